"""Helpers shared by the benchmark scripts.

- `matmul_peak`: this machine's matmul throughput, measured in the calling process. An MFU
  (model FLOP utilisation) divides achieved FLOP/s by a peak measured in the same run,
  on the same device and dtype, under the same thread settings; a datasheet number or a
  figure from another day says little on a shared, noisy machine.
- `count_flops`: FLOPs of one call, from torch's FlopCounterMode (matmuls, convolutions
  and attention; elementwise ops count zero, which is the usual MFU convention).
- `time_calls`: wall times of repeated calls, synchronising CUDA around each.
- `Report`: a figures table printed at the end (and as JSON with --json).

Scripts run as `python benchmarks/bench_x.py` from the repository root and put the root
on sys.path themselves, so `from benchmarks._common import ...` works without installing.
Usage, e.g. for a training MFU:

    from benchmarks._common import matmul_peak, count_flops, time_calls
    peak = matmul_peak(torch.float32)                # FLOP/s on this device, this process
    flops = count_flops(lambda: train_step(batch))   # FLOPs of one step
    t = median(time_calls(lambda: train_step(batch), repeats=10))
    mfu = flops / t / peak.best
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


def sync(device: torch.device | str | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
               device: torch.device | str | None = None) -> list[float]:
    """Seconds per call for `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


@dataclass
class Peak:
    dtype: str
    device: str
    n: int  # matrix side
    threads: int  # torch intra-op threads when measured
    median: float  # FLOP/s, median of the timed runs
    best: float  # FLOP/s, fastest run: the denominator for MFU (a conservative utilisation)
    runs: list[float] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.dtype} {self.n}x{self.n} matmul on {self.device} ({self.threads} threads): "
                f"best {self.best / 1e9:.1f} GFLOP/s, median {self.median / 1e9:.1f} GFLOP/s")


def matmul_peak(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", n: int | None = None,
                repeats: int = 10, min_seconds: float = 0.05) -> Peak:
    """Matmul FLOP/s (2 n^3 per product) measured now, in this process.

    Each timed run repeats the product until it lasts at least `min_seconds`, so small
    CPUs and big GPUs both give stable figures. n defaults to 2048 on CPU, 8192 on CUDA.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    flop = 2.0 * n ** 3
    a @ b  # warm up (kernel selection, page faults)
    sync(device)
    t0 = time.perf_counter()
    a @ b
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, int(min_seconds / one))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        rates.append(flop * inner / (time.perf_counter() - t0))
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return Peak(dtype=name, device=dev, n=n, threads=torch.get_num_threads(), median=statistics.median(rates),
                best=max(rates), runs=rates)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers), user + system.
    On a shared machine CPU time per item is steadier than wall time."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn`, as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                            "load_avg_1min": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return info


class Report:
    """Figures collected during a benchmark and printed as one table at the end."""

    def __init__(self, title: str, command: str | None = None):
        self.title = title
        self.command = command or " ".join([Path(sys.executable).name, *sys.argv])
        self.rows: list[tuple[str, str, str]] = []
        self.values: dict[str, Any] = {}

    def add(self, name: str, value: float | int | str, unit: str = "", fmt: str = "{:.4g}") -> None:
        self.values[name] = value
        text = fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
        self.rows.append((name, text, unit))

    def print(self, as_json: bool = False) -> None:
        m = machine()
        print()
        print(f"== {self.title}")
        print(f"   command: {self.command}")
        print(f"   machine: {m.get('cpu', '?')}, {m['cpu_count']} cores, torch {m['torch']} "
              f"({m['torch_threads']} threads){', ' + m['gpu'] if m.get('gpu') else ''}")
        w = max((len(r[0]) for r in self.rows), default=10)
        for name, text, unit in self.rows:
            print(f"   {name:<{w}}  {text:>12} {unit}")
        print(f"   load average (1 min) at the end: {m['load_avg_1min']:.1f}")
        if as_json:
            print(json.dumps({"title": self.title, "command": self.command, "machine": m, "values": self.values},
                             default=str))
        sys.stdout.flush()


def add_rank_args(ap: argparse.ArgumentParser) -> None:
    """--json, and the hidden options a benchmark's own ranks run with (`--worker`, their
    `--out` folder): the benchmarks that start ranks through bench_train.spawn_ranks."""
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
