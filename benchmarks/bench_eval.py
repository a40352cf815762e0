"""Evaluation cost: what FID and CLIP score cost per image, and what an eval of N images costs.

    .venv/bin/python benchmarks/bench_eval.py [--resolution 32] [--batch 16] [--steps 25] [--fid-images 1000]
                                              [--clip-arch tiny] [--device cpu|cuda] [--json]

Measured in this process, on random-init networks of the real architectures (the
arithmetic is the same as with pretrained weights):

  inception        torch-fidelity FID Inception-v3 on uint8 images at --resolution, resized
                   to 299 inside the network: images/s (the dominant per-image cost on CPU)
  stats update     FeatureStats.update (float64 sum and outer products, D = 2048): images/s
  frechet          frechet_distance at D = 2048, with N < D images (low-rank path) and N >= D
  clip             CLIP score of (image, prompt) pairs with --clip-arch: pairs/s
  sampling         the tiny preset's U-Net at --resolution, DDIM with CFG (2N per forward),
                   --steps steps: images/s
  eval estimate    seconds for an FID + CLIP eval of --fid-images images on one rank:
                   sampling + Inception + CLIP for the generated set, Inception for the
                   reference (once; cached afterwards), one Frechet distance
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import Report, time_calls  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=32, help="generated image side in pixels")
    ap.add_argument("--batch", type=int, default=16, help="images per Inception / sampler batch")
    ap.add_argument("--steps", type=int, default=25, help="sampler steps")
    ap.add_argument("--fid-images", type=int, default=1000, help="N for the eval-cost estimate")
    ap.add_argument("--clip-arch", default="tiny", help="open_clip architecture for CLIP score: tiny, ViT-B-32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)

    from latentforge.eval import clip_score as cs
    from latentforge.eval import fid

    device = torch.device(args.device)
    rep = Report("evaluation cost (FID / CLIP score / sampling)")
    B, R = args.batch, args.resolution
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, 3, R, R), generator=g, dtype=torch.uint8)
    rep.add("batch", B, "images")
    rep.add("resolution", R, "px")

    print(f"[bench] Inception-v3 at {R} px -> 299, batch {B} on {device}", flush=True)
    inception = fid.load_inception(None, device)
    t_inc = statistics.median(time_calls(lambda: fid.image_features(inception, images, B), args.repeats,
                                         device=device))
    rep.add("inception", B / t_inc, "images/s")

    feats = torch.randn(B, fid.FEATURE_DIM, generator=g, dtype=torch.float64).to(device)
    stats = fid.FeatureStats(device=device)
    t_upd = statistics.median(time_calls(lambda: stats.update(feats), args.repeats, device=device))
    rep.add("stats update", B / t_upd, "images/s")

    print("[bench] Frechet distance at D = 2048", flush=True)
    for n in (256, 4096):
        a, b = fid.FeatureStats(), fid.FeatureStats()
        a.update(torch.randn(n, fid.FEATURE_DIM, generator=g, dtype=torch.float64))
        b.update(torch.randn(n, fid.FEATURE_DIM, generator=g, dtype=torch.float64) * 1.1)
        t = statistics.median(time_calls(lambda: fid.fid_from_stats(a, b), max(1, args.repeats - 1), warmup=0))
        rep.add(f"frechet N={n}", t, "s")
    t_frechet = rep.values["frechet N=4096"] if args.fid_images >= fid.FEATURE_DIM else rep.values["frechet N=256"]

    print(f"[bench] CLIP score, {args.clip_arch}", flush=True)
    scorer = cs.load_clip_scorer(args.clip_arch, None, device)
    prompts = ["a large red circle in the center on a white background"] * B
    t_clip = statistics.median(time_calls(lambda: scorer.score(images, prompts), args.repeats, device=device))
    rep.add(f"clip ({args.clip_arch})", B / t_clip, "pairs/s")

    print(f"[bench] sampling: tiny-preset U-Net, DDIM {args.steps} steps with CFG", flush=True)
    from latentforge.config import resolve
    from latentforge.eval.sampling import sample
    from latentforge.training.diffusion import Schedule
    from latentforge.training.unet import build_unet, unet_forward

    cfg = resolve("tiny", None, [f"data.resolution={R}"])
    C, h = 3 * cfg.codec.patch ** 2, R // cfg.codec.patch
    L, D, P = 77, 64, 64  # the tiny text encoder's token sequence and pooled widths
    unet = build_unet(cfg.model, C, h, D, P).to(device).eval()
    schedule = Schedule.from_config(cfg.diffusion)
    cond = {"text": torch.randn(B, L, D, device=device), "pooled": torch.randn(B, P, device=device)}
    uncond = {"text": torch.zeros(1, L, D, device=device), "pooled": torch.zeros(1, P, device=device)}

    def run_sampler() -> None:
        with torch.no_grad():
            sample(lambda x, t, c: unet_forward(unet, x, t, c), (B, C, h, h), cond, uncond, schedule=schedule,
                   diffusion_cfg=cfg.diffusion, sampler="ddim", steps=args.steps, cfg_scale=3.0,
                   generator=torch.Generator().manual_seed(0), device=device)

    t_samp = statistics.median(time_calls(run_sampler, max(1, args.repeats - 1), device=device))
    rep.add("sampling", B / t_samp, "images/s")

    n = args.fid_images
    per_image = t_samp / B + 2 * t_inc / B + t_clip / B + t_upd / B  # generated: sample, features, CLIP; + reference
    rep.add(f"eval estimate N={n}", n * per_image + t_frechet, "s (first eval, reference not cached)")
    rep.add(f"eval estimate N={n} cached", n * (per_image - t_inc / B) + t_frechet, "s (reference cached)")
    rep.print(as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
