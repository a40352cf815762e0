"""Checkpoints and run-directory conventions.

    RUN_DIR/
      config.yaml                  the resolved config, written before step 0
      ds_config.json               the DeepSpeed config generated from it
      SAVE_NOW                     (touch it) checkpoint at the next step boundary and go on
      checkpoints/
        latest                     text: the tag of the newest COMPLETE checkpoint
        step_00000400/             DeepSpeed's sharded files for this tag, plus
          rank_00000.pt ...        each rank's own state (RNG), written by that rank
          COMPLETE                 JSON {step, world_size, zero_stage, time}, written by rank 0
                                   after every rank's files are on disk
        step_00000400_universal/   the same checkpoint in DeepSpeed's universal form (made when
          zero/ ... COMPLETE       a run resumes with a different world size, or by
                                   `latentforge ckpt universal`)
        load_universal             text: a universal tag the next start-up loads, once
      samples/                     sample grids from eval
      export/                      `latentforge export` output

A checkpoint is whole or absent (DESIGN.md guarantee 5): every rank writes its shards,
all ranks meet at a barrier, then rank 0 writes COMPLETE and moves `latest` with an
atomic rename. A crash anywhere before that leaves the previous `latest` in place; the
half-written directory is ignored, and removed at the next start-up (`clean_partial`) or
by the next save of that step. The last K complete checkpoints are kept.

Resume with a different world size (ZeRO 1-3 partition the optimizer state by rank) goes
through a universal checkpoint: converted once, loaded once with DeepSpeed's
`load_universal`, after which the flag is gone and the run writes ordinary checkpoints.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentforge import dist
from latentforge.config import AbortError
from latentforge.fileio import atomic_open, atomic_write
from latentforge.log import get_logger
from latentforge.training.ckpt_layout import (  # noqa: F401  (re-exported: the conventions callers use)
    CKPT,
    COMPLETE,
    LATEST,
    SAVE_NOW,
    TAG_RE,
    UNIVERSAL_FLAG,
    UNIVERSAL_SUFFIX,
    UTAG_RE,
    ckpt_dir,
    complete_tags,
    latest_tag,
    meta,
    tag_for,
    universal_tag,
)
from latentforge.training.state import TrainState

log = get_logger("checkpoint")

# While rank 0 converts a checkpoint to its universal form, the other ranks watch these
# files instead of waiting in a collective (see prepare_resume).
HEARTBEAT = ".universal_heartbeat"  # a counter rank 0 rewrites every few seconds while converting
CONVERT_FAILED = ".universal_failed"  # rank 0's one-line error when the conversion failed

def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# ---------------------------------------------------------------------------------------
# Saving.


def save(engine: Any, run_dir: Path, state: TrainState, keep_last: int) -> str:
    """Collective: every rank calls it with its own state. Returns the tag."""
    d = ckpt_dir(run_dir)
    step = state.step
    tag = tag_for(step)
    t0 = time.monotonic()
    if dist.is_main():
        d.mkdir(parents=True, exist_ok=True)
        if (d / tag).exists():  # a half-written save from a crashed attempt at this step
            shutil.rmtree(d / tag)
    dist.barrier()
    engine.save(d, tag, state.state_dict())
    with atomic_open(d / tag / f"rank_{dist.rank():05d}.pt") as f:
        torch.save({"rng": rng_state(), "rank": dist.rank(), "world_size": dist.world_size()}, f)
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        atomic_write(d / tag / COMPLETE, json.dumps({"step": step, "world_size": dist.world_size(),
                                                     "zero_stage": engine.cfg.train.zero_stage,
                                                     "time": time.time()}), fsync=True)
        atomic_write(d / LATEST, tag, fsync=True)
        prune(run_dir, keep_last)
    dist.barrier()
    log.info(f"saved {d / tag} in {time.monotonic() - t0:.1f}s")
    return tag


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; remove older ones, any incomplete
    directory older than `latest`, and universal copies no start-up will load any more."""
    d = ckpt_dir(run_dir)
    tags = complete_tags(run_dir)
    keep = set(tags[-keep_last:]) if keep_last > 0 else set(tags)
    latest = latest_tag(run_dir)
    pending = pending_universal(run_dir)
    for p in d.iterdir():
        if UTAG_RE.match(p.name):
            # Needed only while its base is still `latest` (a resume may yet load it).
            if p.name != pending and p.name[: -len(UNIVERSAL_SUFFIX)] != latest:
                shutil.rmtree(p, ignore_errors=True)
            continue
        if not TAG_RE.match(p.name) or p.name in keep or p.name == latest:
            continue
        if (p / COMPLETE).is_file() or (latest is not None and p.name < latest):
            shutil.rmtree(p, ignore_errors=True)


def clean_partial(run_dir: Path) -> list[str]:
    """Remove what crashed saves and conversions left: checkpoint directories without
    COMPLETE and temporary conversion folders. Call on rank 0 at start-up, when no save is
    running. Returns the names removed."""
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    removed = []
    for p in d.iterdir():
        partial = (TAG_RE.match(p.name) or UTAG_RE.match(p.name)) and not (p / COMPLETE).is_file()
        if partial or (p.is_dir() and p.name.startswith(".") and p.name.endswith(".tmp")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return sorted(removed)


# ---------------------------------------------------------------------------------------
# Resuming.


def pending_universal(run_dir: Path) -> str | None:
    """The universal tag the next start-up must load (set by `make_universal`), if any."""
    p = ckpt_dir(run_dir) / UNIVERSAL_FLAG
    if not p.is_file():
        return None
    utag = p.read_text().strip()
    return utag if (ckpt_dir(run_dir) / utag / COMPLETE).is_file() else None


def make_universal(run_dir: Path, tag: str | None = None) -> str:
    """Convert checkpoint `tag` (default: latest) to its universal form and flag it for the
    next start-up. One process; idempotent. Returns the universal tag."""
    from latentforge.training.engine import to_universal

    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir(run_dir)}: no complete checkpoint to convert")
    src = ckpt_dir(run_dir) / tag
    if not (src / COMPLETE).is_file():
        raise FileNotFoundError(f"{src}: not a complete checkpoint")
    utag = universal_tag(tag)
    dst = ckpt_dir(run_dir) / utag
    if not (dst / COMPLETE).is_file():
        t0 = time.monotonic()
        log.info(f"converting {src} to a universal checkpoint (DeepSpeed ds_to_universal)")
        to_universal(src, dst)
        atomic_write(dst / COMPLETE, json.dumps({**meta(run_dir, tag), "universal_of": tag}), fsync=True)
        log.info(f"universal checkpoint {dst} written in {time.monotonic() - t0:.1f}s")
    atomic_write(ckpt_dir(run_dir) / UNIVERSAL_FLAG, utag, fsync=True)
    return utag


def drop_universal_flag(run_dir: Path) -> None:
    (ckpt_dir(run_dir) / UNIVERSAL_FLAG).unlink(missing_ok=True)


@dataclass
class ResumePlan:
    tag: str  # the checkpoint resumed from
    load_tag: str  # what DeepSpeed loads: `tag`, or its universal form
    universal: bool
    reason: str  # why universal (for the log), "" otherwise


def plan_resume(run_dir: Path, world_size: int, zero_stage: int) -> ResumePlan | None:
    """How this start-up resumes, or None for a fresh run. Not collective; every rank gets
    the same answer from the same files (after rank 0 converted, see `prepare_resume`)."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    m = meta(run_dir, tag)
    saved_world, saved_stage = int(m.get("world_size", world_size)), int(m.get("zero_stage", zero_stage))
    if saved_stage != zero_stage and {saved_stage, zero_stage} != {1, 2}:
        # Stage 0 keeps one unpartitioned optimizer state; ZeRO-3 names its files per rank,
        # which DeepSpeed's universal load for stages 1-2 does not read (and vice versa).
        from latentforge.config import ConfigError

        raise ConfigError(f"train.zero_stage: {run_dir / CKPT / tag} was saved with ZeRO stage {saved_stage}; "
                          f"it resumes with stage {saved_stage} (a change is possible between stages 1 and 2 only)")
    changed = ""
    if saved_stage and (saved_world != world_size or saved_stage != zero_stage):
        changed = (f"saved with world size {saved_world} and ZeRO stage {saved_stage}, "
                   f"now {world_size} and {zero_stage}")
    if pending_universal(run_dir) == universal_tag(tag):
        return ResumePlan(tag, universal_tag(tag), True, changed or "flagged by `latentforge ckpt universal`")
    if changed:  # ZeRO 1-3 partition the optimizer state by rank: re-partition through universal
        return ResumePlan(tag, universal_tag(tag), True, changed)
    # Same layout, or ZeRO stage 0 (one unpartitioned optimizer state loads at any world size).
    return ResumePlan(tag, tag, False, "")


def prepare_resume(run_dir: Path, world_size: int, zero_stage: int, timeout_s: float = 600.0
                   ) -> ResumePlan | None:
    """Collective. Rank 0 removes crashed saves and, when the plan needs it, converts the
    checkpoint to its universal form. The other ranks do not wait for that inside a
    collective, which train.collective_timeout_s (`timeout_s`) bounds while converting a
    large checkpoint may take longer: they watch the file system (`wait_for_conversion`)
    for as long as rank 0 shows it is alive, and stop with rank 0's error if it fails."""
    plan = plan_resume(run_dir, world_size, zero_stage)  # every rank: a bad resume fails everywhere
    d = ckpt_dir(run_dir)
    if dist.is_main():
        for name in clean_partial(run_dir):
            log.info(f"removed incomplete {ckpt_dir(run_dir) / name} (a crashed save)")
        for marker in (HEARTBEAT, CONVERT_FAILED):
            (d / marker).unlink(missing_ok=True)
    dist.barrier()  # an earlier attempt's markers are gone before anyone reads them
    if plan is not None and plan.universal:
        if dist.is_main():
            _convert_with_heartbeat(run_dir, plan.tag)
        else:
            wait_for_conversion(d, plan.load_tag, timeout_s)
    dist.barrier()
    return plan


def _convert_with_heartbeat(run_dir: Path, tag: str, beat_s: float = 2.0, progress_s: float = 30.0) -> None:
    """`make_universal` on rank 0, rewriting HEARTBEAT every `beat_s` (and logging progress)
    while it runs; on failure CONVERT_FAILED holds the error for the waiting ranks."""
    d = ckpt_dir(run_dir)
    stop = threading.Event()
    t0 = time.monotonic()

    def beat() -> None:
        n, last_log = 0, t0
        while not stop.wait(beat_s):
            n += 1
            atomic_write(d / HEARTBEAT, str(n))
            if time.monotonic() - last_log >= progress_s:
                last_log = time.monotonic()
                log.info(f"converting {d / tag} to a universal checkpoint: {last_log - t0:.0f} s so far "
                         f"(the other ranks wait)")

    atomic_write(d / HEARTBEAT, "0")
    thread = threading.Thread(target=beat, name="latentforge-universal-heartbeat", daemon=True)
    thread.start()
    try:
        make_universal(run_dir, tag)
    except BaseException as e:
        first = str(e).splitlines()[0] if str(e) else ""
        atomic_write(d / CONVERT_FAILED, f"{type(e).__name__}: {first}")
        raise
    finally:
        stop.set()
        thread.join()


def wait_for_conversion(d: Path, utag: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Block until rank 0 has written the universal checkpoint `utag` in the checkpoint
    directory `d`. Raises AbortError with rank 0's message when its conversion failed, and
    when rank 0's heartbeat has not changed for `timeout_s` (rank 0 died or hangs)."""
    last_beat: str | None = None
    last_change = time.monotonic()
    while not (d / utag / COMPLETE).is_file():
        if (d / CONVERT_FAILED).is_file():
            raise AbortError(f"rank 0 could not convert a checkpoint to {d / utag}: "
                             f"{(d / CONVERT_FAILED).read_text().strip()}")
        try:
            beat = (d / HEARTBEAT).read_text()
        except FileNotFoundError:
            beat = None
        now = time.monotonic()
        if beat != last_beat:
            last_beat, last_change = beat, now
        elif now - last_change > timeout_s:
            raise AbortError(f"rank 0 showed no progress converting {d / utag} for {timeout_s:.0f} s "
                             f"(train.collective_timeout_s): it died or hangs")
        time.sleep(poll_s)  # a file poll: rank 0 is converting, nothing to do meanwhile


def load(engine: Any, run_dir: Path, plan: ResumePlan) -> TrainState:
    """Load weights, optimizer and train state; restore this rank's RNG if it was saved
    with the same world size. Collective. Returns this rank's train state."""
    d = ckpt_dir(run_dir)
    client = TrainState.from_state_dict(engine.load(d, plan.load_tag, universal=plan.universal))
    rank_file = d / plan.tag / f"rank_{dist.rank():05d}.pt"
    if rank_file.is_file() and meta(run_dir, plan.tag).get("world_size") == dist.world_size():
        set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
    if plan.universal:
        dist.barrier()  # every rank has loaded it: the flag has done its one job
        if dist.is_main():
            drop_universal_flag(run_dir)
    return client


# ---------------------------------------------------------------------------------------
# Reading checkpoints in one process (export, eval, tests).


def _model_states_file(d: Path) -> Path:
    f = d / "mp_rank_00_model_states.pt"
    return f if f.is_file() else d / "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3: one per rank


def _states_files(d: Path) -> list[Path]:
    """The model-states files of a checkpoint: one below ZeRO-3, one per rank under it."""
    files = sorted(d.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    return files or [d / "mp_rank_00_model_states.pt"]


def consolidated_ema(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Whole EMA weights of a checkpoint, from every rank's shard under ZeRO-3."""
    from latentforge.training.ema import assemble

    d = ckpt_dir(run_dir) / tag
    states = [torch.load(f, map_location="cpu", weights_only=False).get("ema") for f in _states_files(d)]
    if any(st is None for st in states):
        raise ValueError(f"{d}: a checkpoint without EMA state (ema.enabled was false)")
    return assemble(states)


def _read_state(run_dir: Path, tag: str | None) -> tuple[str, dict[str, Any], TrainState]:
    """(tag, rank 0's model-states dict, its TrainState with the EMA whole: assembled from
    every rank's shard under ZeRO-3)."""
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir(run_dir)}: no complete checkpoint")
    states = torch.load(_model_states_file(ckpt_dir(run_dir) / tag), map_location="cpu", weights_only=False)
    state = TrainState.from_state_dict(states)
    if state.ema and state.ema.get("layout") is not None:
        state.ema = {"updates": state.ema["updates"], "shadow": consolidated_ema(run_dir, tag), "layout": None}
    return tag, states, state


def client_state(run_dir: Path, tag: str | None = None) -> TrainState:
    """The train state (step, loader position, EMA, ...) of a checkpoint (default: latest),
    with the EMA whole."""
    return _read_state(run_dir, tag)[2]


def consolidated_weights(run_dir: Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], TrainState]:
    """(fp32 module weights, train state with the EMA whole) of a checkpoint, for export
    and eval, in one process without DeepSpeed's engine. Works for every ZeRO stage."""
    tag, states, state = _read_state(run_dir, tag)
    d = ckpt_dir(run_dir) / tag
    if list(d.glob("*zero_pp_rank_*optim_states.pt")):
        from latentforge.training.engine import consolidated_state_dict

        weights = consolidated_state_dict(ckpt_dir(run_dir), tag)
    else:  # ZeRO stage 0: the module states file holds the weights
        weights = {k: v.float().clone() for k, v in states["module"].items()}
    return weights, state
