"""Exactly-once and bitwise resume with real processes, real DataLoader workers and real
latent shards (the plan itself is checked by simulation in test_loader.py), for a square
dataset and for one with aspect-ratio buckets and two captions per sample.

Each rank is a plain Python process running LatentLoader with its rank and world size: no
process group is needed, since the loader's position is the same on every rank. A rank
takes N micro-batches, records every batch and its state_dict, and exits: that is the
"interruption". The next segment starts every rank of the new world size from that state.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from latentforge.data import latents as lat
from latentforge.data.captions import choose_caption
from latentforge.data.loader import Finalize, LatentLoader, finalize

pytestmark = pytest.mark.slow

COUNTS = [13, 7, 20, 1, 9, 16, 11, 0, 5]  # samples per part; an empty part too
SHAPES = {"latent": [4, 4, 4], "text": [5, 8], "pooled": [8]}
BUCKETS = [[4, 4, 4], [4, 2, 6], [4, 6, 2], [4, 2, 6], [4, 4, 4], [4, 6, 2], [4, 2, 6], [4, 4, 4], [4, 6, 2]]
MICRO = 3
SEED = 7
SCALE, SHIFT = 0.5, 0.1
CAPTION_WEIGHTS = (1.0, 2.0)
KEYS = ("latents", "text", "pooled", "text_len", "mask", "part", "index", "caption", "time_ids")


def _loader(d: Path, rank: int, world: int, workers: int, position: dict | None) -> LatentLoader:
    m = lat.load_manifest(d)
    return LatentLoader(d, m["parts"], micro_batch=MICRO, seed=SEED, rank=rank, world_size=world,
                        num_workers=workers, prefetch_factor=2, scale=SCALE, shift=SHIFT, shapes=m["shapes"],
                        position=position, caption_weights=CAPTION_WEIGHTS, default_size=(32, 32))


def child(args: dict[str, Any]) -> None:
    """One rank of one segment: take `steps` micro-batches (or to the end of the epoch)."""
    torch.set_num_threads(1)
    loader = _loader(Path(args["dir"]), args["rank"], args["world"], args["workers"], args["position"])
    steps = loader.steps_remaining if args["steps"] == "end" else args["steps"]
    it = iter(loader)
    batches = []
    for _ in range(steps):
        b = next(it)
        batches.append({k: b[k].clone() for k in KEYS})
    torch.save({"batches": batches, "state": loader.state_dict()}, args["out"])


@pytest.fixture(scope="module", params=["square", "buckets"])
def dataset(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The square dataset, and one whose parts hold three buckets and two captions per sample."""
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "square":
        lat.write_random_dataset(d, COUNTS, SHAPES, seed=1, with_std=True)
    else:
        lat.write_random_dataset(d, COUNTS, SHAPES, seed=1, with_std=True, part_latents=BUCKETS, captions=2)
    return d


def run_segment(d: Path, tmp: Path, tag: str, world: int, workers: int, steps: int | str,
                position: dict | None) -> tuple[list[list[dict]], dict]:
    """Start `world` rank processes together; return (batches per rank, the common state)."""
    procs, outs = [], []
    for r in range(world):
        out = tmp / f"{tag}-rank{r}.pt"
        args = {"dir": str(d), "rank": r, "world": world, "workers": workers, "steps": steps, "position": position,
                "out": str(out)}
        procs.append(subprocess.Popen([sys.executable, __file__, json.dumps(args)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        outs.append(out)
    for p in procs:
        log, _ = p.communicate(timeout=240)
        assert p.returncode == 0, log
    results = [torch.load(o) for o in outs]
    states = [r["state"] for r in results]
    assert all(s == states[0] for s in states), states  # every rank agrees on the position
    return [r["batches"] for r in results], states[0]


def run_chain(d: Path, tmp: Path, layouts: list[tuple[int, int]], rng: random.Random,
              ) -> tuple[list[list[list[dict]]], list[int]]:
    """Segments with the given (world, workers), each cut at a random micro-step except the
    last, which runs to the end of the epoch. Returns per segment the batches per rank."""
    position, segments, cuts = None, [], []
    for i, (world, workers) in enumerate(layouts):
        left = _loader(d, 0, world, workers, position).steps_remaining
        steps: int | str = "end" if i == len(layouts) - 1 else rng.randint(1, left - 1)
        cuts.append(left if steps == "end" else steps)
        batches, position = run_segment(d, tmp, f"seg{i}", world, workers, steps, position)
        segments.append(batches)
    return segments, cuts


def test_exactly_once_across_world_sizes_1_2_1(dataset: Path, tmp_path: Path) -> None:
    """1 rank -> 2 ranks -> 1 rank (no workers), interrupted at random points: every sample
    of the epoch is seen exactly once, with its own data: latents, the caption the choice
    names, its size and crop numbers. With buckets every micro-batch holds one shape, the
    same on every rank at the same step. (2 -> 2: the next test.)"""
    rng = random.Random(2024)
    segments, cuts = run_chain(dataset, tmp_path, [(1, 2), (2, 2), (1, 0)], rng)
    seen: Counter = Counter()
    manifest = lat.load_manifest(dataset)
    parts = [lat.read_part(dataset / p["file"]) for p in manifest["parts"]]
    fin = Finalize(scale=SCALE, shift=SHIFT, seed=SEED)
    for seg in segments:
        for step in zip(*seg):  # the ranks' batches of one micro-step
            assert len({tuple(b["latents"].shape) for b in step}) == 1
    for batches in (b for seg in segments for rank in seg for b in rank):
        for i in range(MICRO):
            if batches["mask"][i] == 0:
                assert batches["part"][i] == -1 and not batches["latents"][i].any()
                continue
            p, idx = int(batches["part"][i]), int(batches["index"][i])
            seen[(p, idx)] += 1
            rec, c = parts[p][idx], int(batches["caption"][i])
            assert c == choose_caption(SEED, 0, rec.key, 1 + len(rec.extra), CAPTION_WEIGHTS)
            text, pooled = (rec.text, rec.pooled) if c == 0 else rec.extra[c - 1][1:]
            assert torch.equal(batches["text"][i], torch.from_numpy(text))
            assert torch.equal(batches["pooled"][i], torch.from_numpy(pooled))
            assert torch.equal(batches["latents"][i], finalize(rec.mean, rec.std, fin, 0, p, idx))
            assert int(batches["text_len"][i]) == (rec.meta["text_lens"][c] if c else rec.meta["text_len"])
            size = manifest["parts"][p].get("size", [32, 32])
            assert batches["time_ids"][i].tolist() == [rec.meta["orig_height"], rec.meta["orig_width"],
                                                       rec.meta["crop_top"], rec.meta["crop_left"], *size]
    nonempty = [n for n in COUNTS if n]
    expected = Counter((p, i) for p, n in enumerate(nonempty) for i in range(n))
    assert seen == expected, f"cuts {cuts}: missing {expected - seen}, repeated {seen - expected}"


def test_same_world_size_resume_is_bitwise_identical(dataset: Path, tmp_path: Path) -> None:
    """2 ranks x 2 workers, interrupted twice at random points and resumed with the same
    layout: every rank's batch sequence equals the uninterrupted run's, bit for bit. (The
    uninterrupted reference runs in this process, with its own DataLoader workers.)"""
    whole = []
    for r in range(2):
        loader = _loader(dataset, r, 2, 2, None)
        it = iter(loader)
        whole.append([{k: b[k].clone() for k in KEYS} for b in (next(it) for _ in range(loader.steps_remaining))])
    segments, cuts = run_chain(dataset, tmp_path, [(2, 2), (2, 2), (2, 2)], random.Random(7))
    for r in range(2):
        resumed = [b for seg in segments for b in seg[r]]
        assert len(resumed) == len(whole[r]), cuts
        for j, (a, b) in enumerate(zip(whole[r], resumed)):
            for k in KEYS:
                assert torch.equal(a[k], b[k]), f"rank {r} batch {j} field {k} differs (cuts {cuts})"


if __name__ == "__main__":
    child(json.loads(sys.argv[1]))
