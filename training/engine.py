"""The only module that imports deepspeed: initialise, forward, backward, step, save, load.

Everything DeepSpeed-specific (the ds_config, ZeRO stages, precision, the process group,
gathering ZeRO-3 parameters, checkpoint calls) lives here so the training loop reads as
plain PyTorch. deepspeed is imported inside functions: `latentforge --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from pathlib import Path
from typing import Any, Iterator

import torch

from latentforge.training import dist
from latentforge.training.config import Config, ConfigError


def precision(cfg: Config) -> str:
    """`auto` is bf16 on CUDA and fp32 on CPU (bf16 matmuls are slower than fp32 on CPUs)."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if dist.device().type == "cuda" else "fp32"


def batch_split(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) from the global batch size."""
    g = cfg.train.global_batch_size
    if g % world_size:
        raise ConfigError(f"train.global_batch_size: {g} is not divisible by the world size {world_size}")
    per_rank = g // world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size: {micro} does not divide the per-rank batch {per_rank} "
                          f"(global {g} / world {world_size})")
    return micro, per_rank // micro


def ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    micro, accum = batch_split(cfg, world_size)
    prec = precision(cfg)
    zero: dict[str, Any] = {
        "stage": cfg.train.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": dist.device().type == "cuda",
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
    }
    if cfg.train.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=5e7, stage3_param_persistence_threshold=1e5,
                    stage3_gather_16bit_weights_on_model_save=False)
    if cfg.train.offload_optimizer:
        if cfg.train.zero_stage == 0:
            raise ConfigError("train.offload_optimizer: needs train.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": dist.device().type == "cuda"}
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our client AdamW (torch) is fine on CPU with offload; DeepSpeedCPUAdam needs a compiled op.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float) -> None:
    """Join the process group (env:// from RANK/WORLD_SIZE/MASTER_*). A lone process gets a
    one-rank group on loopback, so the same code path runs everywhere."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    import datetime

    import deepspeed

    if dist.device().type == "cuda":
        torch.cuda.set_device(dist.device())
    deepspeed.init_distributed(dist_backend=dist.backend(), timeout=datetime.timedelta(seconds=timeout_s))


class Engine:
    """A thin wrapper over a DeepSpeed engine with the calls the training loop needs."""

    def __init__(self, ds_engine: Any, cfg: Config, config_dict: dict[str, Any]):
        self.ds = ds_engine
        self.cfg = cfg
        self.config_dict = config_dict
        self.micro_batch, self.accum = config_dict["train_micro_batch_size_per_gpu"], \
            config_dict["gradient_accumulation_steps"]
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(cfg), torch.float32)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds(*args, **kwargs)

    def set_lr(self, lr: float) -> None:
        for g in self.ds.optimizer.param_groups:
            g["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def grad_norm(self) -> float:
        n = self.ds.get_global_grad_norm()
        return float(n) if n is not None else float("nan")

    def zero_loss(self) -> torch.Tensor:
        """A zero loss that touches every trainable parameter, so a skipped micro-batch still
        runs DeepSpeed's gradient hooks (with zero gradients) and its counters stay aligned."""
        return sum((p.sum() * 0.0 for p in self.module.parameters() if p.requires_grad),
                   torch.zeros((), device=self.device))

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[torch.nn.Module]:
        """The module with full (gathered) parameters, read-only. A no-op below ZeRO-3.
        Collective under ZeRO-3: every rank must enter it."""
        if self.cfg.train.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield self.module
        else:
            yield self.module

    def save(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Collective: every rank writes its shards. `latest` is left to the caller."""
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)

    def load(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        path, client = self.ds.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
        return client or {}


def build_engine(model: torch.nn.Module, cfg: Config, run_dir: Path | None = None) -> Engine:
    import deepspeed

    config_dict = ds_config(cfg, dist.world_size())
    if run_dir is not None and dist.is_main():
        (run_dir / "ds_config.json").write_text(json.dumps(config_dict, indent=1))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr_at(cfg, 0), betas=cfg.optim.betas, eps=cfg.optim.eps)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config_dict)
    return Engine(ds_engine, cfg, config_dict)


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights from a sharded checkpoint, any ZeRO stage, no process group needed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.float().clone() for k, v in sd.items()}
