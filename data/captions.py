"""Several captions per image: where precompute finds them, and which one the loader picks.

Caption 0 is the sample's caption as before (KEY.txt, else the json "caption"). Captions
1, 2, ... come from `data.caption_fields`, in order: each names a tar member extension
(`KEY.recaption.txt` -> "recaption.txt") or a KEY.json field holding a string or a list of
strings (img2dataset passes extra parquet columns through to the json). Blank captions
and repeats of an earlier caption are skipped; at most `data.max_captions` are kept.
Precompute encodes each one (latents.py stores caption k >= 1 as KEY.caption{k}.txt,
KEY.text{k}.npy, KEY.pooled{k}.npy).

The loader picks one caption per sample per pass over its source (the epoch, for a
dataset of one source) with the relative weights `data.caption_weights` (caption 0, 1,
...; a sample's missing captions drop out, () = uniform), from a hash of (seed, pass,
key): the same sample in the same pass gets the same caption on any rank, worker or
world size, and the choice survives resume.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Sequence


def _text(b: bytes) -> str:
    try:
        return b.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return b.decode("latin-1").strip()


def extra_captions(files: dict[str, bytes], meta: dict[str, Any] | None, fields: Sequence[str], primary: str,
                   limit: int) -> list[str]:
    """Captions 1, 2, ... of a sample (at most limit - 1), from member extensions or json fields."""
    out: list[str] = []
    seen = {primary}
    for name in fields:
        if name in files:
            found: list[Any] = [_text(files[name])]
        elif meta is not None and name in meta:
            v = meta[name]
            found = list(v) if isinstance(v, (list, tuple)) else [v]
        else:
            continue
        for c in found:
            c = c.strip() if isinstance(c, str) else ""
            if c and c not in seen and len(out) < limit - 1:
                seen.add(c)
                out.append(c)
    return out


def choose_caption(seed: int, pass_: int, key: str, num_captions: int, weights: Sequence[float] = ()) -> int:
    """Which of a sample's `num_captions` captions to use in this pass: weights[i] for
    caption i (missing entries count as 0 when `weights` is given, () = uniform)."""
    if num_captions <= 1:
        return 0
    w = [float(weights[i]) if i < len(weights) else 0.0 for i in range(num_captions)] if weights else \
        [1.0] * num_captions
    total = sum(w)
    if total <= 0:
        return 0  # only captions the weights leave out: keep caption 0
    h = hashlib.blake2b(struct.pack("<2q", seed, pass_) + key.encode("utf-8"), digest_size=8,
                        person=b"latentforge-cap").digest()
    u = int.from_bytes(h, "little") / 2.0 ** 64 * total  # uniform in [0, total)
    acc = 0.0
    for i, wi in enumerate(w):
        acc += wi
        if u < acc:
            return i
    return max(i for i, wi in enumerate(w) if wi > 0)
