"""The latent-shard loader: exactly once per epoch, resumable at any world size.

The epoch's order is a pure function of (seed, epoch, dataset) at shard granularity
(DESIGN.md, "Hints on the hard parts"):

    shard order      a seeded permutation of the dataset's shard parts
    sample order     a seeded permutation inside each part
    segment          (part, start, end): positions [start, end) of that part's sample order
    deal             segments, in epoch order, go to the stream with the fewest samples so far
    stream           rank r, worker w  ->  stream r * W + w; it reads its segments in order
                     and cuts them into micro-batches of B (the last one padded, mask 0)
    rank schedule    rank r takes batches from its W streams round-robin, skipping empty ones;
                     ranks with fewer batches than the longest get all-padding batches, so
                     every rank takes the same number of micro-steps per epoch

The position saved in a checkpoint is (epoch, the segments of the last deal, the layout
(world size, workers, micro-batch), k = micro-batches handed to the training loop since
that deal). Batches prefetched by workers are not counted. On resume with the same
layout the streams continue exactly where they were (bitwise). With a different layout
the unread parts of every segment are dealt again, in epoch order, to the new streams,
so every remaining sample is still seen exactly once.

Reading (per DataLoader worker, one stream each): a part is read with one `readinto` and
indexed by walking its tar headers (`latents.PartIndex`); samples are fp16 views into that
buffer. A batch is filled in place: latents finalised in f32 (mean + std * eps, eps seeded
by (seed, epoch, part, index)), text and pooled copied as stored (fp16). Batch tensors of
a worker live in shared memory from the start, so handing them to the main process copies
nothing; on CUDA the DataLoader pins them for an asynchronous copy to the GPU.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from latentforge.data import latents as lat

# Text embeddings leave the loader as stored: fp16. The model casts them to its compute
# dtype (on the device), so converting here would only double the bytes moved between
# processes and to the GPU. Latents are finalised (mean + std * eps) in f32.
TEXT_DTYPE = torch.float16


class Segment(NamedTuple):
    part: int  # index into the dataset's part list
    start: int  # first position in the part's sample order
    end: int  # one past the last position

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


def part_order(seed: int, epoch: int, num_parts: int) -> np.ndarray:
    """Permutation of the parts for this epoch."""
    return _rng(seed, epoch, 0x5EED).permutation(num_parts)


def sample_order(seed: int, epoch: int, part: int, n: int) -> np.ndarray:
    """Permutation of a part's samples for this epoch: position -> index in the tar."""
    return _rng(seed, epoch, 0x5A3, part).permutation(n)


def epoch_segments(seed: int, epoch: int, counts: list[int]) -> list[Segment]:
    return [Segment(int(p), 0, counts[p]) for p in part_order(seed, epoch, len(counts)) if counts[p] > 0]


def deal(segments: list[Segment], num_streams: int) -> list[list[Segment]]:
    """Greedy balance: each segment, in order, goes to the stream with the fewest samples
    (ties: the lowest stream). A pure function of its arguments."""
    streams: list[list[Segment]] = [[] for _ in range(num_streams)]
    load = [0] * num_streams
    for seg in segments:
        s = min(range(num_streams), key=lambda i: (load[i], i))
        streams[s].append(seg)
        load[s] += seg.size
    return streams


class Plan:
    """One deal of segments to streams, and the batch schedule it implies."""

    def __init__(self, segments: list[Segment], layout: Layout):
        self.segments = segments
        self.layout = layout
        self.streams = deal(segments, layout.num_streams)
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
        B = self.layout.micro_batch
        lo, hi = j * B, (j + 1) * B
        segs, starts = self.streams[stream], self._offsets[stream]
        out = []
        i = max(0, bisect.bisect_right(starts, lo) - 1)  # the segment holding sample `lo`
        while i < len(segs) and starts[i] < hi:
            seg, offset = segs[i], starts[i]
            a, b = max(lo, offset), min(hi, offset + seg.size)
            out.extend((seg.part, seg.start + p - offset) for p in range(a, b))
            i += 1
        return out

    def consumed_batches(self, k: int) -> list[int]:
        """Batches each stream has handed out after every rank took k micro-steps."""
        done = [0] * self.layout.num_streams
        for r in range(self.layout.world_size):
            for s, _ in self.rank_schedule(r)[:k]:
                done[s] += 1
        return done

    def remaining(self, k: int) -> list[Segment]:
        """Unread segments after k micro-steps, in the order of `self.segments` (epoch order)."""
        B = self.layout.micro_batch
        done = self.consumed_batches(k)
        left: dict[tuple[int, int], Segment] = {}
        for s, st in enumerate(self.streams):
            skip = done[s] * B
            for seg in st:
                take = min(skip, seg.size)
                skip -= take
                if take < seg.size:
                    left[(seg.part, seg.start)] = Segment(seg.part, seg.start + take, seg.end)
        return [left[(seg.part, seg.start)] for seg in self.segments if (seg.part, seg.start) in left]


@dataclass
class Position:
    """Where the loader is: saved in checkpoints via state_dict()."""

    epoch: int = 0
    base: list[Segment] | None = None  # segments of the last deal; None = the epoch's full order
    layout: Layout | None = None  # layout of the last deal
    k: int = 0  # micro-batches handed out since that deal (equal on every rank)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "base": None if self.base is None else [list(s) for s in self.base],
            "layout": None if self.layout is None else self.layout.as_list(),
            "k": self.k,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "Position":
        return cls(
            epoch=int(d["epoch"]),
            base=None if d["base"] is None else [Segment(*map(int, s)) for s in d["base"]],
            layout=None if d["layout"] is None else Layout(*map(int, d["layout"])),
            k=int(d["k"]),
        )


def plan_for(position: Position, counts: list[int], seed: int, layout: Layout) -> tuple[Plan, int]:
    """The plan to read with `layout` from `position`, and how many of its micro-steps are
    already done. Same layout: the saved deal, continued (bitwise). Different layout: what
    is left, dealt again from step 0. The caller stores the returned plan's segments."""
    segments = position.base if position.base is not None else epoch_segments(seed, position.epoch, counts)
    old_layout = position.layout or layout
    plan = Plan(segments, old_layout)
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
    """The generator of one sample's eps: seeded by a hash of (seed, epoch, part, index)."""
    key = struct.pack("<4q", seed, epoch, part, index)
    h = hashlib.blake2b(key, digest_size=8, person=b"latentforge-eps").digest()  # ~1 us; SeedSequence ~10
    return torch.Generator().manual_seed(int.from_bytes(h, "little"))


def finalize_batch(means: list[np.ndarray], stds: list[np.ndarray | None], fin: Finalize, epoch: int,
                   keys: list[tuple[int, int]], out: torch.Tensor) -> torch.Tensor:
    """Training latents from stored posteriors (fp16, (C, h, w) each), into out[:n] (f32):
    z = mean + std * eps, then (z - shift) * scale; keys[i] = (part, index in the tar).

    eps of a sample depends only on (seed, epoch, part, index), not on the layout or the
    batch it lands in, so a re-dealt sample keeps it. The arithmetic runs once for the
    batch; per element it is the same two roundings (std * eps, then + mean) as one
    sample at a time, so results do not depend on the batching.
    """
    n = len(means)
    z = torch.from_numpy(np.stack(means)).float()  # (n, C, h, w)
    have = [s is not None for s in stds]
    if any(have):
        eps = torch.zeros_like(z)  # a sample without std (a deterministic codec) gets z = mean + 0
        for i, (part, index) in enumerate(keys):
            if have[i]:
                torch.randn(z.shape[1:], generator=_eps_generator(fin.seed, epoch, part, index), out=eps[i])
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
    """One training latent (C, h, w) f32: `finalize_batch` for a single sample."""
    out = torch.empty(1, *rec_mean.shape)
    return finalize_batch([rec_mean], [rec_std], fin, epoch, [(part, index)], out)[0]


class _StreamDataset(torch.utils.data.IterableDataset):
    """Yields the batches of this rank's streams, from a given batch onward. Each worker
    owns one stream. Batches carry (stream, batch index) so the main process can put them
    in schedule order whatever order the workers deliver them in.

    What the stream holds after each stage:
        plan.streams[stream]      segments (part, start, end), in deal order
        PartIndex(file)           the part in memory, one read; fields located, not decoded
        sample_order              positions -> indices in the tar, this epoch's permutation
        _collate                  B samples -> batch tensors: latents finalised in f32, text and
                                  pooled copied as stored (fp16)
    """

    def __init__(self, latent_dir: Path, files: list[str], plan: Plan, rank: int, start_batch: list[int],
                 epoch: int, fin: Finalize, shapes: dict[str, list[int]]):
        self.latent_dir = latent_dir
        self.files = files
        self.plan = plan
        self.rank = rank
        self.start_batch = start_batch
        self.epoch = epoch
        self.fin = fin
        self.shapes = shapes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        W = self.plan.layout.workers_per_rank
        workers = [w] if info is not None else list(range(W))
        # With no DataLoader workers the single main-process stream is W == 1.
        for wk in workers:
            stream = self.rank * W + wk
            yield from self._stream_batches(stream)

    def _stream_batches(self, stream: int) -> Iterator[dict[str, Any]]:
        B = self.plan.layout.micro_batch
        skip = self.start_batch[stream] * B
        j = self.start_batch[stream]
        buf: list[tuple[int, int, lat.PartIndex]] = []  # (part, index in the tar, the part's data)
        for seg in self.plan.streams[stream]:
            if skip >= seg.size:
                skip -= seg.size
                continue
            path = self.latent_dir / self.files[seg.part]
            part = lat.PartIndex(path)
            if len(part) < seg.end:
                raise lat.CorruptPart(f"{path}: holds {len(part)} samples, the manifest says at least {seg.end}; "
                                      f"re-run `latentforge precompute --verify`")
            order = sample_order(self.fin.seed, self.epoch, seg.part, len(part))
            for pos in range(seg.start + skip, seg.end):
                buf.append((seg.part, int(order[pos]), part))
                if len(buf) == B:
                    yield self._collate(stream, j, buf)
                    j += 1
                    buf = []
            skip = 0
        if buf:
            yield self._collate(stream, j, buf)

    def _collate(self, stream: int, j: int, buf: list[tuple[int, int, lat.PartIndex]]) -> dict[str, Any]:
        B, n = self.plan.layout.micro_batch, len(buf)
        batch = _batch_buffers(B, n, self.shapes)
        want = (tuple(self.shapes["latent"]), tuple(self.shapes["text"]), tuple(self.shapes["pooled"]))
        means, stds, text_len = [], [], []
        for i, (part, idx, data) in enumerate(buf):
            mean, text, pooled = data.array(idx, "mean"), data.array(idx, "text"), data.array(idx, "pooled")
            if (mean.shape, text.shape, pooled.shape) != want:
                raise lat.CorruptPart(f"{data.path}: sample {data.keys[idx]} has shapes {mean.shape}, {text.shape}, "
                                      f"{pooled.shape}; the manifest says {want}")
            means.append(mean)  # (C, h, w) fp16 views into the part's buffer
            stds.append(data.array(idx, "std") if data.has(idx, "std.npy") else None)
            batch["text"][i].copy_(torch.from_numpy(text))  # (L, D) fp16, a plain copy
            batch["pooled"][i].copy_(torch.from_numpy(pooled))  # (P,)
            text_len.append(int(data.meta(idx).get("text_len", 0)))
        keys = [(part, idx) for part, idx, _ in buf]
        finalize_batch(means, stds, self.fin, self.epoch, keys, out=batch["latents"])  # (n, C, h, w)
        batch["text_len"][:n] = torch.tensor(text_len)
        batch["mask"][:n] = 1.0
        batch["part"][:n] = torch.tensor([k[0] for k in keys])
        batch["index"][:n] = torch.tensor([k[1] for k in keys])
        batch["stream"] = stream
        batch["batch_index"] = j
        return batch


def empty_batch(B: int, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """A batch of B padding samples (mask 0). Shapes come from the manifest."""
    return {
        "latents": torch.zeros(B, *shapes["latent"]),
        "text": torch.zeros(B, *shapes["text"], dtype=TEXT_DTYPE),
        "pooled": torch.zeros(B, *shapes["pooled"], dtype=TEXT_DTYPE),
        "text_len": torch.zeros(B, dtype=torch.long),
        "mask": torch.zeros(B),
        "part": torch.full((B,), -1, dtype=torch.long),
        "index": torch.full((B,), -1, dtype=torch.long),
        "stream": -1,
        "batch_index": -1,
    }


def _batch_buffers(B: int, n: int, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Uninitialised batch tensors for n real samples, padding rows n..B-1 zeroed.

    In a DataLoader worker every tensor is allocated in shared memory, as DataLoader's own
    default_collate does (`_typed_storage()._new_shared`): sending it to the main process
    then costs no copy, where a private tensor would be copied into a new segment. Fresh
    shared memory still costs a page fault per 4 KiB, written here and read there (about
    1 ms per MB on a busy VM): the reason text stays fp16 (TEXT_DTYPE).
    """
    in_worker = torch.utils.data.get_worker_info() is not None

    def alloc(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not in_worker:
            return torch.empty(shape, dtype=dtype)
        proto = torch.empty(0, dtype=dtype)
        storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
        return proto.new(storage).resize_(*shape)

    batch: dict[str, Any] = {
        "latents": alloc(B, *shapes["latent"]),
        "text": alloc(B, *shapes["text"], dtype=TEXT_DTYPE),
        "pooled": alloc(B, *shapes["pooled"], dtype=TEXT_DTYPE),
        "text_len": alloc(B, dtype=torch.long),
        "mask": alloc(B),
        "part": alloc(B, dtype=torch.long),
        "index": alloc(B, dtype=torch.long),
        "stream": -1,
        "batch_index": -1,
    }
    for k in ("latents", "text", "pooled", "text_len", "mask"):
        batch[k][n:] = 0
    batch["part"][n:] = -1
    batch["index"][n:] = -1
    return batch


def split_parts(manifest: dict[str, Any], heldout_parts: int) -> tuple[list[dict], list[dict]]:
    """(train parts, held-out parts): the last `heldout_parts` parts in file-name order are
    held out. With a single part nothing is held out."""
    parts = sorted(manifest["parts"], key=lambda p: p["file"])
    n = min(heldout_parts, len(parts) - 1) if heldout_parts > 0 else 0
    return (parts[:len(parts) - n], parts[len(parts) - n:]) if n else (parts, [])


def _leave_stops_to_the_rank(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT. SLURM (scancel, preemption) sends SIGTERM
    to every process of a job step, a terminal's Ctrl-C sends SIGINT to every process of the
    foreground group; a worker would die on either, and the rank would then fail with
    "DataLoader worker exited unexpectedly" instead of checkpointing (DESIGN.md, guarantee
    4). The rank still ends its workers: a sentinel at shutdown, SIGKILL after a timeout,
    and a worker exits by itself when its rank is gone."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LatentLoader:
    """Infinite iterator of micro-batches for this rank, crossing epochs.

    Every batch is a dict: latents (B, C, h, w) f32, text (B, L, D) fp16, pooled (B, P) fp16,
    text_len (B,), mask (B,) 1 for real samples, part/index (B,) of each sample (-1 = pad).
    """

    def __init__(self, latent_dir: str | Path, parts: list[dict], *, micro_batch: int, seed: int, rank: int,
                 world_size: int, num_workers: int = 0, prefetch_factor: int = 2, scale: float = 1.0,
                 shift: float = 0.0, shapes: dict[str, list[int]], position: dict[str, Any] | None = None):
        self.latent_dir = Path(latent_dir)
        self.files = [p["file"] for p in parts]
        self.counts = [int(p["count"]) for p in parts]
        if sum(self.counts) == 0:
            raise ValueError(f"{latent_dir}: the training split holds no samples")
        self.seed = seed
        self.rank = rank
        self.layout = Layout(world_size, num_workers, micro_batch)
        self.prefetch_factor = prefetch_factor
        self.fin = Finalize(scale=scale, shift=shift, seed=seed)
        self.shapes = shapes
        self.position = Position.from_state(position) if position else Position()
        self._plan, self._k = plan_for(self.position, self.counts, seed, self.layout)
        self._commit_plan()

    def _commit_plan(self) -> None:
        self.position = Position(self.position.epoch, list(self._plan.segments), self.layout, self._k)

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def steps_per_epoch(self) -> int:
        """Micro-steps in a full epoch at this layout (every rank takes the same number)."""
        return Plan(epoch_segments(self.seed, self.epoch, self.counts), self.layout).steps

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
            self.position = Position(self.position.epoch + 1, None, None, 0)
            self._plan, self._k = plan_for(self.position, self.counts, self.seed, self.layout)
            self._commit_plan()

    def _iter_plan(self) -> Iterator[dict[str, Any]]:
        plan = self._plan
        schedule = plan.rank_schedule(self.rank)
        start = plan.consumed_batches(self._k)
        ds = _StreamDataset(self.latent_dir, self.files, plan, self.rank, start, self.epoch, self.fin, self.shapes)
        pending: dict[tuple[int, int], dict[str, Any]] = {}
        source: Iterator[dict[str, Any]] | None = None
        if self._k < len(schedule):
            nw = self.layout.num_workers
            # Pinned host memory makes the trainer's .to(device) an async DMA on CUDA.
            dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=nw,
                                             prefetch_factor=self.prefetch_factor if nw else None,
                                             persistent_workers=False, pin_memory=torch.cuda.is_available(),
                                             worker_init_fn=_leave_stops_to_the_rank if nw else None)
            source = iter(dl)
        while self._k < plan.steps:
            if self._k < len(schedule):
                want = schedule[self._k]
                while want not in pending:
                    b = next(source)  # type: ignore[arg-type]
                    pending[(b["stream"], b["batch_index"])] = b
                    if len(pending) > 4 * self.layout.workers_per_rank * max(self.prefetch_factor, 1) + 8:
                        raise RuntimeError(f"loader: batch {want} never arrived (got {sorted(pending)[:8]})")
                batch = pending.pop(want)
            else:
                batch = empty_batch(self.layout.micro_batch, self.shapes)
            self._k += 1
            self.position.k = self._k
            yield batch
        del source

