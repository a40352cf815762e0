"""The latent-shard loader: exactly once per epoch, resumable at any world size, with
aspect-ratio buckets and weighted sources.

What an epoch holds is a pure function of (seed, epoch, dataset, source weights)
(data/sources.py for the weights):

    source passes    source s is read in passes; pass p is a seeded permutation of its parts
                     (part order) and, inside each part, of its samples (sample order)
    epoch slice      epoch e takes T_s samples of source s: positions [start_s, start_s + T_s)
                     of its endless sequence of passes; start_s moves on by T_s each epoch.
                     One source: T = its size, so epoch e is pass e (and the order is the one
                     this loader had before sources existed)
    segment          (part, start, end, pass): positions [start, end) of that part's sample
                     order in that pass
    epoch order      the sources' segments interleaved by a seeded permutation (one source:
                     its pass order as it is)

How an epoch is read. Every part holds one bucket (a latent shape; a square dataset has
one), and each bucket is read on its own:

    deal             the bucket's segments, in epoch order, cut into S = world x workers
                     contiguous ranges of whole micro-batches, as equal as possible (only the
                     bucket's last batch is partial); stream r * W + w is rank r's worker w
    stream           reads its segments in order and cuts them into micro-batches of B
    bucket steps     ceil(bucket batches / world): a rank with a batch fewer takes a padding
                     batch (mask 0) of the bucket's shape
and across buckets:
    schedule         a seeded permutation of every bucket's steps: at global micro-step k all
                     ranks take a batch of bucket schedule[k], so no rank waits on a shape the
                     others do not have
    rank order       rank r takes its workers' batches in turn, passing over a worker without
                     a batch of the scheduled bucket; DataLoader's round-robin over workers
                     then hands batches over in nearly the order they are used

Padding per epoch is steps x world x B - samples: under one global step per bucket, so it
shrinks as the dataset grows (`EpochPlan.padding`, logged at each deal).

The position saved in a checkpoint is (epoch, the segments of the last deal, the layout
(world size, workers, micro-batch), k = micro-steps handed to the training loop since that
deal, each source's start, the latent set it belongs to: a resume on another latent set is
refused). Batches prefetched by workers are not counted. On resume with
the same layout the streams continue exactly where they were (bitwise). With a different
layout the unread parts of every segment are dealt again, in epoch order, to the new
streams, with a new schedule: every remaining sample is still seen exactly once. A
position saved before buckets existed (version 1) continues with that version's deal.

Reading (per DataLoader worker, one stream of each bucket): a part is read with one
`readinto` and indexed by walking its tar headers (`latents.PartIndex`); samples are fp16
views into that buffer. A batch is filled in place: latents finalised in f32 (mean + std *
eps, eps seeded by (seed, pass, part, index)), text and pooled copied as stored (fp16),
one caption per sample chosen by (seed, pass, key) (data/captions.py), SD-XL's size and
crop numbers from the sample's json (data/buckets.py). Batch tensors of a worker live in
shared memory from the start, so handing them to the main process copies nothing; on CUDA
the DataLoader pins them for an asynchronous copy to the GPU.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from latentforge import torch_compat
from latentforge.data import latents as lat
from latentforge.data.buckets import sample_time_ids
from latentforge.data.captions import choose_caption
from latentforge.data.latents import split_parts  # noqa: F401  (where callers have always found it)
from latentforge.data.sources import epoch_counts
from latentforge.log import get_logger

log = get_logger("loader")

# Text embeddings leave the loader as stored: fp16. The model casts them to its compute
# dtype (on the device), so converting here would only double the bytes moved between
# processes and to the GPU. Latents are finalised (mean + std * eps) in f32.
TEXT_DTYPE = torch.float16

Bucket = tuple[int, ...]  # a bucket, named by its latent shape (C, h, w)


class Segment(NamedTuple):
    part: int  # index into the loader's part list
    start: int  # first position in the part's sample order
    end: int  # one past the last position
    pass_: int = 0  # the source's pass the positions belong to (seeds the sample order and eps)

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    world_size: int
    num_workers: int  # DataLoader workers per rank; 0 reads in the main process (one stream)
    micro_batch: int

    @property
    def workers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_streams(self) -> int:
        return self.world_size * self.workers_per_rank

    def as_list(self) -> list[int]:
        return [self.world_size, self.num_workers, self.micro_batch]


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def part_order(seed: int, epoch: int, num_parts: int, source: int = 0) -> np.ndarray:
    """Permutation of a source's parts in pass `epoch` (the epoch, for one source)."""
    return _rng(seed, epoch, 0x5EED, *((source,) if source else ())).permutation(num_parts)


def sample_order(seed: int, epoch: int, part: int, n: int) -> np.ndarray:
    """Permutation of a part's samples in pass `epoch`: position -> index in the tar."""
    return _rng(seed, epoch, 0x5A3, part).permutation(n)


def epoch_segments(seed: int, epoch: int, counts: list[int]) -> list[Segment]:
    """One source's whole pass `epoch` in part order: what an unmixed epoch reads."""
    return source_slice(seed, 0, list(range(len(counts))), counts, epoch * sum(counts), sum(counts))


def source_slice(seed: int, source: int, parts: list[int], counts: list[int], start: int,
                 take: int) -> list[Segment]:
    """Positions [start, start + take) of a source's endless sequence of passes, as segments.
    `parts` are the source's part indices (into `counts`), in their manifest order."""
    n = sum(counts[p] for p in parts)
    if take <= 0 or n == 0:
        return []
    out: list[Segment] = []
    pos, end = start, start + take
    while pos < end:
        pass_, lo = divmod(pos, n)
        hi = min(n, lo + end - pos)  # this pass's positions [lo, hi)
        acc = 0  # first position of the current part in the pass
        for i in part_order(seed, pass_, len(parts), source):
            p = parts[int(i)]
            a, b = max(lo, acc), min(hi, acc + counts[p])
            if a < b:
                out.append(Segment(p, a - acc, b - acc, pass_))
            acc += counts[p]
            if acc >= hi:
                break
        pos += hi - lo
    return out


def deal(segments: list[Segment], num_streams: int) -> list[list[Segment]]:
    """Version 1's deal: each segment, in order, goes to the stream with the fewest samples
    (ties: the lowest stream). Balanced only when segments are small against the streams'
    shares; kept for positions saved by that version."""
    streams: list[list[Segment]] = [[] for _ in range(num_streams)]
    load = [0] * num_streams
    for seg in segments:
        s = min(range(num_streams), key=lambda i: (load[i], i))
        streams[s].append(seg)
        load[s] += seg.size
    return streams


def split(segments: list[Segment], layout: Layout) -> list[list[Segment]]:
    """Cut the segments, in order, into contiguous ranges of whole micro-batches, one per
    stream in stream order, as equal as possible: every stream gets q or q + 1 batches, the
    extra ones spread worker-major so ranks differ by at most one batch, and only the last
    batch of the last non-empty stream is partial."""
    S, B, world, W = layout.num_streams, layout.micro_batch, layout.world_size, layout.workers_per_rank
    n = sum(s.size for s in segments)
    nb = -(-n // B)
    base, extra = divmod(nb, S)
    quota = [base] * S
    for i in range(extra):
        w, r = divmod(i, world)
        quota[r * W + w] += 1
    cap = [q * B for q in quota]
    if nb:
        cap[max(i for i in range(S) if quota[i])] -= nb * B - n
    streams: list[list[Segment]] = [[] for _ in range(S)]
    it = iter(segments)
    seg: Segment | None = next(it, None)
    for s in range(S):
        need = cap[s]
        while need > 0 and seg is not None:
            take = min(need, seg.size)
            streams[s].append(Segment(seg.part, seg.start, seg.start + take, seg.pass_))
            need -= take
            seg = Segment(seg.part, seg.start + take, seg.end, seg.pass_) if take < seg.size else next(it, None)
    return streams


def merge_in_order(pieces: list[Segment], order_of: list[Segment]) -> list[Segment]:
    """`pieces` (parts of the segments `order_of`) sorted into `order_of`'s order, with
    adjacent pieces of one segment joined."""
    rank: dict[tuple[int, int], int] = {}
    for i, seg in enumerate(order_of):
        rank.setdefault((seg.part, seg.pass_), i)
    out: list[Segment] = []
    for p in sorted(pieces, key=lambda s: (rank[(s.part, s.pass_)], s.start)):
        if out and out[-1].part == p.part and out[-1].pass_ == p.pass_ and out[-1].end == p.start:
            out[-1] = Segment(p.part, out[-1].start, p.end, p.pass_)
        else:
            out.append(p)
    return out


class Plan:
    """One deal of one bucket's segments to streams, and the batch schedule it implies."""

    def __init__(self, segments: list[Segment], layout: Layout, balanced: bool = True):
        self.segments = segments
        self.layout = layout
        self.balanced = balanced
        self.streams = split(segments, layout) if balanced else deal(segments, layout.num_streams)
        B = layout.micro_batch
        self._offsets = [list(itertools.accumulate((s.size for s in st[:-1]), initial=0)) if st else []
                         for st in self.streams]  # first sample of each segment within its stream
        self.stream_samples = [sum(s.size for s in st) for st in self.streams]
        self.stream_batches = [math.ceil(n / B) for n in self.stream_samples]
        W = layout.workers_per_rank
        self.rank_lengths = [sum(self.stream_batches[r * W:(r + 1) * W]) for r in range(layout.world_size)]
        self.steps = max(self.rank_lengths, default=0)  # micro-steps every rank takes in this deal

    def rank_schedule(self, rank: int) -> list[tuple[int, int]]:
        """[(stream, batch index in that stream)] in the order rank `rank` consumes them:
        round-robin over its streams, skipping exhausted ones."""
        W = self.layout.workers_per_rank
        mine = list(range(rank * W, (rank + 1) * W))
        out = []
        for i in range(max((self.stream_batches[s] for s in mine), default=0)):
            out.extend((s, i) for s in mine if i < self.stream_batches[s])
        return out

    def batch_samples(self, stream: int, j: int) -> list[tuple[int, int]]:
        """[(part, position)] of batch j of a stream (without reading anything)."""
        return [(p, pos) for p, pos, _ in self.batch_positions(stream, j)]

    def batch_positions(self, stream: int, j: int) -> list[tuple[int, int, int]]:
        """[(part, position, pass)] of batch j of a stream."""
        B = self.layout.micro_batch
        lo, hi = j * B, (j + 1) * B
        segs, starts = self.streams[stream], self._offsets[stream]
        out = []
        i = max(0, bisect.bisect_right(starts, lo) - 1)  # the segment holding sample `lo`
        while i < len(segs) and starts[i] < hi:
            seg, offset = segs[i], starts[i]
            a, b = max(lo, offset), min(hi, offset + seg.size)
            out.extend((seg.part, seg.start + p - offset, seg.pass_) for p in range(a, b))
            i += 1
        return out

    def consumed_batches(self, k: int) -> list[int]:
        """Batches each stream has handed out after every rank took k micro-steps."""
        done = [0] * self.layout.num_streams
        for r in range(self.layout.world_size):
            for s, _ in self.rank_schedule(r)[:k]:
                done[s] += 1
        return done

    def unread(self, done: list[int]) -> list[Segment]:
        """The unread pieces of every segment once stream s has handed out done[s] batches,
        in the order of `self.segments` (epoch order)."""
        B = self.layout.micro_batch
        left = []
        for s, st in enumerate(self.streams):
            skip = done[s] * B
            for seg in st:
                take = min(skip, seg.size)
                skip -= take
                if take < seg.size:
                    left.append(Segment(seg.part, seg.start + take, seg.end, seg.pass_))
        return merge_in_order(left, self.segments)

    def remaining(self, k: int) -> list[Segment]:
        """Unread segments after k micro-steps, in the order of `self.segments` (epoch order)."""
        return self.unread(self.consumed_batches(k))


def bucket_schedule(seed: int, epoch: int, steps: dict[Bucket, int], salt: int) -> list[Bucket]:
    """Every bucket's micro-steps in a seeded order (all ranks compute the same one). `salt`
    tells the deals of one epoch apart (a re-deal after a layout change gets its own)."""
    slots = [b for b in sorted(steps) for _ in range(steps[b])]
    if len(steps) <= 1:
        return slots
    return [slots[i] for i in _rng(seed, epoch, 0xB0C, salt).permutation(len(slots))]


class EpochPlan:
    """One deal of an epoch's segments: a `Plan` per bucket, the bucket schedule shared by
    all ranks, and each rank's order of batches."""

    def __init__(self, segments: list[Segment], layout: Layout, bucket_of: Sequence[Bucket], seed: int,
                 epoch: int, balanced: bool = True):
        self.segments = segments
        self.layout = layout
        self.balanced = balanced
        by_bucket: dict[Bucket, list[Segment]] = {}
        for seg in segments:
            by_bucket.setdefault(bucket_of[seg.part], []).append(seg)
        self.buckets = sorted(by_bucket)
        self.plans = {b: Plan(by_bucket[b], layout, balanced) for b in self.buckets}
        self.samples = sum(seg.size for seg in segments)
        self.schedule = bucket_schedule(seed, epoch, {b: p.steps for b, p in self.plans.items()}, self.samples)
        self.steps = len(self.schedule)
        self._orders: dict[tuple[tuple[int, ...], ...], list[tuple[Bucket, int, int] | None]] = {}

    @property
    def padding(self) -> int:
        """Padding rows (mask 0) all ranks together take in this deal."""
        return self.steps * self.layout.world_size * self.layout.micro_batch - self.samples

    def rank_order(self, rank: int) -> list[tuple[Bucket, int, int] | None]:
        """Per global micro-step, the (bucket, stream, batch index) rank `rank` takes, or None
        for a padding batch: its workers in turn, passing over one without a batch of the
        scheduled bucket."""
        W = self.layout.workers_per_rank
        return [None if it is None else (it[0], rank * W + it[1], it[2]) for it in self._order(self._signature(rank))]

    def _signature(self, rank: int) -> tuple[tuple[int, ...], ...]:
        """Batches of each of the rank's workers in each bucket: all its order depends on.
        A balanced deal gives only a few distinct signatures over all ranks."""
        W = self.layout.workers_per_rank
        return tuple(tuple(self.plans[b].stream_batches[rank * W:(rank + 1) * W]) for b in self.buckets)

    def _order(self, sig: tuple[tuple[int, ...], ...]) -> list[tuple[Bucket, int, int] | None]:
        """`rank_order` with workers (0..W-1) in place of streams, for a rank of signature `sig`."""
        if sig in self._orders:
            return self._orders[sig]
        W = self.layout.workers_per_rank
        left = dict(zip(self.buckets, sig))
        taken = {b: [0] * W for b in self.buckets}
        out: list[tuple[Bucket, int, int] | None] = []
        ptr = 0
        for b in self.schedule:
            lb, tb = left[b], taken[b]
            w = next(((ptr + i) % W for i in range(W) if lb[(ptr + i) % W] > tb[(ptr + i) % W]), None)
            if w is None:
                out.append(None)
                continue
            out.append((b, w, tb[w]))
            tb[w] += 1
            ptr = (w + 1) % W
        self._orders[sig] = out
        return out

    def consumed(self, k: int) -> dict[Bucket, list[int]]:
        """Batches each stream of each bucket has handed out after every rank took k micro-steps."""
        W = self.layout.workers_per_rank
        done = {b: [0] * self.layout.num_streams for b in self.plans}
        per_sig: dict[tuple[tuple[int, ...], ...], dict[tuple[Bucket, int], int]] = {}
        for r in range(self.layout.world_size):
            sig = self._signature(r)
            if sig not in per_sig:
                counts: dict[tuple[Bucket, int], int] = {}
                for item in self._order(sig)[:k]:
                    if item is not None:
                        counts[(item[0], item[1])] = counts.get((item[0], item[1]), 0) + 1
                per_sig[sig] = counts
            for (b, w), n in per_sig[sig].items():
                done[b][r * W + w] += n
        return done

    def remaining(self, k: int) -> list[Segment]:
        """Unread segments after k micro-steps, in epoch order."""
        done = self.consumed(k)
        pieces = [seg for b, p in self.plans.items() for seg in p.unread(done[b])]
        return merge_in_order(pieces, self.segments)


@dataclass
class Position:
    """Where the loader is: saved in checkpoints via state_dict()."""

    epoch: int = 0
    base: list[Segment] | None = None  # segments of the last deal; None = the epoch's full order
    layout: Layout | None = None  # layout of the last deal
    k: int = 0  # micro-batches handed out since that deal (equal on every rank)
    starts: list[int] | None = None  # each source's start in its sequence of passes; None = epoch x T_s
    version: int = 2  # 1: saved before buckets (greedy deal, one bucket)
    dataset: str = ""  # the latent set the part indices refer to (latents.dataset_id); "" = unknown

    def state_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "epoch": self.epoch,
            "base": None if self.base is None else [list(s) for s in self.base],
            "layout": None if self.layout is None else self.layout.as_list(),
            "k": self.k,
            "starts": self.starts,
            "version": self.version,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "Position":
        epoch = int(d["epoch"])
        return cls(
            epoch=epoch,
            # Version 1 segments are (part, start, end) of the epoch's own pass.
            base=None if d["base"] is None else [Segment(*map(int, s)) if len(s) == 4 else
                                                 Segment(*map(int, s), epoch) for s in d["base"]],
            layout=None if d["layout"] is None else Layout(*map(int, d["layout"])),
            k=int(d["k"]),
            starts=None if d.get("starts") is None else [int(x) for x in d["starts"]],
            version=int(d.get("version", 1)),
            dataset=str(d.get("dataset") or ""),
        )


def plan_for(position: Position, counts: list[int], seed: int, layout: Layout) -> tuple[Plan, int]:
    """For one source in one bucket: the plan to read with `layout` from `position`, and how
    many of its micro-steps are already done. Same layout: the saved deal, continued
    (bitwise). Different layout: what is left, dealt again from step 0."""
    segments = position.base if position.base is not None else epoch_segments(seed, position.epoch, counts)
    old_layout = position.layout or layout
    plan = Plan(segments, old_layout, balanced=position.version >= 2)
    if old_layout == layout:
        return plan, position.k
    return Plan(plan.remaining(position.k), layout), 0


# ---------------------------------------------------------------------------------------
# Reading.


@dataclass(frozen=True)
class Finalize:
    """How stored posteriors become training latents: z = mean + std * eps; (z - shift) * scale."""

    scale: float
    shift: float
    seed: int


def _eps_generator(seed: int, epoch: int, part: int, index: int) -> torch.Generator:
    """The generator of one sample's eps: seeded by a hash of (seed, pass, part, index)."""
    key = struct.pack("<4q", seed, epoch, part, index)
    h = hashlib.blake2b(key, digest_size=8, person=b"latentforge-eps").digest()  # ~1 us; SeedSequence ~10
    return torch.Generator().manual_seed(int.from_bytes(h, "little"))


def finalize_batch(means: list[np.ndarray], stds: list[np.ndarray | None], fin: Finalize,
                   keys: list[tuple[int, int, int]], out: torch.Tensor) -> torch.Tensor:
    """Training latents from stored posteriors (fp16, (C, h, w) each), into out[:n] (f32):
    z = mean + std * eps, then (z - shift) * scale; keys[i] = (pass, part, index in the tar).

    eps of a sample depends only on (seed, pass, part, index), not on the layout or the
    batch it lands in, so a re-dealt sample keeps it (and a sample repeated in one epoch,
    a small source's next pass, gets new noise). The arithmetic runs once for the batch;
    per element it is the same two roundings (std * eps, then + mean) as one sample at a
    time, so results do not depend on the batching.
    """
    n = len(means)
    z = torch.from_numpy(np.stack(means)).float()  # (n, C, h, w)
    have = [s is not None for s in stds]
    if any(have):
        eps = torch.zeros_like(z)  # a sample without std (a deterministic codec) gets z = mean + 0
        for i, (pass_, part, index) in enumerate(keys):
            if have[i]:
                torch.randn(z.shape[1:], generator=_eps_generator(fin.seed, pass_, part, index), out=eps[i])
        if all(have):
            std = torch.from_numpy(np.stack(stds)).float()  # (n, C, h, w)
        else:
            std = torch.stack([torch.from_numpy(s).float() if s is not None else torch.zeros(z.shape[1:])
                               for s in stds])
        z = z.add_(std.mul_(eps))
    if fin.shift:
        z = z.sub_(fin.shift)
    return torch.mul(z, fin.scale, out=out[:n])


def finalize(rec_mean: np.ndarray, rec_std: np.ndarray | None, fin: Finalize, epoch: int, part: int,
             index: int) -> torch.Tensor:
    """One training latent (C, h, w) f32: `finalize_batch` for a single sample of pass `epoch`."""
    out = torch.empty(1, *rec_mean.shape)
    return finalize_batch([rec_mean], [rec_std], fin, [(epoch, part, index)], out)[0]


@dataclass(frozen=True)
class PartInfo:
    """What reading needs to know about the parts besides their files."""

    files: list[str]  # part files, relative to the latent directory (or absolute)
    target_size: list[tuple[int, int]]  # per part: the (height, width) its images were made at
    caption_weights: tuple[float, ...] = ()  # data.caption_weights
    part_source: list[int] = field(default_factory=list)  # per part: its source


class _StreamDataset(torch.utils.data.IterableDataset):
    """Yields the batches of this rank's streams, from global micro-step k0 onward, in the
    order the rank uses them. Each worker owns stream `rank * W + worker` of every bucket.
    Batches carry (bucket, stream, batch index) so the main process can put them in
    schedule order whatever order the workers deliver them in.

    What the stream holds after each stage:
        plan.plans[b].streams[s]  segments (part, start, end, pass), in deal order
        PartIndex(file)           the part in memory, one read; fields located, not decoded
        sample_order              positions -> indices in the tar, the pass's permutation
        _collate                  B samples -> batch tensors: latents finalised in f32, text and
                                  pooled of the chosen caption copied as stored (fp16), size and
                                  crop numbers from the sample's json
    """

    def __init__(self, latent_dir: Path, info: PartInfo, plan: EpochPlan, rank: int, k0: int, fin: Finalize,
                 shapes: dict[str, list[int]]):
        self.latent_dir = latent_dir
        self.info = info
        self.plan = plan
        self.rank = rank
        self.k0 = k0
        self.fin = fin
        self.shapes = shapes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        winfo = torch.utils.data.get_worker_info()
        W = self.plan.layout.workers_per_rank
        # With no DataLoader workers the single main-process stream is W == 1.
        mine = {self.rank * W + winfo.id} if winfo is not None else set(range(self.rank * W, (self.rank + 1) * W))
        gens: dict[tuple[Bucket, int], Iterator[dict[str, Any]]] = {}
        for item in self.plan.rank_order(self.rank)[self.k0:]:
            if item is None or item[1] not in mine:
                continue
            b, s, j = item
            if (b, s) not in gens:
                gens[(b, s)] = self._stream_batches(b, s, j)
            yield next(gens[(b, s)])

    def _stream_batches(self, bucket: Bucket, stream: int, j: int) -> Iterator[dict[str, Any]]:
        plan = self.plan.plans[bucket]
        B = plan.layout.micro_batch
        skip = j * B
        buf: list[tuple[int, int, int, lat.PartIndex]] = []  # (part, index in the tar, pass, the part's data)
        for seg in plan.streams[stream]:
            if skip >= seg.size:
                skip -= seg.size
                continue
            path = self.latent_dir / self.info.files[seg.part]
            part = lat.PartIndex(path)
            if len(part) < seg.end:
                raise lat.CorruptPart(f"{path}: holds {len(part)} samples, the manifest says at least {seg.end}; "
                                      f"re-run `latentforge precompute --verify`")
            order = sample_order(self.fin.seed, seg.pass_, seg.part, len(part))
            for pos in range(seg.start + skip, seg.end):
                buf.append((seg.part, int(order[pos]), seg.pass_, part))
                if len(buf) == B:
                    yield self._collate(bucket, stream, j, buf)
                    j += 1
                    buf = []
            skip = 0
        if buf:
            yield self._collate(bucket, stream, j, buf)

    def _collate(self, bucket: Bucket, stream: int, j: int, buf: list[tuple[int, int, int, lat.PartIndex]]
                 ) -> dict[str, Any]:
        B, n = self.plan.layout.micro_batch, len(buf)
        shapes = dict(self.shapes, latent=list(bucket))
        batch = _batch_buffers(B, n, shapes)
        want = (tuple(bucket), tuple(shapes["text"]), tuple(shapes["pooled"]))
        means, stds, text_len, caption, time_ids = [], [], [], [], []
        for i, (part, idx, pass_, data) in enumerate(buf):
            meta = data.meta(idx)
            c = choose_caption(self.fin.seed, pass_, data.keys[idx], data.num_captions(idx),
                               self.info.caption_weights)
            _, text_field, pooled_field = lat.caption_field(c)
            mean, text, pooled = data.array(idx, "mean"), data.array(idx, text_field), data.array(idx, pooled_field)
            if (mean.shape, text.shape, pooled.shape) != want:
                raise lat.CorruptPart(f"{data.path}: sample {data.keys[idx]} has shapes {mean.shape}, {text.shape}, "
                                      f"{pooled.shape}; the manifest says {want}")
            means.append(mean)  # (C, h, w) fp16 views into the part's buffer
            stds.append(data.array(idx, "std") if data.has(idx, "std.npy") else None)
            batch["text"][i].copy_(torch.from_numpy(text))  # (L, D) fp16, a plain copy
            batch["pooled"][i].copy_(torch.from_numpy(pooled))  # (P,)
            text_len.append(int(meta["text_lens"][c] if c else meta.get("text_len", 0)))
            caption.append(c)
            time_ids.append(sample_time_ids(meta, self.info.target_size[part]))
        keys = [(pass_, part, idx) for part, idx, pass_, _ in buf]
        finalize_batch(means, stds, self.fin, keys, out=batch["latents"])  # (n, C, h, w)
        batch["text_len"][:n] = torch.tensor(text_len)
        batch["mask"][:n] = 1.0
        batch["part"][:n] = torch.tensor([k[1] for k in keys])
        batch["index"][:n] = torch.tensor([k[2] for k in keys])
        batch["caption"][:n] = torch.tensor(caption)
        batch["time_ids"][:n] = torch.tensor(time_ids)
        batch["bucket"] = self.plan.buckets.index(bucket)
        batch["stream"] = stream
        batch["batch_index"] = j
        return batch


def empty_batch(B: int, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """A batch of B padding samples (mask 0). Shapes come from the manifest (the latent
    shape: the scheduled bucket's)."""
    return {
        "latents": torch.zeros(B, *shapes["latent"]),
        "text": torch.zeros(B, *shapes["text"], dtype=TEXT_DTYPE),
        "pooled": torch.zeros(B, *shapes["pooled"], dtype=TEXT_DTYPE),
        "text_len": torch.zeros(B, dtype=torch.long),
        "mask": torch.zeros(B),
        "part": torch.full((B,), -1, dtype=torch.long),
        "index": torch.full((B,), -1, dtype=torch.long),
        "caption": torch.full((B,), -1, dtype=torch.long),
        "time_ids": torch.zeros(B, 6),
        "bucket": -1,
        "stream": -1,
        "batch_index": -1,
    }


def _batch_buffers(B: int, n: int, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Uninitialised batch tensors for n real samples, padding rows n..B-1 zeroed.

    In a DataLoader worker every tensor is allocated in shared memory, as DataLoader's own
    default_collate does (`torch_compat.new_shared`): sending it to the main process
    then costs no copy, where a private tensor would be copied into a new segment. Fresh
    shared memory still costs a page fault per 4 KiB, written here and read there (about
    1 ms per MB on a busy VM): the reason text stays fp16 (TEXT_DTYPE).
    """
    in_worker = torch.utils.data.get_worker_info() is not None

    def alloc(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not in_worker:
            return torch.empty(shape, dtype=dtype)
        return torch_compat.new_shared(shape, dtype)

    batch: dict[str, Any] = {
        "latents": alloc(B, *shapes["latent"]),
        "text": alloc(B, *shapes["text"], dtype=TEXT_DTYPE),
        "pooled": alloc(B, *shapes["pooled"], dtype=TEXT_DTYPE),
        "text_len": alloc(B, dtype=torch.long),
        "mask": alloc(B),
        "part": alloc(B, dtype=torch.long),
        "index": alloc(B, dtype=torch.long),
        "caption": alloc(B, dtype=torch.long),
        "time_ids": alloc(B, 6),
        "bucket": -1,
        "stream": -1,
        "batch_index": -1,
    }
    for k in ("latents", "text", "pooled", "text_len", "mask", "time_ids"):
        batch[k][n:] = 0
    for k in ("part", "index", "caption"):
        batch[k][n:] = -1
    return batch


def _leave_stops_to_the_rank(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT. SLURM (scancel, preemption) sends SIGTERM
    to every process of a job step, a terminal's Ctrl-C sends SIGINT to every process of the
    foreground group; a worker would die on either, and the rank would then fail with
    "DataLoader worker exited unexpectedly" instead of checkpointing (docs/guarantees.md,
    guarantee 4). The rank still ends its workers: a sentinel at shutdown, SIGKILL after a timeout,
    and a worker exits by itself when its rank is gone."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LatentLoader:
    """Infinite iterator of micro-batches for this rank, crossing epochs.

    Every batch is a dict: latents (B, C, h, w) f32 (h, w: the scheduled bucket's), text
    (B, L, D) fp16, pooled (B, P) fp16, text_len (B,), mask (B,) 1 for real samples,
    part/index (B,) of each sample (-1 = pad), caption (B,) the caption used, time_ids
    (B, 6) f32 SD-XL's (orig h, orig w, crop top, crop left, target h, target w).

    `parts` may come from several sources ("source": index into `sources`, a list of
    {"name", "weight"}) and several buckets ("latent": [C, h, w], "size": [H, W] pixels);
    a part without them belongs to source 0 and the manifest's `shapes`. `default_size`
    is the (height, width) images without a bucket were made at (data.resolution).
    """

    def __init__(self, latent_dir: str | Path, parts: list[dict], *, micro_batch: int, seed: int, rank: int,
                 world_size: int, num_workers: int = 0, prefetch_factor: int = 2, scale: float = 1.0,
                 shift: float = 0.0, shapes: dict[str, list[int]], position: dict[str, Any] | None = None,
                 sources: list[dict[str, Any]] | None = None, epoch_samples: int = 0,
                 caption_weights: Sequence[float] = (), default_size: tuple[int, int] = (0, 0), dataset: str = ""):
        """`dataset`: the identity of `parts` (latents.dataset_id); a `position` saved for
        another latent set is refused (its part indices would name other parts)."""
        self.latent_dir = Path(latent_dir)
        self.counts = [int(p["count"]) for p in parts]
        if sum(self.counts) == 0:
            raise ValueError(f"{latent_dir}: the training split holds no samples")
        self.bucket_of: list[Bucket] = [tuple(p.get("latent", shapes["latent"])) for p in parts]
        self.part_source = [int(p.get("source", 0)) for p in parts]
        self.info = PartInfo(files=[p["file"] for p in parts],
                             target_size=[tuple(p["size"]) if "size" in p else tuple(default_size) for p in parts],
                             caption_weights=tuple(caption_weights), part_source=self.part_source)
        srcs = sources or [{"name": "", "weight": 1.0}]
        self.source_names = [str(s["name"]) for s in srcs]
        self.source_parts = [[i for i, s in enumerate(self.part_source) if s == j] for j in range(len(srcs))]
        sizes = [sum(self.counts[i] for i in ps) for ps in self.source_parts]
        self.take = epoch_counts(sizes, [float(s["weight"]) for s in srcs], epoch_samples)
        self.seed = seed
        self.rank = rank
        self.layout = Layout(world_size, num_workers, micro_batch)
        self.prefetch_factor = prefetch_factor
        self.fin = Finalize(scale=scale, shift=shift, seed=seed)
        self.shapes = shapes
        self.position = Position.from_state(position) if position else Position()
        if dataset and self.position.dataset and self.position.dataset != dataset:
            raise ValueError(f"data.latent_dir: the saved loader position belongs to latent set "
                             f"{self.position.dataset}, but {latent_dir} holds {dataset}; resume on the same latents, "
                             f"or start a new run (model.init_from=RUN_DIR starts it from this run's weights)")
        self.position.dataset = dataset or self.position.dataset
        if self.position.starts is None:
            self.position.starts = [self.position.epoch * t for t in self.take]
        if len(self.position.starts) != len(self.take):
            raise ValueError(f"data.sources: the saved loader position holds {len(self.position.starts)} source(s), "
                             f"the config {len(self.take)}; resume with the sources the run started with")
        if self.position.base and max(s.part for s in self.position.base) >= len(parts):
            raise ValueError(f"{latent_dir}: the saved loader position names part "
                             f"{max(s.part for s in self.position.base)}, the dataset has {len(parts)}")
        self._plan, self._k = self._plan_for(self.position)
        self._commit_plan()

    def _epoch_segments(self, epoch: int, starts: list[int]) -> list[Segment]:
        segs = [seg for s, parts in enumerate(self.source_parts)
                for seg in source_slice(self.seed, s, parts, self.counts, starts[s], self.take[s])]
        if len(self.source_parts) > 1:  # interleave the sources
            segs = [segs[i] for i in _rng(self.seed, epoch, 0x313).permutation(len(segs))]
        return segs

    def _plan_for(self, position: Position) -> tuple[EpochPlan, int]:
        """The plan to read with this layout from `position`, and how many of its micro-steps
        are done. Same layout: the saved deal, continued (bitwise). Different layout: what is
        left, dealt again from step 0."""
        assert position.starts is not None
        segments = position.base if position.base is not None else \
            self._epoch_segments(position.epoch, position.starts)
        old_layout = position.layout or self.layout
        plan = EpochPlan(segments, old_layout, self.bucket_of, self.seed, position.epoch,
                         balanced=position.version >= 2 or position.base is None)
        if old_layout == self.layout:
            return plan, position.k
        return EpochPlan(plan.remaining(position.k), self.layout, self.bucket_of, self.seed, position.epoch), 0

    def _commit_plan(self) -> None:
        p = self._plan
        self.position = Position(self.position.epoch, list(p.segments), self.layout, self._k,
                                 list(self.position.starts or []), 2 if p.balanced else 1,
                                 self.position.dataset)
        rows = p.steps * self.layout.world_size * self.layout.micro_batch
        log.info(f"epoch {self.epoch}: {p.samples} samples in {p.steps} micro-steps of {len(p.buckets)} bucket(s) "
                 f"from step {self._k}; padding {p.padding} of {rows} rows ({p.padding / max(rows, 1):.2%})")

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def padding_fraction(self) -> float:
        """Padding rows / all rows of the current deal (all ranks)."""
        rows = self._plan.steps * self.layout.world_size * self.layout.micro_batch
        return self._plan.padding / rows if rows else 0.0

    @property
    def steps_per_epoch(self) -> int:
        """Micro-steps in a full epoch at this layout (every rank takes the same number)."""
        assert self.position.starts is not None
        return EpochPlan(self._epoch_segments(self.epoch, self.position.starts), self.layout, self.bucket_of,
                         self.seed, self.epoch).steps

    @property
    def steps_remaining(self) -> int:
        """Micro-steps left in the current epoch (the same on every rank)."""
        return self._plan.steps - self._k

    def state_dict(self) -> dict[str, Any]:
        return self.position.state_dict()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self._iter_plan()
            # The deal is used up: next epoch, dealt from scratch at this layout.
            starts = [a + t for a, t in zip(self.position.starts or [], self.take)]
            self.position = Position(self.position.epoch + 1, None, None, 0, starts,
                                     dataset=self.position.dataset)
            self._plan, self._k = self._plan_for(self.position)
            self._commit_plan()

    def _iter_plan(self) -> Iterator[dict[str, Any]]:
        plan = self._plan
        order = plan.rank_order(self.rank)
        ds = _StreamDataset(self.latent_dir, self.info, plan, self.rank, self._k, self.fin, self.shapes)
        pending: dict[tuple[int, int, int], dict[str, Any]] = {}
        source: Iterator[dict[str, Any]] | None = None
        if any(item is not None for item in order[self._k:]):
            nw = self.layout.num_workers
            if nw:
                torch_compat.check_version()  # here, once, not as a traceback from inside a worker
            # Pinned host memory makes the trainer's .to(device) an async DMA on CUDA.
            dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=nw,
                                             prefetch_factor=self.prefetch_factor if nw else None,
                                             persistent_workers=False, pin_memory=torch.cuda.is_available(),
                                             worker_init_fn=_leave_stops_to_the_rank if nw else None)
            source = iter(dl)
        limit = (4 * max(self.prefetch_factor, 1) + len(plan.buckets)) * self.layout.workers_per_rank + 8
        while self._k < plan.steps:
            item = order[self._k]
            if item is not None:
                want = (plan.buckets.index(item[0]), item[1], item[2])
                while want not in pending:
                    b = next(source)  # type: ignore[arg-type]
                    pending[(b["bucket"], b["stream"], b["batch_index"])] = b
                    if len(pending) > limit:
                        raise RuntimeError(f"loader: batch {want} never arrived (got {sorted(pending)[:8]})")
                batch = pending.pop(want)
            else:
                batch = empty_batch(self.layout.micro_batch, dict(self.shapes, latent=list(plan.schedule[self._k])))
            self._k += 1
            self.position.k = self._k
            yield batch
        del source
