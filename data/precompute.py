"""Precompute: raw image-caption shards -> latent shards with manifests.

    raw shards (this task's share)       expand_shards + split_for_task (--task-index/--num-tasks
                                         or SLURM_ARRAY_TASK_ID); shards with a manifest skipped
      -> decoded chunks                  data.precompute_workers DataLoader workers, each reading
                                         one raw shard at a time with raw.iter_shard (decode, EXIF,
                                         to RGB, filter, resize + centre-crop): per shard, chunks of
                                         up to data.precompute_batch_size kept images (N, R, R, 3)
                                         uint8 with their captions, plus the rejections met on the way
      -> posteriors + text embeddings    the main process encodes each chunk as one batch:
                                         codec.encode, text.encode (inference mode, compute dtype)
      -> finite check                    a sample with NaN/inf anywhere (also after the cast to
                                         fp16) is rejected as nonfinite_latent / nonfinite_text
      -> latent shard parts              NAME-000.tar, ... (tmp name, renamed when complete)
      -> per-shard manifest              NAME.json, written last: NAME is done
      -> dataset manifest                manifest.json, assembled once every raw shard is done

Decoding (PIL, CPU bound) overlaps encoding: workers decode the next chunks while the
main process encodes this one. Several shards are in flight at once (one per worker);
each has its own writer, and batches never mix shards, so a shard's bytes depend only on
the shard (and the config), not on the number of tasks, workers, or which shards were
done before. A re-run skips raw shards whose manifest exists and redoes the others from
scratch (their stale parts and temporaries are removed first), so a killed precompute
followed by a re-run writes the same bytes as a clean run.

The latent directory must be new, empty or an earlier precompute's (identity.json); one
that is, holds or lies inside a run, checkpoint or other latent directory or an MLflow
store is refused before anything is written (`check_latent_dir`).

Every raw sample is either written or listed as rejected with a reason, and
seen == written + rejected is checked for every shard before its manifest is written
(docs/guarantees.md, 1).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from latentforge import outputs
from latentforge.config import Config, ConfigError
from latentforge.data import latents as lat
from latentforge.data import raw, shards, sources
from latentforge.data.encoders import Encoders, build_encoders, with_recorded_dtypes
from latentforge.fileio import write_json
from latentforge.hashing import sha256_file
from latentforge.log import get_logger

log = get_logger("precompute")

class Progress:
    """One line every few seconds: samples done, samples/s, ETA, shards done, what is open.

    The number of raw samples is unknown until shards are read; the ETA assumes the
    shards still to do are as large as the mean of those done (or `per_shard_hint`)."""

    def __init__(self, what: str, num_shards: int, per_shard_hint: float = 0.0, every_s: float = 5.0):
        self.what, self.num_shards, self.every_s = what, num_shards, every_s
        self.per_shard_hint = per_shard_hint
        self.t0 = self.last = time.monotonic()
        self.done = 0  # raw samples seen (written or rejected)
        self.shards_done = 0
        self.seen_in_done_shards = 0

    def shard_done(self, seen: int) -> None:
        self.shards_done += 1
        self.seen_in_done_shards += seen

    def total_estimate(self) -> float:
        per = self.seen_in_done_shards / self.shards_done if self.shards_done else self.per_shard_hint
        return per * self.num_shards

    def update(self, n: int, note: str = "", force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        total = self.total_estimate()
        eta = max(total - self.done, 0.0) / rate if rate > 0 and total else float("nan")
        eta_s = "?" if math.isnan(eta) else f"{eta / 60:.1f} min"
        total_s = f"~{total:.0f}" if total else "?"
        log.info(f"{self.what}: {self.done}/{total_s} samples, {rate:.1f} samples/s, ETA {eta_s}, "
                 f"shards {self.shards_done}/{self.num_shards} done {note}".rstrip())


# ---------------------------------------------------------------------------------------
# Decoding raw shards in worker processes.


@dataclass
class Chunk:
    """What a decoding worker sends the main process: the next piece of one raw shard."""

    shard: int  # index into the task's list of shards to do
    images: torch.Tensor  # (n, H, W, 3) uint8: kept samples of one size (R x R, or one bucket), in shard order
    samples: list[tuple[str, list[str], dict[str, Any]]]  # (key, captions: caption 0 first, meta) per image
    rejections: list[dict[str, str]]  # {"key", "reason", "detail"} met since the previous chunk
    report: dict[str, Any] | None = None  # on the shard's last chunk: raw.ShardReport.to_dict()


class _RawChunks(torch.utils.data.IterableDataset):
    """Worker w reads shards w, w + W, ...: one at a time, start to end. DataLoader hands
    the chunks over round-robin across workers; the main process sorts them by shard."""

    def __init__(self, urls: list[str], rcfg: raw.RawConfig, batch: int):
        self.urls, self.rcfg, self.batch = urls, rcfg, batch

    def __iter__(self) -> Iterator[Chunk]:
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(w, len(self.urls), W):
            yield from read_chunks(i, self.urls[i], self.rcfg, self.batch)


def read_chunks(index: int, url: str, rcfg: raw.RawConfig, batch: int) -> Iterator[Chunk]:
    """One raw shard as chunks of up to `batch` kept samples of one size (with buckets, a
    chunk never mixes buckets); the last one carries the report."""
    report = raw.ShardReport(url=url)
    kept: dict[tuple[int, int], list[raw.RawSample]] = {}  # (height, width) -> samples waiting
    rejections: list[dict[str, str]] = []

    def chunk(size: tuple[int, int], final: bool) -> Chunk:
        samples = kept.pop(size, [])
        images = (torch.from_numpy(np.stack([np.asarray(s.image, dtype=np.uint8) for s in samples]))
                  if samples else torch.zeros(0, *size, 3, dtype=torch.uint8))  # (n, H, W, 3)
        out = Chunk(index, images, [(s.key, [s.caption, *s.extra_captions], s.meta) for s in samples],
                    list(rejections), report.to_dict() if final else None)
        rejections.clear()
        return out

    for item in raw.iter_shard(url, rcfg, report):
        if isinstance(item, raw.Rejection):
            rejections.append({"key": item.key, "reason": item.reason, "detail": item.detail})
            continue
        size = (item.image.height, item.image.width)
        kept.setdefault(size, []).append(item)
        if len(kept[size]) == batch:
            yield chunk(size, final=False)
    rest = sorted(kept)  # what is left of each size, in a fixed order; the last chunk carries the report
    for size in rest[:-1]:
        yield chunk(size, final=False)
    yield chunk(rest[-1] if rest else (rcfg.resolution, rcfg.resolution), final=True)


# ---------------------------------------------------------------------------------------
# Encoding and writing, in the main process.


def _finite(x: torch.Tensor) -> torch.Tensor:
    """(N,) bool: every value of the row finite in float32 and after the cast to fp16."""
    x = x.float().flatten(1)
    return torch.isfinite(x).all(1) & torch.isfinite(x.half()).all(1)


def encode_batch(enc: Encoders, images: torch.Tensor, captions: list[str],
                 extra: list[list[str]] | None = None) -> dict[str, Any]:
    """images (N, H, W, 3) uint8 -> CPU float32 mean, std (or None), tokens, pooled; lengths;
    and the rejection reason per sample ("" = keep). `extra[i]`: sample i's captions 1, 2, ...,
    encoded in one more text batch: out["extra"][i] = [(tokens (L, D), pooled (P,), length)]."""
    # uint8 to the device first (a quarter of the bytes of float32), then exactly raw.to_tensor's
    # arithmetic: (N, 3, R, R) in [-1, 1].
    x = images.to(enc.codec.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    mean, std = enc.codec.encode(x)  # (N, C, h, w) each; std None if deterministic
    t = enc.text.encode(captions)  # tokens (N, L, D), pooled (N, P), lengths (N,)
    out = {"mean": mean.float().cpu(), "std": None if std is None else std.float().cpu(),
           "tokens": t.tokens.float().cpu(), "pooled": t.pooled.float().cpu(), "lengths": t.lengths.cpu()}
    ok_latent = _finite(out["mean"]) & (_finite(out["std"]) if out["std"] is not None else True)
    ok_text = _finite(out["tokens"]) & _finite(out["pooled"])
    flat = [c for caps in (extra or []) for c in caps]
    out["extra"] = [[] for _ in captions]
    if flat:
        te = enc.text.encode(flat)
        tok, pool, lens = te.tokens.float().cpu(), te.pooled.float().cpu(), te.lengths.cpu()
        ok_extra = (_finite(tok) & _finite(pool)).tolist()
        j = 0
        for i, caps in enumerate(extra or []):
            for _ in caps:
                out["extra"][i].append((tok[j], pool[j], int(lens[j])))
                ok_text[i] &= bool(ok_extra[j])
                j += 1
    out["reason"] = ["" if a and b else ("nonfinite_latent" if not a else "nonfinite_text")
                     for a, b in zip(ok_latent.tolist(), ok_text.tolist())]
    return out


@dataclass
class ShardWriter:
    """Writes one raw shard's latent parts and, when it is complete, its manifest. With
    buckets a part holds one bucket: one writer is open per bucket, parts are numbered in
    the order they are opened."""

    name: str
    url: str
    out_dir: Path
    identity_hash: str
    per_part: int
    parts: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, str]] = field(default_factory=list)
    encode_rejected: Counter = field(default_factory=Counter)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    written: int = 0
    writers: dict[tuple[int, int] | None, lat.TarWriter] = field(default_factory=dict)  # bucket (None: square)
    latent_shapes: dict[tuple[int, int] | None, list[int]] = field(default_factory=dict)
    opened: int = 0  # parts opened so far: the next part's number

    def add(self, chunk: Chunk, enc: Encoders) -> None:
        self.rejections.extend(chunk.rejections)
        if not chunk.samples:
            return
        extra = [caps[1:] for _, caps, _ in chunk.samples]
        e = encode_batch(enc, chunk.images, [caps[0] for _, caps, _ in chunk.samples],
                         extra if any(extra) else None)
        for i, (key, captions, meta) in enumerate(chunk.samples):
            if e["reason"][i]:
                self.encode_rejected[e["reason"][i]] += 1
                self.rejections.append({"key": key, "reason": e["reason"][i],
                                        "detail": "NaN or inf in the encoder output (or beyond fp16's range)"})
                continue
            mean, std = e["mean"][i].numpy(), None if e["std"] is None else e["std"][i].numpy()
            tokens, pooled = e["tokens"][i].numpy(), e["pooled"][i].numpy()
            bucket = (meta["target_height"], meta["target_width"]) if "target_height" in meta else None
            writer = self.writers.get(bucket)
            if writer is None:
                writer = self.writers[bucket] = lat.TarWriter(
                    self.out_dir / lat.SHARDS / lat.part_name(self.name, self.opened))
                self.opened += 1
                self.latent_shapes[bucket] = list(mean.shape)
            meta = dict(meta, text_len=int(e["lengths"][i]))
            more = [(c, t.numpy(), p.numpy(), n) for c, (t, p, n) in zip(captions[1:], e["extra"][i])]
            writer.write_sample(key, lat.encode_sample(key, captions[0], mean, std, tokens, pooled, meta, more))
            self.shapes = self.shapes or {"latent": list(mean.shape), "text": list(tokens.shape),
                                          "pooled": list(pooled.shape)}
            self.written += 1
            if writer.count == self.per_part:
                self._close_part(bucket)

    def _close_part(self, bucket: tuple[int, int] | None) -> None:
        writer = self.writers.pop(bucket)
        writer.close()
        part: dict[str, Any] = {"file": writer.path.name, "count": writer.count, "sha256": writer.sha256}
        if bucket is not None:
            part.update(size=list(bucket), latent=self.latent_shapes[bucket])
        self.parts.append(part)

    def finish(self, report: dict[str, Any]) -> dict[str, Any]:
        for bucket in sorted(self.writers, key=lambda b: b or (0, 0)):
            self._close_part(bucket)
        self.parts.sort(key=lambda p: p["file"])
        rejected = Counter(report["rejected"]) + self.encode_rejected
        manifest = {
            "name": self.name,
            "raw_shard": self.url,
            "identity_hash": self.identity_hash,
            "parts": self.parts,
            "seen": report["seen"],
            "written": self.written,
            "rejected": dict(sorted(rejected.items())),
            "rejections": self.rejections,
            "errors": list(report["errors"]),
            "notes": list(report["notes"]),
            "shapes": self.shapes,
        }
        n_rej = sum(rejected.values())
        if manifest["seen"] != self.written + n_rej or len(self.rejections) != n_rej:
            raise AssertionError(f"{self.url}: accounting broke: seen {report['seen']} != written {self.written} + "
                                 f"rejected {n_rej} (rejections listed: {len(self.rejections)})")
        write_json(lat.shard_manifest_path(self.out_dir, self.name), manifest)
        return manifest

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()


def remove_stale_parts(shard_dir: Path, names: set[str]) -> int:
    """Delete the parts and temporaries of the raw shards `names` (not done: no manifest),
    left by a killed run, so a redone shard starts clean. One directory listing. Returns
    how many files went."""
    n = 0
    for f in os.listdir(shard_dir):
        m = lat.PART_FILE_RE.match(f)
        if m and m.group(1) in names:
            (shard_dir / f).unlink(missing_ok=True)
            n += 1
    return n


def _identity_collate(chunk: Chunk) -> Chunk:
    return chunk  # DataLoader's default would walk the object looking for arrays to convert


def _names(urls: list[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    for u in urls:
        n = shards.shard_name(u)
        if n in names:
            raise ValueError(f"data.raw_shards: two shards share the name {n!r} ({names[n]}, {u}); "
                             f"latent shards are named after raw shards, so names must be unique")
        names[n] = u
    return names


_OWN_NAMES = {lat.SHARDS, lat.IDENTITY, lat.MANIFEST, lat.NULL_TEXT}


def is_latent_output(out: Path) -> bool:
    """A latent directory an earlier precompute wrote: identity.json (written first), or
    only what precompute writes (another task of the array may be about to write it)."""
    return (out / lat.IDENTITY).is_file() or all(
        p.name in _OWN_NAMES or (p.name.startswith(".") and ".tmp-" in p.name) for p in out.iterdir())


def check_latent_dir(cfg: Config) -> Path:
    """The latent directory, refused (one line) when writing it would destroy work: a run,
    checkpoint or MLflow folder, a latent directory inside another, a non-empty folder
    that no precompute wrote (latentforge/outputs.py)."""
    out_dir = cfg.resolved_latent_dir
    outputs.check_output_dir(out_dir, command="precompute", metadata=lat.IDENTITY,
                             is_earlier_output=is_latent_output, own_kind="a latent directory",
                             stores=outputs.store_paths(cfg.resolved_tracking_uri))
    return out_dir


def _ensure_dataset_identity(out_dir: Path, identity: dict[str, Any]) -> None:
    p = out_dir / lat.IDENTITY
    if p.exists():
        old = json.loads(p.read_text())
        if old != identity:
            lat.check_identity({"identity": old}, identity, str(out_dir))
    else:
        write_json(p, identity)


def _check_config(cfg: Config) -> None:
    d = cfg.data
    for key, value, low in (("data.precompute_batch_size", d.precompute_batch_size, 1),
                            ("data.latent_samples_per_shard", d.latent_samples_per_shard, 1),
                            ("data.precompute_workers", d.precompute_workers, 0)):
        if value < low:
            raise ConfigError(f"{key}: must be >= {low}, got {value}")


def run(cfg: Config, task_index: int = 0, num_tasks: int = 1, assemble: bool | None = None,
        encoders: Encoders | None = None) -> dict[str, Any]:
    """Precompute this task's share. Returns a summary. Assembles a dataset manifest when
    every raw shard of its source is done and `assemble` is not False. `encoders` (built
    from `cfg` on this process's device) saves building them again, e.g. in benchmarks.

    With data.sources the task's share is taken from the shards of all sources in config
    order (data/sources.py `work_items`), and each source is written to its own latent
    directory as a dataset of its own."""
    _check_config(cfg)
    from latentforge import dist

    srcs = sources.sources_of(cfg)
    for src in srcs:  # every output directory is checked before any work
        check_latent_dir(sources.source_config(cfg, src) if cfg.data.sources else cfg)
    items = sources.work_items([(i, s.raw_shards) for i, s in enumerate(srcs)])
    for i in range(len(srcs)):
        _names([u for j, u in items if j == i])  # unique names, checked before any work
    mine = shards.split_for_task(items, task_index, num_tasks)
    device = dist.device()
    # "auto" dtypes: resolved on this device when this run starts the dataset, else the ones
    # it recorded (a re-run or another array task encodes as the first one did). Every
    # source is encoded alike: the first source that has started records them.
    started = [s.latent_dir / lat.IDENTITY for s in srcs if (s.latent_dir / lat.IDENTITY).is_file()]
    recorded = json.loads(started[0].read_text()) if started else None
    cfg = with_recorded_dtypes(cfg, recorded)
    enc = encoders if encoders is not None else build_encoders(cfg, device)
    what = f"task {task_index}/{num_tasks}"
    results = []
    for i, src in enumerate(srcs):
        my = [u for j, u in mine if j == i]
        if not my and cfg.data.sources:
            continue  # the task that finishes this source's last shard assembles it
        scfg = sources.source_config(cfg, src) if cfg.data.sources else cfg
        results.append(_run_source(scfg, [u for j, u in items if j == i], my, enc,
                                   f"{what} source {src.name}" if src.name else what, assemble))
    if not cfg.data.sources:
        return {"task": task_index, "num_tasks": num_tasks, **results[0]}
    total: Counter[str] = Counter()
    for r in results:
        total.update({k: r[k] for k in ("seen", "written", "rejected") if k in r})
    out: dict[str, Any] = {"task": task_index, "num_tasks": num_tasks, **total}
    manifests = [r["manifest"] for r in results if "manifest" in r]
    if manifests:
        out["manifests"] = ", ".join(manifests)
    return out


def _run_source(cfg: Config, urls: list[str], mine: list[str], enc: Encoders, what: str,
                assemble: bool | None) -> dict[str, Any]:
    """Precompute `mine` (some of `urls`, one source's shards) into cfg's latent directory."""
    from latentforge import dist

    names = _names(urls)
    out_dir = cfg.resolved_latent_dir
    (out_dir / lat.SHARDS).mkdir(parents=True, exist_ok=True)
    device = dist.device()
    identity = enc.identity(cfg)
    ihash = lat.identity_hash(identity)
    _ensure_dataset_identity(out_dir, identity)
    if not (out_dir / lat.NULL_TEXT).exists():
        null = enc.text.encode([""])
        lat.save_null_text(out_dir, null.tokens[0].float().cpu().numpy(), null.pooled[0].float().cpu().numpy())

    todo = [u for u in mine if not lat.shard_manifest_path(out_dir, shards.shard_name(u)).exists()]
    stale = remove_stale_parts(out_dir / lat.SHARDS, {shards.shard_name(u) for u in todo})
    log.info(f"{what}: {len(mine)} raw shards, {len(mine) - len(todo)} already done, {len(todo)} to do -> {out_dir} "
             f"(codec {identity['codec']['name']} {identity['codec']['dtype']}, text {cfg.text.model} "
             f"{identity['text']['dtype']}, {device}, {cfg.data.precompute_workers} decoding workers)"
          + (f"; removed {stale} stale part file(s) of unfinished shards" if stale else ""))
    done_seen = [json.loads(lat.shard_manifest_path(out_dir, shards.shard_name(u)).read_text())["seen"]
                 for u in mine if u not in todo]
    hint = (sum(done_seen) / len(done_seen) if done_seen else
            cfg.synth.samples_per_shard if not cfg.data.raw_shards else 0.0)
    progress = Progress(what, num_shards=len(todo), per_shard_hint=hint)
    summary: Counter[str] = Counter()

    rcfg = raw.RawConfig.from_data_config(cfg.data)
    nw = min(cfg.data.precompute_workers, len(todo))
    loader = torch.utils.data.DataLoader(_RawChunks(todo, rcfg, cfg.data.precompute_batch_size), batch_size=None,
                                         num_workers=nw, prefetch_factor=2 if nw else None,
                                         collate_fn=_identity_collate)
    open_shards: dict[int, ShardWriter] = {}
    try:
        with torch.inference_mode():
            for chunk in loader:
                w = open_shards.get(chunk.shard)
                if w is None:
                    url = todo[chunk.shard]
                    w = open_shards[chunk.shard] = ShardWriter(shards.shard_name(url), url, out_dir, ihash,
                                                               cfg.data.latent_samples_per_shard)
                w.add(chunk, enc)
                progress.update(len(chunk.samples) + len(chunk.rejections),
                                note=f"(open: {', '.join(s.name for s in open_shards.values())})")
                if chunk.report is not None:
                    m = open_shards.pop(chunk.shard).finish(chunk.report)
                    progress.shard_done(m["seen"])
                    summary["seen"] += m["seen"]
                    summary["written"] += m["written"]
                    summary["rejected"] += m["seen"] - m["written"]
                    err = f", shard errors: {'; '.join(m['errors'])}" if m["errors"] else ""
                    log.info(f"{what}: shard {m['name']} done: {m['written']} written, {m['seen'] - m['written']} "
                             f"rejected of {m['seen']} seen{err}")
    finally:
        for w in open_shards.values():
            w.abort()
    progress.update(0, note="finished", force=True)

    result: dict[str, Any] = dict(summary)
    all_done = all(lat.shard_manifest_path(out_dir, n).exists() for n in names)
    if assemble is not False and all_done:
        manifest = lat.assemble_manifest(out_dir, identity, expected_shards=list(names))
        result["manifest"] = str(out_dir / lat.MANIFEST)
        log.info(f"dataset: {manifest['written']} written, {sum(manifest['rejected'].values())} rejected "
                 f"of {manifest['seen']} seen, {len(manifest['parts'])} parts -> {out_dir / lat.MANIFEST}")
    elif not all_done:
        log.info(f"{what}: done; the dataset manifest is assembled by the task that finishes last "
                 f"(or `latentforge precompute --assemble`)")
    return result


def assemble(cfg: Config) -> dict[str, Any]:
    """Assemble the dataset manifest after a job array (refuses while shards are missing);
    with data.sources, every source's. Returns the (last) manifest."""
    manifest: dict[str, Any] = {}
    for src in sources.sources_of(cfg):
        urls = shards.expand_shards(src.raw_shards)
        p = src.latent_dir / lat.IDENTITY
        if not p.is_file():
            raise lat.ShardsNotDone(f"{p} not found: no precompute task has started in {src.latent_dir}")
        identity = json.loads(p.read_text())
        manifest = lat.assemble_manifest(src.latent_dir, identity, expected_shards=list(_names(urls)))
    return manifest


def verify(cfg: Config) -> list[str]:
    """Check every raw shard has a manifest, every part exists with its stated count and
    sha256, seen == written + rejected, and the dataset manifest agrees (with data.sources,
    for every source). Returns a list of problems (empty = OK)."""
    if not cfg.data.sources:
        return _verify_source(cfg)
    return [f"source {src.name}: {p}" for src in sources.sources_of(cfg)
            for p in _verify_source(sources.source_config(cfg, src))]


def _verify_source(cfg: Config) -> list[str]:
    problems = []
    out_dir = cfg.resolved_latent_dir
    names = _names(shards.expand_shards(cfg.resolved_raw_shards))
    shard_manifests = {}
    last = t0 = time.monotonic()
    for i, (name, url) in enumerate(names.items()):
        if time.monotonic() - last > 10:  # reading every part back takes a while on a big dataset
            last = time.monotonic()
            log.info(f"verify: {i}/{len(names)} raw shards checked, {i / (last - t0):.1f} shards/s, "
                     f"{len(problems)} problem(s) so far")
        mp = lat.shard_manifest_path(out_dir, name)
        if not mp.exists():
            problems.append(f"{name}: not precomputed ({url})")
            continue
        m = shard_manifests[name] = json.loads(mp.read_text())
        before = len(problems)
        if m["seen"] != m["written"] + sum(m["rejected"].values()):
            problems.append(f"{name}: seen {m['seen']} != written {m['written']} + rejected "
                            f"{sum(m['rejected'].values())}")
        n = 0
        for part in m["parts"]:
            pp = out_dir / lat.SHARDS / part["file"]
            if not pp.exists():
                problems.append(f"{name}: missing part {pp}")
                continue
            if "sha256" in part and sha256_file(pp, cache=False) != part["sha256"]:
                problems.append(f"{name}: {pp.name} is corrupt (sha256 differs from the manifest's)")
                continue
            try:
                got = len(lat.PartIndex(pp))
            except lat.CorruptPart as e:
                problems.append(f"{name}: {e}")
                continue
            n += got
            if got != part["count"]:
                problems.append(f"{name}: {pp.name} holds {got} samples, manifest says {part['count']}")
        if n != m["written"] and len(problems) == before:  # else already explained above
            problems.append(f"{name}: parts hold {n} samples, manifest says written {m['written']}")
    mp = out_dir / lat.MANIFEST
    if not mp.exists():
        problems.append(f"dataset manifest {mp} not assembled")
    elif len(shard_manifests) == len(names):
        d = json.loads(mp.read_text())
        want_parts = sorted(f"{lat.SHARDS}/{p['file']}" for m in shard_manifests.values() for p in m["parts"])
        if sorted(p["file"] for p in d["parts"]) != want_parts or d["written"] != sum(
                m["written"] for m in shard_manifests.values()):
            problems.append(f"dataset manifest {mp} disagrees with the per-shard manifests; "
                            f"re-assemble it with `latentforge precompute --assemble`")
    return problems


def accounting(latent_dir: str | os.PathLike) -> dict[str, Any]:
    """Raw samples seen, written and rejected (by reason), and shard-level errors and notes,
    summed over the per-shard manifests (so it works while a job array is still running)."""
    d = Path(latent_dir)
    files = sorted((d / lat.SHARDS).glob("*.json")) if (d / lat.SHARDS).is_dir() else []
    if not files:
        raise FileNotFoundError(f"{d}: no per-shard manifests under {d / lat.SHARDS} (not a latent dataset, "
                                f"or precompute has not finished a shard yet)")
    ms = [json.loads(p.read_text()) for p in files]
    reasons: Counter[str] = Counter()
    for m in ms:
        reasons.update(m["rejected"])
    errors: Counter[str] = Counter(e.split(":", 1)[0] for m in ms for e in m["errors"])
    notes: Counter[str] = Counter(n.split(":", 1)[0] for m in ms for n in m["notes"])
    out = {
        "raw_shards": len(ms),
        "seen": sum(m["seen"] for m in ms),
        "written": sum(m["written"] for m in ms),
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "shard_errors_by_reason": dict(sorted(errors.items())),
        "shard_notes": dict(sorted(notes.items())),
        "shard_errors": [(m["name"], e) for m in ms for e in m["errors"]],
        "assembled": (d / lat.MANIFEST).is_file(),
        "parts": sum(len(m["parts"]) for m in ms),
    }
    return out


def inspect(latent_dir: str | os.PathLike) -> str:
    """Per-reason accounting: raw samples seen, written and rejected. Written + rejected == seen."""
    a = accounting(latent_dir)
    d = Path(latent_dir)
    lines = [f"latent dataset {d}: {a['raw_shards']} raw shards, {a['parts']} parts, dataset manifest "
             f"{'assembled' if a['assembled'] else 'NOT assembled yet'}",
             f"  seen      {a['seen']:>10}", f"  written   {a['written']:>10}", f"  rejected  {a['rejected']:>10}"]
    lines += [f"    {r:<22}{n:>8}" for r, n in a["rejected_by_reason"].items()]
    if a["shard_errors"]:
        lines.append(f"  shards cut short by an error: {len(a['shard_errors'])} (their samples before the error "
                     f"are counted above)")
        lines += [f"    {r:<22}{n:>8}" for r, n in a["shard_errors_by_reason"].items()]
        lines += [f"    {n}: {e}" for n, e in a["shard_errors"][:20]]
    if a["shard_notes"]:
        lines.append("  shard notes: " + ", ".join(f"{k} {v}" for k, v in a["shard_notes"].items()))
    ok = a["written"] + a["rejected"] == a["seen"]
    lines.append(f"  check: written + rejected {'==' if ok else '!='} seen")
    return "\n".join(lines)
