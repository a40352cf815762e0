"""The only module that imports deepspeed: initialise, forward, backward, step, save, load.

Everything DeepSpeed-specific (the ds_config, ZeRO stages, precision, the process group,
gathering ZeRO-3 parameters, skipping a step, checkpoint calls, universal checkpoints)
lives here so the training loop reads as plain PyTorch; the private DeepSpeed APIs it
needs sit behind training/deepspeed_compat.py, with a version check. deepspeed is
imported inside functions: `latentforge --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from latentforge import dist
from latentforge.config import Config, ConfigError, batch_split
from latentforge.env import bind_gloo_interface, free_port
from latentforge.fileio import atomic_write
from latentforge.log import get_logger, quiet_prints, quiet_third_party
from latentforge.training import deepspeed_compat as compat
from latentforge.training.ema import Fragment

log = get_logger("train")


def _deepspeed() -> Any:
    """Import deepspeed with the accelerator named, not auto-detected: the device is
    latentforge.dist's choice, and detection prints a warning on every CPU rank."""
    os.environ.setdefault("DS_ACCELERATOR", dist.device().type)
    import deepspeed

    compat.check_version(deepspeed.__version__)
    if dist.device().type == "cpu":
        compat.skip_shm_comm_op()  # nothing compiled at start-up (training never uses the op)
    compat.skip_muon_import()  # nor torch._inductor imported for an optimizer we do not use
    quiet_third_party()
    return deepspeed


def precision(cfg: Config) -> str:
    """train.precision for this device (latentforge.dist.train_precision: `auto` is bf16 on a
    GPU with native bf16, fp16 on older GPUs, fp32 on CPU)."""
    return dist.train_precision(cfg.train.precision)


def _fp32_accumulation(prec: str, cfg: Config) -> bool:
    """Whether DeepSpeed 0.19.8 accumulates gradients in fp32 (data_types.grad_accum_dtype)
    for this precision and ZeRO stage without changing optimizer: ZeRO 2 and 3 (and 1 with
    offload, and 1 under fp16) pass it to their ZeRO optimizer. ZeRO 0 refuses a
    half-precision model with fp32 accumulation ("unsupported mix"), and bf16 ZeRO 1 without
    offload would move to DeepSpeed's BF16_Optimizer, whose checkpoints carry no ZeRO stage
    for zero_to_fp32 (export, eval) to read."""
    stage = cfg.train.zero_stage
    return stage >= 2 or (stage == 1 and (cfg.train.offload_optimizer or prec == "fp16"))


def client_steps_alone(cfg: Config) -> bool:
    """Whether DeepSpeed hands our AdamW the step unwrapped: ZeRO stage 0 in fp32 (no ZeRO
    optimizer, no fp16/bf16 wrapper). Then the client step also clips and checks the
    gradients (`_guard_client_optimizer`), and DeepSpeed's own clipping is off."""
    return cfg.train.zero_stage == 0 and precision(cfg) == "fp32"


def ds_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config generated from ours. `load_universal` is set only for the one
    start-up that resumes from a universal checkpoint (a different world size)."""
    micro, accum = batch_split(cfg, world_size)
    prec = precision(cfg)
    cuda = dist.device().type == "cuda"
    zero: dict[str, Any] = {
        "stage": cfg.train.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": cuda,
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
    }
    if cfg.train.zero_stage == 3:
        # At most 5e7 gathered parameter elements live at a time (DeepSpeed's default, 1e9, is
        # more than a whole SD-sized U-Net: ZeRO-3 would then keep every layer gathered).
        zero.update(stage3_prefetch_bucket_size=5e7, stage3_param_persistence_threshold=1e5,
                    stage3_max_live_parameters=5e7, stage3_max_reuse_distance=5e7,
                    stage3_gather_16bit_weights_on_model_save=False)
    if cfg.train.offload_optimizer:
        if cfg.train.zero_stage == 0:
            raise ConfigError("train.offload_optimizer: ZeRO-Offload needs train.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    half: dict[str, Any] = {}
    if prec in ("bf16", "fp16"):
        # Gradients are reduced over ranks in fp32 (DeepSpeed's default is the model dtype:
        # a bf16 sum over 32+ ranks keeps 8 bits of mantissa) and, where DeepSpeed allows it,
        # accumulated over micro-batches in fp32 (see _fp32_accumulation).
        half["communication_data_type"] = "fp32"
        if _fp32_accumulation(prec, cfg):
            half["data_types"] = {"grad_accum_dtype": "fp32"}
        elif accum > 1:
            raise ConfigError(f"train.zero_stage: {prec} with gradient accumulation ({accum} micro-batches) "
                              f"would accumulate in {prec} at ZeRO stage {cfg.train.zero_stage}; use "
                              f"train.zero_stage=2 (or 3), or train.micro_batch_size=0")
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # ZeRO 0 in fp32: the client step clips (one fused pass; DeepSpeed's clip_grad_norm_
        # walks the parameters one by one and keeps no norm to log).
        "gradient_clipping": 0.0 if client_steps_alone(cfg) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        # bf16: DeepSpeed keeps fp32 master weights and skips a step whose gradients are
        # not finite (check_grad_overflow). fp16: dynamic loss scaling from 2**16.
        "bf16": {"enabled": prec == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": prec == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        **half,
        # Our client AdamW (torch) runs the offloaded step on the CPU; DeepSpeedCPUAdam would
        # need a compiled op, and this build of deepspeed ships none.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def lr_at(cfg: Config, step: int) -> float:
    """Linear warmup to optim.lr, then constant or cosine down to lr * min_lr_ratio.
    A pure function of the step, so a resumed run needs no scheduler state."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.decay == "constant":
        return o.lr
    span = max(1, cfg.train.max_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def bind_device_env() -> None:
    """Make DeepSpeed use the GPU latentforge.dist chose. DeepSpeed 0.19.8 reads
    os.environ["LOCAL_RANK"] as the CUDA ordinal: deepspeed.initialize calls
    set_device(LOCAL_RANK) (DeepSpeedEngine._set_distributed_vars), init_process_group binds
    device_id=cuda:LOCAL_RANK (comm/torch.py), ZeRO-3 allocates on cuda:LOCAL_RANK
    (zero/partition_parameters.py, zero/utils.py). Under per-task GPU binding each task sees
    one GPU, and LOCAL_RANK 1..7 are invalid ordinals (DeepSpeed PR #3165). So LOCAL_RANK
    becomes the ordinal; the launcher's value stays in dist.NODE_LOCAL_RANK for
    latentforge.dist. DeepSpeed's other readings of LOCAL_RANK (node-local checkpoint
    storage, serial checkpoint loading) are off in our ds_config. A no-op on CPU."""
    dev = dist.device()  # refuses more ranks than GPUs, with both counts
    if dev.type != "cuda":
        return
    os.environ.setdefault(dist.NODE_LOCAL_RANK, str(dist.local_rank()))
    os.environ["LOCAL_RANK"] = str(dev.index)


def init_distributed(timeout_s: float) -> None:
    """Join the process group (env:// from RANK/WORLD_SIZE/MASTER_*). A lone process gets a
    one-rank group on loopback, so the same code path runs everywhere. `timeout_s` bounds
    every collective: a dead rank makes the others fail instead of waiting forever."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    network = bind_gloo_interface()  # a job across nodes: gloo on the interface that reaches the master
    if network:
        log.info(network)
    import datetime

    bind_device_env()
    dist.import_group_default_users()
    dist.on_destroy(compat.release_process_groups)
    deepspeed = _deepspeed()
    if dist.device().type == "cuda":
        torch.cuda.set_device(dist.device())
    deepspeed.init_distributed(dist_backend=dist.backend(), timeout=datetime.timedelta(seconds=timeout_s))


class Engine:
    """A thin wrapper over a DeepSpeed engine with the calls the training loop needs."""

    def __init__(self, ds_engine: Any, cfg: Config, config_dict: dict[str, Any], client_optimizer: Any):
        self.ds = ds_engine
        self.cfg = cfg
        self.config_dict = config_dict
        self.client_optimizer = client_optimizer  # our torch AdamW, wrapped by DeepSpeed's ZeRO optimizer
        self.micro_batch, self.accum = config_dict["train_micro_batch_size_per_gpu"], \
            config_dict["gradient_accumulation_steps"]
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(cfg), torch.float32)
        # DeepSpeed's file I/O: hashed and fsynced as written, loaded weights-only.
        self._written = compat.install_checkpoint_io(ds_engine)
        # `step()` answers with one of these device scalars, picked in Python: no transfer.
        device = ds_engine.device
        self._one, self._zero = torch.ones((), device=device), torch.zeros((), device=device)
        # ZeRO's optimizers (and DeepSpeed's fp16/bf16 wrappers) drop a step whose gradients
        # are not finite (their `overflow` path). Without one (ZeRO stage 0 in fp32:
        # `client_steps_alone`, which also turned DeepSpeed's clipping off in `ds_config`) the
        # client AdamW clips and checks its gradients itself, on the device: see
        # `_guard_client_optimizer`. One rule decides both; DeepSpeed must agree with it.
        self._found_inf = _guard_client_optimizer(client_optimizer, device, cfg.optim.grad_clip) \
            if _client_guards_step(cfg, ds_engine.optimizer) else None
        self._ema_sources: dict[str, Any] | None = None

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds(*args, **kwargs)

    def set_lr(self, lr: float) -> None:
        for g in self.client_optimizer.param_groups:
            g["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> torch.Tensor:
        """One micro-step; at the accumulation boundary the optimizer steps. Returns, without
        a host sync, a device scalar: 1.0 when an optimizer update was applied at this
        boundary; 0.0 between boundaries and when the step was dropped because a gradient
        was not finite. A dropped step leaves the weights and Adam moments (and its step
        count) untouched: DeepSpeed's overflow path under ZeRO or fp16/bf16, which reduces
        the check over ranks with the gradient norm it computes anyway; otherwise the client
        AdamW's found_inf, set from gradients that are already identical on every rank. The
        training loop makes a non-finite loss into NaN gradients (training/loop.py), so this
        one check covers both."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.step()
        if not boundary:
            return self._zero
        if self._found_inf is not None:
            return self._one - self._found_inf[0]
        # DeepSpeed decided on the host (it read the norm back); no extra sync here.
        return self._zero if self.ds.optimizer.overflow else self._one

    def destroy(self) -> None:
        """Release the engine once training is over: DeepSpeed's `destroy` removes the
        gradient hooks ZeRO puts on autograd's accumulator nodes. Those nodes (C++) keep the
        optimizer, the engine and its process groups reachable through a cycle Python's
        collector cannot see, so without this they outlive `dist.destroy` (see there why that
        matters). Not after a failed collective: it synchronises the device."""
        self.ds.destroy()

    def grad_norm(self) -> float:
        """The last step's global gradient norm (a host sync: call it at log steps)."""
        n = self.ds.get_global_grad_norm()
        return float(n) if n is not None else float("nan")

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[torch.nn.Module]:
        """The module with full (gathered) parameters, read-only. A no-op below ZeRO-3.
        Collective under ZeRO-3: every rank must enter it."""
        if self.cfg.train.zero_stage == 3:
            deepspeed = _deepspeed()
            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield self.module
        else:
            yield self.module

    # -- what an EMA tracks -------------------------------------------------------------

    @property
    def zero3(self) -> bool:
        return self.cfg.train.zero_stage == 3

    def ema_parameters(self) -> dict[str, Any]:
        """name -> what the EMA averages for each trainable parameter (training/ema.py), read
        where the optimizer has just written it; no communication.

        fp32: the parameter itself below ZeRO-3; under ZeRO-3 its flat partition
        (p.ds_tensor, (ceil(n / N),)). bf16/fp16: the optimizer's fp32 master weights, never
        the rounded module weights: under ZeRO-3 the fp32 partition (same layout), under
        ZeRO 1/2 this rank's `Fragment` of the flat fp32 partition, under ZeRO 0 the whole
        fp32 master (where they live: training/deepspeed_compat.py)."""
        if self._ema_sources is not None:
            return self._ema_sources
        params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if self.dtype == torch.float32:
            if self.zero3:
                return {n: p.ds_tensor for n, p in params}
            # The parameters themselves, updated in place by every step and every load: the
            # same dict serves every step (no walk over the module's parameters per step).
            self._ema_sources = dict(params)
            return self._ema_sources
        if self.zero3:
            from deepspeed.utils import safe_get_local_fp32_param

            return {n: safe_get_local_fp32_param(p) for n, p in params}
        if self.cfg.train.zero_stage == 0:
            return self._stage0_master(params)
        out: dict[str, Any] = {}
        for n, p in params:
            frag = compat.fp32_fragment(p)  # None: no element of this parameter is in this rank's partition
            start, values = frag if frag is not None else (0, torch.empty(0))
            out[n] = Fragment(tuple(p.shape), start, values)
        return out

    def _stage0_master(self, params: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """ZeRO 0 under bf16/fp16 (DeepSpeed's FP16_Optimizer): views of each group's flat fp32
        master, cut in the order the group's parameters were flattened (no padding)."""
        names = {id(p): n for n, p in params}
        out: dict[str, torch.Tensor] = {}
        for group, flat in compat.fp32_master_groups(self.ds.optimizer):
            offset = 0
            for p in group:
                out[names[id(p)]] = flat[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
        return out

    def ema_layout(self) -> dict[str, Any] | None:
        """How `ema_parameters()` splits each parameter over ranks (see training/ema.py);
        None when every rank holds whole parameters."""
        if not self.zero3:
            return None
        world = dist.world_size()
        layout: dict[str, Any] = {"world_size": world, "rank": dist.rank(), "numel": {}, "shape": {}}
        for n, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if p.ds_tensor.numel() != math.ceil(p.ds_numel / world):
                raise RuntimeError(f"{n}: ZeRO-3 partition of {p.ds_tensor.numel()} elements, expected "
                                   f"ceil({p.ds_numel} / {world}); the EMA's shard layout does not apply")
            layout["numel"][n], layout["shape"][n] = int(p.ds_numel), list(p.ds_shape)
        return layout

    def gather_shard(self, shard: torch.Tensor) -> torch.Tensor:
        """Every rank's (P,) shard, concatenated in rank order: (N * P,). Collective."""
        import torch.distributed as tdist

        out = torch.empty(shard.numel() * dist.world_size(), dtype=shard.dtype, device=shard.device)
        gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor  # the name before torch 2.14
        gather(out, shard.contiguous())
        return out

    # -- checkpoints ------------------------------------------------------------------

    def save(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Collective: every rank writes its shards, each fsynced. Returns what this rank
        wrote: {path relative to the tag folder: {"size", "hash"}} (hashed as written).
        `latest` is left to the caller."""
        self._written.clear()
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        folder = (Path(ckpt_dir) / tag).resolve()
        return {Path(p).relative_to(folder).as_posix(): v for p, v in self._written.items()
                if Path(p).is_relative_to(folder)}

    def load(self, ckpt_dir: Path, tag: str, universal: bool = False) -> dict[str, Any]:
        """Load weights, optimizer state and the client state. `universal`: `tag` is a
        universal checkpoint (see `to_universal`); DeepSpeed re-partitions it for this
        world size. The flag holds for this one load only: later checkpoints of this run
        are ordinary ones, and so are later resumes."""
        compat.set_load_universal(self.ds, universal)
        try:
            with compat.weights_only_loads():  # the universal load reads outside the checkpoint engine
                path, client = self.ds.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        finally:
            compat.set_load_universal(self.ds, False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
        if universal:
            place_optimizer_steps(self.client_optimizer)
        return client or {}

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """This rank's optimizer state as flat tensors (tests compare them across a skipped
        step): {"{group}.{param}.{key}": tensor}. For ZeRO the parameters are this rank's
        flat fp32 partitions."""
        out: dict[str, torch.Tensor] = {}
        opt = self.client_optimizer
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                for k, v in opt.state.get(p, {}).items():
                    out[f"{gi}.{pi}.{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
        return out


def place_optimizer_steps(optimizer: torch.optim.Optimizer) -> None:
    """Put each parameter's Adam step counter where torch's fused (or capturable) AdamW
    wants it: a float32 tensor on the parameter's device. A universal load sets
    `state["step"]` straight from the file (base_optimizer.py / stage3.py
    load_hp_checkpoint_state...), as saved: a CPU tensor (or a number), which the fused
    CUDA kernel refuses. torch's own Optimizer.load_state_dict does the same conversion."""
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                step = state["step"]
                step = step if torch.is_tensor(step) else torch.tensor(float(step))
                state["step"] = step.to(device=p.device, dtype=torch.float32)


def _client_guards_step(cfg: Config, ds_optimizer: Any) -> bool:
    """Whether the client AdamW must clip and check its own gradients: `client_steps_alone`,
    the rule `ds_config` also turned DeepSpeed's clipping off by. DeepSpeed's optimizer must
    agree: a ZeRO optimizer or fp16/bf16 wrapper has an `overflow` path (it clips and drops
    non-finite steps), the bare client optimizer has none. A DeepSpeed version that decided
    otherwise would leave the gradients unclipped and unchecked (or clipped twice), so it is
    refused here, at start-up."""
    alone = client_steps_alone(cfg)
    if alone == hasattr(ds_optimizer, "overflow"):
        raise RuntimeError(
            f"DeepSpeed {'wrapped' if alone else 'did not wrap'} the client optimizer at ZeRO stage "
            f"{cfg.train.zero_stage} in {precision(cfg)} (its optimizer: {type(ds_optimizer).__name__}), "
            "against latentforge.training.engine.client_steps_alone: gradient clipping and the "
            "non-finite check would run twice or not at all. Update client_steps_alone for this DeepSpeed version")
    return alone


def _guard_client_optimizer(optimizer: torch.optim.Optimizer, device: torch.device,
                            max_norm: float = 0.0) -> torch.Tensor:
    """Make `optimizer` (a fused torch AdamW that DeepSpeed steps unwrapped: ZeRO 0 in fp32)
    clip its gradients and skip a step whose gradients hold a NaN or inf, on the device,
    without a host sync. Before each step:

    - the global gradient norm, from one multi-tensor norm, kept as
      `optimizer._global_grad_norm` (DeepSpeed's engine reads it for get_global_grad_norm);
    - one fused pass over the gradients and that norm (the GradScaler's check, with a scale
      of 1) sets `found_inf`, which torch's fused AdamW honours by leaving parameters,
      moments and step counts as they were; a norm that overflows counts as not finite;
    - with `max_norm` > 0, every gradient times min(1, max_norm / (norm + 1e-6)), as
      torch.nn.utils.clip_grad_norm_ and DeepSpeed's clipping do.

    Returns the (1,) flag the next step fills: 1.0 when it was skipped."""
    if not optimizer.defaults.get("fused"):
        raise ValueError("the client optimizer must be a fused torch AdamW (found_inf needs the fused kernel)")
    found_inf = torch.zeros(1, device=device)
    unit = torch.ones(1, device=device)
    step = optimizer.step

    def guarded_step(*args: Any, **kwargs: Any) -> Any:
        found_inf.zero_()
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # () fp32
            optimizer._global_grad_norm = norm
            # grads * 1 and norm * 1: unchanged.
            torch._amp_foreach_non_finite_check_and_unscale_([*grads, norm.view(1)], found_inf, unit)
            if max_norm > 0:
                torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        # torch's AMP hook of Adam.step; 0-dim, as GradScaler's: the step counts it is subtracted from are 0-dim.
        optimizer.found_inf, optimizer.grad_scale = found_inf.view(()), None
        return step(*args, **kwargs)

    optimizer.step = guarded_step  # an instance attribute shadows the method
    return found_inf


def _activation_checkpointing_available(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_supports_gradient_checkpointing", False))


def build_engine(model: torch.nn.Module, cfg: Config, run_dir: Path | None = None,
                 load_universal: bool = False) -> Engine:
    """deepspeed.initialize with our AdamW (decay on matrices only), then the optional
    activation checkpointing and torch.compile. Writes ds_config.json into the run dir."""
    deepspeed = _deepspeed()
    config_dict = ds_config(cfg, dist.world_size(), load_universal=load_universal)
    if run_dir is not None and dist.is_main():
        write_ds_config(run_dir, config_dict)
    if cfg.train.activation_checkpointing:
        if not _activation_checkpointing_available(model):
            raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} does not support it")
        model.enable_gradient_checkpointing()  # diffusers: recompute each block's activations in backward
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # frozen weights (a LoRA run's base U-Net) get no optimizer state
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over ZeRO's flat fp32 partitions, without the partition-sized
    # temporaries of the for-each implementation (CPU and CUDA both have it).
    optimizer = torch.optim.AdamW(groups, lr=lr_at(cfg, 0), betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config_dict)
    if client_steps_alone(cfg) and dist.world_size() == 1:
        compat.skip_gradient_allreduce(ds_engine)
    if cfg.train.zero_stage == 3:
        compat.share_fp32_master(ds_engine)
        _return_freed_memory()  # the whole model built on this rank is now 1/N of it
    if cfg.train.compile:
        compile_engine(ds_engine)
    return Engine(ds_engine, cfg, config_dict, optimizer)


def _return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim). ZeRO-3 frees each whole
    parameter once partitioned, but glibc keeps freed blocks below its mmap threshold in
    the process, so a rank's resident memory would stay at the full model's size."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def write_ds_config(run_dir: Path, config_dict: dict[str, Any]) -> None:
    atomic_write(Path(run_dir) / "ds_config.json", json.dumps(config_dict, indent=1))


def compile_engine(ds_engine: Any) -> None:
    """torch.compile the module through DeepSpeed (engine.compile keeps ZeRO's hooks
    working). The CPU backend (inductor) needs a C++ compiler; say so clearly."""
    if dist.device().type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise ConfigError("train.compile: torch.compile on CPU needs a C++ compiler (g++ or $CXX) on PATH; "
                          "install one or set train.compile=false")
    try:
        ds_engine.compile()
    except Exception as e:  # e.g. an unsupported torch build; one line, naming the key
        raise ConfigError(f"train.compile: torch.compile failed: {str(e).splitlines()[0] if str(e) else e!r}; "
                          f"set train.compile=false") from e


# ---------------------------------------------------------------------------------------
# Checkpoint files without an engine.


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights from a sharded checkpoint, any ZeRO stage, no process group needed."""
    _deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with quiet_prints("DeepSpeed's zero_to_fp32"), compat.weights_only_loads():  # it prints a line per step
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.float().clone() for k, v in sd.items()}


def to_universal(src: Path, out: Path) -> None:
    """Convert the DeepSpeed checkpoint directory `src` (ZeRO 1-3) into a universal
    checkpoint in the new folder `out` with DeepSpeed's own converter: every parameter's
    fp32 weights and Adam moments, whole, so any world size can load them. One process,
    no process group; weights-only reads. The caller names `out` (a temporary folder) and
    moves it into place."""
    _deepspeed()
    src, out = Path(src), Path(out)
    if not list(src.glob("*optim_states.pt")):
        raise ValueError(f"{src}: no ZeRO optimizer shards; only ZeRO stage 1-3 checkpoints need (and have) a "
                         f"universal form (stage 0 checkpoints load at any world size as they are)")
    shutil.rmtree(out, ignore_errors=True)
    compat.ds_to_universal(src, out)
