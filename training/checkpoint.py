"""Checkpoints and run-directory conventions.

    RUN_DIR/
      config.yaml                  the resolved config, written before step 0
      ds_config.json               the DeepSpeed config generated from it
      checkpoints/
        latest                     text: the tag of the newest COMPLETE checkpoint
        step_00000400/             DeepSpeed's sharded files for this tag, plus
          rank_00000.pt ...        each rank's own state (RNG), written by that rank
          COMPLETE                 written by rank 0 after every rank's files are on disk
      samples/                     sample grids from eval
      export/                      `latentforge export` output

A checkpoint is whole or absent (DESIGN.md guarantee 5): every rank writes its shards,
all ranks meet at a barrier, then rank 0 writes COMPLETE and moves `latest` with an
atomic rename. A crash anywhere before that leaves the previous `latest` in place; the
half-written directory is ignored and removed by the next save. The last K complete
checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from latentforge.training import dist

CKPT = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8})$")


def ckpt_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CKPT


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(run_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    tags = [p.name for p in d.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def latest_tag(run_dir: Path) -> str | None:
    """The tag `latest` names if it is complete; otherwise the newest complete tag."""
    d = ckpt_dir(run_dir)
    p = d / LATEST
    if p.is_file():
        tag = p.read_text().strip()
        if (d / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(run_dir)
    return tags[-1] if tags else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


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


def save(engine: Any, run_dir: Path, step: int, client_state: dict[str, Any], keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag."""
    d = ckpt_dir(run_dir)
    tag = tag_for(step)
    t0 = time.monotonic()
    if dist.is_main():
        d.mkdir(parents=True, exist_ok=True)
        if (d / tag).exists():  # a half-written save from a crashed attempt at this step
            shutil.rmtree(d / tag)
    dist.barrier()
    engine.save(d, tag, client_state)
    rank_file = d / tag / f"rank_{dist.rank():05d}.pt"
    tmp = rank_file.with_name(f".{rank_file.name}.tmp")
    torch.save({"rng": rng_state(), "rank": dist.rank(), "world_size": dist.world_size()}, tmp)
    os.replace(tmp, rank_file)
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        _atomic_write(d / tag / COMPLETE, json.dumps({"step": step, "world_size": dist.world_size(),
                                                       "time": time.time()}))
        _atomic_write(d / LATEST, tag)
        prune(run_dir, keep_last)
    dist.barrier()
    dist.print0(f"[checkpoint] saved {d / tag} in {time.monotonic() - t0:.1f}s")
    return tag


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; remove older ones and any
    incomplete directory older than `latest`."""
    d = ckpt_dir(run_dir)
    tags = complete_tags(run_dir)
    keep = set(tags[-keep_last:]) if keep_last > 0 else set(tags)
    latest = latest_tag(run_dir)
    for p in d.iterdir():
        if not _TAG.match(p.name) or p.name in keep or p.name == latest:
            continue
        if (p / COMPLETE).is_file() or (latest is not None and p.name < latest):
            shutil.rmtree(p, ignore_errors=True)


def load(engine: Any, run_dir: Path, tag: str) -> dict[str, Any]:
    """Load weights, optimizer and client state; restore this rank's RNG if it was saved
    with the same world size. Returns the client state."""
    d = ckpt_dir(run_dir)
    client = engine.load(d, tag)
    rank_file = d / tag / f"rank_{dist.rank():05d}.pt"
    meta = json.loads((d / tag / COMPLETE).read_text())
    if rank_file.is_file() and meta.get("world_size") == dist.world_size():
        set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
    return client


def consolidated_weights(run_dir: Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 module weights, client state) of a checkpoint, for export and eval, in one
    process without DeepSpeed's engine. Works for every ZeRO stage."""
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir(run_dir)}: no complete checkpoint")
    d = ckpt_dir(run_dir) / tag
    states_file = d / "mp_rank_00_model_states.pt"
    if not states_file.is_file():  # ZeRO-3 names it per data-parallel rank
        states_file = d / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    states = torch.load(states_file, map_location="cpu", weights_only=False)
    client = {k: v for k, v in states.items() if k not in ("module", "optimizer", "lr_scheduler",
                                                           "param_shapes", "frozen_param_shapes",
                                                           "shared_params", "frozen_param_fragments",
                                                           "buffer_names")}
    if list(d.glob("*zero_pp_rank_*optim_states.pt")):
        from latentforge.training.engine import consolidated_state_dict

        weights = consolidated_state_dict(ckpt_dir(run_dir), tag)
    else:  # ZeRO stage 0: the module states file holds the weights
        weights = {k: v.float().clone() for k, v in states["module"].items()}
    return weights, client
