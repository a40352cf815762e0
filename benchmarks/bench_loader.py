"""Loader throughput: samples/s out of LatentLoader vs the raw read rate of the same files.

    .venv/bin/python benchmarks/bench_loader.py [--samples 2048] [--parts 16] [--shapes sd2] [--batch 32]

Writes a random latent dataset in the real format (data.latents.write_random_dataset)
with the shapes of the sd2-base-256 preset (VAE posterior 4x32x32 mean + std, ViT-H-14
penultimate tokens 77x1024, pooled 1024; ~180 KB a sample in fp16), then measures, on a
warm page cache:

  raw read        every part file's bytes read with one read() each: the ceiling for
                  anything that reads these files
  tar iteration   tarfile over every member, reading its bytes (a plain WebDataset read)
  loader          LatentLoader, one rank, W DataLoader workers, micro-batch B, one epoch,
                  counting from iter() (worker start-up included) to the last batch:
                  samples come out as f32 tensors with latents finalised (mean + std*eps)
  buckets         the same samples in --bucket-parts parts, written three times: square, as a
                  bucketed dataset (--buckets shapes of about the same latent area, part i in
                  bucket i mod buckets), and square with two captions a sample; read by the
                  same loader with each of `--workers`' counts, taking turns, best of N each:
                  the ratios to square (wall and CPU time of all processes) are the figures.
                  A stream of a bucket reads whole parts, and a part that straddles two
                  streams is read by both: "part reads per part" says what that costs
  padding         masked rows / all rows of one epoch's deal, from the loader's own plan (no
                  files): --pad-parts parts of ~--pad-per-part samples in --buckets buckets
                  and 3 weighted sources, micro-batch 2 (sd2-base-256's 2,048 global batch
                  on 1,024 ranks), at several world sizes with 4 workers per rank

Goals: loader >= 50% of the raw read rate (issue 3); buckets >= 90% of square only and
padding <= 2% at 1,024 ranks (issue 14).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import Report, cpu_seconds  # noqa: E402
from latentforge.data import latents as lat  # noqa: E402
from latentforge.data.loader import LatentLoader  # noqa: E402

SHAPES = {
    "sd2": {"latent": [4, 32, 32], "text": [77, 1024], "pooled": [1024]},  # sd2-base-256
    "tiny": {"latent": [48, 8, 8], "text": [77, 64], "pooled": [64]},  # the tiny preset at 32 px
}


def raw_read(files: list[Path]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) to read every file's bytes."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    n = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            n += len(fh.read())
    return time.perf_counter() - t0, cpu_seconds() - c0


def tar_iteration(files: list[Path]) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), cpu_seconds()
    for f in files:
        with tarfile.open(f, "r") as tar:
            for m in tar:
                tar.extractfile(m).read()  # type: ignore[union-attr]
    return time.perf_counter() - t0, cpu_seconds() - c0


def loader_epoch(d: Path, manifest: dict, workers: int, batch: int, prefetch: int) -> tuple[float, float, int, float]:
    """(wall seconds for one epoch, CPU seconds, real samples, seconds until the first batch)."""
    loader = LatentLoader(d, manifest["parts"], micro_batch=batch, seed=0, rank=0, world_size=1,
                          num_workers=workers, prefetch_factor=prefetch, scale=0.18215, shift=0.0,
                          shapes=manifest["shapes"], caption_weights=(1.0, 1.0), default_size=(256, 256))
    steps = loader.steps_remaining
    n = 0
    t0, c0 = time.perf_counter(), cpu_seconds()
    it = iter(loader)
    first = None
    for _ in range(steps):
        b = next(it)
        if first is None:
            first = time.perf_counter() - t0
        n += int(b["mask"].sum())
    wall = time.perf_counter() - t0
    del it, b  # shuts the workers down, so their CPU time is counted
    gc.collect()
    return wall, cpu_seconds() - c0, n, first or 0.0


def part_reads(manifest: dict, workers: int, batch: int) -> float:
    """Part files read per part in one epoch at one rank x `workers` (a stream reads each
    part its segments touch, whole)."""
    lo = LatentLoader("/nonexistent", manifest["parts"], micro_batch=batch, seed=0, rank=0, world_size=1,
                      num_workers=workers, shapes=manifest["shapes"])
    reads = sum(len({seg.part for seg in st}) for p in lo._plan.plans.values() for st in p.streams)
    return reads / sum(1 for p in manifest["parts"] if p["count"])


def bucket_shapes(square: list[int], n: int) -> list[list[int]]:
    """`n` latent shapes of about the area of `square` [C, h, w]: the square one first, then
    pairs of a wide and a tall one."""
    C, h, _ = square
    out = [[C, h, h]]
    for k in range(1, n):
        a = h + 4 * ((k + 1) // 2)  # the long side grows, the short one shrinks to keep the area
        wide = [C, max(1, h * h // a), a]
        out.append(wide if k % 2 else [C, wide[2], wide[1]])
    return out[:n]


def padding_table(parts: int, per_part: int, shapes: list[list[int]], as_json: bool) -> None:
    """Padding of one epoch's deal at several world sizes (planning only, no files)."""
    import numpy as np

    from latentforge.data.loader import EpochPlan, Layout, epoch_segments

    rng = np.random.default_rng(0)
    counts = rng.integers(per_part // 2, per_part * 3 // 2, size=parts)
    part_list = [{"file": "x", "count": int(c), "source": int(i % 3), "latent": shapes[int(rng.integers(len(shapes)))]}
                 for i, c in enumerate(counts)]
    total = int(counts.sum())
    rep = Report(f"padding per epoch (masked rows / all rows): {total:,} samples in {parts:,} parts, "
                 f"{len(shapes)} buckets, 3 sources weighted 2:1:1, micro-batch 2, 4 workers per rank")
    for world in (1, 8, 64, 1024):
        lo = LatentLoader("/nonexistent", part_list, micro_batch=2, seed=0, rank=0, world_size=world, num_workers=4,
                          shapes={"latent": shapes[0], "text": [77, 1024], "pooled": [1024]},
                          sources=[{"name": n, "weight": w} for n, w in (("a", 2.0), ("b", 1.0), ("c", 1.0))])
        rep.add(f"{world} ranks", 100 * lo.padding_fraction, "%", fmt="{:.3f}")
    # For comparison, one bucket and one source: this deal, and the greedy deal of whole
    # segments that the loader used before buckets (still used to finish a version-1 position).
    segs = epoch_segments(0, 0, [int(c) for c in counts])
    for balanced in (True, False):
        plan = EpochPlan(segs, Layout(1024, 4, 2), [tuple(shapes[0])] * len(counts), 0, 0, balanced=balanced)
        rows = plan.steps * 1024 * 2
        rep.add(f"1024 ranks, square, one source, {'this deal' if balanced else 'greedy deal (before buckets)'}",
                100 * plan.padding / rows, "%", fmt="{:.3f}")
    rep.print(as_json)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--parts", type=int, default=16)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="sd2")
    ap.add_argument("--batch", type=int, default=32, help="micro-batch per rank")
    ap.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to measure")
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="best of N for every figure")
    ap.add_argument("--dir", default=None, help="where to write the dataset (default: a temporary directory)")
    ap.add_argument("--buckets", type=int, default=5, help="bucket shapes of the bucketed dataset (0: skip)")
    ap.add_argument("--bucket-parts", type=int, default=64, help="parts of the square vs bucketed comparison")
    ap.add_argument("--pad-parts", type=int, default=10000, help="padding simulation: parts")
    ap.add_argument("--pad-per-part", type=int, default=500, help="padding simulation: mean samples per part")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # the loader's work is per-sample copies; workers give the parallelism
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_loader_"))
    d = tmp / "latents"
    shapes = SHAPES[args.shapes]
    per = args.samples // args.parts
    counts = [per + (i < args.samples % args.parts) for i in range(args.parts)]
    print(f"[bench_loader] writing {args.samples} random samples ({args.shapes} shapes) in {args.parts} parts "
          f"to {d}", flush=True)
    manifest = lat.write_random_dataset(d, counts, shapes, seed=0)
    files = [d / p["file"] for p in manifest["parts"]]
    total_bytes = sum(f.stat().st_size for f in files)
    n = manifest["written"]

    rep = Report(f"latent loader throughput ({args.shapes} shapes, {n} samples, "
                 f"{total_bytes / n / 1024:.0f} KiB/sample, micro-batch {args.batch})")
    raw_read(files)  # warm the page cache
    t_raw, c_raw = min(raw_read(files) for _ in range(args.repeats))
    raw_rate = n / t_raw
    rep.add("raw read (bytes of the part files)", raw_rate, "samples/s")
    rep.add("raw read bandwidth", total_bytes / t_raw / 1e6, "MB/s")
    rep.add("raw read CPU time", c_raw / n * 1e6, "us/sample")
    t_tar, c_tar = min(tar_iteration(files) for _ in range(args.repeats))
    rep.add("tarfile member iteration", n / t_tar, "samples/s")
    rep.add("tarfile member iteration CPU time", c_tar / n * 1e6, "us/sample")
    for w in (int(x) for x in args.workers.split(",")):
        runs = [loader_epoch(d, manifest, w, args.batch, args.prefetch) for _ in range(args.repeats)]
        t, c, got, first = min(runs)
        assert got == n, (got, n)
        rep.add(f"loader, {w} workers", n / t, "samples/s")
        rep.add(f"loader, {w} workers / raw read", n / t / raw_rate, "", fmt="{:.0%}")
        rep.add(f"loader, {w} workers / tarfile iteration", n / t * t_tar / n, "", fmt="{:.0%}")
        rep.add(f"loader, {w} workers, CPU time (all processes)", min(r[1] for r in runs) / n * 1e6, "us/sample")
        rep.add(f"loader, {w} workers, first batch after", first * 1e3, "ms")
    if args.buckets:
        bshapes = bucket_shapes(shapes["latent"], args.buckets)
        per = args.samples // args.bucket_parts
        bcounts = [per + (i < args.samples % args.bucket_parts) for i in range(args.bucket_parts)]
        sets = {"square": lat.write_random_dataset(tmp / "cmp-square", bcounts, shapes, seed=0),
                f"{len(bshapes)} buckets": lat.write_random_dataset(
                    tmp / "cmp-buckets", bcounts, shapes, seed=0,
                    part_latents=[bshapes[i % len(bshapes)] for i in range(len(bcounts))]),
                "square, 2 captions": lat.write_random_dataset(tmp / "cmp-captions", bcounts, shapes, seed=0,
                                                               captions=2)}
        dirs = dict(zip(sets, (tmp / "cmp-square", tmp / "cmp-buckets", tmp / "cmp-captions")))
        for w in (int(x) for x in args.workers.split(",")):
            runs: dict[str, list] = {k: [] for k in sets}
            for _ in range(args.repeats):  # taking turns, so all see the same machine load
                for k, m in sets.items():
                    runs[k].append(loader_epoch(dirs[k], m, w, args.batch, args.prefetch))
            wall = {k: min(r[0] for r in v) for k, v in runs.items()}
            cpu = {k: min(r[1] for r in v) for k, v in runs.items()}
            for k in sets:
                rep.add(f"{k}, {args.bucket_parts} parts, {w} workers", n / wall[k], "samples/s")
                if k != "square":
                    rep.add(f"  {k} / square, wall | CPU time", f"{wall['square'] / wall[k]:.0%} | "
                                                                 f"{cpu['square'] / cpu[k]:.0%}")
        for k in ("square", f"{len(bshapes)} buckets"):
            rep.add(f"part reads per part, {k}, {w} workers", part_reads(sets[k], w, args.batch), "", fmt="{:.2f}")
    rep.print(args.json)
    if args.buckets and args.pad_parts:
        padding_table(args.pad_parts, args.pad_per_part, bucket_shapes(shapes["latent"], args.buckets), args.json)
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
