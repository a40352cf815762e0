"""Training throughput and model FLOP utilisation (MFU) of the trainer's step.

    .venv/bin/python benchmarks/bench_train.py [--model tiny|mid|all] [--batch N] [--steps 6]
                                               [--zero-stage 2] [--threads N] [--json]

What is timed is one optimizer step of the real trainer, in one rank: DeepSpeed engine
(ZeRO stage --zero-stage, fp32 on CPU), the diffusion objective (training/diffusion.py
loss_fn), backward, clipping, the AdamW step and the EMA update. Inputs are synthetic
latents and text embeddings of the model's shapes: the data loader has its own benchmark
(bench_loader.py), and on this 2-core machine its workers would take a core from the step.

FLOPs: torch.utils.flop_counter over the U-Net forward and backward of one step (matmuls,
convolutions, attention; elementwise ops count zero, the usual MFU convention). Peak: the
fp32 matmul rate measured in this process, at the same thread count, just before the timed
steps (benchmarks/_common.matmul_peak; its fastest run, so the MFU is conservative).

Models:
  tiny   the `tiny` preset: 32 px through the pixel codec -> (48, 8, 8) latents, the tiny
         open_clip's (77, 64) tokens, U-Net (32, 64), ~1.1M parameters
  mid    256 px through an SD-style VAE -> (4, 32, 32) latents, ViT-H-sized (77, 1024) tokens,
         U-Net (192, 384, 768) with 2 resnets per level, ~100M parameters

The helpers here (`Stepper`) are also used by bench_memory.py and bench_scaling.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import Report, count_flops, matmul_peak  # noqa: E402

# name -> (config overrides on the tiny preset, latent (C, h, w), text (L, D), pooled P)
MODELS: dict[str, tuple[list[str], tuple[int, int, int], tuple[int, int], int]] = {
    "tiny": ([], (48, 8, 8), (77, 64), 64),
    "mid": (["model.block_out_channels=[192, 384, 768]", "model.layers_per_block=2",
             "model.down_block_types=[CrossAttnDownBlock2D, CrossAttnDownBlock2D, DownBlock2D]",
             "model.up_block_types=[UpBlock2D, CrossAttnUpBlock2D, CrossAttnUpBlock2D]",
             "model.attention_head_dim=64"], (4, 32, 32), (77, 1024), 1024),
    # ~300M parameters (SD-2-base's layout at 0.6x the width); bench_memory.py's model.
    "300m": (["model.block_out_channels=[192, 384, 768, 768]", "model.layers_per_block=2",
              "model.down_block_types=[CrossAttnDownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D, DownBlock2D]",
              "model.up_block_types=[UpBlock2D, CrossAttnUpBlock2D, CrossAttnUpBlock2D, CrossAttnUpBlock2D]",
              "model.attention_head_dim=64"], (4, 16, 16), (77, 1024), 1024),
}


class Stepper:
    """The trainer's optimizer step on synthetic inputs, in this rank (RANK/WORLD_SIZE from
    the environment, or a one-rank group). `step(i)` runs micro-batches x accumulation."""

    def __init__(self, model: str, micro_batch: int, zero_stage: int, extra: list[str] = (),
                 ema: bool = True, init_dir: str = "", lora_rank: int = 0):
        """init_dir: a diffusers U-Net folder to start from, loaded as model.init_from does
        (training/init_from.py); lora_rank: train LoRA adapters on it (the trainer's build_model)."""
        from latentforge import dist
        from latentforge.config import resolve
        from latentforge.training import engine as eng
        from latentforge.training.diffusion import Schedule
        from latentforge.training.ema import EMA
        from latentforge.training.unet import build_unet, count_params

        overrides, self.latent, self.text, self.pooled = MODELS[model]
        world = int(os.environ.get("WORLD_SIZE", 1))
        self.cfg = resolve("tiny", None, [*overrides, f"train.zero_stage={zero_stage}", "train.precision=fp32",
                                          f"train.global_batch_size={micro_batch * world}",
                                          f"ema.enabled={str(ema).lower()}", *extra])
        eng.init_distributed(self.cfg.train.collective_timeout_s)
        self.rank, self.world = dist.rank(), dist.world_size()
        torch.manual_seed(0)
        if init_dir:
            from latentforge.training.init_from import load_unet

            shapes = {"latent": list(self.latent), "text": list(self.text), "pooled": [self.pooled]}
            unet = load_unet(self.cfg.model, shapes, Path(init_dir))
        else:
            unet = build_unet(self.cfg.model, self.latent[0], self.latent[1], self.text[1], self.pooled)
        if lora_rank:
            from latentforge.training.unet import add_lora

            self.cfg.model.lora_rank = lora_rank
            add_lora(unet, self.cfg.model)
        self.n_params = count_params(unet)
        self.n_trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        self.engine = eng.build_engine(unet, self.cfg)
        self.ema = EMA(self.engine.ema_parameters(), self.cfg.ema, self.engine.ema_layout(),
                       self.engine.gather_shard) if ema else None
        self.schedule = Schedule.from_config(self.cfg.diffusion)
        self.micro_batch = micro_batch
        g = torch.Generator().manual_seed(100 + self.rank)
        self.x0 = torch.randn(micro_batch, *self.latent, generator=g)  # (B, C, h, w)
        self.cond = {"text": torch.randn(micro_batch, *self.text, generator=g),  # (B, L, D)
                     "pooled": torch.randn(micro_batch, self.pooled, generator=g)}  # (B, P)

    def model_fn(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        from latentforge.training.unet import unet_forward

        return unet_forward(self.engine, x, t, cond)

    def step(self, i: int) -> torch.Tensor:
        """One optimizer step; returns the last micro-batch's loss as a () device tensor, so a
        loop of steps makes no host sync of its own (as the trainer's); `float()` it to read it."""
        from latentforge.training import engine as eng
        from latentforge.training.diffusion import loss_fn
        from latentforge.training.loop import step_generator

        self.engine.set_lr(eng.lr_at(self.cfg, i))
        for micro in range(self.engine.accum):
            gen = step_generator(self.cfg.train.seed, self.rank, i, micro)
            loss = loss_fn(self.model_fn, self.x0, self.cond, self.cfg.diffusion, self.schedule, gen)["loss"]
            self.engine.backward(loss)
            applied = self.engine.step()  # () device flag, as in the trainer: no host sync
        if self.ema is not None:
            self.ema.update(self.engine.ema_parameters(), i, applied=applied)
        return loss.detach()

    def flops_per_step(self) -> int:
        """U-Net forward + backward FLOPs of one optimizer step (all micro-batches, this rank),
        counted on a plain copy of the model (same arithmetic, no ZeRO hooks)."""
        from latentforge.training.diffusion import loss_fn
        from latentforge.training.unet import build_unet, unet_forward

        unet = build_unet(self.cfg.model, self.latent[0], self.latent[1], self.text[1], self.pooled)
        gen = torch.Generator().manual_seed(0)

        def fwd_bwd() -> None:
            loss_fn(lambda x, t, c: unet_forward(unet, x, t, c), self.x0, self.cond, self.cfg.diffusion,
                    self.schedule, gen)["loss"].backward()

        return count_flops(fwd_bwd) * self.engine.accum


def rss_gb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GB (Linux)."""
    import resource

    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return current / 1e9, peak / 1e9


def spawn_ranks(script: str, args: list[str], nproc: int, threads: int = 1) -> list[int]:
    """Run `python SCRIPT ARGS` as `nproc` local ranks (RANK/WORLD_SIZE/MASTER_* as torchrun
    sets them, OMP_NUM_THREADS=threads); wait; return the exit codes."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
        procs.append(subprocess.Popen([sys.executable, script, *args], env=env))
    return [p.wait() for p in procs]


def cpu_peak(n: int = 2048, seconds: float = 2.0) -> tuple[float, float]:
    """fp32 matmul (FLOP per wall second, FLOP per CPU second of this process). The second
    is what the CPUs do while they run us: on a shared machine other processes take wall
    time, not CPU time, so it is the contention-free rate."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b
    k, w0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - w0 < seconds:
        a @ b
        k += 1
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return 2 * n ** 3 * k / wall, 2 * n ** 3 * k * torch.get_num_threads() / max(cpu, 1e-9)


def bench_model(rep: Report, name: str, batch: int, steps: int, zero_stage: int) -> None:
    from latentforge.training.diffusion import loss_fn
    from latentforge.training.unet import build_unet, unet_forward

    print(f"[bench] {name}: building the U-Net and the DeepSpeed engine (ZeRO {zero_stage}, fp32)", flush=True)
    s = Stepper(name, batch, zero_stage)
    flops = s.flops_per_step()
    print(f"[bench] {name}: {s.n_params / 1e6:.1f}M params, {flops / batch / 1e9:.2f} GFLOP per sample "
          f"(forward + backward); warm-up step", flush=True)
    s.step(0)
    peak = matmul_peak(torch.float32)
    print(f"[bench] peak: {peak.describe()}", flush=True)
    _, peak_cpu = cpu_peak()
    wall, cpu = [], []
    for i in range(1, steps + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        loss = float(s.step(i))  # per-step wall time: wait for the step (a GPU runs ahead otherwise)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        print(f"[bench] {name}: step {i}/{steps} {wall[-1]:.2f}s ({batch / wall[-1]:.2f} samples/s, "
              f"CPU busy {100 * cpu[-1] / wall[-1] / torch.get_num_threads():.0f}%) loss {loss:.4f}", flush=True)

    # The model's own share: forward + backward of a plain U-Net (no DeepSpeed) on the same batch.
    plain = build_unet(s.cfg.model, s.latent[0], s.latent[1], s.text[1], s.pooled)
    gen = torch.Generator().manual_seed(0)

    def fwd_bwd() -> None:
        loss_fn(lambda x, t, c: unet_forward(plain, x, t, c), s.x0, s.cond, s.cfg.diffusion, s.schedule,
                gen)["loss"].backward()

    fwd_bwd()
    c0 = time.process_time()
    fwd_bwd()
    model_cpu = (time.process_time() - c0) * s.engine.accum

    t, tc = statistics.median(wall), statistics.median(cpu)
    threads = torch.get_num_threads()
    rep.add(f"{name}: parameters", s.n_params / 1e6, "M")
    rep.add(f"{name}: batch", batch, "samples / step")
    rep.add(f"{name}: step time (median of {steps})", t, "s")
    rep.add(f"{name}: throughput", batch / t, "samples/s")
    rep.add(f"{name}: model FLOPs", flops / batch / 1e9, "GFLOP / sample (fwd + bwd)")
    rep.add(f"{name}: achieved", flops / t / 1e9, "GFLOP/s")
    rep.add(f"{name}: fp32 matmul peak", peak.best / 1e9, f"GFLOP/s ({peak.n}^2, {peak.threads} threads)")
    rep.add(f"{name}: MFU", 100 * flops / t / peak.best, "% of the matmul peak (wall clock)")
    rep.add(f"{name}: CPU busy during steps", 100 * tc / t / threads, "% of our threads' wall time")
    rep.add(f"{name}: MFU per CPU second", 100 * (flops * threads / tc) / peak_cpu,
            "% (step and peak both per CPU second: contention-free)")
    rep.add(f"{name}: U-Net fwd+bwd share", 100 * min(1.0, model_cpu / tc),
            "% of step CPU time (rest: ZeRO, AdamW, EMA)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all", choices=["tiny", "mid", "all"])
    ap.add_argument("--batch", type=int, default=0, help="samples per step (default: tiny 64, mid 8)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    rep = Report("training step throughput and MFU (one rank)")
    for name in (["tiny", "mid"] if args.model == "all" else [args.model]):
        bench_model(rep, name, args.batch or {"tiny": 64, "mid": 8}[name], args.steps, args.zero_stage)
    rep.print(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
