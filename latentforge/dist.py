"""A tiny distributed helper: rank, world size, device, reductions (logging is latentforge/log.py).

Defaults to one process when torch.distributed is not initialised, so every function
here is safe to call from single-process tools and tests. This module and
`training/engine.py` are the only places that know about devices and backends: CUDA
gets NCCL, CPU gets gloo. Model code never imports torch.distributed.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from latentforge.env import bind_gloo_interface
from latentforge.log import get_logger

log = get_logger("dist")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """The one place that picks a device: this rank's GPU if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if device().type == "cuda" else "gloo"


def init(timeout_s: float = 600.0) -> None:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT.

    A no-op for a single process without those variables. `timeout_s` bounds every
    collective, so a dead rank makes the others fail instead of hanging (docs/guarantees.md,
    guarantee 6). NCCL honours it only with async error handling, which we turn on.
    """
    if is_initialized() or int(os.environ.get("WORLD_SIZE", 1)) <= 1 and "MASTER_ADDR" not in os.environ:
        return
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    bind_gloo_interface()  # a job across nodes: gloo on the interface that reaches the master
    if device().type == "cuda":
        torch.cuda.set_device(device())
    dist.init_process_group(backend=backend(), timeout=datetime.timedelta(seconds=timeout_s))


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity for one process). Returns `t`."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank. Collective: every rank must call it."""
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    return bool(all_reduce_max(t).item() > 0)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list for one process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    """Leave the process group (local: no collective). Called on the way out, errors
    included, so a failure to tear down is not a second error."""
    if is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # e.g. a backend already broken by a lost peer
            log.debug(f"destroy_process_group: {e}")

