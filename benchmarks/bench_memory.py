"""Peak memory per rank: ZeRO-3 against ZeRO-0, for a U-Net of about 300M parameters.

    .venv/bin/python benchmarks/bench_memory.py [--model 300m|mid] [--ranks 2] [--stages 0 3] [--steps 2]
                                                [--no-ema] [--json]

Each stage runs as its own job of --ranks local processes (one thread each). Every rank
builds the `300m` U-Net of bench_train.py (SD-2-base's layout at 0.6x the width; `mid` is
its 165M model, for machines without ~16 GB free for ZeRO-0 at 300M on 2 ranks), the
DeepSpeed engine (fp32, our AdamW) and the EMA, exactly as the trainer does, and takes
--steps optimizer steps on one synthetic (4, 16, 16) latent per rank (small activations:
the figure is about the model, gradient, optimizer and EMA state, which ZeRO partitions).

CPU memory has no allocator to ask for a peak, so the figure is the kernel's resident set.
glibc keeps freed blocks below its (dynamic, up to 32 MB) mmap threshold inside the
process, so under ZeRO-3 the freed whole model and every step's gathered layers and
activations would stay resident although no tensor uses them. By default the ranks run with
MALLOC_MMAP_THRESHOLD_=131072 (fixed): tensors of 128 kB and more are mapped and unmapped,
and resident memory follows the live tensors, as a GPU's allocated-memory counter does.
--glibc-default measures with glibc's defaults instead.

Per rank it reports:
  baseline   resident memory after importing torch/deepspeed/diffusers and joining the
             process group, before the model exists
  peak       the process's peak resident memory (getrusage ru_maxrss): what a node must have
  state      peak - baseline: what the training state itself cost

fp32 bytes per parameter, per rank, for N ranks (W weights, G gradients, A = 2 Adam moments,
E = EMA): ZeRO-0  W 4 + G 4 + A 8 + E 4 = 20;  ZeRO-3  (W 4 + fp32 master 4 + G 4 + A 8 +
E 4) / N plus the layers gathered at a time. The goal: ZeRO-3 peak at most 60% of ZeRO-0's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import Report, add_rank_args  # noqa: E402
from benchmarks.bench_train import Stepper, rss_gb, spawn_ranks  # noqa: E402


def worker(args: argparse.Namespace) -> int:
    import deepspeed  # noqa: F401  (counted in the baseline, as in the trainer)
    import diffusers  # noqa: F401

    from latentforge.training import engine as eng

    torch.set_num_threads(1)
    eng.init_distributed(600.0)
    rank = int(os.environ["RANK"])
    base, _ = rss_gb()
    t0 = time.perf_counter()
    s = Stepper(args.model, 1, args.stage, ema=not args.no_ema, init_dir=args.init_dir)  # init_dir: bench_init_from.py
    built, _ = rss_gb()
    if rank == 0:
        print(f"[bench] ZeRO-{args.stage}: {s.n_params / 1e6:.0f}M params, engine built in "
              f"{time.perf_counter() - t0:.0f}s; {args.steps} steps", flush=True)
    for i in range(args.steps):
        t1 = time.perf_counter()
        s.step(i)
        if rank == 0:
            print(f"[bench] ZeRO-{args.stage}: step {i + 1}/{args.steps} {time.perf_counter() - t1:.1f}s", flush=True)
    now, peak = rss_gb()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "params": s.n_params, "baseline": base, "after_build": built, "after_steps": now, "peak": peak}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="300m", choices=["300m", "mid"])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--stage0-ranks", type=int, default=0,
                    help="ranks for ZeRO-0 (default: --ranks). Nothing is partitioned at stage 0, so a rank's "
                         "memory does not depend on how many there are; 1 halves what the machine must hold, "
                         "and leaves out the gradient all-reduce's buffers (ZeRO-0's figure comes out lower)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no-ema", action="store_true", help="measure without the EMA")
    ap.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    add_rank_args(ap)
    ap.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--init-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    rep = Report(f"peak memory per rank, {args.ranks} ranks, `{args.model}` U-Net, fp32"
                 + (" (no EMA)" if args.no_ema else " with EMA")
                 + (", glibc defaults" if args.glibc_default else ", MALLOC_MMAP_THRESHOLD_=131072"))
    if not args.glibc_default:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # inherited by the ranks
    peaks: dict[int, float] = {}
    for stage in args.stages:
        with tempfile.TemporaryDirectory() as out:
            nranks = args.stage0_ranks if stage == 0 and args.stage0_ranks else args.ranks
            print(f"[bench] ZeRO-{stage}: starting {nranks} ranks", flush=True)
            codes = spawn_ranks(__file__, ["--worker", f"--stage={stage}", f"--out={out}", f"--steps={args.steps}",
                                           f"--model={args.model}"]
                                + (["--no-ema"] if args.no_ema else []), nranks)
            if any(codes):
                print(f"[bench] ZeRO-{stage}: ranks exited with {codes}", file=sys.stderr)
                return 1
            ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nranks)]
        if stage == args.stages[0]:
            rep.add("parameters", ranks[0]["params"] / 1e6, "M")
        peaks[stage] = max(r["peak"] for r in ranks)
        rep.add(f"ZeRO-{stage}: ranks", len(ranks), "")
        for r in ranks:
            rep.add(f"ZeRO-{stage} rank {r['rank']}: peak", r["peak"], "GB resident")
            rep.add(f"ZeRO-{stage} rank {r['rank']}: state (peak - baseline)", r["peak"] - r["baseline"],
                    f"GB (baseline {r['baseline']:.2f} GB)")
            rep.add(f"ZeRO-{stage} rank {r['rank']}: after the steps", r["after_steps"], "GB resident")
        rep.add(f"ZeRO-{stage}: state per parameter",
                max(r["peak"] - r["baseline"] for r in ranks) * 1e9 / ranks[0]["params"], "bytes")
    if 0 in peaks and 3 in peaks:
        rep.add("ZeRO-3 / ZeRO-0 peak per rank", 100 * peaks[3] / peaks[0], "% (goal: <= 60%)")
    rep.print(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
