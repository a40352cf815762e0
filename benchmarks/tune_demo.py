"""Tune the demo's preset by measurement: train candidates for a short budget, score them.

    .venv/bin/python benchmarks/tune_demo.py --list
    .venv/bin/python benchmarks/tune_demo.py --candidates x0-p4,flow-p2 [--steps 2000] [--eval-at 1000,2000]
                                             [--threads 2] [--prompts 48] [--root /tmp/tune-demo] [--json]
    .venv/bin/python benchmarks/tune_demo.py --set "diffusion.objective=flow diffusion.prediction=v" --name mine
    .venv/bin/python benchmarks/tune_demo.py --preset demo --steps 1500 --cfg-sweep 5,7     # the demo preset

A candidate is a list of `section.field=value` overrides on the `tiny` preset (CANDIDATES
below; `--set` adds an ad-hoc one; `--preset` another base). For each, in this one process:

  data     `make demo`'s data: the synthetic shapes (synth seed 0, 2,048 images at 64 px)
           through the real precompute at 32 px with the candidate's codec patch, cached
           under --root per patch; the last latent shard is held out, as in training.
  train    the trainer's objective on the training shards held in memory: a seeded
           permutation per epoch, `train.global_batch_size` samples per step in one
           process (the demo splits them over 2 ranks: the same arithmetic), caption
           dropout (cfg_drop), training/diffusion.py's loss_fn, gradient clipping,
           torch's fused AdamW with the preset's lr schedule (engine.lr_at) and the EMA
           (training/ema.py). No DeepSpeed, no loader workers, no checkpoints: a
           candidate's quality is what it learns per sample; its cost is samples/s.
  score    at each --eval-at step, the EMA weights sample two grids with the candidate's
           sampler, steps and CFG scale (eval/sampling.py, fixed noise per cell as the
           evaluator draws it):
             demo grid  the demo's 8 prompts x 2 images (eval/shape_* of `make demo`)
             wide grid  --prompts prompts x 2 images (another seed): the same figures
                        with a smaller sampling error (shape accuracy on 16 images moves
                        in steps of 1/16)
           adherence (eval/adherence.py), shape accuracy, diversity (eval/diversity.py:
           same-prompt RMS distance, its ratio to different-prompt pairs), and a seam
           score: the mean absolute jump across the codec's patch borders minus the mean
           jump inside patches, in 0..255 units (about 0 for a seamless image).
  reference  the same figures for real renders of the wide grid's prompts (two jitter
           draws each): what a perfect model scores (diversity_same of the data itself).

Samples/s is the training rate of this process (torch threads = --threads) with the load
average beside it: the machine is shared, so compare rates measured close together.
Each candidate's grids are written to --root/NAME/step_XXXXX_{demo,wide}.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# name -> overrides on the tiny preset. The preset before this tuning: pixel codec, 4x4
# patches, U-Net (32, 64) with cross-attention at both levels, x0 prediction on the linear
# schedule with zero terminal SNR, lr 3e-3 cosine, batch 64, 2,000 steps, DDIM 25 steps, CFG 3.
_P2 = ["codec.patch=2"]
_FLOW = ["diffusion.objective=flow", "diffusion.prediction=v", "diffusion.zero_terminal_snr=false"]
_EPS = ["diffusion.prediction=eps", "diffusion.zero_terminal_snr=false", "diffusion.schedule=scaled_linear",
        "diffusion.beta_start=0.00085", "diffusion.beta_end=0.012"]
_V_ZT = ["diffusion.prediction=v", "diffusion.zero_terminal_snr=true"]
_LEAN = ["model.down_block_types=[DownBlock2D, CrossAttnDownBlock2D]",
         "model.up_block_types=[CrossAttnUpBlock2D, UpBlock2D]"]
CANDIDATES: dict[str, list[str]] = {
    "x0-p4": [],  # the preset before this tuning
    "flow-p4": _FLOW,
    "x0-p2": _P2,
    "flow-p2": _P2 + _FLOW,
    "eps-p2": _P2 + _EPS,
    "v-zt-p2": _P2 + _V_ZT,
    "v-zt-minsnr5-p2": _P2 + _V_ZT + ["diffusion.min_snr_gamma=5"],
    "flow-p2-lean": _P2 + _FLOW + _LEAN,
    "eps-p2-lean": _P2 + _EPS + _LEAN,
    "flow-p2-lean-pooled": _P2 + _FLOW + _LEAN + ["model.pooled_text_conditioning=true"],
    "flow-p4-pooled": _FLOW + ["model.pooled_text_conditioning=true"],
    "x0-p4-pooled": ["model.pooled_text_conditioning=true"],
}


def seam_score(images: np.ndarray, patch: int) -> float:
    """Mean |difference| of horizontally and vertically adjacent pixels that straddle a
    patch border, minus the same inside patches; (N, H, W, 3) uint8 -> 0..255 units.
    A codec with patch p cuts the image every p pixels; a model that cannot join its
    patches leaves jumps there. Clean renders score about 0 (slightly negative or
    positive by where edges fall)."""
    if patch <= 1:
        return 0.0
    x = images.astype(np.float64)
    dx = np.abs(np.diff(x, axis=2)).mean(axis=(0, 1, 3))  # (W-1,) jump between column j and j+1
    dy = np.abs(np.diff(x, axis=1)).mean(axis=(0, 2, 3))  # (H-1,)
    out = []
    for d in (dx, dy):
        border = (np.arange(d.shape[0]) + 1) % patch == 0
        out.append(d[border].mean() - d[~border].mean())
    return float(np.mean(out))


class Data:
    """`make demo`'s latents for one config, in memory: training and held-out parts split
    as the trainer splits them."""

    def __init__(self, cfg: Any):
        from latentforge.data import latents as lat
        from latentforge.data import precompute
        from latentforge.data.loader import split_parts
        from latentforge.data.synth import ensure_synth

        ensure_synth(cfg)
        if not (cfg.resolved_latent_dir / lat.MANIFEST).exists():
            precompute.run(cfg)
        manifest = lat.load_manifest(cfg.resolved_latent_dir)
        train_parts, _ = split_parts(manifest, cfg.data.heldout_shards)
        xs, texts, pooled = [], [], []
        for part in train_parts:
            for rec in lat.read_part(cfg.resolved_latent_dir / part["file"]):
                xs.append(rec.mean.astype(np.float32))
                texts.append(rec.text.astype(np.float32))
                pooled.append(rec.pooled.astype(np.float32))
        self.x0 = torch.from_numpy(np.stack(xs))  # (N, C, h, w): the pixel codec is exact (no std)
        self.text = torch.from_numpy(np.stack(texts))  # (N, L, D)
        self.pooled = torch.from_numpy(np.stack(pooled))  # (N, P)
        null_tokens, null_pooled = lat.load_null_text(cfg.resolved_latent_dir)
        self.null = (torch.from_numpy(null_tokens), torch.from_numpy(null_pooled))  # (L, D), (P,)
        self.shapes = manifest["shapes"]


def grids(cfg: Any, wide: int) -> dict[str, list[str]]:
    from latentforge.data.synth import fixed_prompts
    from latentforge.eval.images import default_prompts

    return {"demo": default_prompts(cfg), "wide": fixed_prompts(wide, seed=cfg.eval.seed + 1)}


def score_images(images: np.ndarray, prompts: list[str], per: int, patch: int) -> dict[str, float]:
    """images (N * per, H, W, 3) uint8, cell (i, j) at i * per + j."""
    from latentforge.eval import adherence
    from latentforge.eval.diversity import diversity

    cell_prompts = [p for p in prompts for _ in range(per)]
    s = adherence.score(list(images), cell_prompts)
    d = diversity(images, [i for i in range(len(prompts)) for _ in range(per)])
    return {"adherence": s["adherence"], "shape": s["shape"], "color": s["color"], "size": s["size"],
            "position": s["position"], "background": s["background"], "diversity_same": d["same"],
            "diversity_ratio": d["ratio"], "seams": seam_score(images, patch)}


def reference(cfg: Any, prompts: list[str], per: int = 2) -> dict[str, float]:
    """The figures of real renders at the training resolution (two jitter draws per prompt)."""
    from latentforge.data.raw import resize_center_crop
    from latentforge.data.synth import parse_caption, render

    rng = np.random.default_rng(0)
    ims = []
    for p in prompts:
        spec = parse_caption(p)
        for _ in range(per):
            im, _, _ = resize_center_crop(render(spec, cfg.synth.image_size, rng), cfg.data.resolution)
            ims.append(np.asarray(im))
    return score_images(np.stack(ims), prompts, per, cfg.codec.patch)


@torch.no_grad()
def sample_grid(cfg: Any, model: torch.nn.Module, encoders: Any, null: tuple[torch.Tensor, torch.Tensor],
                schedule: Any, prompts: list[str], per: int) -> np.ndarray:
    """(len(prompts) * per, H, W, 3) uint8, as the evaluator's grid: noise_for(seed, i, j)."""
    from latentforge.eval.images import noise_for, to_uint8
    from latentforge.eval.sampling import sample
    from latentforge.training.unet import unet_forward

    emb = encoders.text.encode(prompts)
    C, h, w = model.config.in_channels, model.config.sample_size, model.config.sample_size
    cells = [(i, j) for i in range(len(prompts)) for j in range(per)]
    idx = torch.tensor([i for i, _ in cells])
    x_T = torch.stack([noise_for(cfg.eval.seed, i, j, (C, h, w)) for i, j in cells])
    n = len(cells)
    cond = {"text": emb.tokens.float()[idx], "pooled": emb.pooled.float()[idx]}
    uncond = {"text": null[0].expand(n, -1, -1), "pooled": null[1].expand(n, -1)}
    out = []
    for k in range(0, n, 64):  # batches of 64 cells
        sl = slice(k, k + 64)
        z = sample(lambda x, t, c: unet_forward(model, x, t, c), tuple(x_T[sl].shape),
                   {kk: v[sl] for kk, v in cond.items()}, {kk: v[sl] for kk, v in uncond.items()},
                   schedule=schedule, diffusion_cfg=cfg.diffusion, sampler=cfg.eval.sampler, steps=cfg.eval.steps,
                   cfg_scale=cfg.eval.cfg_scale, generator=torch.Generator().manual_seed(cfg.eval.seed), x_T=x_T[sl])
        codec = encoders.codec
        out.append(to_uint8(codec.decode(z / codec.scale + codec.shift)))
    return np.concatenate(out)


def run_candidate(name: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from latentforge.config import resolve
    from latentforge.data.encoders import build_encoders
    from latentforge.eval.images import make_grid
    from latentforge.training import engine as eng
    from latentforge.training.diffusion import Schedule, cfg_drop, loss_fn
    from latentforge.training.ema import EMA
    from latentforge.training.unet import build_unet, count_params, unet_forward

    root = Path(args.root)
    pre = resolve(args.preset, None, [*overrides, f"train.max_steps={args.steps}"])
    # Data depends on the codec only: one latent directory per patch.
    cfg_overrides = [f"run_root={root}", f"data.latent_dir={root / f'latents-p{pre.codec.patch}'}",
                     *overrides, f"train.max_steps={args.steps}"]
    cfg = resolve(args.preset, None, cfg_overrides)
    data = Data(cfg)
    encoders = build_encoders(cfg, "cpu")
    schedule = Schedule.from_config(cfg.diffusion)
    C, h, _ = data.shapes["latent"]
    torch.manual_seed(cfg.train.seed)
    unet = build_unet(cfg.model, C, h, data.shapes["text"][-1], data.shapes["pooled"][-1])
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    o = cfg.optim
    opt = torch.optim.AdamW(unet.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                            fused=True)
    ema = EMA(dict(unet.named_parameters()), cfg.ema)
    eval_model = build_unet(cfg.model, C, h, data.shapes["text"][-1], data.shapes["pooled"][-1]).eval()
    prompts = grids(cfg, args.prompts)
    per = cfg.eval.images_per_prompt
    out_dir = root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    evals = sorted({s for s in args.eval_at if s <= cfg.train.max_steps} | {cfg.train.max_steps})
    result: dict[str, Any] = {"name": name, "overrides": overrides, "params_M": count_params(unet) / 1e6,
                              "latent": list(data.shapes["latent"]), "steps": cfg.train.max_steps,
                              "batch": cfg.train.global_batch_size, "evals": {}}
    print(f"[{name}] {result['params_M']:.2f}M params, latents {result['latent']}, {len(data.x0)} training samples, "
          f"{cfg.train.max_steps} steps x {cfg.train.global_batch_size}: {' '.join(overrides) or '(preset)'}",
          flush=True)

    def model_fn(x: torch.Tensor, t: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return unet_forward(unet, x, t, c)

    B, N = cfg.train.global_batch_size, len(data.x0)
    order: list[int] = []
    epoch, train_s, t_last = 0, 0.0, time.monotonic()
    for step in range(cfg.train.max_steps):
        t0 = time.perf_counter()
        if len(order) < B:  # a seeded permutation per epoch, as the loader's (not its exact order)
            order += torch.randperm(N, generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch)).tolist()
            epoch += 1
        idx, order = torch.tensor(order[:B]), order[B:]
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
        text, pooled, _ = cfg_drop(data.text[idx], data.null[0], cfg.diffusion.cfg_dropout, g,
                                   pooled=data.pooled[idx], null_pooled=data.null[1])
        x0 = (data.x0[idx] - encoders.codec.shift) * encoders.codec.scale  # the loader's finalize
        loss = loss_fn(model_fn, x0, {"text": text, "pooled": pooled},
                       cfg.diffusion, schedule, g)["loss"]
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), o.grad_clip)
        for group in opt.param_groups:
            group["lr"] = eng.lr_at(cfg, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(dict(unet.named_parameters()), step)
        train_s += time.perf_counter() - t0
        done = step + 1
        if time.monotonic() - t_last > 30 or done == cfg.train.max_steps:
            t_last = time.monotonic()
            rate = done * B / train_s
            print(f"[{name}] step {done}/{cfg.train.max_steps} loss {float(loss.detach()):.4f} {rate:.0f} samples/s, "
                  f"ETA {(cfg.train.max_steps - done) * B / rate / 60:.1f} min, load {os.getloadavg()[0]:.1f}",
                  flush=True)
        if done in evals:
            ema.copy_to(eval_model)
            t_eval = time.perf_counter()
            ev: dict[str, Any] = {"samples_per_s": done * B / train_s, "load": os.getloadavg()[0]}
            for kind, ps in prompts.items():
                ims = sample_grid(cfg, eval_model, encoders, data.null, schedule, ps, per)
                ev[kind] = score_images(ims, ps, per, cfg.codec.patch)
                make_grid(ims, ps, per).save(out_dir / f"step_{done:05d}_{kind}.png")
            if done == cfg.train.max_steps:
                for scale in args.cfg_sweep:  # the wide grid at other guidance scales, same weights
                    c = resolve(args.preset, None, [*cfg_overrides, f"eval.cfg_scale={scale}"])
                    ims = sample_grid(c, eval_model, encoders, data.null, schedule, prompts["wide"], per)
                    ev[f"wide_cfg{scale:g}"] = score_images(ims, prompts["wide"], per, cfg.codec.patch)
                    make_grid(ims, prompts["wide"], per).save(out_dir / f"step_{done:05d}_wide_cfg{scale:g}.png")
                torch.save(eval_model.state_dict(), out_dir / "ema_final.pt")
            ev["eval_s"] = time.perf_counter() - t_eval
            result["evals"][done] = ev
            print(f"[{name}] step {done}: " + "; ".join(
                f"{k} adherence {v['adherence']:.3f} shape {v['shape']:.3f} div {v['diversity_same']:.4f} "
                f"(ratio {v['diversity_ratio']:.3f}) seams {v['seams']:.1f}"
                for k, v in ev.items() if isinstance(v, dict)) + f"; eval {ev['eval_s']:.0f} s", flush=True)
    result["train_s"] = train_s
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", default="", help="comma-separated names from CANDIDATES (--list)")
    ap.add_argument("--set", default="", help="an ad-hoc candidate: space-separated overrides on the tiny preset")
    ap.add_argument("--name", default="custom", help="the ad-hoc candidate's name")
    ap.add_argument("--preset", default="tiny", help="the preset candidates override (`--preset demo` alone: "
                    "the demo preset as it is)")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (0 = the candidate's train.max_steps)")
    ap.add_argument("--eval-at", default="", help="comma-separated steps to score at (the last step always)")
    ap.add_argument("--cfg-sweep", default="", help="comma-separated CFG scales: the wide grid again at the last step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--prompts", type=int, default=48, help="prompts of the wide grid")
    ap.add_argument("--channels-last", action="store_true", help="run the U-Net in channels-last layout")
    ap.add_argument("--root", default="/tmp/tune-demo", help="data cache and outputs")
    ap.add_argument("--reference", action="store_true", help="also score real renders of the wide grid's prompts")
    ap.add_argument("--list", action="store_true", help="print the candidates and exit")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.list:
        for k, v in CANDIDATES.items():
            print(f"{k:24s} {' '.join(v) or '(the preset before tuning)'}")
        return 0
    torch.set_num_threads(args.threads)
    args.eval_at = [int(s) for s in args.eval_at.split(",") if s.strip()]
    args.cfg_sweep = [float(s) for s in args.cfg_sweep.split(",") if s.strip()]
    todo = [(c, CANDIDATES[c]) for c in args.candidates.split(",") if c]
    if args.set:
        todo.append((args.name, shlex.split(args.set)))
    if not todo:
        todo.append((args.preset, []))
    from latentforge.config import resolve

    if not args.steps:
        args.steps = resolve(args.preset, None, todo[0][1] if todo else []).train.max_steps
    results = [run_candidate(name, ov, args) for name, ov in todo]
    if args.reference:
        cfg = resolve(args.preset, None, [])
        results.append({"name": "real renders", "evals": {0: {"wide": reference(cfg, grids(cfg, args.prompts)["wide"])}}})
    if args.json:
        print(json.dumps(results, indent=1))
    print(f"\n{'candidate':24s} {'step':>5s} {'smp/s':>6s} {'demo adh':>8s} {'shape':>6s} {'div':>6s} "
          f"{'wide adh':>8s} {'shape':>6s} {'div':>6s} {'ratio':>6s} {'seams':>6s}")
    nan = float("nan")
    for r in results:
        for step, ev in r["evals"].items():
            d = ev.get("demo", {})
            for kind in [k for k in ev if k.startswith("wide")]:  # wide, then wide_cfgS of --cfg-sweep
                w = ev[kind]
                name = r["name"] + ("" if kind == "wide" else f" {kind[5:]}")
                print(f"{name:24s} {step:>5} {ev.get('samples_per_s', nan):6.0f} "
                      f"{d.get('adherence', nan) if kind == 'wide' else nan:8.3f} "
                      f"{d.get('shape', nan) if kind == 'wide' else nan:6.3f} "
                      f"{d.get('diversity_same', nan) if kind == 'wide' else nan:6.3f} {w['adherence']:8.3f} "
                      f"{w['shape']:6.3f} {w['diversity_same']:6.3f} {w['diversity_ratio']:6.3f} {w['seams']:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
