"""Prompt adherence on the synthetic shapes: detect what an image shows, compare to its prompt.

The renderer (`latentforge.data.synth`) is known, so every attribute a caption names can
be read back from pixels without a learned model:

    background  the median colour of the 1-pixel border, nearest named background
    colour      the named colour that best explains the pixels far from the background
                as blends of it with the background (anti-aliased edges are such blends)
    alpha       per pixel, how far it lies from the background towards that colour,
                (H, W) in [0, 1], ramped over 0.25..0.75 against noise and kept only
                around the largest blob (a generated image may hold speckles)
    position    the alpha-weighted centroid, in a 3x3 grid
    shape       the best fit (least L1 on alpha) among a circle, a square and an apex-up
                triangle with the same area and centroid, rendered analytically
    size        the fitted shape's bounding-box side: small below 0.25 of the image side
                (the renderer uses 0.15-0.19 for small, 0.32-0.38 for large)

Images larger than 64 px are box-filtered down to 64 first: the classes are coarse, and
it bounds the cost. The fit is exact on clean renders at 32 px (the tiny preset's
training resolution), where a small shape is only ~5 pixels across, and degrades
gracefully with noise (Gaussian sigma 15 of 255: ~99% of shapes right) and blur.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

from latentforge.data.synth import BACKGROUNDS, COLORS, SHAPES, ShapeSpec, fill_ratio, parse_caption

ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size", "position", "background")
SIZE_THRESHOLD = 0.25  # bbox side / image side between the renderer's small and large ranges
MIN_CONTRAST = 60.0  # RGB distance from the background below which no shape is seen
MIN_AREA_PX = 2.0  # fewer shape pixels (sum of alpha) than this is no shape
_MAX_SIDE = 64  # analyse at most this resolution
_SUPERSAMPLE = 4  # template rendering: 4x4 samples per pixel

_COLOR_NAMES = list(COLORS)
_COLOR_RGB = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float64)  # (6, 3)
_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float64)  # (3, 3)
_POSITION_GRID = (("top left", "top", "top right"), ("left", "center", "right"),
                  ("bottom left", "bottom", "bottom right"))


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """-> (H, W, 3) float64 in 0..255, at most _MAX_SIDE on the long side."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image: expected an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
        image = Image.fromarray(image, "RGB")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    if max(w, h) > _MAX_SIDE:
        f = _MAX_SIDE / max(w, h)
        image = image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def _nearest(rgb: np.ndarray, table: np.ndarray, names: list[str]) -> str:
    return names[int(np.argmin(np.linalg.norm(table - rgb, axis=1)))]


def _template(shape: str, cx: float, cy: float, side: float, h: int, w: int) -> np.ndarray:
    """Coverage (H, W) in [0, 1] of `shape` with area centroid (cx, cy) and bbox side
    `side`, all in pixels, by supersampling."""
    s = _SUPERSAMPLE
    ys = (np.arange(h * s) + 0.5) / s  # sample centres, (H*s,)
    xs = (np.arange(w * s) + 0.5) / s  # (W*s,)
    y, x = ys[:, None], xs[None, :]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= (side / 2) ** 2
    elif shape == "square":
        inside = (np.abs(x - cx) <= side / 2) & (np.abs(y - cy) <= side / 2)
    else:  # apex up; the centroid is 2/3 of the height below the apex
        apex = cy - side * 2 / 3
        inside = (y >= apex) & (y <= apex + side) & (np.abs(x - cx) <= (y - apex) / 2)
    return inside.reshape(h, s, w, s).mean(axis=(1, 3))


def _main_blob(alpha: np.ndarray) -> np.ndarray:
    """`alpha` kept only on and next to its largest 8-connected blob (of alpha > 0.5):
    speckles elsewhere, common in generated images, would pull the centroid and area."""
    from scipy import ndimage

    labels, n = ndimage.label(alpha > 0.5, structure=np.ones((3, 3)))
    if n <= 1:
        return alpha
    sizes = ndimage.sum(alpha, labels, index=np.arange(1, n + 1))  # (n,)
    keep = ndimage.binary_dilation(labels == 1 + int(np.argmax(sizes)), structure=np.ones((3, 3)), iterations=2)
    return alpha * keep


def _analyse(arr: np.ndarray) -> tuple[str, ShapeSpec | None]:
    """(background name, full spec or None when no shape is visible)."""
    h, w, _ = arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])  # (2W + 2H, 3)
    bg = np.median(border, axis=0)  # (3,): robust to a shape touching the border
    background = _nearest(bg, _BG_RGB, _BG_NAMES)
    dist = np.linalg.norm(arr - bg, axis=-1)  # (H, W)
    peak = float(dist.max())
    if peak < MIN_CONTRAST:
        return background, None
    # Colour: the named colour that best explains the shape's pixels as blends with the
    # background (p = bg + a * (C - bg), a in [0, 1]). Taking the mean or median colour
    # instead fails on tiny shapes, whose "interior" pixels are still partly background.
    shape_px = arr[dist >= 0.3 * peak] - bg  # (K, 3)
    axes = _COLOR_RGB - bg  # (6, 3)
    a = np.clip((shape_px @ axes.T) / (axes * axes).sum(axis=1), 0.0, 1.0)  # (K, 6)
    resid = np.linalg.norm(shape_px[:, None, :] - a[..., None] * axes[None], axis=-1)  # (K, 6)
    ci = int(np.argmin(resid.sum(axis=0)))
    axis = axes[ci]
    alpha = np.clip(((arr - bg) @ axis) / float(axis @ axis), 0.0, 1.0)  # (H, W)
    # Dead zone against faint noise and ringing from bicubic resizing; the linear ramp
    # keeps the area of symmetric anti-aliased edges.
    alpha = np.clip((alpha - 0.25) / 0.5, 0.0, 1.0)
    alpha = _main_blob(alpha)
    area = float(alpha.sum())
    if area < MIN_AREA_PX:
        return background, None
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres, (H, W) each
    cx, cy = float((alpha * xx).sum() / area), float((alpha * yy).sum() / area)
    fits = {}
    for shape in SHAPES:
        side = float(np.sqrt(area / fill_ratio(shape)))
        fits[shape] = float(np.abs(alpha - _template(shape, cx, cy, side, h, w)).sum())
    shape = min(fits, key=fits.__getitem__)
    side_frac = float(np.sqrt(area / fill_ratio(shape) / (h * w)))  # bbox side / image side
    row, col = min(int(cy / h * 3), 2), min(int(cx / w * 3), 2)
    return background, ShapeSpec(
        shape=shape,
        color=_COLOR_NAMES[ci],
        size="small" if side_frac < SIZE_THRESHOLD else "large",
        position=_POSITION_GRID[row][col],
        background=background,
    )


def detect(image: Image.Image | np.ndarray) -> ShapeSpec | None:
    """The spec a shapes image shows, or None when no shape stands out from the background.

    `image`: a PIL image (any mode) or an (H, W, 3) uint8 array.
    """
    return _analyse(_as_array(image))[1]


def _images_list(images: Any) -> list[Image.Image | np.ndarray]:
    """PIL images, (H, W, 3) uint8 arrays, or a float tensor/array (N, 3, H, W) in [-1, 1]."""
    try:
        import torch

        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency; keep this module light anyway
        pass
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] == 3 and images.dtype != np.uint8:
        x = np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)  # (N, 3, H, W)
        return list(x.transpose(0, 2, 3, 1))  # N x (H, W, 3)
    return list(images)


def score(images: Any, prompts: Sequence[str]) -> dict[str, float]:
    """How well each image matches its prompt, attribute by attribute.

    `images`: PIL images, (H, W, 3) uint8 arrays, or a float (N, 3, H, W) batch in [-1, 1]
    (what the samplers return). Returns the fraction of correct attributes over the
    scored pairs for each of ATTRIBUTES, their mean (`adherence`), the fraction with all
    five right (`exact`), the number of scored pairs (`count`) and of prompts skipped
    because they are not shapes captions (`skipped`). An image without a visible shape scores only its background.
    With nothing scored the fractions are NaN.
    """
    items = _images_list(images)
    if len(items) != len(prompts):
        raise ValueError(f"images: got {len(items)} images for {len(prompts)} prompts")
    hits = {a: 0 for a in ATTRIBUTES}
    exact = scored = skipped = 0
    for image, prompt in zip(items, prompts):
        want = parse_caption(prompt)
        if want is None:
            skipped += 1
            continue
        scored += 1
        background, got = _analyse(_as_array(image))
        hits["background"] += background == want.background
        if got is not None:
            for a in ATTRIBUTES[:-1]:
                hits[a] += getattr(got, a) == getattr(want, a)
            exact += got == want
    out = {a: hits[a] / scored if scored else float("nan") for a in ATTRIBUTES}
    out["adherence"] = float(np.mean([out[a] for a in ATTRIBUTES])) if scored else float("nan")
    out["exact"] = exact / scored if scored else float("nan")
    out["count"] = float(scored)
    out["skipped"] = float(skipped)
    return out
