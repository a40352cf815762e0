"""The latent-shard format: writing, reading and manifests.

Layout of a latent dataset directory (written by `latentforge precompute`):

    LATENT_DIR/
      manifest.json             dataset manifest: parts with exact counts, totals, rejections
                                by reason, and the identity of everything that shaped the numbers
      null_text.npz             the empty caption's embedding (classifier-free guidance's null)
      shards/NAME-000.tar       latent shard parts (WebDataset tars), one per <= N samples
      shards/NAME.json          per-raw-shard manifest; written last, so it marks NAME as done

One tar sample per raw sample kept (WebDataset naming, `KEY.field.ext`):

    KEY.caption.txt    the caption (UTF-8)
    KEY.mean.npy       posterior mean, fp16 (C, h, w)
    KEY.std.npy        posterior std, fp16 (C, h, w); absent for a deterministic codec
    KEY.text.npy       text encoder token sequence, fp16 (L, D)
    KEY.pooled.npy     pooled text embedding, fp16 (P,)
    KEY.json           {"text_len": int, "orig_width", "orig_height", "crop_top", "crop_left", ...}

Latents are stored raw (the posterior, before scale and shift); the loader samples
`mean + std * eps` and applies `(z - shift) * scale` just in time (STYLE.md item 6).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NULL_TEXT = "null_text.npz"
SHARDS = "shards"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


class TarWriter:
    """Writes a tar with fixed metadata (mtime 0, uid 0) so equal inputs give equal bytes.
    The file appears under its final name only when `close()` completes (tmp + rename)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def write_sample(self, key: str, fields: dict[str, bytes]) -> None:
        for ext in sorted(fields):
            self.add(f"{key}.{ext}", fields[ext])
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)


def encode_sample(key: str, caption: str, mean: np.ndarray, std: np.ndarray | None, text: np.ndarray,
                  pooled: np.ndarray, meta: dict[str, Any]) -> dict[str, bytes]:
    """Fields of one latent sample. Arrays are stored as fp16 .npy."""
    fields = {
        "caption.txt": caption.encode("utf-8"),
        "mean.npy": _npy_bytes(mean.astype(np.float16)),
        "text.npy": _npy_bytes(text.astype(np.float16)),
        "pooled.npy": _npy_bytes(pooled.astype(np.float16)),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    if std is not None:
        fields["std.npy"] = _npy_bytes(std.astype(np.float16))
    return fields


@dataclass
class LatentRecord:
    """One decoded latent sample (arrays still fp16, as stored)."""

    key: str
    caption: str
    mean: np.ndarray  # (C, h, w) fp16
    std: np.ndarray | None  # (C, h, w) fp16 or None
    text: np.ndarray  # (L, D) fp16
    pooled: np.ndarray  # (P,) fp16
    meta: dict[str, Any]


def _decode(key: str, fields: dict[str, bytes]) -> LatentRecord:
    return LatentRecord(
        key=key,
        caption=fields["caption.txt"].decode("utf-8"),
        mean=_npy_load(fields["mean.npy"]),
        std=_npy_load(fields["std.npy"]) if "std.npy" in fields else None,
        text=_npy_load(fields["text.npy"]),
        pooled=_npy_load(fields["pooled.npy"]),
        meta=json.loads(fields["json"]),
    )


def read_raw_fields(path: str | os.PathLike) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of a latent tar, undecoded, in file order: [(key, {ext: bytes})]."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    index: dict[str, int] = {}
    with tarfile.open(path, "r") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            if key not in index:
                index[key] = len(samples)
                samples.append((key, {}))
            samples[index[key]][1][ext] = data
    return samples


def read_part(path: str | os.PathLike) -> list[LatentRecord]:
    return [_decode(k, f) for k, f in read_raw_fields(path)]


def iter_records(latent_dir: str | os.PathLike, parts: list[str] | None = None) -> Iterator[LatentRecord]:
    m = load_manifest(latent_dir)
    for p in m["parts"]:
        if parts is None or p["file"] in parts:
            yield from read_part(Path(latent_dir) / p["file"])


# ---------------------------------------------------------------------------------------
# Manifests.


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def shard_manifest_path(latent_dir: Path, name: str) -> Path:
    return Path(latent_dir) / SHARDS / f"{name}.json"


def load_manifest(latent_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(latent_dir) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"no latent dataset manifest at {p}: run `latentforge precompute` first "
                                f"(or finish its job array so the manifest is assembled)")
    return json.loads(p.read_text())


def assemble_manifest(latent_dir: str | os.PathLike, identity: dict[str, Any],
                      expected_shards: list[str] | None = None) -> dict[str, Any]:
    """Combine every per-shard manifest into LATENT_DIR/manifest.json.

    `expected_shards` (raw shard names) makes it refuse to assemble while any is missing,
    so a job array's last task can call this safely."""
    latent_dir = Path(latent_dir)
    shard_files = sorted((latent_dir / SHARDS).glob("*.json"))
    shards = [json.loads(p.read_text()) for p in shard_files]
    if expected_shards is not None:
        done = {s["name"] for s in shards}
        missing = sorted(set(expected_shards) - done)
        if missing:
            raise RuntimeError(f"cannot assemble {latent_dir / MANIFEST}: {len(missing)} shard(s) not done yet, "
                               f"e.g. {missing[:3]}")
    want = identity_hash(identity)
    for s in shards:
        if s["identity_hash"] != want:
            raise ValueError(f"{latent_dir / SHARDS / (s['name'] + '.json')}: written by a different codec/encoder "
                             f"configuration ({s['identity_hash']} != {want}); use a fresh data.latent_dir")
    parts = [{"file": f"{SHARDS}/{p['file']}", "count": p["count"], "raw_shard": s["name"]}
             for s in shards for p in s["parts"]]
    rejected: dict[str, int] = {}
    for s in shards:
        for reason, n in s["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + n
    manifest = {
        "format_version": FORMAT_VERSION,
        "identity": identity,
        "identity_hash": want,
        "num_raw_shards": len(shards),
        "parts": parts,
        "seen": sum(s["seen"] for s in shards),
        "written": sum(s["written"] for s in shards),
        "rejected": dict(sorted(rejected.items())),
        "shard_errors": {s["name"]: s["errors"] for s in shards if s["errors"]},
        "shapes": shards[0]["shapes"] if shards else {},
    }
    write_json_atomic(latent_dir / MANIFEST, manifest)
    return manifest


def save_null_text(latent_dir: Path, tokens: np.ndarray, pooled: np.ndarray) -> None:
    p = Path(latent_dir) / NULL_TEXT
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, tokens=tokens.astype(np.float32), pooled=pooled.astype(np.float32))
    os.replace(tmp, p)


def load_null_text(latent_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (L, D), pooled (P,)) float32 of the empty caption."""
    with np.load(Path(latent_dir) / NULL_TEXT) as z:
        return z["tokens"], z["pooled"]


def check_identity(manifest: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Refuse latents whose manifest identity differs from what the config would produce."""
    got = manifest["identity"]
    diffs = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            diffs.append(f"{path}: latents have {a!r}, config gives {b!r}")

    walk(got, expected, "")
    if diffs:
        raise ValueError(f"{where}: latent manifest does not match the config ({'; '.join(diffs[:4])}"
                         f"{'; ...' if len(diffs) > 4 else ''}). Re-run precompute into a new data.latent_dir "
                         f"or fix the codec/text/data.resolution settings.")
