"""`latentforge sample`: images from an export, with classifier-free guidance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from latentforge import dist
from latentforge.data.codecs import build_codec
from latentforge.data.text import build_text_encoder
from latentforge.eval.images import make_grid, noise_for, to_uint8
from latentforge.eval.sampling import sample
from latentforge.fileio import atomic_open
from latentforge.training.diffusion import Schedule
from latentforge.training.export import load_export
from latentforge.training.unet import unet_forward


def sample_from_export(model_dir: str | Path, prompts: list[str], out: str | Path, n: int = 4,
                       steps: int | None = None, cfg_scale: float | None = None, sampler: str | None = None,
                       seed: int = 0, use_ema: bool = True) -> Path:
    device = dist.device()
    unet, cfg, meta = load_export(model_dir, use_ema, device)
    text = build_text_encoder(cfg.text, device)
    codec = build_codec(cfg.codec, device)
    with np.load(Path(model_dir) / "null_text.npz") as z:
        null_tokens, null_pooled = torch.from_numpy(z["tokens"]), torch.from_numpy(z["pooled"])
    emb = text.encode(prompts)
    idx = torch.arange(len(prompts)).repeat_interleave(n)
    C, h, w = meta["shapes"]["latent"]
    x_T = torch.stack([noise_for(seed, i, j, (C, h, w)) for i in range(len(prompts)) for j in range(n)]).to(device)
    cond = {"text": emb.tokens.float()[idx].to(device), "pooled": emb.pooled.float()[idx].to(device)}
    uncond = {"text": null_tokens.expand(len(idx), -1, -1).to(device),
              "pooled": null_pooled.expand(len(idx), -1).to(device)}
    with torch.no_grad():
        z = sample(lambda x, t, c: unet_forward(unet, x, t, c), (len(idx), C, h, w), cond, uncond,
                   schedule=Schedule.from_config(cfg.diffusion), diffusion_cfg=cfg.diffusion,
                   sampler=sampler or cfg.eval.sampler, steps=steps or cfg.eval.steps,
                   cfg_scale=cfg.eval.cfg_scale if cfg_scale is None else cfg_scale,
                   generator=torch.Generator().manual_seed(seed), x_T=x_T)
        images = to_uint8(codec.decode(z.float() / codec.scale + codec.shift))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out) as f:
        make_grid(images, prompts, n).save(f, format="PNG")
    return out
