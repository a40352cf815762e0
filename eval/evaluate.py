"""Evaluation during training: held-out denoising loss, a sample grid from fixed prompts
with classifier-free guidance, and prompt adherence on the synthetic shapes data.

All ranks take part; each handles its share of prompts and held-out latents and only
statistics (or the few grid images) are combined. Sampling uses a plain copy of the
U-Net loaded with the EMA (or gathered raw) weights, so it needs no collectives inside
the forward pass, whatever the ZeRO stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.data import latents as lat
from latentforge.data.loader import finalize, Finalize
from latentforge.training import dist
from latentforge.training.config import Config
from latentforge.training.unet import build_unet, unet_forward


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


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, prompts: list[str], per_prompt: int, cell: int = 96) -> "Image.Image":
    """One row per prompt, its text on the left, `per_prompt` images upscaled to `cell` px."""
    from PIL import Image, ImageDraw

    label_w = 330
    rows = len(prompts)
    grid = Image.new("RGB", (label_w + per_prompt * (cell + 4), rows * (cell + 4)), (255, 255, 255))
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
            im = Image.fromarray(images[i * per_prompt + j]).resize((cell, cell), Image.NEAREST)
            grid.paste(im, (label_w + j * (cell + 4), y))
    return grid


class Evaluator:
    def __init__(self, cfg: Config, encoders: Any, shapes: dict[str, list[int]], heldout_parts: list[dict],
                 null_text: tuple[torch.Tensor, torch.Tensor], run_dir: Path, schedule: Any):
        self.cfg = cfg
        self.encoders = encoders
        self.shapes = shapes
        self.run_dir = Path(run_dir)
        self.schedule = schedule
        self.null_tokens, self.null_pooled = null_text
        self.prompts = default_prompts(cfg)
        emb = encoders.text.encode(self.prompts)
        self.prompt_tokens, self.prompt_pooled = emb.tokens.float().cpu(), emb.pooled.float().cpu()
        self.heldout = self._load_heldout(heldout_parts)
        self._model: torch.nn.Module | None = None

    def _load_heldout(self, parts: list[dict]) -> dict[str, torch.Tensor] | None:
        """This rank's share of the first `eval.heldout_samples` held-out latents."""
        if not parts or self.cfg.eval.heldout_samples <= 0:
            return None
        fin = Finalize(self.encoders.codec.scale, self.encoders.codec.shift, seed=self.cfg.eval.seed)
        xs, texts, pooled = [], [], []
        n = 0
        for pi, part in enumerate(parts):
            for idx, rec in enumerate(lat.read_part(self.cfg.resolved_latent_dir / part["file"])):
                if n >= self.cfg.eval.heldout_samples:
                    break
                if n % dist.world_size() == dist.rank():
                    xs.append(finalize(rec.mean, rec.std, fin, 0, pi, idx))
                    texts.append(torch.from_numpy(rec.text.astype(np.float32)))
                    pooled.append(torch.from_numpy(rec.pooled.astype(np.float32)))
                n += 1
        if not xs:
            return {"x0": torch.zeros(0, *self.shapes["latent"]), "text": torch.zeros(0, *self.shapes["text"]),
                    "pooled": torch.zeros(0, *self.shapes["pooled"])}
        return {"x0": torch.stack(xs), "text": torch.stack(texts), "pooled": torch.stack(pooled)}

    def _eval_model(self, engine: Any, ema: Any) -> torch.nn.Module:
        """A plain U-Net on this rank's device with the weights to evaluate."""
        if self._model is None:
            C, h, _ = self.shapes["latent"]
            self._model = build_unet(self.cfg.model, C, h, self.shapes["text"][-1], self.shapes["pooled"][-1])
            self._model.to(dist.device()).eval().requires_grad_(False)
        if ema is not None and self.cfg.eval.use_ema:
            ema.copy_to(self._model)
        else:
            with engine.full_parameters() as m, torch.no_grad():
                for (name, p), (name2, q) in zip(self._model.named_parameters(), m.named_parameters()):
                    p.copy_(q.detach().float())
        return self._model

    @torch.no_grad()
    def run(self, engine: Any, ema: Any, step: int, tracker: Any) -> dict[str, float]:
        from latentforge.eval.sampling import sample
        from latentforge.training.diffusion import heldout_loss

        t0 = time.monotonic()
        device = dist.device()
        model = self._eval_model(engine, ema)

        def model_fn(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
            return unet_forward(model, x, t, cond)

        metrics: dict[str, float] = {}

        # Held-out denoising loss at fixed timestep buckets: per-rank sums, one all-reduce.
        if self.heldout is not None:
            n = self.heldout["x0"].shape[0]
            g = torch.Generator().manual_seed(self.cfg.eval.seed + dist.rank())
            local: dict[str, float] = {}
            if n:
                cond = {"text": self.heldout["text"].to(device), "pooled": self.heldout["pooled"].to(device)}
                local = heldout_loss(model_fn, self.heldout["x0"].to(device), cond, self.cfg.diffusion,
                                     self.schedule, self.cfg.eval.heldout_buckets, g)
            keys = sorted(local) if local else None
            keys = dist.broadcast_object(keys, src=0) if dist.world_size() > 1 else keys
            if keys:
                vals = torch.tensor([local.get(k, 0.0) * n for k in keys] + [n], dtype=torch.float64, device=device)
                vals = dist.all_reduce_sum(vals)
                total = vals[-1].item()
                for k, v in zip(keys, vals[:-1].tolist()):
                    metrics[f"eval/{k}"] = v / max(total, 1)

        # Sample grid: cells (prompt i, image j) dealt round-robin over ranks.
        per = self.cfg.eval.images_per_prompt
        cells = [(i, j) for i in range(len(self.prompts)) for j in range(per)]
        mine = cells[dist.rank()::dist.world_size()]
        C, h, w = self.shapes["latent"]
        images: list[tuple[tuple[int, int], np.ndarray]] = []
        if mine:
            idx = torch.tensor([i for i, _ in mine])
            x_T = torch.stack([noise_for(self.cfg.eval.seed, i, j, (C, h, w)) for i, j in mine]).to(device)
            cond = {"text": self.prompt_tokens[idx].to(device), "pooled": self.prompt_pooled[idx].to(device)}
            uncond = {"text": self.null_tokens.expand(len(mine), -1, -1).to(device),
                      "pooled": self.null_pooled.expand(len(mine), -1).to(device)}
            z = sample(model_fn, (len(mine), C, h, w), cond, uncond, schedule=self.schedule,
                       diffusion_cfg=self.cfg.diffusion, sampler=self.cfg.eval.sampler, steps=self.cfg.eval.steps,
                       cfg_scale=self.cfg.eval.cfg_scale, generator=torch.Generator().manual_seed(self.cfg.eval.seed),
                       x_T=x_T)
            codec = self.encoders.codec
            pix = to_uint8(codec.decode(z.float() / codec.scale + codec.shift))
            images = list(zip(mine, pix))
        gathered = dist.all_gather_object(images)
        if dist.is_main():
            cells_img = dict(item for part in gathered for item in part)
            grid_images = np.stack([cells_img[c] for c in cells])
            grid = make_grid(grid_images, self.prompts, per)
            out = self.run_dir / "samples" / f"step_{step:08d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            grid.save(out)
            tracker.log_image(grid, f"samples/step_{step:08d}.png")
            metrics.update(self._adherence(grid_images, [self.prompts[i] for i, _ in cells]))
        metrics["eval/time_s"] = time.monotonic() - t0
        dist.print0(f"[eval] step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        return metrics

    def _adherence(self, images: np.ndarray, prompts: list[str]) -> dict[str, float]:
        """Prompt adherence on synthetic-shapes prompts (skipped if none parse)."""
        from latentforge.eval import adherence

        s = adherence.score(list(images), prompts)
        if not s.get("count", 0):
            return {}
        return {f"eval/shape_{k}" if k != "adherence" else "eval/shape_adherence": v
                for k, v in s.items() if k in ("adherence", "shape", "color", "size", "position", "background")}
