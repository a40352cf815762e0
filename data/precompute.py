"""Precompute: raw image-caption shards -> latent shards with manifests.

    raw shards (this task's share)       expand_shards + split_for_task
      -> samples or rejections           raw.iter_shard: decode, filter, resize + centre-crop
      -> batches of N samples            images (N, 3, R, R) in [-1, 1], captions
      -> posteriors + text embeddings    codec.encode, text.encode (inference mode, compute dtype)
      -> finite check                    a sample with NaN/inf anywhere is rejected, counted
      -> latent shard parts              NAME-000.tar, ... (tmp name, renamed when complete)
      -> per-shard manifest              NAME.json, written last: NAME is done

A re-run skips raw shards whose manifest exists, so a killed precompute redoes only
the shard it was in. Every raw sample is either written or listed as rejected with a
reason (DESIGN.md guarantee 1). The dataset manifest is assembled once every shard is
done (by the single task, or by `latentforge precompute --assemble` after a job array).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.data import latents as lat
from latentforge.data import raw, shards
from latentforge.training.config import Config


@dataclass
class Encoders:
    codec: Any  # data.codecs.ImageCodec
    text: Any  # data.text.TextEncoder

    def identity(self, cfg: Config) -> dict[str, Any]:
        """Everything that shapes the stored numbers. Latents made under another identity
        are refused by the trainer and never mixed into one dataset."""
        return {
            "codec": self.codec.identity(),
            "text": self.text.identity(),
            "resolution": cfg.data.resolution,
            "crop": "resize-shorter-side+center-crop",
            "storage_dtype": "fp16",
            "min_size": cfg.data.min_size,
            "max_aspect": cfg.data.max_aspect,
        }


def build_encoders(cfg: Config, device: torch.device | str = "cpu") -> Encoders:
    from latentforge.data.codecs import build_codec
    from latentforge.data.text import build_text_encoder

    return Encoders(codec=build_codec(cfg.codec, device), text=build_text_encoder(cfg.text, device))


def expected_identity(cfg: Config, device: torch.device | str = "cpu") -> dict[str, Any]:
    return build_encoders(cfg, device).identity(cfg)


class Progress:
    """One line every few seconds: what, samples/s, ETA."""

    def __init__(self, what: str, total: int, every_s: float = 5.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.t0 = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int, note: str = "", force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 and self.total else float("nan")
        eta_s = f"{eta/60:.1f} min" if eta == eta else "?"
        print(f"[{self.what}] {self.done}/{self.total or '?'} samples, {rate:.1f} samples/s, ETA {eta_s} {note}",
              flush=True)


def _encode_batch(enc: Encoders, batch: list[raw.RawSample]) -> list[tuple[raw.RawSample, dict | None, str]]:
    """Encode a batch. Returns, per sample, (sample, arrays or None, reason if rejected)."""
    images = torch.stack([raw.to_tensor(s.image) for s in batch])  # (N, 3, R, R) in [-1, 1]
    mean, std = enc.codec.encode(images)  # (N, C, h, w) each; std None if deterministic
    t = enc.text.encode([s.caption for s in batch])  # tokens (N, L, D), pooled (N, P), lengths (N,)
    out = []
    for i, s in enumerate(batch):
        arrays = {
            "mean": mean[i].float().cpu().numpy(),
            "std": None if std is None else std[i].float().cpu().numpy(),
            "text": t.tokens[i].float().cpu().numpy(),
            "pooled": t.pooled[i].float().cpu().numpy(),
            "text_len": int(t.lengths[i]),
        }
        bad = [k for k in ("mean", "std", "text", "pooled") if arrays[k] is not None and not (
            np.isfinite(arrays[k]).all() and np.isfinite(arrays[k].astype(np.float16)).all())]
        if bad:
            out.append((s, None, f"nonfinite_{'latent' if bad[0] in ('mean', 'std') else 'text'}"))
        else:
            out.append((s, arrays, ""))
    return out


def process_shard(url: str, name: str, enc: Encoders, cfg: Config, out_dir: Path, identity_hash: str,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Encode one raw shard into parts under out_dir/shards and write its manifest last."""
    shard_dir = out_dir / lat.SHARDS
    for stale in shard_dir.glob(f".{name}-*.tmp-*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    rcfg = raw.RawConfig.from_data_config(cfg.data)
    report = raw.ShardReport(url=url)
    rejected: Counter[str] = Counter()
    rejections: list[dict[str, str]] = []
    parts: list[dict[str, Any]] = []
    writer: lat.TarWriter | None = None
    per_part = cfg.data.latent_samples_per_shard
    shapes: dict[str, list[int]] = {}
    written = 0

    def flush(batch: list[raw.RawSample]) -> None:
        nonlocal writer, written
        for s, arrays, reason in _encode_batch(enc, batch):
            if arrays is None:
                rejected[reason] += 1
                rejections.append({"key": s.key, "reason": reason, "detail": "NaN or inf in encoder output"})
                continue
            if writer is None:
                writer = lat.TarWriter(shard_dir / f"{name}-{len(parts):03d}.tar")
            meta = dict(s.meta, text_len=arrays["text_len"])
            writer.write_sample(s.key, lat.encode_sample(s.key, s.caption, arrays["mean"], arrays["std"],
                                                         arrays["text"], arrays["pooled"], meta))
            shapes.setdefault("latent", list(arrays["mean"].shape))
            shapes.setdefault("text", list(arrays["text"].shape))
            shapes.setdefault("pooled", list(arrays["pooled"].shape))
            written += 1
            if writer.count == per_part:
                writer.close()
                parts.append({"file": writer.path.name, "count": writer.count})
                writer = None
        if progress:
            progress.update(len(batch), note=f"({name})")

    batch: list[raw.RawSample] = []
    try:
        for item in raw.iter_shard(url, rcfg, report):
            if isinstance(item, raw.Rejection):
                rejections.append({"key": item.key, "reason": item.reason, "detail": item.detail})
                continue
            batch.append(item)
            if len(batch) == cfg.data.precompute_batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        if writer is not None:
            writer.close()
            parts.append({"file": writer.path.name, "count": writer.count})
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    for reason, n in report.rejected.items():
        rejected[reason] += n
    manifest = {
        "name": name,
        "raw_shard": url,
        "identity_hash": identity_hash,
        "parts": parts,
        "seen": report.seen,
        "written": written,
        "rejected": dict(sorted(rejected.items())),
        "rejections": rejections,
        "errors": list(report.errors),
        "notes": list(report.notes),
        "shapes": shapes,
    }
    if manifest["seen"] != manifest["written"] + sum(rejected.values()):
        raise AssertionError(f"{url}: accounting broke: seen {report.seen} != written {written} + "
                             f"rejected {sum(rejected.values())}")
    lat.write_json_atomic(lat.shard_manifest_path(out_dir, name), manifest)
    return manifest


def _names(urls: list[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    for u in urls:
        n = shards.shard_name(u)
        if n in names:
            raise ValueError(f"data.raw_shards: two shards share the name {n!r} ({names[n]}, {u}); "
                             f"latent shards are named after raw shards, so names must be unique")
        names[n] = u
    return names


def _ensure_dataset_identity(out_dir: Path, identity: dict[str, Any]) -> None:
    p = out_dir / "identity.json"
    if p.exists():
        old = json.loads(p.read_text())
        if old != identity:
            lat.check_identity({"identity": old}, identity, str(out_dir))
    else:
        lat.write_json_atomic(p, identity)


def run(cfg: Config, task_index: int = 0, num_tasks: int = 1, assemble: bool | None = None) -> dict[str, Any]:
    """Precompute this task's share. Returns a summary. Assembles the dataset manifest when
    every raw shard is done and `assemble` is not False."""
    torch.set_grad_enabled(False)
    urls = shards.expand_shards(cfg.resolved_raw_shards)
    names = _names(urls)
    mine = shards.split_for_task(urls, task_index, num_tasks)
    out_dir = cfg.resolved_latent_dir
    (out_dir / lat.SHARDS).mkdir(parents=True, exist_ok=True)

    from latentforge.training import dist

    enc = build_encoders(cfg, dist.device())
    identity = enc.identity(cfg)
    ihash = lat.identity_hash(identity)
    _ensure_dataset_identity(out_dir, identity)
    if not (out_dir / lat.NULL_TEXT).exists():
        null = enc.text.encode([""])
        lat.save_null_text(out_dir, null.tokens[0].float().cpu().numpy(), null.pooled[0].float().cpu().numpy())

    todo = [u for u in mine if not lat.shard_manifest_path(out_dir, shards.shard_name(u)).exists()]
    print(f"[precompute] task {task_index}/{num_tasks}: {len(mine)} raw shards, {len(mine) - len(todo)} already "
          f"done, {len(todo)} to do -> {out_dir}", flush=True)
    # The total is an estimate until shards are read: assume done shards' mean size.
    est = cfg.synth.samples_per_shard if not cfg.data.raw_shards else 0
    progress = Progress(f"precompute {task_index}", total=est * len(todo))
    summary = Counter()
    for url in todo:
        m = process_shard(url, shards.shard_name(url), enc, cfg, out_dir, ihash, progress)
        summary["seen"] += m["seen"]
        summary["written"] += m["written"]
        summary["rejected"] += m["seen"] - m["written"]
    progress.update(0, note="done", force=True)
    result: dict[str, Any] = {"task": task_index, "num_tasks": num_tasks, **summary}
    all_done = all(lat.shard_manifest_path(out_dir, n).exists() for n in names)
    if assemble is not False and all_done:
        manifest = lat.assemble_manifest(out_dir, identity, expected_shards=list(names))
        result["manifest"] = str(out_dir / lat.MANIFEST)
        print(f"[precompute] dataset: {manifest['written']} written, {sum(manifest['rejected'].values())} rejected "
              f"of {manifest['seen']} seen, {len(manifest['parts'])} parts", flush=True)
    elif not all_done:
        print(f"[precompute] task {task_index} done; the dataset manifest is assembled when every task is done "
              f"(`latentforge precompute --assemble`)", flush=True)
    return result


def assemble(cfg: Config) -> dict[str, Any]:
    """Assemble the dataset manifest after a job array (refuses while shards are missing)."""
    urls = shards.expand_shards(cfg.resolved_raw_shards)
    out_dir = cfg.resolved_latent_dir
    identity = json.loads((out_dir / "identity.json").read_text())
    return lat.assemble_manifest(out_dir, identity, expected_shards=list(_names(urls)))


def verify(cfg: Config) -> list[str]:
    """Check every raw shard has a manifest, every part exists with its stated count, and
    seen == written + rejected. Returns a list of problems (empty = OK)."""
    problems = []
    out_dir = cfg.resolved_latent_dir
    for name, url in _names(shards.expand_shards(cfg.resolved_raw_shards)).items():
        mp = lat.shard_manifest_path(out_dir, name)
        if not mp.exists():
            problems.append(f"{name}: not precomputed ({url})")
            continue
        m = json.loads(mp.read_text())
        if m["seen"] != m["written"] + sum(m["rejected"].values()):
            problems.append(f"{name}: seen {m['seen']} != written {m['written']} + rejected")
        n = 0
        for part in m["parts"]:
            pp = out_dir / lat.SHARDS / part["file"]
            if not pp.exists():
                problems.append(f"{name}: missing part {pp}")
                continue
            got = len(lat.read_raw_fields(pp))
            n += got
            if got != part["count"]:
                problems.append(f"{name}: {pp.name} holds {got} samples, manifest says {part['count']}")
        if n != m["written"] and not any("missing part" in p for p in problems):
            problems.append(f"{name}: parts hold {n} samples, manifest says written {m['written']}")
    if not (out_dir / lat.MANIFEST).exists():
        problems.append(f"dataset manifest {out_dir / lat.MANIFEST} not assembled")
    return problems


def inspect(latent_dir: str | os.PathLike) -> str:
    """Per-reason accounting: raw samples seen, written and rejected. Written + rejected == seen."""
    d = Path(latent_dir)
    ms = [json.loads(p.read_text()) for p in sorted((d / lat.SHARDS).glob("*.json"))]
    if not ms:
        raise FileNotFoundError(f"{d}: no per-shard manifests under {d / lat.SHARDS}")
    seen = sum(m["seen"] for m in ms)
    written = sum(m["written"] for m in ms)
    reasons: Counter[str] = Counter()
    for m in ms:
        reasons.update(m["rejected"])
    rejected = sum(reasons.values())
    lines = [f"latent dataset {d}: {len(ms)} raw shards", f"  seen      {seen:>10}", f"  written   {written:>10}",
             f"  rejected  {rejected:>10}"]
    lines += [f"    {r:<22}{n:>8}" for r, n in sorted(reasons.items())]
    errors = [(m["name"], e) for m in ms for e in m["errors"]]
    if errors:
        lines.append(f"  shard errors: {len(errors)}")
        lines += [f"    {n}: {e}" for n, e in errors[:20]]
    lines.append(f"  check: written + rejected {'==' if written + rejected == seen else '!='} seen")
    return "\n".join(lines)
