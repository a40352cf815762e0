"""Metadata filters at precompute: original size, aesthetic score, watermark and unsafe
probabilities, caption length.

The fields come from what img2dataset writes beside each image: KEY.json (every column of
the input parquet, plus width/height/original_width/original_height) and, for a local
shard, the per-shard parquet SHARD.parquet with the same columns (used for a key whose
json lacks the field, or has no json). Names differ between datasets, so each field is
looked up under a few names (LAION's parquet columns first):

    original size   original_width + original_height, else width + height
    aesthetic       aesthetic, AESTHETIC_SCORE, aesthetic_score
    watermark       pwatermark, watermark
    unsafe          punsafe, unsafe

A sample a filter rejects is counted under `filtered_<field>`; a sample without the field
(absent, null, NaN, or not a number) under `missing_<field>`, so seen = written + rejected
still holds (docs/guarantees.md, guarantee 1). A filter that is off reads nothing.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

# Rejection reasons, in the order they are checked (data/raw.py lists them in REASONS).
REASONS: tuple[str, ...] = (
    "filtered_caption_length",  # caption word count outside [filter_min_caption_words, filter_max_caption_words]
    "missing_original_size",  # no original_width/original_height (or width/height) in the metadata
    "filtered_original_size",  # original shorter side below, or longer side above, the bounds
    "missing_aesthetic",  # no aesthetic score in the metadata
    "filtered_aesthetic",  # aesthetic score below filter_min_aesthetic
    "missing_watermark",  # no watermark probability in the metadata
    "filtered_watermark",  # watermark probability above filter_max_watermark
    "missing_unsafe",  # no unsafe probability in the metadata
    "filtered_unsafe",  # unsafe probability above filter_max_unsafe
)

SIZE_FIELDS: tuple[tuple[str, str], ...] = (("original_width", "original_height"), ("width", "height"))
AESTHETIC_FIELDS: tuple[str, ...] = ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score")
WATERMARK_FIELDS: tuple[str, ...] = ("pwatermark", "watermark")
UNSAFE_FIELDS: tuple[str, ...] = ("punsafe", "unsafe")
PARQUET_COLUMNS: tuple[str, ...] = (*(f for pair in SIZE_FIELDS for f in pair), *AESTHETIC_FIELDS,
                                    *WATERMARK_FIELDS, *UNSAFE_FIELDS)


@dataclass(frozen=True)
class MetadataFilters:
    min_original_side: int = 0  # 0 = off
    max_original_side: int = 0  # 0 = off
    min_aesthetic: float = 0.0  # 0 = off
    max_watermark: float = 1.0  # 1 = off
    max_unsafe: float = 1.0  # 1 = off
    min_caption_words: int = 0  # 0 = off
    max_caption_words: int = 0  # 0 = off

    @classmethod
    def from_data_config(cls, d: Any) -> MetadataFilters:
        return cls(min_original_side=d.filter_min_original_side, max_original_side=d.filter_max_original_side,
                   min_aesthetic=d.filter_min_aesthetic, max_watermark=d.filter_max_watermark,
                   max_unsafe=d.filter_max_unsafe, min_caption_words=d.filter_min_caption_words,
                   max_caption_words=d.filter_max_caption_words)

    @property
    def active(self) -> bool:
        return self != MetadataFilters()

    @property
    def needs_metadata(self) -> bool:
        """Whether any filter reads the json/parquet fields (caption length does not)."""
        return bool(self.min_original_side or self.max_original_side or self.min_aesthetic
                    or self.max_watermark < 1 or self.max_unsafe < 1)

    def identity(self) -> dict[str, Any]:
        """The filters that are on (they shape the kept set, so they go into cache keys)."""
        off = MetadataFilters()
        return {k: v for k, v in asdict(self).items() if v != getattr(off, k)}

    def check(self, caption: str, fields: Mapping[str, Any]) -> tuple[str, str] | None:
        """(reason, detail) of the first filter that rejects the sample, or None to keep it."""
        if self.min_caption_words or self.max_caption_words:
            n = len(caption.split())
            if n < self.min_caption_words or (self.max_caption_words and n > self.max_caption_words):
                return "filtered_caption_length", (f"{n} words, outside [{self.min_caption_words}, "
                                                   f"{self.max_caption_words or 'inf'}]")
        if self.min_original_side or self.max_original_side:
            size, why = original_size(fields)
            if size is None:
                return "missing_original_size", why
            w, h = size
            if min(w, h) < self.min_original_side or (self.max_original_side and max(w, h) > self.max_original_side):
                return "filtered_original_size", (f"original {w:g}x{h:g}: sides outside [{self.min_original_side}, "
                                                  f"{self.max_original_side or 'inf'}]")
        for name, names, bound, low in (("aesthetic", AESTHETIC_FIELDS, self.min_aesthetic, True),
                                        ("watermark", WATERMARK_FIELDS, self.max_watermark, False),
                                        ("unsafe", UNSAFE_FIELDS, self.max_unsafe, False)):
            if (low and bound <= 0) or (not low and bound >= 1):
                continue
            value, why = _field(fields, names)
            if value is None:
                return f"missing_{name}", why
            if (value < bound) if low else (value > bound):
                return f"filtered_{name}", f"{name} {value:g} {'<' if low else '>'} {bound:g}"
        return None


def _number(v: Any) -> float | None:
    """A finite float from a json/parquet value (numbers and numeric strings), else None."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            return None
    if not isinstance(v, (int, float)):
        try:
            v = float(v)  # numpy scalars from parquet
        except (TypeError, ValueError):
            return None
    v = float(v)
    return v if math.isfinite(v) else None


def _field(fields: Mapping[str, Any], names: tuple[str, ...]) -> tuple[float | None, str]:
    for n in names:
        if n in fields:
            v = _number(fields[n])
            if v is None:
                return None, f"{n} is {fields[n]!r}, not a number"
            return v, ""
    return None, f"none of {', '.join(names)} in the metadata"


def original_size(fields: Mapping[str, Any]) -> tuple[tuple[float, float] | None, str]:
    """((width, height), "") of the original image from img2dataset's fields, or (None, why not)."""
    for wn, hn in SIZE_FIELDS:
        if wn in fields or hn in fields:
            w, h = _number(fields.get(wn)), _number(fields.get(hn))
            if w is None or h is None or w <= 0 or h <= 0:
                return None, f"{wn}/{hn} are {fields.get(wn)!r}/{fields.get(hn)!r}, not positive numbers"
            return (w, h), ""
    return None, "no original_width/original_height (or width/height) in the metadata"


def parquet_path(url: str) -> Path | None:
    """img2dataset's per-shard parquet beside a local tar (SHARD.tar -> SHARD.parquet), if any."""
    if "://" in url or url.startswith("pipe:"):
        return None
    p = Path(url)
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if p.name.endswith(suffix):
            q = p.with_name(p.name[:-len(suffix)] + ".parquet")
            return q if q.is_file() else None
    return None


def read_parquet_rows(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{key: {column: value}} of the filter columns of an img2dataset parquet (rows without
    a key are skipped). Raises ValueError naming the file when it cannot be read."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "key" not in schema.names:
            raise ValueError("no 'key' column")
        cols = ["key", *(c for c in PARQUET_COLUMNS if c in schema.names)]
        rows = pq.read_table(path, columns=cols).to_pylist()
    except Exception as e:  # pyarrow's own errors, a missing key column
        raise ValueError(f"{path}: unreadable metadata parquet ({type(e).__name__}: {e})") from None
    return {str(r.pop("key")): r for r in rows if r.get("key") is not None}
