"""The latent-shard format: writing, reading and manifests.

Layout of a latent dataset directory (written by `latentforge precompute`):

    LATENT_DIR/
      manifest.json             dataset manifest: parts with exact counts, totals, rejections
                                by reason, and the identity of everything that shaped the numbers
      identity.json             that identity, written first: a re-run with other encoders is refused
      null_text.npz             the empty caption's embedding (classifier-free guidance's null)
      shards/NAME-000.tar       latent shard parts (WebDataset tars), one per <= N samples
      shards/NAME.json          per-raw-shard manifest; written last, so it marks NAME as done

One tar sample per raw sample kept (WebDataset naming, `KEY.field.ext`):

    KEY.caption.txt    the caption (UTF-8)
    KEY.mean.npy       posterior mean, fp16 (C, h, w)
    KEY.std.npy        posterior std, fp16 (C, h, w); absent for a deterministic codec
    KEY.text.npy       text encoder token sequence, fp16 (L, D)
    KEY.pooled.npy     pooled text embedding, fp16 (P,)
    KEY.json           {"text_len": int, "orig_width", "orig_height", "crop_top", "crop_left", ...};
                       bucketed datasets add "target_height", "target_width" (the bucket)
    KEY.caption{k}.txt, KEY.text{k}.npy, KEY.pooled{k}.npy   caption k = 1, 2, ... when the image
                       has several (data/captions.py); the json then holds "captions": n and
                       "text_lens": [len of caption 0, 1, ...]

A bucketed dataset (data.bucket_max_ratio > 1) writes each raw shard's samples into parts
of one bucket each; the manifest's part entries carry the bucket ("size": [H, W] pixels)
and its latent shape ("latent": [C, h, w]), and "buckets" lists every bucket's shape and
count. "shapes" keeps the text and pooled shapes and the latent shape of the nominal bucket
(the one nearest to square, data/buckets.py).

Latents are stored raw (the posterior, before scale and shift); the loader samples
`mean + std * eps` and applies `(z - shift) * scale` just in time, so the model has no
"precomputed?" branch (docs/data-formats.md).

Every file here is a pure function of its content: tars have fixed member metadata, JSON
is written with sorted keys, the npz has fixed zip timestamps. So a re-run after a crash
writes byte-identical files, and `precompute --verify` can compare sha256 digests.

Reading a part (`PartIndex`) takes one `readinto` of the file and a walk over its
512-byte tar headers; arrays are zero-copy numpy views into that buffer. Python's
`tarfile` builds an object per member and was the loader's largest cost.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import math
import os
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentforge.fileio import atomic_open, tmp_name, write_json
from latentforge.hashing import json_sha256, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDENTITY = "identity.json"
NULL_TEXT = "null_text.npz"
SHARDS = "shards"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


class TarWriter:
    """Writes a tar with fixed metadata (mtime 0, uid 0, mode 644) so equal inputs give
    equal bytes. POSIX (pax) format: long or non-ASCII keys get a pax record instead of
    an error. The file appears under its final name only when `close()` completes
    (tmp + fsync + rename). `sha256` is the digest of the bytes written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = tmp_name(self.path)
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT, encoding="utf-8")
        self.count = 0
        self.sha256 = ""

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
        self.sha256 = sha256_file(self.tmp, cache=False)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)


def encode_sample(key: str, caption: str, mean: np.ndarray, std: np.ndarray | None, text: np.ndarray,
                  pooled: np.ndarray, meta: dict[str, Any],
                  extra: list[tuple[str, np.ndarray, np.ndarray, int]] = ()) -> dict[str, bytes]:
    """Fields of one latent sample. Arrays are stored as fp16 .npy. `extra`: captions 1, 2, ...
    as (caption, text (L, D), pooled (P,), text_len)."""
    if extra:
        meta = dict(meta, captions=1 + len(extra), text_lens=[meta["text_len"], *(int(e[3]) for e in extra)])
    fields = {
        "caption.txt": caption.encode("utf-8"),
        "mean.npy": _npy_bytes(np.ascontiguousarray(mean, dtype=np.float16)),
        "text.npy": _npy_bytes(np.ascontiguousarray(text, dtype=np.float16)),
        "pooled.npy": _npy_bytes(np.ascontiguousarray(pooled, dtype=np.float16)),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    if std is not None:
        fields["std.npy"] = _npy_bytes(np.ascontiguousarray(std, dtype=np.float16))
    for k, (cap, t, p, _) in enumerate(extra, start=1):
        fields[f"caption{k}.txt"] = cap.encode("utf-8")
        fields[f"text{k}.npy"] = _npy_bytes(np.ascontiguousarray(t, dtype=np.float16))
        fields[f"pooled{k}.npy"] = _npy_bytes(np.ascontiguousarray(p, dtype=np.float16))
    return fields


def caption_field(k: int) -> tuple[str, str, str]:
    """The (caption, text, pooled) field names of caption k: k = 0 is the plain one."""
    return ("caption.txt", "text", "pooled") if k == 0 else (f"caption{k}.txt", f"text{k}", f"pooled{k}")


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
    extra: list[tuple[str, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)  # captions 1, 2, ...



# ---------------------------------------------------------------------------------------
# Reading parts.

# WebDataset's split of a member name: the key keeps its folders and ends at the first
# dot of the basename ("a.b/000.mean.npy" -> "a.b/000", "mean.npy").
_KEY_RE = re.compile(r"^((?:.*/|)[^./][^.]*)[.]([^/]*)$")
_BLOCK = 512
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


class CorruptPart(ValueError):
    """A latent part that does not parse. The message names the file."""


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    return int(field, 8) if field else 0


def _pax_path(records: bytes) -> str | None:
    """The "path" record of a pax extended header ("LEN path=VALUE\\n" records)."""
    pos, path = 0, None
    while pos < len(records):
        sp = records.index(b" ", pos)
        n = int(records[pos:sp])
        kv = records[sp + 1:pos + n - 1]
        k, _, v = kv.partition(b"=")
        if k == b"path":
            path = v.decode("utf-8", "surrogateescape")
        pos += n
    return path


class PartIndex:
    """A latent part held in memory: its samples in file order, with each field's
    (offset, size) in one buffer. `array(i, field)` is a zero-copy fp16 view.

    Parses the tar headers itself (USTAR + pax path records, as `TarWriter` writes them)
    and checks every header's checksum; anything else falls back to `tarfile`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = os.path.getsize(self.path)
        # np.empty, not bytearray: no zero-fill of a buffer that is overwritten at once.
        # Writable, so torch.from_numpy on its views does not warn.
        self.buf = np.empty(size, np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            got = f.readinto(memoryview(self.buf))
        if got != size:
            raise CorruptPart(f"{self.path}: read {got} of {size} bytes")
        self.keys: list[str] = []
        self.fields: list[dict[str, tuple[int, int]]] = []
        try:
            self._index()
        except CorruptPart:
            raise
        except Exception as e:  # bad octal digits, bad pax records, ...
            raise CorruptPart(f"{self.path}: not a readable latent part ({type(e).__name__}: {e})") from None

    def __len__(self) -> int:
        return len(self.keys)

    def _add(self, name: str, offset: int, size: int) -> None:
        m = _KEY_RE.match(name[2:] if name.startswith("./") else name)
        if m is None:
            return  # no extension: no part of a sample (we never write such members)
        key, ext = m.group(1), m.group(2)
        if not self.keys or self.keys[-1] != key:
            self.keys.append(key)
            self.fields.append({})
        self.fields[-1][ext] = (offset, size)

    def _index(self) -> None:
        buf, n = self.buf, len(self.buf)
        mv = memoryview(buf)
        pos, pax_name, headers = 0, None, []
        while True:
            if pos + _BLOCK > n:
                raise CorruptPart(f"{self.path}: ends at byte {n} without an end-of-archive marker (truncated?)")
            # Only the fields we use are sliced out: name (0:100), size (124:136), type (156),
            # magic (257:262), prefix (345:500). A member's name never starts with NUL, so
            # a NUL there is the end-of-archive marker (checked whole below).
            name_field = mv[pos:pos + 100].tobytes()
            if name_field[0] == 0:
                if any(mv[pos:pos + _BLOCK]):
                    raise CorruptPart(f"{self.path}: a tar header without a name at byte {pos} (corrupt file)")
                break
            headers.append(pos)
            size = _octal(mv[pos + 124:pos + 136].tobytes())
            kind = mv[pos + 156:pos + 157].tobytes()
            data = pos + _BLOCK
            if data + size > n:
                raise CorruptPart(f"{self.path}: member at byte {pos} runs past the end of the file (truncated?)")
            if kind == b"x":
                pax_name = _pax_path(mv[data:data + size].tobytes())
            elif kind == b"g":
                pass  # global pax header: no per-member information we use
            elif kind in (b"0", b"\0"):
                name = pax_name
                if name is None:
                    name = name_field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    if mv[pos + 257:pos + 262] == b"ustar" and buf[pos + 345]:
                        prefix = mv[pos + 345:pos + 500].tobytes().split(b"\0", 1)[0]
                        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
                self._add(name, data, size)
                pax_name = None
            elif kind == b"5":
                pax_name = None  # a directory
            else:  # GNU long names, links, ...: not ours, let tarfile handle it
                self.keys, self.fields = [], []
                self._index_tarfile()
                return
            pos = data + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        self._check_checksums(np.asarray(headers, dtype=np.int64))

    def _check_checksums(self, offsets: np.ndarray) -> None:
        """Every header's checksum, vectorised: the sum of its 512 bytes with the checksum
        field (148:156) counted as spaces must equal the octal number stored there."""
        if not len(offsets):
            return
        n = len(self.buf)
        h = self.buf[:n - n % _BLOCK].reshape(-1, _BLOCK)[offsets // _BLOCK].astype(np.int64)  # (M, 512)
        want = h.sum(axis=1) - h[:, 148:156].sum(axis=1) + 8 * 32
        field = h[:, 148:156]
        digits = field[:, :6] - ord("0")
        # tarfile writes "%06o\0 "; other writers may differ, so parse those rows one by one.
        simple = ((digits >= 0) & (digits <= 7)).all(axis=1) & (field[:, 6] == 0) & (field[:, 7] == 32)
        got = digits @ (8 ** np.arange(5, -1, -1, dtype=np.int64))
        for i in np.flatnonzero(~simple):
            got[i] = _octal(self.buf[offsets[i] + 148:offsets[i] + 156].tobytes())
        bad = np.flatnonzero(got != want)
        if len(bad):
            raise CorruptPart(f"{self.path}: bad tar header checksum at byte {int(offsets[bad[0]])} (corrupt file)")

    def _index_tarfile(self) -> None:
        with tarfile.open(self.path, "r") as tar:
            for m in tar:
                if m.isfile():
                    self._add(m.name, m.offset_data, m.size)

    def raw(self, i: int, ext: str) -> bytes:
        off, size = self.fields[i][ext]
        return self.buf[off:off + size].tobytes()

    def has(self, i: int, ext: str) -> bool:
        return ext in self.fields[i]

    def array(self, i: int, field: str) -> np.ndarray:
        """Sample i's KEY.<field>.npy as a zero-copy view into the buffer."""
        off, size = self.fields[i][f"{field}.npy"]
        buf = memoryview(self.buf)
        if buf[off:off + 6] != _NPY_MAGIC:
            raise CorruptPart(f"{self.path}: {self.keys[i]}.{field}.npy is not an .npy array")
        major = buf[off + 6]
        hl = 2 if major == 1 else 4
        hlen = int.from_bytes(buf[off + 8:off + 8 + hl], "little")
        start = off + 8 + hl
        header = buf[start:start + hlen].tobytes()
        parsed = _NPY_HEADERS.get(header)
        if parsed is None:  # the same few headers recur: parse each once per process
            d = ast.literal_eval(header.decode("latin-1"))
            parsed = (np.dtype(d["descr"]), tuple(d["shape"]), bool(d["fortran_order"]))
            if parsed[0].hasobject:
                raise CorruptPart(f"{self.path}: {self.keys[i]}.{field}.npy holds Python objects")
            _NPY_HEADERS[header] = parsed
        dtype, shape, fortran = parsed
        count = math.prod(shape)
        if start + hlen + count * dtype.itemsize > off + size:
            raise CorruptPart(f"{self.path}: {self.keys[i]}.{field}.npy is shorter than its header says")
        a = self.buf[start + hlen:start + hlen + count * dtype.itemsize].view(dtype)
        return a.reshape(shape, order="F" if fortran else "C")

    def meta(self, i: int) -> dict[str, Any]:
        return json.loads(self.raw(i, "json"))

    def num_captions(self, i: int) -> int:
        k = 1
        while f"text{k}.npy" in self.fields[i]:
            k += 1
        return k

    def record(self, i: int) -> LatentRecord:
        f = self.fields[i]
        extra = []
        for k in range(1, self.num_captions(i)):
            cap, text, pooled = caption_field(k)
            extra.append((self.raw(i, cap).decode("utf-8"), self.array(i, text).copy(), self.array(i, pooled).copy()))
        return LatentRecord(
            key=self.keys[i],
            caption=self.raw(i, "caption.txt").decode("utf-8"),
            mean=self.array(i, "mean").copy(),
            std=self.array(i, "std").copy() if "std.npy" in f else None,
            text=self.array(i, "text").copy(),
            pooled=self.array(i, "pooled").copy(),
            meta=self.meta(i),
            extra=extra,
        )



def read_part(path: str | os.PathLike) -> list[LatentRecord]:
    p = PartIndex(path)
    return [p.record(i) for i in range(len(p))]



# ---------------------------------------------------------------------------------------
# Manifests.


def identity_hash(identity: dict[str, Any]) -> str:
    return json_sha256(identity)


def shard_manifest_path(latent_dir: Path, name: str) -> Path:
    return Path(latent_dir) / SHARDS / f"{name}.json"


def part_name(shard: str, i: int) -> str:
    return f"{shard}-{i:03d}.tar"


# A part file or its temporary: "[.]SHARD-NNN.tar[.tmp-PID]" -> SHARD. The shard name is
# everything before the last "-NNN", so "a-000-001.tar" belongs to shard "a-000", not "a".
PART_FILE_RE = re.compile(r"^\.?(.+)-\d{3,}\.tar(?:\.tmp-\d+)?$")


def load_manifest(latent_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(latent_dir) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"no latent dataset manifest at {p}: run `latentforge precompute` first "
                                f"(or finish its job array so the manifest is assembled)")
    return json.loads(p.read_text())


class ShardsNotDone(FileNotFoundError):
    """The dataset manifest cannot be assembled yet: some raw shards have no manifest."""


def assemble_manifest(latent_dir: str | os.PathLike, identity: dict[str, Any],
                      expected_shards: list[str] | None = None) -> dict[str, Any]:
    """Combine every per-shard manifest into LATENT_DIR/manifest.json.

    `expected_shards` (raw shard names) makes it refuse to assemble while any is missing,
    and leave out manifests of shards no longer named (so a job array's last task can call
    this safely)."""
    latent_dir = Path(latent_dir)
    shard_files = sorted((latent_dir / SHARDS).glob("*.json"))
    shards = [json.loads(p.read_text()) for p in shard_files]
    if expected_shards is not None:
        done = {s["name"] for s in shards}
        missing = sorted(set(expected_shards) - done)
        if missing:
            raise ShardsNotDone(f"cannot assemble {latent_dir / MANIFEST}: {len(missing)} of {len(expected_shards)} "
                                f"raw shard(s) not done yet, e.g. {missing[:3]}; run the missing precompute tasks")
        wanted = set(expected_shards)
        shards = [s for s in shards if s["name"] in wanted]
    want = identity_hash(identity)
    for s in shards:
        if s["identity_hash"] != want:
            raise ValueError(f"{latent_dir / SHARDS / (s['name'] + '.json')}: written by a different codec/encoder "
                             f"configuration ({s['identity_hash']} != {want}); use a fresh data.latent_dir")
    parts = [{"file": f"{SHARDS}/{p['file']}", "count": p["count"], "raw_shard": s["name"],
              **{k: p[k] for k in ("size", "latent") if k in p}} for s in shards for p in s["parts"]]
    rejected: dict[str, int] = {}
    for s in shards:
        for reason, n in s["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + n
    shapes = next((s["shapes"] for s in shards if s["shapes"]), {})
    buckets = _bucket_summary(parts)
    if buckets and identity.get("buckets"):
        shapes = dict(shapes, latent=nominal_latent(identity, buckets))
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
        "shapes": shapes,
    }
    if buckets:
        manifest["buckets"] = buckets
    write_json(latent_dir / MANIFEST, manifest)
    return manifest


def _bucket_summary(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """[{"size": [H, W], "latent": [C, h, w], "count": n}] over the parts' buckets, by width/height."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for p in parts:
        if "size" in p:
            b = out.setdefault(tuple(p["size"]), {"size": list(p["size"]), "latent": list(p["latent"]), "count": 0})
            b["count"] += p["count"]
    return [out[k] for k in sorted(out, key=lambda b: (b[1] / b[0], b))]


def nominal_latent(identity: dict[str, Any], buckets: list[dict[str, Any]]) -> list[int]:
    """The latent shape [C, h, w] of the table's nominal bucket (nearest to square), from the
    codec's downsample factor that the written buckets show."""
    from latentforge.data.buckets import nominal_bucket

    b0 = buckets[0]
    down = b0["size"][0] // b0["latent"][1]
    h, w = nominal_bucket([tuple(b) for b in identity["buckets"]], identity.get("resolution", 0))
    return [b0["latent"][0], h // down, w // down]


def split_parts(manifest: dict[str, Any], heldout_parts: int) -> tuple[list[dict], list[dict]]:
    """(train parts, held-out parts): the last `heldout_parts` parts in file-name order are
    held out. With a single part nothing is held out."""
    parts = sorted(manifest["parts"], key=lambda p: p["file"])
    n = min(heldout_parts, len(parts) - 1) if heldout_parts > 0 else 0
    return (parts[:len(parts) - n], parts[len(parts) - n:]) if n else (parts, [])


def dataset_id(latent_dir: str | os.PathLike, manifest: dict[str, Any], parts: list[dict]) -> str:
    """The identity of the latent set `parts` of a dataset: its encoders' identity and every
    part's file, count and content hash (from the per-shard manifests). A loader position
    is only meaningful for the parts it was dealt from: it records this, and a resume on
    another set is refused."""
    sha: dict[str, str] = {}
    for p in (Path(latent_dir) / SHARDS).glob("*.json"):
        for part in json.loads(p.read_text()).get("parts", []):
            sha[f"{SHARDS}/{part['file']}"] = part.get("sha256", "")
    return json_sha256({"identity": manifest.get("identity_hash"),
                        "parts": [[p["file"], int(p["count"]), sha.get(p["file"], "")] for p in parts]})


def save_null_text(latent_dir: Path, tokens: np.ndarray, pooled: np.ndarray) -> None:
    """The empty caption's embedding, as an .npz with fixed zip timestamps (np.savez
    stamps the current time, which would make re-runs differ)."""
    with atomic_open(Path(latent_dir) / NULL_TEXT) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
        for name, a in (("tokens", tokens), ("pooled", pooled)):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            z.writestr(info, _npy_bytes(np.ascontiguousarray(a, dtype=np.float32)))


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


# ---------------------------------------------------------------------------------------
# A random dataset in the real format, for tests and benchmarks of the reading path.


def write_random_dataset(latent_dir: str | os.PathLike, counts: list[int], shapes: dict[str, list[int]],
                         seed: int = 0, with_std: bool = True, identity: dict[str, Any] | None = None,
                         part_latents: list[list[int]] | None = None, captions: int = 1) -> dict[str, Any]:
    """Parts `r{i:05d}-000.tar` holding counts[i] samples of random fp16 arrays with the
    given shapes ({"latent": [C, h, w], "text": [L, D], "pooled": [P]}), their per-shard
    manifests, the dataset manifest and a null text. Returns the manifest.

    `part_latents[i]`: part i's latent shape instead (a bucketed dataset: its parts carry
    "latent" and "size" = 8 x (h, w)); `captions`: captions per sample (1 + extra ones)."""
    d = Path(latent_dir)
    (d / SHARDS).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    identity = identity if identity is not None else {"kind": "random", "seed": seed}
    ih = identity_hash(identity)
    L = shapes["text"][0]
    for i, n in enumerate(counts):
        name = f"r{i:05d}"
        latent = part_latents[i] if part_latents is not None else shapes["latent"]
        parts = []
        if n:
            w = TarWriter(d / SHARDS / part_name(name, 0))
            for j in range(n):
                key = f"{name}_{j:06d}"
                mean = rng.standard_normal(latent).astype(np.float16)
                std = (rng.random(latent) * 0.1 + 0.01).astype(np.float16) if with_std else None
                text = rng.standard_normal(shapes["text"]).astype(np.float16)
                pooled = rng.standard_normal(shapes["pooled"]).astype(np.float16)
                meta: dict[str, Any] = {"text_len": int(rng.integers(2, L + 1))}
                meta.update(orig_width=int(rng.integers(8, 999)), orig_height=int(rng.integers(8, 999)),
                            crop_top=int(rng.integers(0, 9)), crop_left=int(rng.integers(0, 9)))
                if part_latents is not None:
                    meta.update(target_height=8 * latent[1], target_width=8 * latent[2])
                extra = [(f"caption {key} #{c}", rng.standard_normal(shapes["text"]).astype(np.float16),
                          rng.standard_normal(shapes["pooled"]).astype(np.float16), int(rng.integers(2, L + 1)))
                         for c in range(1, captions)]
                w.write_sample(key, encode_sample(key, f"caption {key}", mean, std, text, pooled, meta, extra))
            w.close()
            part: dict[str, Any] = {"file": w.path.name, "count": n, "sha256": w.sha256}
            if part_latents is not None:
                part.update(size=[8 * latent[1], 8 * latent[2]], latent=list(latent))
            parts.append(part)
        write_json(shard_manifest_path(d, name), {
            "name": name, "raw_shard": name, "identity_hash": ih, "parts": parts, "seen": n, "written": n,
            "rejected": {}, "rejections": [], "errors": [], "notes": [], "shapes": shapes})
    write_json(d / IDENTITY, identity)
    save_null_text(d, np.zeros(shapes["text"], np.float32), np.zeros(shapes["pooled"], np.float32))
    return assemble_manifest(d, identity)
