"""`latentforge sample`: images from an export, with classifier-free guidance; with an init
image, image-to-image (--strength) and inpainting (--mask).

    latentforge sample --model EXPORT --prompt P [--init-image IMG [--mask MASK] [--strength S]]

The init image is resized to the model's resolution and encoded with the run's codec
(a VAE's posterior mean). The mask is an image of the same picture: white (>= 128) marks
what to generate, black what to keep. A latent cell is generated when any of its pixels
is (the mask is max-pooled to the latent grid), so the kept region stays exactly the
init image's latents (eval/sampling.py `sample_blended`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge import dist
from latentforge.data.codecs import build_codec
from latentforge.data.text import build_text_encoder
from latentforge.eval.images import make_grid, noise_for, to_uint8
from latentforge.eval.sampling import sample, sample_geometry
from latentforge.fileio import atomic_open
from latentforge.training.diffusion import Schedule
from latentforge.training.export import load_export
from latentforge.training.unet import unet_forward

IMG2IMG_STRENGTH = 0.8  # --init-image without --mask and without --strength (diffusers' img2img default)


def _load_image(path: str | Path, size: tuple[int, int], key: str, mode: str = "RGB") -> Any:
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}: image not found: {p}")
    with Image.open(p) as im:
        im = im.convert(mode)
        wh = (size[1], size[0])  # PIL sizes are (width, height)
        return im if im.size == wh else im.resize(wh, Image.Resampling.BICUBIC)


def init_latents(codec: Any, init_image: str | Path, mask: str | Path | None, size: int | tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x0 (1, C, h, w) in the model's latent space, keep (1, 1, h, w) in {0, 1} or None) for
    images of `size` pixels (height, width; an int is a square)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    img = torch.from_numpy(np.asarray(_load_image(init_image, size, "--init-image"), dtype=np.float32))
    img = (img / 127.5 - 1.0).permute(2, 0, 1)[None]  # (1, 3, H, W) in [-1, 1]
    mean, _ = codec.encode(img.to(codec.device))
    x0 = (mean.float() - codec.shift) * codec.scale
    if mask is None:
        return x0, None
    m = torch.from_numpy(np.asarray(_load_image(mask, size, "--mask", "L"), dtype=np.float32) >= 128)
    generate = torch.nn.functional.max_pool2d(m.float()[None, None], codec.downsample)  # (1, 1, h, w)
    return x0, 1.0 - generate


def sample_images(model_dir: str | Path, prompts: list[str], n: int = 4, steps: int | None = None,
                  cfg_scale: float | None = None, sampler: str | None = None, seed: int = 0, use_ema: bool = True,
                  init_image: str | Path | None = None, mask: str | Path | None = None,
                  strength: float | None = None, size: tuple[int, int] | None = None,
                  crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """(len(prompts) * n, 3, H, W) float32 images in [-1, 1], n per prompt, prompt-major.
    The noise of image j of prompt i is `noise_for(seed, i, j)`. `size` is (H, W) pixels
    (default: the run's nominal size; a bucketed run lists its buckets in the export's
    metadata); `crop` is the micro-conditioning crop (SD-XL's (0, 0) by default)."""
    if mask is not None and init_image is None:
        raise ValueError("--mask: needs --init-image (the picture whose unmasked part is kept)")
    device = dist.device()
    unet, cfg, meta = load_export(model_dir, use_ema, device)
    text = build_text_encoder(cfg.text, device)
    codec = build_codec(cfg.codec, device)
    with np.load(Path(model_dir) / "null_text.npz") as z:
        null_tokens, null_pooled = torch.from_numpy(z["tokens"]), torch.from_numpy(z["pooled"])
    emb = text.encode(prompts)
    idx = torch.arange(len(prompts)).repeat_interleave(n)
    C, h, w = meta["shapes"]["latent"]
    (C, h, w), ids = sample_geometry(C, codec.downsample, size or (h * codec.downsample, w * codec.downsample), crop,
                                     key="--size")
    x_T = torch.stack([noise_for(seed, i, j, (C, h, w)) for i in range(len(prompts)) for j in range(n)]).to(device)
    time_ids = torch.tensor([ids] * len(idx), device=device)  # (N, 6), the same for the unconditional half
    cond = {"text": emb.tokens.float()[idx].to(device), "pooled": emb.pooled.float()[idx].to(device),
            "time_ids": time_ids}
    uncond = {"text": null_tokens.expand(len(idx), -1, -1).to(device),
              "pooled": null_pooled.expand(len(idx), -1).to(device), "time_ids": time_ids}
    x0_known = keep = None
    if init_image is not None:
        x0_known, keep = init_latents(codec, init_image, mask, (h * codec.downsample, w * codec.downsample))
        strength = strength if strength is not None else (1.0 if mask is not None else IMG2IMG_STRENGTH)
    with torch.no_grad():
        z = sample(lambda x, t, c: unet_forward(unet, x, t, c), (len(idx), C, h, w), cond, uncond,
                   schedule=Schedule.from_config(cfg.diffusion), diffusion_cfg=cfg.diffusion,
                   sampler=sampler or cfg.eval.sampler, steps=steps or cfg.eval.steps,
                   cfg_scale=cfg.eval.cfg_scale if cfg_scale is None else cfg_scale,
                   generator=torch.Generator().manual_seed(seed), x_T=x_T, x0_known=x0_known,
                   keep=None if keep is None else keep.to(device), strength=strength or 1.0)
        return codec.decode(z.float() / codec.scale + codec.shift).cpu()


def sample_from_export(model_dir: str | Path, prompts: list[str], out: str | Path, n: int = 4,
                       steps: int | None = None, cfg_scale: float | None = None, sampler: str | None = None,
                       seed: int = 0, use_ema: bool = True, init_image: str | Path | None = None,
                       mask: str | Path | None = None, strength: float | None = None,
                       size: tuple[int, int] | None = None, crop: tuple[int, int] = (0, 0)) -> Path:
    """`sample_images`, written as a grid (one row per prompt) to `out`."""
    images = sample_images(model_dir, prompts, n, steps, cfg_scale, sampler, seed, use_ema, init_image, mask,
                           strength, size, crop)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out) as f:
        make_grid(to_uint8(images), prompts, n).save(f, format="PNG")
    return out
