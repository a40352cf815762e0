"""Weak scaling of the trainer's step from 1 to N ranks, one thread each.

    .venv/bin/python benchmarks/bench_scaling.py [--model tiny] [--micro-batch 16] [--ranks 1 2]
                                                 [--steps 8] [--zero-stage 2] [--json]

Weak scaling: every rank keeps the same micro-batch, so N ranks do N times the work of
one per step; efficiency(N) = throughput(N) / (N x throughput(1)). Each rank runs the
trainer's optimizer step (bench_train.Stepper: DeepSpeed ZeRO --zero-stage, the diffusion
loss, backward with the gradient all-reduce over gloo, AdamW, EMA) on synthetic inputs, one
torch thread per rank, after one warm-up step. A step ends when the slowest rank ends it
(the gradient reduction is a barrier), so rank 0's step time is the job's.

On a shared machine the ranks compete with other processes for cores; the script prints
each rank's CPU busy share (CPU time / wall time) so a contended figure can be told apart
from a communication cost. It also gives the efficiency per CPU second (throughput per CPU
second of all ranks), which contention does not move.
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

from benchmarks._common import Report, add_rank_args  # noqa: E402
from benchmarks.bench_train import Stepper, spawn_ranks  # noqa: E402


def worker(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    s = Stepper(args.model, args.micro_batch, args.zero_stage)
    rank, world = s.rank, s.world
    s.step(0)  # warm-up
    wall, cpu = [], []
    for i in range(1, args.steps + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        float(s.step(i))  # per-step wall time: wait for the step (a GPU runs ahead otherwise)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        if rank == 0:
            print(f"[bench] {world} rank(s): step {i}/{args.steps} {wall[-1]:.2f}s "
                  f"({args.micro_batch * world / wall[-1]:.1f} samples/s)", flush=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "wall": wall, "cpu": cpu,
                                                              "params": s.n_params}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "mid"])
    ap.add_argument("--micro-batch", type=int, default=16, help="samples per rank per step")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--zero-stage", type=int, default=2)
    add_rank_args(ap)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    rep = Report(f"weak scaling, {args.model} U-Net, micro-batch {args.micro_batch} per rank, one thread per rank, "
                 f"ZeRO-{args.zero_stage}")
    thr: dict[int, float] = {}
    thr_cpu: dict[int, float] = {}
    for n in args.ranks:
        with tempfile.TemporaryDirectory() as out:
            print(f"[bench] {n} rank(s)", flush=True)
            codes = spawn_ranks(__file__, ["--worker", f"--out={out}", f"--model={args.model}",
                                           f"--micro-batch={args.micro_batch}", f"--steps={args.steps}",
                                           f"--zero-stage={args.zero_stage}"], n)
            if any(codes):
                print(f"[bench] {n} rank(s): exited with {codes}", file=sys.stderr)
                return 1
            ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(n)]
        step = statistics.median(ranks[0]["wall"])
        samples = args.micro_batch * n
        thr[n] = samples / step
        cpu_per_step = sum(statistics.median(r["cpu"]) for r in ranks)  # all ranks' CPU seconds per step
        thr_cpu[n] = samples / cpu_per_step
        busy = [100 * sum(r["cpu"]) / sum(r["wall"]) for r in ranks]
        rep.add(f"{n} rank(s): step time", step, "s (median)")
        rep.add(f"{n} rank(s): throughput", thr[n], "samples/s")
        rep.add(f"{n} rank(s): CPU busy per rank", " / ".join(f"{b:.0f}%" for b in busy), "")
        rep.add(f"{n} rank(s): samples per CPU second", thr_cpu[n], "")
    base = min(args.ranks)
    for n in args.ranks:
        if n != base:
            rep.add(f"weak-scaling efficiency {base} -> {n}", 100 * thr[n] * base / (n * thr[base]), "% (goal >= 85%)")
            rep.add(f"  per CPU second {base} -> {n}", 100 * thr_cpu[n] / thr_cpu[base], "% (contention-free)")
    rep.add("cores on this machine", os.cpu_count() or 0, "")
    rep.print(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
