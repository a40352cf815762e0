"""The trainer's step against its physical bound, on the peer-sized model of issue 15.

    .venv/bin/python benchmarks/bench_peer.py [--steps 30] [--repeats 3] [--zero-stage 0] [--json]

The model is the one diffusers' examples/text_to_image/train_text_to_image.py trains in
the side-by-side: UNet2DConditionModel with block_out_channels (32, 64), a cross-attention
width of 64, 0.8M parameters, on (4, 8, 8) latents, 16 samples per process per step.
Measured in this one run, in turns (each figure the median of --repeats runs):

  bare 1 thread    a bare loop in one process: forward, the diffusion loss, backward,
                   torch's fused AdamW. No DeepSpeed, no data, no EMA: the bound.
  bare 2 threads   the same with 2 torch threads.
  bare pair        two bare 1-thread loops in two processes at once, not communicating:
                   the ceiling the machine itself sets for 2 ranks (shared caches and
                   memory bandwidth), which a lone loop does not meet.
  ours 1 rank      the trainer's optimizer step (bench_train.Stepper: DeepSpeed ZeRO-2
                   engine, the loss, backward, clipping, AdamW, the fused EMA) on one rank
                   with the same thread count as "bare 1 thread".
  ours 2 ranks     2 ranks x 1 thread (gloo), 16 samples per rank.

Goals: ours 1 rank >= 90% of bare 1 thread; ours 2 ranks >= 85% of twice bare 1 thread.

--zero-stage picks the trainer's ZeRO stage (default 0, the `demo` preset's setting for a
model this small; 2 is the SD presets'). The side-by-side with diffusers' example script
(v0.40.0, unmodified) on the same model is benchmarks/bench_vs_diffusers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import Report, add_rank_args, matmul_peak  # noqa: E402
from benchmarks.bench_train import MODELS, Stepper, spawn_ranks  # noqa: E402

# The peer's U-Net: diffusers' default block types at two levels, 0.80M parameters.
MODELS["peer"] = (["model.block_out_channels=[32, 64]", "model.attention_head_dim=32", "model.norm_num_groups=32",
                   "model.down_block_types=[CrossAttnDownBlock2D, DownBlock2D]",
                   "model.up_block_types=[UpBlock2D, CrossAttnUpBlock2D]", "diffusion.prediction=eps",
                   "diffusion.zero_terminal_snr=false"], (4, 8, 8), (77, 64), 64)
BATCH = 16


def bare_rate(steps: int, threads: int) -> float:
    """Samples/s of the bare loop (forward, loss, backward, fused AdamW) at `threads`."""
    from latentforge.config import resolve
    from latentforge.training.diffusion import Schedule, loss_fn
    from latentforge.training.unet import build_unet, unet_forward

    torch.set_num_threads(threads)
    overrides, latent, text, pooled = MODELS["peer"]
    cfg = resolve("tiny", None, overrides)
    torch.manual_seed(0)
    unet = build_unet(cfg.model, latent[0], latent[1], text[1], pooled)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    schedule = Schedule.from_config(cfg.diffusion)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(BATCH, *latent, generator=g)
    cond = {"text": torch.randn(BATCH, *text, generator=g), "pooled": torch.randn(BATCH, pooled, generator=g)}

    def step(i: int) -> None:
        loss = loss_fn(lambda x, t, c: unet_forward(unet, x, t, c), x0, cond, cfg.diffusion, schedule,
                       torch.Generator().manual_seed(i))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return BATCH * steps / (time.perf_counter() - t0)


def _bare_in_pair(steps: int, start: object, out: object) -> None:
    start.wait()  # both processes begin their loops together
    out.put(bare_rate(steps, 1))


def bare_pair_rate(steps: int) -> float:
    """Two bare 1-thread loops in two processes at once, no communication: what two ranks on
    this machine's 2 cores could reach if their collectives cost nothing (the cores share
    caches and memory bandwidth, which a lone loop has to itself). Their summed rate."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_bare_in_pair, args=(steps, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    rates = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    return sum(rates)


def worker(args: argparse.Namespace) -> int:
    """One rank of "ours": the trainer's step, timed after 3 warm-up steps."""
    torch.set_num_threads(1)
    s = Stepper("peer", BATCH, args.zero_stage)
    for i in range(3):
        s.step(i)
    t0 = time.perf_counter()
    for i in range(3, 3 + args.steps):
        s.step(i)
    float(s.step(3 + args.steps))  # the last step's loss: everything before it has finished
    elapsed = time.perf_counter() - t0
    Path(args.out, f"rank{s.rank}.json").write_text(json.dumps({"samples_per_s": BATCH * (args.steps + 1) / elapsed,
                                                               "params": s.n_params}))
    return 0


def ours_rate(steps: int, ranks: int, zero_stage: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        codes = spawn_ranks(__file__, ["--worker", f"--out={out}", f"--steps={steps}", f"--zero-stage={zero_stage}"],
                            ranks)
        if any(codes):
            raise SystemExit(f"bench_peer: ranks exited with {codes}")
        r = [json.loads((Path(out) / f"rank{i}.json").read_text()) for i in range(ranks)]
    return sum(x["samples_per_s"] for x in r)  # the job: every rank does BATCH samples per step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--zero-stage", type=int, default=0, help="the trainer's ZeRO stage (0: the tiny presets' default)")
    add_rank_args(ap)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    load0 = os.getloadavg()[0]
    runs: dict[str, list[float]] = {"bare1": [], "bare2": [], "pair": [], "ours1": [], "ours2": []}
    for r in range(args.repeats):  # in turns, so drift in the machine's load hits every figure alike
        print(f"[bench] round {r + 1}/{args.repeats}", flush=True)
        runs["bare1"].append(bare_rate(args.steps, 1))
        runs["bare2"].append(bare_rate(args.steps, 2))
        runs["pair"].append(bare_pair_rate(args.steps))
        runs["ours1"].append(ours_rate(args.steps, 1, args.zero_stage))
        runs["ours2"].append(ours_rate(args.steps, 2, args.zero_stage))
        print("[bench]   " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()) + " samples/s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    torch.set_num_threads(1)
    peak = matmul_peak(torch.float32)
    rep = Report(f"peer-sized U-Net (0.80M params, 4x8x8 latents, batch {BATCH}/process): the trainer against "
                 f"the bare loop, ZeRO stage {args.zero_stage}, medians of {args.repeats}")
    rep.add("bare loop, 1 thread", med["bare1"], "samples/s")
    rep.add("bare loop, 2 threads", med["bare2"], "samples/s")
    rep.add("bare loop, 2 processes x 1 thread at once", med["pair"], "samples/s")
    rep.add("ours, 1 rank x 1 thread", med["ours1"], "samples/s")
    rep.add("ours, 2 ranks x 1 thread", med["ours2"], "samples/s")
    rep.add("ours 1 rank / bare 1 thread", 100 * med["ours1"] / med["bare1"], "% (goal >= 90%)")
    rep.add("ours 2 ranks / (2 x bare 1 thread)", 100 * med["ours2"] / (2 * med["bare1"]), "% (goal >= 85%)")
    rep.add("2 bare processes at once / (2 x bare 1 thread)", 100 * med["pair"] / (2 * med["bare1"]),
            "% (the machine's own ceiling for 2 ranks)")
    rep.add("ours 2 ranks / 2 bare processes at once", 100 * med["ours2"] / med["pair"], "% (what communication costs)")
    rep.add("fp32 matmul peak, 1 thread", peak.best / 1e9, "GFLOP/s")
    rep.add("load average (1 min) at the start", load0, "")
    rep.print(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
