"""Aspect-ratio buckets and SD-XL's size and crop micro-conditioning.

A bucket is a (height, width) in pixels. The table holds, for every width w that is a
multiple of `multiple` up to the square side, the tallest height h (a multiple too) with
w * h <= `area`, and its transpose, keeping ratios up to `max_ratio` (the construction of
kohya-ss's `make_bucket_resolutions`; SD-XL's appendix lists a table of the same kind).
256**2 pixels, multiples of 64, ratios up to 4:

    (128, 512) (192, 320) (256, 256) (320, 192) (512, 128)

An image goes to the bucket nearest in log aspect ratio (mosaicml/diffusion's bucketed
transform does the same); ties go to the earlier bucket of the table, which is sorted by
width / height. The image is then resized to cover the bucket and centre-cropped
(data/raw.py `resize_crop`); the original size and the crop offsets are recorded.

With `max_ratio` 1 there is no table: every image is the square centre crop at
data.resolution, as before buckets existed (`square_only`).

Micro-conditioning (Podell et al. 2023, "SDXL", sec. 2.2) gives the U-Net six numbers per
sample, in diffusers' order (`StableDiffusionXLPipeline._get_add_time_ids`):
(original height, original width, crop top, crop left, target height, target width).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

Bucket = tuple[int, int]  # (height, width) in pixels


def bucket_table(area: int, multiple: int, max_ratio: float) -> tuple[Bucket, ...]:
    """The buckets for a pixel area, a side multiple and a ratio range, sorted by width/height."""
    if area < 1 or multiple < 1 or max_ratio < 1:
        raise ValueError(f"bucket table: need area >= 1, multiple >= 1, max_ratio >= 1; got {area}, {multiple}, "
                         f"{max_ratio}")
    out: set[Bucket] = set()
    w = multiple
    while w * w <= area:
        h = area // w // multiple * multiple
        if max(w, h) <= max_ratio * min(w, h):
            out.update({(h, w), (w, h)})
        w += multiple
    return tuple(sorted(out, key=lambda b: (b[1] / b[0], b)))


def table_from_config(data: Any) -> tuple[Bucket, ...]:
    """The table of `latentforge.config.DataConfig`; () when buckets are off (square only)."""
    if data.bucket_max_ratio <= 1:
        return ()
    table = bucket_table(data.bucket_area or data.resolution ** 2, data.bucket_multiple, data.bucket_max_ratio)
    if not table:
        raise ValueError(f"data.bucket_max_ratio: no bucket of area <= {data.bucket_area or data.resolution ** 2} "
                         f"with sides multiples of {data.bucket_multiple} and ratio <= {data.bucket_max_ratio}")
    return table


def nearest_bucket(width: int, height: int, table: Sequence[Bucket]) -> Bucket:
    """The bucket nearest to width/height in log aspect ratio (the earlier one on a tie)."""
    r = math.log(width / height)
    return min(table, key=lambda b: abs(math.log(b[1] / b[0]) - r))


def bucket_name(bucket: Sequence[int]) -> str:
    """(height, width) -> "HxW", the bucket's name in manifests and logs."""
    return f"{int(bucket[0])}x{int(bucket[1])}"


def nominal_bucket(table: Sequence[Bucket], resolution: int) -> Bucket:
    """The bucket that stands for the dataset where one size is needed (the model's
    sample_size, the default sampling size): the one nearest to square; (R, R) without a table."""
    return nearest_bucket(1, 1, table) if table else (resolution, resolution)


def time_ids(original_hw: Sequence[float], crop_top_left: Sequence[float], target_hw: Sequence[float]) -> list[float]:
    """SD-XL's six micro-conditioning numbers for one sample: original (h, w), crop (top, left), target (h, w)."""
    return [float(original_hw[0]), float(original_hw[1]), float(crop_top_left[0]), float(crop_top_left[1]),
            float(target_hw[0]), float(target_hw[1])]


def sample_time_ids(meta: dict[str, Any], target_hw: Sequence[int]) -> list[float]:
    """The micro-conditioning of a stored sample from its KEY.json: the original size as
    img2dataset recorded it before its own resize (original_width/height of the raw json),
    else the decoded image's (orig_width/height); the crop (crop_top/left, in resized
    pixels, as SD-XL); the target size (target_height/width when bucketed, else `target_hw`)."""
    from latentforge.data.filters import original_size

    target = (meta.get("target_height", target_hw[0]), meta.get("target_width", target_hw[1]))
    size, _ = original_size({k: v for k, v in (meta.get("json") or {}).items() if k.startswith("original_")})
    orig = (size[1], size[0]) if size else (meta.get("orig_height", target[0]), meta.get("orig_width", target[1]))
    return time_ids(orig, (meta.get("crop_top", 0), meta.get("crop_left", 0)), target)
