"""Robust reading of raw image-caption shards (img2dataset's WebDataset layout).

One shard in, a stream of decoded samples and rejections out. Nothing crashes and nothing
is dropped silently (docs/guarantees.md, 1 and 6): every sample the tar holds is counted
as seen and is either yielded as a `RawSample` or yielded as a `Rejection` with one of
`REASONS`; problems with the shard itself (`SHARD_ERRORS`) end it and are listed in the
`ShardReport`. For every shard, seen == yielded + sum(rejected).

The stages, and what the stream holds after each:
    open_shard(url)            bytes (local file, pipe:, http(s)://, s3://, ...)
    _decompress                tar bytes (gzip/bzip2/xz detected by magic number)
    tarfile "r|" + _Tail       (key, ext, bytes) members, in tar order (_members)
    grouping in iter_shard     {ext: bytes} per key (a key's members are consecutive)
    _make_sample               caption(s) and metadata (KEY.json, else the shard's parquet row),
                               metadata filters (data/filters.py), then the image decoded, resized
                               and centre-cropped to data.resolution or to its aspect-ratio bucket
                               (data/buckets.py): a RawSample, or Rejection(key, reason, detail)
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
import tarfile
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageOps

from latentforge.data import filters as flt
from latentforge.data.buckets import Bucket, nearest_bucket
from latentforge.data.captions import extra_captions
from latentforge.data.shards import open_shard

if TYPE_CHECKING:
    import torch

# Per-sample rejection reasons, in the order they are checked (a sample gets the first
# that applies).
REASONS: tuple[str, ...] = (
    "duplicate_key",  # the key was already seen in this shard; the first occurrence wins
    "truncated_sample",  # the shard ended inside this sample, leaving it without image or caption
    "missing_image",  # no jpg/jpeg/png/webp member
    "missing_caption",  # no non-empty .txt, and no non-empty "caption" in .json
    *flt.REASONS,  # metadata filters (data/filters.py): filtered_<field> and missing_<field>
    "decompression_bomb",  # width * height above max_pixels (or above PIL's own hard limit)
    "too_small",  # shorter side below min_size
    "bad_aspect",  # long side / short side above max_aspect
    "corrupt_image",  # the image bytes do not decode (or decode to an unsupported mode)
)

# Shard-level errors: each ends the shard (samples read before it are kept). They are
# strings "reason: detail" in ShardReport.errors.
SHARD_ERRORS: tuple[str, ...] = (
    "open_failed",  # the file or URL could not be opened
    "not_a_tar",  # the first header is not a tar header (or the file is empty, 0 bytes)
    "truncated_shard",  # the data ends before the end-of-archive marker
    "corrupt_shard",  # an invalid tar header after the first member
    "read_error",  # the stream failed (I/O error, download or decompression failure)
)

# Shard-level notes, not errors: ShardReport.notes.
#   "empty_shard": a valid tar with no samples.
#   "ignored_members: N ...": members that are no part of a sample (directories, links,
#   names without an extension).

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")  # in order of preference
CROP_POLICY = "resize-shorter-side-bicubic+center-crop"  # recorded in manifests/caches
BUCKET_CROP_POLICY = "nearest-log-aspect-bucket+resize-to-cover-bicubic+center-crop"  # the same, with buckets
_KEEP_TAIL = 1 << 20  # bytes of the tar stream kept to inspect where it ended
_MAX_DRAIN = 1 << 20  # after the archive ends, read at most this much more before closing
_BLOCK = 512  # tar block size


@dataclass
class RawConfig:
    resolution: int  # output side in pixels: shorter side resized to it, then centre-cropped
    min_size: int = 0  # reject images whose shorter side is below this (0 = off)
    max_aspect: float = 0.0  # reject images whose long/short side ratio is above this (0 = off)
    max_pixels: int = 64_000_000  # refuse images with more pixels (decompression bombs)
    buckets: tuple[Bucket, ...] = ()  # (height, width) aspect-ratio buckets; () = square at resolution
    filters: flt.MetadataFilters = field(default_factory=flt.MetadataFilters)  # metadata filters (off by default)
    caption_fields: tuple[str, ...] = ()  # extra captions: member extensions or json fields (data/captions.py)
    max_captions: int = 1  # most captions kept per sample, caption 0 included

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution: must be >= 1, got {self.resolution}")
        if self.min_size < 0:
            raise ValueError(f"min_size: must be >= 0 (0 = off), got {self.min_size}")
        if self.max_aspect != 0 and self.max_aspect < 1:
            raise ValueError(f"max_aspect: must be 0 (off) or >= 1, got {self.max_aspect}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels: must be >= 1, got {self.max_pixels}")
        if self.max_captions < 1:
            raise ValueError(f"max_captions: must be >= 1, got {self.max_captions}")

    @classmethod
    def from_data_config(cls, data: Any) -> RawConfig:
        """From `latentforge.config.DataConfig` (max_pixels if it has the field)."""
        from latentforge.data.buckets import table_from_config

        kw: dict[str, Any] = dict(resolution=data.resolution, min_size=data.min_size, max_aspect=data.max_aspect,
                                  buckets=table_from_config(data), filters=flt.MetadataFilters.from_data_config(data),
                                  caption_fields=tuple(data.caption_fields),
                                  max_captions=data.max_captions if data.caption_fields else 1)
        if hasattr(data, "max_pixels"):
            kw["max_pixels"] = data.max_pixels
        return cls(**kw)

    def identity(self) -> dict[str, Any]:
        """Everything here that shapes the output pixels or the kept set, for cache keys.
        Buckets, filters and extra captions appear only when on, so a square dataset of
        one caption keeps the identity it had before they existed."""
        return {"resolution": self.resolution, "min_size": self.min_size, "max_aspect": self.max_aspect,
                "max_pixels": self.max_pixels, "crop_policy": self.crop_policy, **extra_identity(self)}

    @property
    def crop_policy(self) -> str:
        return BUCKET_CROP_POLICY if self.buckets else CROP_POLICY


def extra_identity(cfg: RawConfig) -> dict[str, Any]:
    """The identity entries of buckets, metadata filters and extra captions (only those that are on)."""
    out: dict[str, Any] = {}
    if cfg.buckets:
        out["buckets"] = [list(b) for b in cfg.buckets]
    if cfg.filters.active:
        out["filters"] = cfg.filters.identity()
    if cfg.caption_fields:
        out["captions"] = {"fields": list(cfg.caption_fields), "max": cfg.max_captions}
    return out


@dataclass
class RawSample:
    key: str  # the sample's key in its shard (e.g. "000000123")
    image: Image.Image  # RGB, resolution x resolution, or its bucket's width x height
    caption: str  # stripped, non-empty
    meta: dict[str, Any]  # orig_width, orig_height (after EXIF rotation), crop_top, crop_left, json;
    #                       with buckets also target_height, target_width (the bucket)
    extra_captions: list[str] = field(default_factory=list)  # captions 1, 2, ... (data/captions.py)


@dataclass
class Rejection:
    key: str  # the sample's key
    reason: str  # one of REASONS
    detail: str  # a human-readable why


@dataclass
class ShardReport:
    url: str
    seen: int = 0  # samples (groups of members sharing a key) found in the tar
    yielded: int = 0  # RawSamples produced
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> count
    errors: list[str] = field(default_factory=list)  # "reason: detail", reason in SHARD_ERRORS
    notes: list[str] = field(default_factory=list)  # "empty_shard", "ignored_members: ..."

    @property
    def ok(self) -> bool:
        """True when the shard was read to its end-of-archive marker."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "seen": self.seen, "yielded": self.yielded,
                "rejected": dict(sorted(self.rejected.items())), "errors": list(self.errors),
                "notes": list(self.notes)}


class _Reject(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class _ShardError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ---------------------------------------------------------------------------------------
# Images.


def resize_center_crop(image: Image.Image, resolution: int) -> tuple[Image.Image, int, int]:
    """Resize the shorter side to `resolution` (antialiased bicubic), centre-crop a square:
    `resize_crop` to resolution x resolution."""
    return resize_crop(image, resolution, resolution)


def resize_crop(image: Image.Image, width: int, height: int) -> tuple[Image.Image, int, int]:
    """Resize to cover width x height keeping the aspect ratio (antialiased bicubic), then
    centre-crop to exactly width x height.

    Returns (image, crop_top, crop_left); the offsets are in resized pixels, the crop
    conditioning of SDXL (Podell et al. 2023, "SDXL", sec. 2.2). Only the cropped region
    is resampled (PIL's `box`), the same pixels as resize-then-crop without building the
    resized image, which for a 1 x 20000 banner would hold billions of pixels.
    """
    w, h = image.size
    if w * height <= h * width:  # relatively taller than the target: the width binds
        nw, nh = width, max(height, round(h * width / w))
    else:
        nw, nh = max(width, round(w * height / h)), height
    top, left = (nh - height) // 2, (nw - width) // 2
    if (w, h) == (width, height):
        return image, 0, 0
    sx, sy = nw / w, nh / h  # resized pixels per source pixel
    box = (left / sx, top / sy, (left + width) / sx, (top + height) / sy)
    # reducing_gap: a cheap box reduce() first for big downscales, then bicubic.
    image = image.resize((width, height), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return image, top, left


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Transparency (RGBA, LA, PA, P or L with a transparent index) is
    composited on white; 16-bit greyscale is scaled (v * 255 / 65535, rounded), not
    clipped; CMYK and other modes use PIL's conversion. ICC profiles are not applied."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(image).astype(np.float64)  # (H, W); I;16 arrives as uint16
        # "I" comes from 16-bit PNG/TIFF: treat it as 16-bit too. "F" is taken as 0..255.
        a = np.clip(a, 0, 255) if mode == "F" else np.clip(a, 0, 65535) * (255 / 65535)
        return Image.fromarray(np.rint(a).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")  # applies P/L/RGB transparency keys as alpha
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _decode_image(data: bytes, cfg: RawConfig) -> tuple[Image.Image, dict[str, Any]]:
    """Bytes -> (RGB image at resolution, meta) or raise _Reject."""
    with warnings.catch_warnings():
        # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; our own limit is
        # checked explicitly below so it holds whatever PIL's global is set to.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise _Reject("decompression_bomb", str(e)) from None
        except Exception as e:  # UnidentifiedImageError, struct errors from bad headers, ...
            raise _Reject("corrupt_image", f"{type(e).__name__}: {e}") from None
        w, h = image.size
        if w < 1 or h < 1:
            raise _Reject("corrupt_image", f"image size {w}x{h}")
        if w * h > cfg.max_pixels:
            raise _Reject("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}")
        # Rotation by EXIF swaps w and h, which changes neither test below.
        if cfg.min_size and min(w, h) < cfg.min_size:
            raise _Reject("too_small", f"{w}x{h}: shorter side < min_size {cfg.min_size}")
        if cfg.max_aspect and max(w, h) / min(w, h) > cfg.max_aspect:
            raise _Reject("bad_aspect", f"{w}x{h}: aspect {max(w, h) / min(w, h):.2f} > max_aspect {cfg.max_aspect}")
        meta: dict[str, Any] = {}
        try:
            image.load()
            try:
                image = ImageOps.exif_transpose(image)
            except Exception as e:  # a broken EXIF block should not cost a good image
                meta["exif_error"] = f"{type(e).__name__}: {e}"
            image = to_rgb(image)
        except Image.DecompressionBombError as e:
            raise _Reject("decompression_bomb", str(e)) from None
        except Exception as e:  # truncated data, decoder errors, unsupported modes
            raise _Reject("corrupt_image", f"{type(e).__name__}: {e}") from None
    meta["orig_width"], meta["orig_height"] = image.size
    if cfg.buckets:
        th, tw = nearest_bucket(image.size[0], image.size[1], cfg.buckets)
        meta["target_height"], meta["target_width"] = th, tw
        image, meta["crop_top"], meta["crop_left"] = resize_crop(image, tw, th)
    else:
        image, meta["crop_top"], meta["crop_left"] = resize_center_crop(image, cfg.resolution)
    return image, meta


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 in [-1, 1], x / 127.5 - 1."""
    import torch

    if image.mode != "RGB":
        raise ValueError(f"image: expected mode RGB, got {image.mode}")
    a = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    return a.permute(2, 0, 1).float() / 127.5 - 1.0


def from_tensor(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image (rounded, clamped). Inverts `to_tensor` exactly."""
    import torch

    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"x: expected shape (3, H, W), got {tuple(x.shape)}")
    a = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB")


# ---------------------------------------------------------------------------------------
# Captions and samples.


def _caption(files: dict[str, bytes]) -> tuple[str, dict[str, Any] | None, str]:
    """(caption, parsed json or None, why-missing detail). The .txt is UTF-8 (a BOM is
    dropped) or, if it does not decode as UTF-8, latin-1; the .json "caption" is the
    fallback when the .txt is absent or blank."""
    meta: dict[str, Any] | None = None
    why = []
    if "json" in files:
        try:
            parsed = json.loads(files["json"].decode("utf-8"))
            if isinstance(parsed, dict):
                meta = parsed
            else:
                why.append("json is not an object")
        except (UnicodeDecodeError, ValueError) as e:
            why.append(f"unreadable json ({type(e).__name__})")
    text = ""
    if "txt" in files:
        try:
            text = files["txt"].decode("utf-8-sig")
        except UnicodeDecodeError:
            text = files["txt"].decode("latin-1")
        text = text.strip()
        if not text:
            why.append("empty txt")
    else:
        why.append("no txt")
    if not text and meta is not None:
        cap = meta.get("caption")
        text = cap.strip() if isinstance(cap, str) else ""
        if not text:
            why.append("no caption in json")
    return text, meta, ", ".join(why)


def _make_sample(key: str, files: dict[str, bytes], cfg: RawConfig, truncated: bool,
                 parquet_row: dict[str, Any] | None = None) -> RawSample | Rejection:
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    text, meta_json, why = _caption(files)
    members = ", ".join(sorted(files))
    if truncated and (ext is None or not text):
        return Rejection(key, "truncated_sample", f"the shard ends inside this sample (read: {members})")
    if ext is None:
        return Rejection(key, "missing_image", f"no {'/'.join(IMAGE_EXTS)} member (has: {members})")
    if not text:
        return Rejection(key, "missing_caption", why)
    if cfg.filters.active:  # before decoding: a filtered image costs no decode
        fields = {**(parquet_row or {}), **(meta_json or {})}  # the json wins over the parquet
        rejected = cfg.filters.check(text, fields)
        if rejected is not None:
            return Rejection(key, *rejected)
    try:
        image, meta = _decode_image(files[ext], cfg)
    except _Reject as r:
        return Rejection(key, r.reason, f"{key}.{ext}: {r.detail}")
    if meta_json is not None:
        meta["json"] = meta_json
    extra = extra_captions(files, meta_json, cfg.caption_fields, text, cfg.max_captions) if cfg.caption_fields else []
    return RawSample(key=key, image=image, caption=text, meta=meta, extra_captions=extra)


# ---------------------------------------------------------------------------------------
# Tar members.

# WebDataset's split of a member name into key and extension: the key keeps the folder
# and ends at the first dot of the basename (webdataset.tariterators.base_plus_ext).
_KEY_RE = re.compile(r"^((?:.*/|)[^./][^.]*)[.]([^/]*)$")


class _Tail:
    """Reads through a stream, counting bytes and keeping the last ~1 MiB, so we can look
    at the block where tarfile stopped: tarfile in stream mode ends silently at a
    truncated or garbled header, and only the block itself tells that from a clean end."""

    def __init__(self, f: Any) -> None:
        self.f, self.pos, self.start, self.buf, self.eof = f, 0, 0, bytearray(), False

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        if n != 0 and not b:
            self.eof = True
        self.buf += b
        self.pos += len(b)
        if len(self.buf) > 2 * _KEEP_TAIL:
            drop = len(self.buf) - _KEEP_TAIL
            del self.buf[:drop]
            self.start += drop
        return b

    def block_at(self, offset: int) -> bytes | None:
        """Up to 512 bytes at `offset`, reading on as needed; None if already discarded."""
        while not self.eof and self.pos < offset + _BLOCK:
            self.read(64 * 1024)
        if offset < self.start:
            return None
        return bytes(self.buf[offset - self.start: offset - self.start + _BLOCK])

    def drain(self) -> None:
        """Read to the end (bounded), so a pipe's command exits on its own."""
        limit = self.pos + _MAX_DRAIN
        while not self.eof and self.pos < limit:
            self.read(64 * 1024)


class _Peek:
    """A stream with its first bytes read ahead (to sniff compression)."""

    def __init__(self, f: Any, n: int = 6) -> None:
        self.f, self.head = f, f.read(n)

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                b, self.head = self.head + self.f.read(), b""
                return b
            b, self.head = self.head[:n], self.head[n:]
            return b if len(b) == n else b + self.f.read(n - len(b))
        return self.f.read(n)


def _decompress(stream: Any) -> Any:
    p = _Peek(stream)
    if p.head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=p, mode="rb")  # type: ignore[arg-type]
    if p.head.startswith(b"BZh"):
        return bz2.BZ2File(p)  # type: ignore[arg-type]
    if p.head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(p)  # type: ignore[arg-type]
    if p.head.startswith(b"\x28\xb5\x2f\xfd"):
        raise _ShardError("not_a_tar", "zstd-compressed; read it as pipe:zstd -dc FILE")
    return p


def _members(stream: BinaryIO, report: ShardReport) -> Iterator[tuple[str, str, bytes]]:
    """(key, ext, data) for each regular member, in order. Shard-level problems end the
    iteration with a _ShardError."""
    tail = _Tail(_decompress(stream))
    try:
        tar = tarfile.open(fileobj=tail, mode="r|")  # type: ignore[call-overload]
    except tarfile.ReadError as e:
        detail = "empty file (0 bytes)" if tail.pos == 0 else str(e)
        raise _ShardError("not_a_tar", detail) from None
    ignored: list[str] = []
    try:
        with tar:
            for info in tar:
                name = info.name[2:] if info.name.startswith("./") else info.name
                m = _KEY_RE.match(name)
                if not info.isreg() or m is None:  # directories, links, names without extension
                    ignored.append(name)
                    continue
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""  # stream mode: read before the next header
                if len(data) != info.size:
                    raise _ShardError("truncated_shard", f"member {name} ends after {len(data)} of {info.size} bytes")
                yield m.group(1), m.group(2).lower(), data
            end = tar.offset  # where tarfile stopped: the block that ended the archive
    finally:
        if ignored:
            report.notes.append(f"ignored_members: {len(ignored)} ({', '.join(ignored[:3])}"
                                f"{', ...' if len(ignored) > 3 else ''})")
    block = tail.block_at(end)
    if block is not None and len(block) < _BLOCK:
        raise _ShardError("truncated_shard", f"the data ends at byte {tail.pos} without an end-of-archive marker")
    if block is not None and any(block):
        raise _ShardError("corrupt_shard", f"invalid tar header at byte {end}")
    tail.drain()
    # tarfile stops at the first zero block; data after it (e.g. `cat a.tar b.tar`) would
    # be samples lost without a word.
    if end + _BLOCK >= tail.start and any(tail.buf[end + _BLOCK - tail.start:]):
        raise _ShardError("corrupt_shard", f"data after the end-of-archive marker at byte {end} "
                                           f"(concatenated tars?) was not read")


def iter_shard(url: str, cfg: RawConfig, report: ShardReport | None = None) -> Iterator[RawSample | Rejection]:
    """Every sample of one raw shard, decoded (`RawSample`) or rejected (`Rejection`).

    Fills `report` (seen, yielded, rejected by reason, shard-level errors and notes) as
    it goes. Never raises for bad data: a shard that cannot be opened, is not a tar, or
    is cut short ends with an entry in `report.errors`, after the samples read so far.
    Members of one sample must be consecutive (as img2dataset writes them); a key seen
    again later, or a member extension repeated within one sample, starts a new sample
    that is rejected as `duplicate_key`.
    """
    report = report if report is not None else ShardReport(url=url)
    keys: set[str] = set()
    rows: dict[str, dict[str, Any]] = {}
    pq = flt.parquet_path(url) if cfg.filters.needs_metadata else None
    if pq is not None:
        try:
            rows = flt.read_parquet_rows(pq)
            report.notes.append(f"metadata_parquet: {pq.name} ({len(rows)} rows)")
        except ValueError as e:  # the json alone still serves
            report.notes.append(f"metadata_parquet_error: {e}")

    def finish(key: str, files: dict[str, bytes], truncated: bool = False) -> RawSample | Rejection:
        report.seen += 1
        if key in keys:
            out: RawSample | Rejection = Rejection(key, "duplicate_key", f"members {', '.join(sorted(files))} "
                                                                         f"repeat an earlier sample's key")
        else:
            keys.add(key)
            out = _make_sample(key, files, cfg, truncated, rows.get(key))
        if isinstance(out, Rejection):
            report.rejected[out.reason] += 1
        else:
            report.yielded += 1
        return out

    try:
        stream = open_shard(url)
    except Exception as e:
        report.errors.append(f"open_failed: {type(e).__name__}: {e}")
        return
    try:
        key, files = "", {}
        members = _members(stream, report)
        while True:
            try:
                k, ext, data = next(members)
            except StopIteration:
                break
            except _ShardError as e:
                report.errors.append(str(e))
                break
            except tarfile.ReadError as e:
                reason = "truncated_shard" if "unexpected end" in str(e) else "corrupt_shard"
                report.errors.append(f"{reason}: {e}")
                break
            except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:  # gzip/bz2 cut short, pipe exit
                reason = "truncated_shard" if isinstance(e, EOFError) else "read_error"
                report.errors.append(f"{reason}: {type(e).__name__}: {e}")
                break
            except Exception as e:  # anything else tarfile may raise on a malformed header
                report.errors.append(f"corrupt_shard: {type(e).__name__}: {e}")
                break
            if files and (k != key or ext in files):
                yield finish(key, files)
                files = {}
            key = k
            files[ext] = data
        if files:
            yield finish(key, files, truncated=bool(report.errors))
    finally:
        try:
            # A command's exit status is checked here (if it was read to its end; one we
            # stopped reading early is killed quietly, see shards.open_shard).
            stream.close()
        except Exception as e:
            report.errors.append(f"read_error: {type(e).__name__}: {e}")
    if report.seen == 0 and not report.errors:
        report.notes.append("empty_shard")
