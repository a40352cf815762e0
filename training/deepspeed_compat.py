"""Every DeepSpeed API latentforge uses that DeepSpeed does not document as public, in one
place, behind a version check (training/engine.py owns the public calls).

- `check_version`: DeepSpeed versions this code was tested with; another one fails with
  one line (LATENTFORGE_ALLOW_UNTESTED_DEEPSPEED=1 goes on at the user's risk).
- `set_load_universal`: the engine's private `_config.load_universal_checkpoint`, the one
  switch between an ordinary and a universal checkpoint load.
- `share_fp32_master`: the ZeRO-3 optimizer's `fp16_partitioned_groups_flat` /
  `fp32_partitioned_groups_flat` (one fp32 copy of the weights instead of two).
- `ds_to_universal`: `deepspeed.checkpoint.ds_to_universal.main`, the converter behind
  DeepSpeed's CLI, called with its argparse namespace.
- `fp32_fragment`, `fp32_master_groups`: where the fp32 master weights live under bf16/fp16
  (for the EMA): ZeRO 1/2's per-parameter `_hp_mapping` (a tensor_fragment into the
  optimizer's flat fp32 partition), ZeRO 0's FP16_Optimizer `fp16_groups` /
  `fp32_groups_flat`. (ZeRO-3's is DeepSpeed's public `safe_get_local_fp32_param`.)
- `install_checkpoint_io`: the engine's `checkpoint_engine` (TorchCheckpointEngine,
  deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py). Its `save` is replaced
  by one that hashes and fsyncs each file as it is written; its `load`, which calls
  `torch.load(weights_only=False)`, by one with weights_only=True and the allowlist below.
- `skip_shm_comm_op`: `deepspeed.comm.torch.build_shm_op`, which DeepSpeed's CPU accelerator
  calls while joining the process group: it JIT-compiles the shared-memory op
  `deepspeed_shm_comm` with ninja into ~/.cache/torch_extensions (about 2 minutes on 2
  cores, under a lock every process on the machine waits for; its probe of every op's
  compatibility runs compilers too). The op serves only `inference_all_reduce`, which
  tensor-parallel inference (AutoTP) calls; ZeRO training reduces through
  torch.distributed (gloo on CPU), so latentforge never builds it.
- `skip_muon_import`: `deepspeed.runtime.engine.is_zero_supported_optimizer`, which imports
  DeepSpeed's Muon optimizer to list it among ZeRO's optimizers; that module applies
  torch.compile at import, which imports torch._inductor (2-7 s of every start-up, the
  bulk of `deepspeed.initialize` for a small model). latentforge's optimizer is torch's
  AdamW, which the list names anyway: the check is made without the import.
- `weights_only_loads`: DeepSpeed also reads files with `torch.load(weights_only=False)`
  outside its checkpoint engine (the universal load in checkpoint/universal_checkpoint.py,
  zero_to_fp32, ds_to_universal). Inside this context every torch.load is weights-only
  (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD, read at each call) with the same allowlist.

The allowlist holds the only non-tensor objects DeepSpeed 0.19.8 pickles into its files
(found with torch.serialization.get_unsafe_globals_in_checkpoint): the ZeRO stage enum,
the fragment addresses of ZeRO-1/2 parameter slices and the loss scalers. None of them
runs code when unpickled: they are enums and plain attribute holders.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from latentforge.config import AbortError
from latentforge.hashing import HashingWriter

TESTED_VERSIONS = ("0.19.8",)
ALLOW_UNTESTED_ENV = "LATENTFORGE_ALLOW_UNTESTED_DEEPSPEED"


def check_version(version: str) -> None:
    """Fail with one line on a DeepSpeed version these private APIs were not tested with."""
    if version in TESTED_VERSIONS or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return
    raise AbortError(f"deepspeed {version} is not a tested version (tested: {', '.join(TESTED_VERSIONS)}): "
                     f"pip install deepspeed=={TESTED_VERSIONS[-1]}, or set {ALLOW_UNTESTED_ENV}=1 to try it "
                     f"(latentforge uses private DeepSpeed APIs listed in training/deepspeed_compat.py)")


def safe_globals() -> list[Any]:
    """The DeepSpeed classes a weights-only load of its checkpoint files may construct."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


_allowlist: list[Any] = []  # the active torch.serialization.safe_globals context, entered once


@contextlib.contextmanager
def _allowlisted() -> Iterator[None]:
    """torch.serialization.safe_globals, re-entrant: torch's context removes its entries on
    exit even while an outer one still needs them (the engine's `load` runs inside
    `weights_only_loads`), so only the outermost use enters and leaves it."""
    outer = not _allowlist
    if outer:
        ctx = torch.serialization.safe_globals(safe_globals())
        ctx.__enter__()
        _allowlist.append(ctx)
    try:
        yield
    finally:
        if outer:
            _allowlist.pop().__exit__(None, None, None)


def load_file(path: str | os.PathLike, map_location: Any = None) -> Any:
    """torch.load of one DeepSpeed checkpoint file, weights only, with the allowlist."""
    with _allowlisted():
        return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside is weights-only, whatever its caller passes."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with _allowlisted():
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def skip_shm_comm_op() -> None:
    """Join process groups without DeepSpeed's shared-memory op (see the module docstring):
    its builder reports no op, as on a platform without one, and gloo does every collective.
    Call before `deepspeed.init_distributed`."""
    import importlib

    # By module path: the package attribute `deepspeed.comm.torch` is torch itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def skip_muon_import() -> None:
    """ZeRO's optimizer check without importing DeepSpeed's Muon (see the module docstring):
    the same answer for every optimizer but Muon, which latentforge does not use."""
    import importlib

    utils = importlib.import_module("deepspeed.runtime.zero.utils")
    engine = importlib.import_module("deepspeed.runtime.engine")
    engine.is_zero_supported_optimizer = lambda optimizer: type(optimizer) in utils.ZERO_SUPPORTED_OPTIMIZERS


def skip_gradient_allreduce(ds_engine: Any) -> None:
    """One rank, ZeRO 0, fp32 (our AdamW unwrapped): DeepSpeed's backward would flatten
    every gradient into a bucket, all-reduce it over the one rank and copy it back, several
    per cent of a small model's step for an identity. Its own switch turns that off (what
    it does itself without a backend); at ZeRO 0 the all-reduce is all that path does."""
    ds_engine.enable_backward_allreduce = False


def release_process_groups() -> None:
    """Drop DeepSpeed's module-level references to process groups (deepspeed.utils.groups:
    _WORLD_GROUP, _DATA_PARALLEL_GROUP, the expert and all-to-all tables, ...), which it
    never clears, so that `dist.destroy` can free them. Found by type, not by name, so a
    DeepSpeed release that adds a table is covered."""
    from deepspeed.utils import groups

    pg_type = torch.distributed.ProcessGroup
    for name, value in list(vars(groups).items()):
        if isinstance(value, pg_type):
            setattr(groups, name, None)
        elif isinstance(value, dict) and any(isinstance(v, pg_type) for v in value.values()):
            value.clear()


def set_load_universal(ds_engine: Any, universal: bool) -> None:
    ds_engine._config.load_universal_checkpoint = universal


def install_checkpoint_io(ds_engine: Any) -> dict[str, dict[str, Any]]:
    """Replace the engine's checkpoint I/O (see the module docstring). Returns the dict the
    new `save` fills: {absolute path: {"size", "hash"}} of every file this rank wrote; the
    caller empties it before a save and reads it after."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = ds_engine.checkpoint_engine
    if type(ce) is not TorchCheckpointEngine:
        raise AbortError(f"DeepSpeed chose the checkpoint engine {type(ce).__name__}; latentforge supports "
                         f"TorchCheckpointEngine only (remove `checkpoint.writer` / `datastates` from ds_config)")
    written: dict[str, dict[str, Any]] = {}

    def save(state_dict: Any, path: str) -> None:
        with HashingWriter(path) as f:
            torch.save(state_dict, f, _use_new_zipfile_serialization=ce.zipfile_serialization)
        written[str(Path(path).resolve())] = {"size": f.size, "hash": f.hexdigest()}

    def load(path: str, map_location: Any = None) -> Any:
        return load_file(path, map_location=map_location)

    ce.save, ce.load = save, load  # instance attributes shadow the methods
    return written


def share_fp32_master(ds_engine: Any) -> None:
    """ZeRO-3 with fp32 weights: let the optimizer's fp32 master partition be the weight
    partition itself, as DeepSpeed intends ("weights ... are already in and updated using
    fp32. In such cases we don't need another copy", stage3.py _create_fp32_partitions).
    Its check compares `tensor.device` with the string "cpu"/"cuda:0", which is False under
    torch 2.14, so 0.19.8 keeps a second copy: 4 bytes per parameter / N. Same values, same
    updates: the step copies the master into the weights, here onto itself."""
    opt = ds_engine.optimizer
    for lp, master in zip(getattr(opt, "fp16_partitioned_groups_flat", []), getattr(opt, "fp32_partitioned_groups_flat", [])):
        if (lp is not None and master.numel() == lp.numel() and lp.dtype == master.dtype
                and lp.device == master.device and lp.data_ptr() != master.data_ptr()):
            master.data = lp.data  # the optimizer keeps the same Parameter object (and its state key)


def fp32_fragment(param: torch.nn.Parameter) -> tuple[int, torch.Tensor] | None:
    """ZeRO 1/2: (offset in the flattened parameter, fp32 view) of the part of `param`'s fp32
    master weights this rank's optimizer partition holds; None when it holds none."""
    if not hasattr(param, "_hp_mapping"):
        raise RuntimeError("DeepSpeed's ZeRO optimizer left no fp32 master mapping (_hp_mapping) on a parameter")
    h = param._hp_mapping
    return None if h is None else (int(h.lp_fragment_address.start), h.get_hp_fragment())


def fp32_master_groups(ds_optimizer: Any) -> list[tuple[list[torch.nn.Parameter], torch.Tensor]]:
    """ZeRO 0 under bf16/fp16 (DeepSpeed's FP16_Optimizer): for each parameter group, its
    parameters in the order they were flattened (no padding) and its flat fp32 master."""
    return list(zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups_flat))


def ds_to_universal(src: Path, out: Path) -> None:
    """DeepSpeed's converter (deepspeed.checkpoint.ds_to_universal) from checkpoint folder
    `src` into folder `out`, one process, weights-only reads."""
    from deepspeed.checkpoint import ds_to_universal as conv

    args = argparse.Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # Our client state carries no Megatron-style universal_checkpoint_info;
                              # a plain data-parallel model needs only the version stamp.
                              inject_missing_state=True)
    with weights_only_loads():
        conv.main(args)
    # The converter points `<parent>/latest_universal` at its output folder; we pass tags
    # explicitly, so drop it rather than leave a dangling name.
    (Path(out).parent / "latest_universal").unlink(missing_ok=True)
