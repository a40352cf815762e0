"""Image helpers shared by eval, sampling and export: fixed noise, uint8 conversion, grids.

The fixed noise functions make sample grids and FID sets comparable across evals, runs
and rank layouts: a cell's (or an FID image's) initial noise depends only on the seed and
its index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from latentforge.config import Config

if TYPE_CHECKING:
    from PIL import Image


def default_prompts(cfg: Config) -> list[str]:
    if cfg.eval.prompts:
        return list(cfg.eval.prompts)
    from latentforge.data.synth import fixed_prompts

    return fixed_prompts(cfg.eval.num_prompts, seed=cfg.eval.seed)


def noise_for(seed: int, prompt_index: int, image_index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed initial noise of grid cell (prompt, image): the same at every eval and on
    any number of ranks, so grids are comparable across steps."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + prompt_index * 1009 + image_index)
    return torch.randn(shape, generator=g)


def fid_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed initial noise of image `index` of the FID set: a pure function of
    (seed, index), so the set is the same on any number of ranks and at every eval."""
    state = np.random.SeedSequence([seed, index, 0xF1D]).generate_state(2, np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(shape, generator=g)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return to_uint8_nchw(images).permute(0, 2, 3, 1).numpy()


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 3, H, W) torch.uint8 on the CPU: what FID and CLIP take."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def make_grid(images: np.ndarray, prompts: list[str], per_prompt: int, cell: int = 96) -> "Image.Image":
    """One row per prompt, its text on the left, `per_prompt` images upscaled to `cell` px
    high (and as wide as their aspect ratio makes them)."""
    from PIL import Image, ImageDraw

    label_w = 330
    rows = len(prompts)
    cell_w = max(1, round(cell * images.shape[2] / images.shape[1]))  # images (N, H, W, 3)
    grid = Image.new("RGB", (label_w + per_prompt * (cell_w + 4), rows * (cell + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, prompt in enumerate(prompts):
        y = i * (cell + 4)
        words, lines, line = prompt.split(), [], ""
        for w in words:  # wrap the prompt to the label column
            if len(line) + len(w) + 1 > 48:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines):
            draw.text((4, y + 4 + 12 * k), text, fill=(0, 0, 0))
        for j in range(per_prompt):
            im = Image.fromarray(images[i * per_prompt + j]).resize((cell_w, cell), Image.NEAREST)
            grid.paste(im, (label_w + j * (cell_w + 4), y))
    return grid
