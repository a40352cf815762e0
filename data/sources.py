"""Data sources and their weighted mixing.

A run reads one source (data.raw_shards -> data.latent_dir) or several (data.sources):
each has its own raw shards, its own latent directory, and a weight. Every source is
precomputed like a dataset of its own (its manifest, identity and accounting); one
precompute job array covers the shards of all sources, in config order.

Each epoch takes T_s samples from source s: the epoch size E (data.epoch_samples, or the
sources' sizes summed) split by weight with the largest-remainder method, so the counts
sum to E exactly. A source is read in passes, each a seeded permutation of its samples
(data/loader.py). Epoch e takes the next T_s samples of that endless sequence of passes:
a small source repeats (T_s > N_s spans passes), a large one is subsampled (T_s < N_s
leaves the rest of the pass to the next epoch), and within a pass every sample is seen
once before any repeats (mosaicml/streaming's proportion/repeat, with the choice carried
across epochs instead of redrawn).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from latentforge.config import Config
from latentforge.hashing import json_sha256


@dataclass(frozen=True)
class Source:
    name: str  # "" for the single unnamed source of data.raw_shards
    raw_shards: str  # raw shard spec
    latent_dir: Path
    weight: float


def sources_of(cfg: Config) -> list[Source]:
    """The run's sources: data.sources, or data.raw_shards/data.latent_dir as one unnamed source."""
    if not cfg.data.sources:
        return [Source("", cfg.resolved_raw_shards, cfg.resolved_latent_dir, 1.0)]
    return [Source(s.name, s.raw_shards, Path(s.latent_dir) if s.latent_dir else cfg.resolved_latent_dir / s.name,
                   s.weight) for s in cfg.data.sources]


def source_config(cfg: Config, src: Source) -> Config:
    """`cfg` as a single-source config for `src` (precompute runs each source this way)."""
    data = dataclasses.replace(cfg.data, raw_shards=src.raw_shards, latent_dir=str(src.latent_dir), sources=())
    return dataclasses.replace(cfg, data=data)


def work_items(work: Sequence[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """[(tag, raw shard url)] over every (tag, raw spec) in order: what a precompute job
    array splits into tasks (the tag is a source's index or latent directory)."""
    from latentforge.data.shards import expand_shards

    return [(tag, url) for tag, spec in work for url in expand_shards(spec)]


def epoch_counts(sizes: Sequence[int], weights: Sequence[float], epoch_samples: int = 0) -> list[int]:
    """Samples each source contributes to one epoch: epoch_samples (0 = sum of sizes) split
    by weight, largest remainder first (ties: the earlier source). A single source gets
    its size, whatever its weight: an unmixed epoch is one pass over the data."""
    if len(sizes) != len(weights):
        raise ValueError(f"epoch_counts: {len(sizes)} sizes but {len(weights)} weights")
    total = epoch_samples or sum(sizes)
    if len(sizes) == 1:
        return [total]
    wsum = float(sum(weights))
    exact = [total * w / wsum for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    for i, (n, c) in enumerate(zip(sizes, counts)):
        if c and not n:
            raise ValueError(f"data.sources[{i}]: holds no training samples but its weight asks for {c} per epoch")
    return counts


@dataclass
class Dataset:
    """The latent datasets of a run's sources, checked and split, as training and eval see them."""

    sources: list[Source]
    directory: Path  # the first source's latent directory (parts' files are relative to it with one source)
    shapes: dict[str, list[int]]  # {"latent": nominal [C, h, w], "text": [L, D], "pooled": [P]}
    train_parts: list[dict[str, Any]]  # with "source": index; "file" absolute when there are several sources
    heldout_parts: list[dict[str, Any]]  # the last data.heldout_shards parts of every source
    buckets: list[dict[str, Any]]  # {"size": [H, W], "latent": [C, h, w], "count"} over all sources; [] = square
    dataset: str = ""  # identity of the training parts (`training_set_id`), recorded in the loader position
    identity: dict[str, Any] | None = None  # what made the latents (the first manifest's, dtypes as recorded)

    def loader_sources(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "weight": s.weight} for s in self.sources]


def open_dataset(cfg: Config, encoders: Any) -> Dataset:
    """Every source's manifest, refused when its identity differs from what `encoders` (this
    config's) make, an "auto" dtype taking the recorded one (encoders.expected_identity);
    parts split into training and held-out ones per source."""
    from latentforge.data import latents as lat
    from latentforge.data.encoders import expected_identity

    srcs = sources_of(cfg)
    train: list[dict[str, Any]] = []
    heldout: list[dict[str, Any]] = []
    ids: list[str] = []
    identity: dict[str, Any] = {}
    shapes: dict[str, list[int]] = {}
    buckets: dict[tuple[int, int], dict[str, Any]] = {}
    for i, src in enumerate(srcs):
        manifest = lat.load_manifest(src.latent_dir)
        lat.check_identity(manifest, expected_identity(encoders, cfg, manifest["identity"]),
                           str(src.latent_dir / lat.MANIFEST))
        identity = identity or manifest["identity"]
        tr, ho = lat.split_parts(manifest, cfg.data.heldout_shards)
        ids.append(lat.dataset_id(src.latent_dir, manifest, tr))
        where = (lambda p: p) if len(srcs) == 1 else (lambda p, d=src.latent_dir: dict(p, file=str(d / p["file"])))
        train += [dict(where(p), source=i) for p in tr]
        heldout += [where(p) for p in ho]
        shapes = shapes or manifest["shapes"]
        for b in manifest.get("buckets", []):
            buckets.setdefault(tuple(b["size"]), dict(b, count=0))["count"] += b["count"]
    return Dataset(srcs, srcs[0].latent_dir, shapes, train, heldout,
                   [buckets[k] for k in sorted(buckets, key=lambda b: (b[1] / b[0], b))], _combined_id(srcs, ids), identity)


def _combined_id(srcs: list[Source], ids: list[str]) -> str:
    """One source: its latents.dataset_id (what a run before sources recorded); several: a
    hash over every source's name and id."""
    return ids[0] if len(ids) == 1 else json_sha256([[s.name, i] for s, i in zip(srcs, ids)])


def training_set_id(cfg: Config) -> str | None:
    """The identity of the run's training parts, as `open_dataset` records it, without the
    encoders' check; None while a source's manifest is missing (not precomputed yet)."""
    from latentforge.data import latents as lat

    srcs = sources_of(cfg)
    ids = []
    for src in srcs:
        if not (src.latent_dir / lat.MANIFEST).is_file():
            return None
        manifest = lat.load_manifest(src.latent_dir)
        ids.append(lat.dataset_id(src.latent_dir, manifest, lat.split_parts(manifest, cfg.data.heldout_shards)[0]))
    return _combined_id(srcs, ids)
