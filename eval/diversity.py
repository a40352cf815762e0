"""Sample diversity of a grid: do two samples of one prompt differ, relative to samples of
different prompts?

A model that collapses to the per-prompt mean (an x0 objective with too little capacity
or data does) draws the same image from any noise: same-prompt distances near 0, while
its adherence can still look fine. The distance is the RMS difference of two images in
[0, 1] (per pixel and channel); the grid's fixed noise makes the figure deterministic.

    eval/diversity_same    mean distance between two samples of the same prompt
    eval/diversity_diff    mean distance between samples of different prompts
    eval/diversity_ratio   same / diff: 0 = collapsed; about 1 = the prompt barely matters
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def diversity(images: np.ndarray, prompt_ids: Sequence[int]) -> dict[str, float]:
    """images: (N, H, W, 3) uint8; prompt_ids: (N,) which prompt each image shows.
    Returns {"same", "diff", "ratio"} (NaN where there is no such pair)."""
    if len(images) != len(prompt_ids):
        raise ValueError(f"images: got {len(images)} images for {len(prompt_ids)} prompt ids")
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0  # (N, H*W*3)
    # Row by row, not through the Gram matrix: identical images must give exactly 0.
    dist = np.stack([np.sqrt(((x - row) ** 2).mean(1)) for row in x])  # (N, N)
    ids = np.asarray(prompt_ids)
    upper = np.triu(np.ones_like(dist, dtype=bool), k=1)  # each unordered pair once
    same = upper & (ids[:, None] == ids[None, :])
    diff = upper & (ids[:, None] != ids[None, :])
    s = float(dist[same].mean()) if same.any() else float("nan")
    d = float(dist[diff].mean()) if diff.any() else float("nan")
    return {"same": s, "diff": d, "ratio": s / d if d > 0 else float("nan")}
