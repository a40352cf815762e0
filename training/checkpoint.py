"""Checkpoints and run-directory conventions.

    RUN_DIR/
      config.yaml                  the resolved config, written before step 0
      ds_config.json               the DeepSpeed config generated from it
      SAVE_NOW                     (touch it) checkpoint at the next step boundary and go on
      checkpoints/
        latest                     text: the tag of the newest COMPLETE checkpoint
        step_00000400/             DeepSpeed's sharded files for this tag, plus
          rank_00000.pt ...        each rank's own state (RNG), written by that rank
          COMPLETE                 JSON: step, world size, ZeRO stage, and every file of the
                                   folder with its size and content hash (training/ckpt_layout.py),
                                   written by rank 0 after every rank's files are on disk
        step_00000400_universal/   the same checkpoint in DeepSpeed's universal form (made when
          zero/ ... COMPLETE       a run resumes with a different world size, or by
                                   `latentforge ckpt universal`)
        step_00000200.corrupt/     a damaged checkpoint, renamed aside by a resume (never deleted)
        load_universal             text: a universal tag the next start-up loads, once
      samples/                     sample grids from eval
      export/                      `latentforge export` output

A checkpoint is whole or absent (docs/guarantees.md, 5): every rank writes its shards,
hashing and fsyncing each file as it is written, all ranks meet and gather what they
wrote, then rank 0 writes COMPLETE (the file list) and moves `latest` with an atomic,
fsynced rename. A crash anywhere before that leaves the previous `latest` in place; the
half-written directory is ignored, and removed at the next start-up (`clean_partial`) or
by the next save of that step.

A resume trusts nothing it has not checked (`prepare_resume`): every rank checks the
files it will read against COMPLETE (sizes always, content hashes with
train.verify_checkpoints), the ranks agree, and a damaged checkpoint is renamed aside
while the resume falls back to the newest intact one. `keep_last` counts intact
checkpoints only, so pruning never removes the newest intact one. docs/checkpoints.md
has the details.

Resume with a different world size (ZeRO 1-3 partition the optimizer state by rank) goes
through a universal checkpoint: converted once, loaded once with DeepSpeed's
`load_universal`, after which the flag is gone and the run writes ordinary checkpoints.
"""

from __future__ import annotations

import os
import pickle
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentforge import dist
from latentforge.config import AbortError
from latentforge.fileio import atomic_write, fsync_dir, fsync_path
from latentforge.hashing import HashingWriter
from latentforge.log import get_logger
from latentforge.training.ckpt_layout import (  # noqa: F401  (re-exported: the conventions callers use)
    CKPT,
    COMPLETE,
    CORRUPT,
    LATEST,
    SAVE_NOW,
    TAG_RE,
    UNIVERSAL_FLAG,
    UNIVERSAL_SUFFIX,
    UTAG_RE,
    check,
    check_files,
    ckpt_dir,
    complete_tags,
    describe,
    latest_name,
    latest_tag,
    meta,
    read_record,
    record,
    rename_aside,
    tag_for,
    universal_tag,
)
from latentforge.training.state import TrainState

log = get_logger("checkpoint")

# While rank 0 checks and converts a checkpoint to its universal form (for a large one this
# outlasts train.collective_timeout_s), the other ranks wait on this file, not inside a
# collective: rank 0 rewrites a counter in it every few seconds, then writes "done".
HEARTBEAT = ".universal_heartbeat"

def rng_state() -> dict[str, Any]:
    """This process's RNG states in a weights-only loadable form (tensors, ints, floats)."""
    import random

    import numpy as np

    version, py_state, gauss = random.getstate()  # (3, 625 ints, None or float)
    _, keys, pos, has_gauss, cached = np.random.get_state()  # ("MT19937", uint32 (624,), int, int, float)
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def load_file(path: Path) -> Any:
    """torch.load of a checkpoint or run file latentforge wrote: weights only (tensors and
    plain containers; nothing in it can run code). A file that holds anything else is
    refused with one line naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise ValueError(f"{path}: refused: holds objects other than tensors and plain containers "
                         f"({first.strip()[:200] or 'not a weights-only file'})") from None


# ---------------------------------------------------------------------------------------
# Saving.


def save(engine: Any, run_dir: Path, state: TrainState, keep_last: int) -> str:
    """Collective: every rank calls it with its own state. Returns the tag."""
    d = ckpt_dir(run_dir)
    step = state.step
    tag = tag_for(step)
    folder = d / tag
    t0 = time.monotonic()
    if dist.is_main():
        d.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # a half-written save from a crashed attempt at this step
            shutil.rmtree(folder)
    dist.barrier()
    # Every rank: DeepSpeed's files and this rank's own, each hashed and fsynced as written.
    written = engine.save(d, tag, state.state_dict())
    rank_name = f"rank_{dist.rank():05d}.pt"
    with HashingWriter(folder / rank_name) as f:
        torch.save({"rng": rng_state(), "rank": dist.rank(), "world_size": dist.world_size()}, f)
    written[rank_name] = {"size": f.size, "hash": f.hexdigest()}
    fsync_dir(folder)  # this rank's directory entries
    # Every rank's files are on disk; rank 0 learns what each wrote.
    gathered = dist.all_gather_object({name: {**v, "rank": dist.rank()} for name, v in written.items()})
    if dist.is_main():
        known = {name: v for per_rank in gathered for name, v in per_rank.items()}
        files = describe(folder, known)  # anything no rank hashed as it wrote it is hashed now
        atomic_write(folder / COMPLETE, record(files, step=step, world_size=dist.world_size(),
                                               zero_stage=engine.cfg.train.zero_stage, time=time.time(),
                                               dataset=(state.loader or {}).get("dataset")),
                     fsync=True)
        atomic_write(d / LATEST, tag, fsync=True)  # also makes the tag folder's entry in d durable
        prune(run_dir, keep_last)
    dist.barrier()
    log.info(f"saved {folder} in {time.monotonic() - t0:.1f}s")
    return tag


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder so that a crash midway leaves no half-deleted checkpoint
    under its name: rename it to a hidden temporary name first (clean_partial removes those)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.replace(folder, tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` intact checkpoints (sizes checked against COMPLETE) and
    `latest`; remove older intact ones and universal copies no start-up will load any more.
    A damaged checkpoint is never removed and does not count: while a newer one is
    damaged, the newest intact one stays. Folders renamed aside and folders without
    COMPLETE are left alone (clean_partial removes crashed saves)."""
    d = ckpt_dir(run_dir)
    latest = latest_tag(run_dir)
    pending = pending_universal(run_dir)
    for p in d.iterdir():
        # Needed only while its base is still `latest` (a resume may yet load it).
        if UTAG_RE.match(p.name) and p.name != pending and p.name[: -len(UNIVERSAL_SUFFIX)] != latest:
            _remove(p)
    kept = 0
    for tag in reversed(complete_tags(run_dir)):
        status = check(d / tag, hashes=False)
        if not status.ok:
            log.warning(f"checkpoint {d / tag} is damaged ({'; '.join(status.problems)}); kept, not counted "
                        f"in train.keep_last")
            continue
        if keep_last <= 0 or kept < keep_last or tag == latest:
            kept += 1
            continue
        _remove(d / tag)


def clean_partial(run_dir: Path) -> list[str]:
    """Remove what crashed saves and conversions left: checkpoint directories without
    COMPLETE that are newer than `latest` (a folder `latest` names, or an older one, has
    lost its marker: that is damage, handled by `prepare_resume`) and hidden temporary
    folders. Call on rank 0 at start-up, when no save is running. Returns the names removed."""
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    latest = latest_name(run_dir)
    removed = []
    for p in d.iterdir():
        partial = TAG_RE.match(p.name) and not (p / COMPLETE).is_file() and (latest is None or p.name > latest)
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


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*"), reverse=True):  # files before the directories holding them
        fsync_path(p)
    fsync_path(folder)


def make_universal(run_dir: Path, tag: str | None = None, hashes: bool = True) -> str:
    """Convert checkpoint `tag` (default: latest) to its universal form and flag it for the
    next start-up. One process; idempotent. The source is checked first (the converter
    reads every file); the universal folder gets its own COMPLETE with its file list and
    appears under its name only when whole and fsynced. Returns the universal tag."""
    from latentforge.training.engine import to_universal

    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir(run_dir)}: no complete checkpoint to convert")
    src = ckpt_dir(run_dir) / tag
    if not (src / COMPLETE).is_file():
        raise FileNotFoundError(f"{src}: not a complete checkpoint")
    status = check(src, hashes)
    if not status.ok:
        raise ValueError(f"{src}: damaged, not converted: {status.problems[0]}")
    utag = universal_tag(tag)
    dst = ckpt_dir(run_dir) / utag
    if not (dst / COMPLETE).is_file():
        if dst.exists():  # COMPLETE is written before the folder gets its name: this one lost it
            log.warning(f"{dst} has no COMPLETE (damaged); renamed aside to {rename_aside(dst).name}")
        t0 = time.monotonic()
        log.info(f"converting {src} to a universal checkpoint (DeepSpeed ds_to_universal)")
        tmp = dst.with_name(f".{utag}.tmp")
        to_universal(src, tmp)
        info = {k: v for k, v in meta(run_dir, tag).items() if k not in ("files", "hash", "format")}
        atomic_write(tmp / COMPLETE, record(describe(tmp), **info, universal_of=tag))
        _fsync_tree(tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
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
    fallback: list[str] = field(default_factory=list)  # newer checkpoints skipped as damaged, one line each

    def fallback_tags(self) -> dict[str, str]:
        """MLflow tags recording a resume that skipped damaged checkpoints: `checkpoint_fallback`
        and the run's note (`mlflow.note.content`, its description in the UI)."""
        if not self.fallback:
            return {}
        lines = "\n".join(f"- {line}" for line in self.fallback)
        return {"checkpoint_fallback": f"resumed from {self.tag}; skipped {len(self.fallback)} damaged",
                "mlflow.note.content": f"{time.strftime('%Y-%m-%d %H:%M:%S')}: resumed from {self.tag} because "
                                       f"newer checkpoints were damaged (renamed aside to *.corrupt):\n{lines}"}


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


def files_read(run_dir: Path, plan: ResumePlan, world_size: int) -> list[tuple[str, str]]:
    """(folder name, file) of every file a load of `plan` reads, on some rank: DeepSpeed's
    files of the loaded folder, the rank files when the world size is the saved one, and
    under a universal load the base's model-states files (the EMA's shards). Unlisted
    files (a record without a file list) are not checked."""
    d = ckpt_dir(run_dir)
    base = read_record(d / plan.tag).get("files", {})
    same_world = meta(run_dir, plan.tag).get("world_size") == world_size
    out = [(plan.tag, n) for n in base if n.startswith("rank_") and same_world]
    if plan.universal:
        out += [(plan.load_tag, n) for n in read_record(d / plan.load_tag).get("files", {})]
        out += [(plan.tag, n) for n in base if n.endswith("model_states.pt")]
    else:
        out += [(plan.tag, n) for n in base if not n.startswith("rank_")]
    return sorted(set(out))


def _check_share(run_dir: Path, plan: ResumePlan, hashes: bool) -> list[tuple[str, str]]:
    """This rank's part of the collective check: the size of every file the load reads;
    with `hashes`, the content of every world_size-th of them (the ranks share the reading)."""
    d = ckpt_dir(run_dir)
    todo = files_read(run_dir, plan, dist.world_size())
    problems = []
    for folder in sorted({f for f, _ in todo}):
        names = [n for f, n in todo if f == folder]
        mine = [n for i, (f, n) in enumerate(todo) if f == folder and i % dist.world_size() == dist.rank()]
        files = read_record(d / folder).get("files", {})
        problems += [(folder, p) for p in check_files(d / folder, files, names, mine if hashes else ())]
    return problems


def _lost_marker(run_dir: Path) -> list[tuple[str, str]]:
    """The folder `latest` names, or the universal folder the flag names, when it exists
    without COMPLETE: its marker was lost after it was written (damage, not a crashed save)."""
    d = ckpt_dir(run_dir)
    names = [latest_name(run_dir)]
    flag = d / UNIVERSAL_FLAG
    names.append(flag.read_text().strip() if flag.is_file() else None)
    return [(n, "COMPLETE: missing (the folder was complete when `latest` or the flag named it)")
            for n in names if n and (d / n).is_dir() and not (d / n / COMPLETE).is_file()]


def prepare_resume(run_dir: Path, world_size: int, zero_stage: int, hashes: bool = True,
                   timeout_s: float = 600.0) -> ResumePlan | None:
    """Collective. Choose the newest intact checkpoint and make it loadable.

    Rank 0 removes crashed saves. Then, from the newest checkpoint down: when the plan
    needs a universal form that is not there, rank 0 checks the source and converts it
    while the other ranks wait on its heartbeat file for as long as it beats (`_convert`:
    the conversion itself may take longer than train.collective_timeout_s, `timeout_s`,
    which bounds only a silence of rank 0; `latentforge ckpt universal RUN_DIR` converts
    ahead of time); every rank checks
    the files the load will read (sizes; content hashes with `hashes`, the ranks sharing
    the files) and the ranks agree. A damaged folder is renamed aside with one warning
    line and the next older checkpoint is tried; `latest` is repointed to the one chosen.
    No intact checkpoint left after damage: AbortError on every rank."""
    d = ckpt_dir(run_dir)
    if dist.is_main():
        for name in clean_partial(run_dir):
            log.info(f"removed incomplete {d / name} (a crashed save)")
        (d / HEARTBEAT).unlink(missing_ok=True)  # an earlier job's
    dist.barrier()
    fallback: list[str] = []
    while True:
        plan = plan_resume(run_dir, world_size, zero_stage)  # every rank: a bad resume fails everywhere
        problems = _lost_marker(run_dir)
        convert = (plan is not None and not problems and plan.universal
                   and not (d / plan.load_tag / COMPLETE).is_file())
        dist.barrier()  # every rank has read the folder's state before rank 0 changes it
        if convert:
            problems = _convert(run_dir, plan, hashes, timeout_s)
        if plan is not None and not problems:
            problems = sorted({p for per_rank in dist.all_gather_object(_check_share(run_dir, plan, hashes))
                               for p in per_rank})  # every rank checks sizes: one line per problem
        if not problems:
            break
        dist.barrier()  # every rank is done reading before rank 0 renames
        if dist.is_main():
            for folder in sorted({f for f, _ in problems}):
                why = "; ".join(p for f, p in problems if f == folder)
                aside = rename_aside(d / folder)
                if UTAG_RE.match(folder):
                    drop_universal_flag(run_dir)
                fallback.append(f"{folder}: {why}")
                log.warning(f"checkpoint {d / folder} is damaged ({why}); renamed aside to {aside.name}, "
                            f"resuming from an older one")
            fsync_dir(d)
        dist.barrier()
    if plan is None:
        aside = sorted(p.name for p in d.glob(f"*{CORRUPT}*")) if d.is_dir() else []
        if aside:
            err = AbortError(f"{d}: no intact checkpoint left (damaged, renamed aside: {', '.join(aside)}); "
                             f"move them out of {d} to start this run over from step 0")
            err.agreed = True  # every rank raises it: the CLI says it once
            raise err
        return None
    if dist.is_main() and latest_name(run_dir) != plan.tag:
        atomic_write(d / LATEST, plan.tag, fsync=True)
    plan.fallback = fallback
    return plan


def _convert(run_dir: Path, plan: ResumePlan, hashes: bool, timeout_s: float) -> list[tuple[str, str]]:
    """Collective. Rank 0 checks the source of the universal form `plan` loads and converts
    it, beating HEARTBEAT; the other ranks wait on that file (`wait_for_main`) rather than
    in a collective bounded by `timeout_s`, then every rank learns the outcome. Returns the
    source's problems (then nothing was converted), the same on every rank."""
    result: Any = []
    beat = ckpt_dir(run_dir) / HEARTBEAT
    what = f"checking and converting {ckpt_dir(run_dir) / plan.tag} to its universal form"
    # Several beats and polls within one timeout, whatever the timeout: a beat as slow as the
    # timeout would let a late beat (a loaded machine) read as a dead rank 0, and a slow poll
    # would keep rank 0 waiting in the broadcast below for most of its own timeout.
    tick = min(2.0, timeout_s / 8)
    if dist.is_main():
        with Heartbeat(beat, what, beat_s=tick):
            status = check(ckpt_dir(run_dir) / plan.tag, hashes)
            if not status.ok:
                result = [(plan.tag, p) for p in status.problems]
            else:
                try:
                    make_universal(run_dir, plan.tag, hashes=False)  # just checked
                except Exception as e:  # the other ranks learn it from the broadcast: one line
                    result = f"converting {plan.tag} to its universal form failed: {e}"
    else:
        wait_for_main(beat, timeout_s, what, poll_s=tick)
    result = dist.broadcast_object(result)
    if dist.is_main():
        beat.unlink(missing_ok=True)  # every rank is past its wait: a next conversion starts afresh
    if isinstance(result, str):
        raise AbortError(result)
    return result


class Heartbeat:
    """Rank 0's sign of life for ranks that wait on the file system: while the block runs,
    a counter rewritten in `path` every `beat_s` (and a progress line every `progress_s`);
    at its end, "done"."""

    def __init__(self, path: Path, what: str, beat_s: float = 2.0, progress_s: float = 30.0):
        self.path, self.what, self.beat_s, self.progress_s = Path(path), what, beat_s, progress_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="latentforge-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.t0 = time.monotonic()
        atomic_write(self.path, "0")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        atomic_write(self.path, "done")

    def _beat(self) -> None:
        n, last_log = 0, self.t0
        while not self._stop.wait(self.beat_s):
            n += 1
            atomic_write(self.path, str(n))
            if time.monotonic() - last_log >= self.progress_s:
                last_log = time.monotonic()
                log.info(f"{self.what}: {last_log - self.t0:.0f} s so far (the other ranks wait)")


def wait_for_main(path: Path, timeout_s: float, what: str, poll_s: float = 1.0) -> None:
    """Block until rank 0's `Heartbeat` at `path` says "done". Raises AbortError when the
    heartbeat has not changed for `timeout_s`: rank 0 died or hangs."""
    last: str | None = None
    changed = time.monotonic()
    while True:
        try:
            beat = path.read_text()
        except FileNotFoundError:  # not started yet
            beat = None
        if beat == "done":
            return
        now = time.monotonic()
        if beat != last:
            last, changed = beat, now
        elif now - changed > timeout_s:
            raise AbortError(f"rank 0 showed no progress {what} for {timeout_s:.0f} s "
                             f"(train.collective_timeout_s): it died or hangs")
        time.sleep(poll_s)  # a file poll: rank 0 is busy, there is nothing else to do


def _load_rng(rank_file: Path) -> None:
    try:
        st = load_file(rank_file)["rng"]
        set_rng_state(st)
    except (ValueError, KeyError, TypeError) as e:  # e.g. an older latentforge's pickled numpy state
        log.warning(f"{rank_file}: RNG state not restored ({str(e).splitlines()[0][:200]}); the run continues, "
                    f"not bitwise equal to an uninterrupted one")


def load(engine: Any, run_dir: Path, plan: ResumePlan) -> TrainState:
    """Load weights, optimizer and train state; restore this rank's RNG if it was saved
    with the same world size. Collective. Returns this rank's train state."""
    d = ckpt_dir(run_dir)
    client = TrainState.from_state_dict(engine.load(d, plan.load_tag, universal=plan.universal))
    rank_file = d / plan.tag / f"rank_{dist.rank():05d}.pt"
    if rank_file.is_file() and meta(run_dir, plan.tag).get("world_size") == dist.world_size():
        _load_rng(rank_file)
    if plan.universal:
        dist.barrier()  # every rank has loaded it: the flag has done its one job
        if dist.is_main():
            drop_universal_flag(run_dir)
    return client


# ---------------------------------------------------------------------------------------
# Reading checkpoints in one process (export, eval, tests).


def model_states_file(d: Path) -> Path:
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
    states = [load_file(f).get("ema") for f in _states_files(d)]
    if any(st is None for st in states):
        raise ValueError(f"{d}: a checkpoint without EMA state (ema.enabled was false)")
    return assemble(states)


def check_readable(run_dir: Path, tag: str, hashes: bool = True) -> None:
    """Before reading a checkpoint in one process (export, eval): every file it reads (all
    but the rank files) must match COMPLETE. A damaged file: ValueError, one line naming
    it. A record without a file list (an older latentforge) is read unchecked."""
    folder = ckpt_dir(run_dir) / tag
    if not (folder / COMPLETE).is_file():
        raise FileNotFoundError(f"{folder}: not a complete checkpoint (no {COMPLETE})")
    files = read_record(folder).get("files")
    if files is None:
        return
    names = [n for n in files if not n.startswith("rank_")]
    problems = check_files(folder, files, names, names if hashes else ())
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{folder}: damaged checkpoint: {problems[0]}{more}; `latentforge ckpt verify "
                         f"{Path(run_dir)}` lists every checkpoint's state")


def _read_state(run_dir: Path, tag: str | None, verify: bool = True) -> tuple[str, dict[str, Any], TrainState]:
    """(tag, rank 0's model-states dict, its TrainState with the EMA whole: assembled from
    every rank's shard under ZeRO-3), after checking the files (`verify`)."""
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir(run_dir)}: no complete checkpoint")
    if verify:
        check_readable(run_dir, tag)
    states = load_file(model_states_file(ckpt_dir(run_dir) / tag))
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
        # zero_to_fp32 rebuilds what the optimizer holds; below ZeRO-3 the module states hold the
        # rest whole (ZeRO-1 records no frozen parameters: a LoRA run's base U-Net).
        for k, v in (states.get("module") or {}).items():
            if k not in weights and v.numel():
                weights[k] = v.float().clone()
    else:  # ZeRO stage 0: the module states file holds the weights
        weights = {k: v.float().clone() for k, v in states["module"].items()}
    return weights, state
