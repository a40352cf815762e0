"""A tiny distributed helper: rank, world size, device, precision, reductions (logging is
latentforge/log.py).

Defaults to one process when torch.distributed is not initialised, so every function
here is safe to call from single-process tools and tests. This module and
`training/engine.py` are the only places that know about devices and backends: CUDA
gets NCCL, CPU gets gloo. Model code never imports torch.distributed.

The decisions made here, in one place:

- **which GPU** (`cuda_ordinal`): a rank that sees all of its node's GPUs takes GPU
  LOCAL_RANK (torchrun, srun without binding); a task that sees exactly one GPU, chosen
  for it (srun --gpus-per-task=1, --gpu-bind, a site default), takes it whatever its
  LOCAL_RANK: there "GPU LOCAL_RANK" is an invalid ordinal; more ranks on a node than
  visible GPUs is refused, naming both counts (`LOCAL_RANK % count` put two ranks on one
  GPU, and NCCL failed later). DeepSpeed is told the same GPU (training/engine.py,
  `bind_device_env`);
- **which training precision** (`train_precision`): `auto` is bf16 on a GPU with native
  bf16 (compute capability 8.0+), fp16 with dynamic loss scaling on older GPUs (V100,
  T4: their tensor cores run fp16; emulated bf16 is slower than fp32), fp32 on CPUs
  (bf16 matmuls are slower than fp32 there);
- **which encoder dtype** (`compute_dtype`): `auto` is bf16 on a GPU with native bf16,
  else fp32 (never fp16: the SD VAE overflows in fp16, which is why diffusers upcasts it);
- **autocast for inference** (`autocast`): the training precision on CUDA, nothing on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from latentforge.config import ConfigError
from latentforge.env import bind_gloo_interface
from latentforge.log import get_logger

log = get_logger("dist")

# The launcher's LOCAL_RANK, kept here once `engine.init_distributed` has rewritten LOCAL_RANK
# to the CUDA ordinal (the meaning DeepSpeed gives that name).
NODE_LOCAL_RANK = "LATENTFORGE_NODE_LOCAL_RANK"


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This rank's index among the ranks of its node, as the launcher set it."""
    return int(os.environ.get(NODE_LOCAL_RANK) or os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int | None:
    """Ranks on this node (torchrun/our launcher: LOCAL_WORLD_SIZE, deepspeed: LOCAL_SIZE); None if unknown."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return None


def is_main() -> bool:
    return rank() == 0


def cuda_ordinal(local_rank: int, local_world_size: int | None, device_count: int,
                 visible_devices: str | None) -> int:
    """The CUDA device index this rank uses among the `device_count` GPUs it can see
    (`visible_devices`: CUDA_VISIBLE_DEVICES, None when unset).

    - One visible GPU, chosen for this task (CUDA_VISIBLE_DEVICES set, as SLURM's GPU
      binding does): device 0, whatever LOCAL_RANK is. Under per-task binding every task
      of an 8-task node sees only its own GPU, and LOCAL_RANK 1..7 would be invalid
      ordinals. (Should ranks nevertheless share that GPU, NCCL refuses them at the first
      collective: "Duplicate GPU detected".)
    - Otherwise GPU `local_rank`, provided the node's ranks fit on its visible GPUs; more
      ranks than GPUs is one error naming both counts.
    """
    shown = "<unset>" if visible_devices is None else repr(visible_devices)
    if device_count < 1:
        raise ValueError(f"CUDA is available but no GPU is visible (CUDA_VISIBLE_DEVICES={shown})")
    ranks = local_world_size if local_world_size is not None else local_rank + 1
    if device_count == 1 and visible_devices is not None:
        return 0
    if ranks > device_count or local_rank >= device_count:
        raise ValueError(f"{ranks} ranks on this node but {device_count} visible GPU(s) (local rank {local_rank}, "
                         f"CUDA_VISIBLE_DEVICES={shown}): start at most one rank per GPU "
                         f"(e.g. --ntasks-per-node={device_count}) or bind one GPU per task (--gpus-per-task=1)")
    return local_rank


def device() -> torch.device:
    """The one place that picks a device: this rank's GPU if there is one (`cuda_ordinal`),
    else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", cuda_ordinal(local_rank(), local_world_size(), torch.cuda.device_count(),
                                                 os.environ.get("CUDA_VISIBLE_DEVICES")))
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if device().type == "cuda" else "gloo"


def native_bf16() -> bool:
    """True on a GPU whose hardware computes in bf16 (not emulated: emulation is slower than fp32)."""
    return device().type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def train_precision(requested: str) -> str:
    """`train.precision` for this device: `auto` resolved (see the module docstring); an
    explicit choice the device cannot honour is a one-line error naming the key."""
    cuda = device().type == "cuda"
    if requested == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if native_bf16() else "fp16"
    if requested == "bf16" and cuda and not native_bf16():
        raise ConfigError(f"train.precision: bf16 needs a GPU with native bf16 (compute capability 8.0+); "
                          f"{torch.cuda.get_device_name(device())} has none: use fp16 or auto")
    if requested == "fp16" and not cuda:
        raise ConfigError("train.precision: fp16 (dynamic loss scaling) is for CUDA; use fp32 or bf16 on CPU")
    return requested


def compute_dtype(requested: str, dev: torch.device | str | None = None) -> str:
    """`codec.dtype` / `text.dtype` on `dev` (default: this rank's device): `auto` is bf16
    on a GPU with native bf16, else fp32; other names are returned as they are."""
    if requested != "auto":
        return requested
    dev = device() if dev is None else torch.device(dev)
    if dev.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """Inference (eval) in the training precision: `precision` is train.precision as
    configured. On CUDA, torch.autocast to bf16 where the GPU has it natively, else to fp16
    (a bf16-trained run evaluated on a V100); nothing for fp32, and nothing on CPU, where
    results stay bitwise as without it."""
    if device().type != "cuda":
        return contextlib.nullcontext()
    p = train_precision("auto") if precision == "auto" else precision
    if p == "bf16" and not native_bf16():
        p = "fp16"
    if p not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[p])


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
    import_group_default_users()
    if device().type == "cuda":
        torch.cuda.set_device(device())
    dist.init_process_group(backend=backend(), timeout=datetime.timedelta(seconds=timeout_s))


def import_group_default_users() -> None:
    """Import, before the process group exists, the torch module whose functions take
    `group=group.WORLD` as a default argument (torch.distributed.nn.functional: open_clip's
    loss imports it, so do DeepSpeed's sequence-parallel layers). A default is evaluated at
    import: imported after init, those functions hold the default group, which then outlives
    `destroy()`; its gloo worker thread can release the last collective's tensors during
    interpreter shutdown, and a job that succeeded exits with SIGABRT ("terminate called
    without an active exception"). Imported first, the defaults are None. Both ways of
    joining (`init` here, training/engine.py `init_distributed`) call this."""
    if dist.is_available():
        import torch.distributed.nn  # noqa: F401


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


# Callables that drop other libraries' references to our process groups (DeepSpeed's group
# registry: training/engine.py registers it), run by `destroy`.
_release_hooks: list[Callable[[], None]] = []
# Name prefixes of the threads a live process group runs (torch names them).
_GROUP_THREADS = ("pt_gloo", "gloo_tcp", "pt_nccl")


def on_destroy(hook: Callable[[], None]) -> None:
    """Run `hook` in `destroy`, after the groups are torn down (once per hook)."""
    if hook not in _release_hooks:
        _release_hooks.append(hook)


def group_threads() -> list[str]:
    """Names of this process's threads that belong to a process group (Linux; [] elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name.startswith(_GROUP_THREADS):
            names.append(name)
    return sorted(names)


def destroy() -> None:
    """Leave the process group (local: no collective) and free it, so its worker threads are
    joined before the interpreter exits. Called on the way out, errors included, so a
    failure to tear down is not a second error.

    destroy_process_group only unregisters the groups; each is freed, and its threads
    joined, when the last reference goes. A group still referenced at exit keeps a gloo
    worker thread that may release the last collective's tensors while the interpreter
    shuts down, which aborts the process (SIGABRT, "terminate called without an active
    exception") after a job that succeeded. So the release hooks drop the references other
    libraries keep, a collection frees groups held by reference cycles (a DeepSpeed engine),
    and a group that still survives is reported and given a moment to finish its releases."""
    if not is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception as e:  # e.g. a backend already broken by a lost peer
        log.debug(f"destroy_process_group: {e}")
    for hook in _release_hooks:
        try:
            hook()
        except Exception as e:
            log.debug(f"release hook {hook}: {e}")
    gc.collect()
    alive = group_threads()
    if alive:
        # Known case: ZeRO-3 (some reference DeepSpeed keeps that its destroy() leaves).
        log.info(f"a process group outlived destroy() (threads {', '.join(alive)}): something still "
                 f"references it; waiting 0.2 s so its worker threads finish before exit")
        time.sleep(0.2)  # the GIL released: a worker's pending tensor release completes now

