"""Training on precomputed latents vs encoding on the fly: the same U-Net, the same run.

    .venv/bin/python benchmarks/bench_onthefly.py [--res 64] [--batch 8] [--steps 8] [--unet 128,256]

Both modes train the same U-Net (same init, same objective, AdamW, plain PyTorch; no
DeepSpeed, whose fixed costs are the same in both) for the same number of steps, taking
turns step by step so that both see the same load on a shared machine:

  precomputed   LatentLoader (1 DataLoader worker) over latent shards that precompute wrote
                with the SD-VAE architecture and the text encoder; each step waits for a
                batch (data wait), then forward, backward, optimizer step.
  on the fly    raw shards decoded by 1 DataLoader worker; each step waits for decoded images,
                runs the VAE encoder and the text encoder (frozen, no grad), samples
                mean + std * eps, then the same forward, backward, step.

Figures: median step time of each mode, the speedup, the data-wait fraction with
precomputed latents (goal < 2% of step time), and the bound: with encoding a fraction e
of the on-the-fly step, precomputing can at best speed training up 1 / (1 - e) (Amdahl).
The speedup / bound ratio says how much of that precompute delivers. The same bound from
FLOPs (U-Net fwd+bwd vs encoders) is printed for this configuration and, counted on the
meta device (nothing is computed), for the real sd2-base-256 one (SD-2 U-Net on 32x32
latents, SD VAE at 256 px, ViT-H-14 text).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import Report, count_flops, sync  # noqa: E402
from benchmarks.bench_precompute import SD_VAE  # noqa: E402


class RawBatches(torch.utils.data.IterableDataset):
    """Endless batches of decoded raw images (B, R, R, 3) uint8 + captions, cycling the shards."""

    def __init__(self, urls: list[str], resolution: int, batch: int):
        self.urls, self.resolution, self.batch = urls, resolution, batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import numpy as np

        from latentforge.data import raw

        cfg = raw.RawConfig(resolution=self.resolution)
        imgs: list[Any] = []
        caps: list[str] = []
        while True:
            for u in self.urls:
                for s in raw.iter_shard(u, cfg):
                    if isinstance(s, raw.Rejection):
                        continue
                    imgs.append(np.asarray(s.image, dtype=np.uint8))
                    caps.append(s.caption)
                    if len(imgs) == self.batch:
                        yield {"images": torch.from_numpy(np.stack(imgs)), "captions": caps}
                        imgs, caps = [], []


def sd2_flop_bound() -> dict[str, float] | None:
    """GFLOPs per sample of the sd2-base-256 preset, counted on the meta device."""
    try:
        from diffusers import AutoencoderKL

        from latentforge.config import resolve
        from latentforge.training.unet import build_unet, unet_forward

        cfg = resolve("sd2-base-256", None, [])
        with torch.device("meta"):
            unet = build_unet(cfg.model, 4, 32, 1024, 1024)
            vae = AutoencoderKL(**SD_VAE)
        x = torch.zeros(1, 4, 32, 32, device="meta")
        t = torch.zeros(1, dtype=torch.long, device="meta")
        txt = torch.zeros(1, 77, 1024, device="meta")
        u = count_flops(lambda: unet_forward(unet, x, t, {"text": txt, "pooled": None}).float().square().mean()
                        .backward())
        with torch.no_grad():
            v = count_flops(lambda: vae.encode(torch.zeros(1, 3, 256, 256, device="meta")))
        # ViT-H-14 text tower, all 24 blocks (the pooled output needs the last): per block
        # 2 L (4 D^2 + 8 D^2) for the projections and MLP, 4 L^2 D for attention; plus the
        # final projection 2 D P. L = 77, D = 1024, P = 1024.
        L, D = 77, 1024
        text = 24 * (2 * L * 12 * D * D + 4 * L * L * D) + 2 * D * 1024
        return {"unet": u / 1e9, "vae": v / 1e9, "text": text / 1e9}
    except Exception as e:  # a diffusers version that cannot build on meta: skip the figure
        print(f"[bench_onthefly] sd2-base-256 FLOP count skipped: {type(e).__name__}: {e}", flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, default=64, help="image resolution (SD VAE: latents res/8)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--unet", default="128,256", help="U-Net block_out_channels")
    ap.add_argument("--text", default="tiny", help="open_clip architecture of the text tower")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from diffusers import AutoencoderKL

    from latentforge.config import resolve
    from latentforge.data import latents as lat
    from latentforge.data import precompute, shards, synth
    from latentforge.data.encoders import build_encoders
    from latentforge.data.loader import LatentLoader
    from latentforge.training.diffusion import Schedule, loss_fn
    from latentforge.training.unet import build_unet, unet_forward

    torch.set_grad_enabled(True)
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_onthefly_"))
    n_steps = args.warmup + args.steps
    n_images = args.batch * n_steps
    print(f"[bench_onthefly] {n_images} images at {args.res} px, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}, work dir {tmp}", flush=True)
    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE).save_pretrained(tmp / "sd-vae")
    synth.write_shards(tmp / "raw", n_images, max(args.batch, n_images // 4), args.res, seed=0)
    channels = [int(c) for c in args.unet.split(",")]
    ov = [f"run_root={tmp}", f"data.raw_shards={tmp / 'raw'}/*.tar", f"data.latent_dir={tmp / 'latents'}",
          f"data.resolution={args.res}", f"data.precompute_batch_size={args.batch}", "data.precompute_workers=1",
          "codec.kind=vae", f"codec.path={tmp / 'sd-vae'}", f"text.model={args.text}", "text.pretrained=",
          f"model.block_out_channels={channels}", f"model.down_block_types={['CrossAttnDownBlock2D'] * len(channels)}",
          f"model.up_block_types={['CrossAttnUpBlock2D'] * len(channels)}", "model.layers_per_block=1"]
    cfg = resolve("tiny", None, ov)
    from latentforge import dist

    device = dist.device()
    enc = build_encoders(cfg, device)

    # The one-time cost: precompute every image once.
    t0 = time.perf_counter()
    precompute.run(cfg, encoders=enc)
    t_precompute = time.perf_counter() - t0
    manifest = lat.load_manifest(tmp / "latents")
    shapes = manifest["shapes"]
    C, h, _ = shapes["latent"]
    schedule = Schedule.from_config(cfg.diffusion)

    def new_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(1)
        unet = build_unet(cfg.model, C, h, shapes["text"][-1], shapes["pooled"][-1]).to(device).train()
        return unet, torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def train_step(unet: torch.nn.Module, opt: torch.optim.Optimizer, x0: torch.Tensor, text: torch.Tensor,
                   pooled: torch.Tensor, step: int) -> None:
        gen = torch.Generator().manual_seed(step)
        # The model's compute dtype, as the trainer's model_fn casts (the loader hands text over as fp16).
        cond = {"text": text.to(device, torch.float32), "pooled": pooled.to(device, torch.float32)}
        out = loss_fn(lambda x, t, c: unet_forward(unet, x, t, c), x0.to(device), cond, cfg.diffusion, schedule, gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sync(device)

    # The two modes take turns, step by step, so both see the same machine load (this
    # benchmark runs on shared, noisy CPUs); each has its own model, optimizer and loader.
    pre_model, fly_model = new_model(), new_model()
    loader = LatentLoader(tmp / "latents", manifest["parts"], micro_batch=args.batch, seed=0, rank=0, world_size=1,
                          num_workers=1, prefetch_factor=4, scale=enc.codec.scale, shift=enc.codec.shift,
                          shapes=shapes)
    pre_it = iter(loader)
    urls = shards.expand_shards(cfg.resolved_raw_shards)
    raw_it = iter(torch.utils.data.DataLoader(RawBatches(urls, args.res, args.batch), batch_size=None,
                                              num_workers=1, prefetch_factor=4))
    pre_step, pre_wait, pre_cpu = [], [], []
    fly_step, fly_wait, fly_enc, fly_cpu, fly_enc_cpu = [], [], [], [], []
    for step in range(n_steps):
        # Precomputed latents: wait for a batch, train.
        t0, c0 = time.perf_counter(), time.process_time()
        b = next(pre_it)
        t1 = time.perf_counter()
        train_step(*pre_model, b["latents"], b["text"], b["pooled"], step)
        t2, c2 = time.perf_counter(), time.process_time()
        if step >= args.warmup:
            pre_wait.append(t1 - t0)
            pre_step.append(t2 - t0)
            pre_cpu.append(c2 - c0)

        # On the fly: wait for decoded images, encode them and the captions, train.
        t0, c0 = time.perf_counter(), time.process_time()
        r = next(raw_it)
        t1 = time.perf_counter()
        with torch.no_grad():
            x = r["images"].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, R, R)
            mean, std = enc.codec.encode(x)
            z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(step)).to(device)
            # NCHW like the loader's latents: the channels-last VAE hands back NHWC, which would
            # make this mode's U-Net convolutions faster and the comparison unfair.
            x0 = ((z - enc.codec.shift) * enc.codec.scale).contiguous()
            t = enc.text.encode(list(r["captions"]))
        sync(device)
        t2, c2 = time.perf_counter(), time.process_time()
        # The encoders run under inference_mode: clone to plain tensors autograd may save.
        train_step(*fly_model, x0, t.tokens.clone(), t.pooled.clone(), step)
        t3, c3 = time.perf_counter(), time.process_time()
        if step >= args.warmup:
            fly_wait.append(t1 - t0)
            fly_enc.append(t2 - t1)
            fly_step.append(t3 - t0)
            fly_enc_cpu.append(c2 - c0)
            fly_cpu.append(c3 - c0)
    del pre_it, raw_it

    # FLOPs per sample of this configuration.
    unet = pre_model[0]
    xb = torch.zeros(args.batch, C, h, h, device=device)
    tb = torch.zeros(args.batch, dtype=torch.long, device=device)
    txt = torch.zeros(args.batch, *shapes["text"], device=device)
    f_unet = count_flops(lambda: unet_forward(unet, xb, tb, {"text": txt, "pooled": None}).square().mean()
                         .backward()) / args.batch
    with torch.no_grad():
        f_vae = count_flops(lambda: enc.codec.encode(torch.zeros(args.batch, 3, args.res, args.res))) / args.batch
        f_text = count_flops(lambda: enc.text.encode(["a caption"] * args.batch)) / args.batch

    # Other jobs share these cores: a step's time swings several-fold with their load, in
    # wall and in CPU time alike. The fastest step of each mode is the closest to its cost
    # on a quiet machine, so the headline figures use it; medians are printed beside them.
    med = statistics.median
    t_pre, t_fly, t_enc = min(pre_step), min(fly_step), min(fly_enc)
    wait_frac = sum(pre_wait) / sum(pre_step)
    bound = t_fly / (t_fly - t_enc)  # Amdahl: the on-the-fly step without its encoding
    speedup = t_fly / t_pre
    flop_bound = (f_unet + f_vae + f_text) / f_unet

    rep = Report(f"training on precomputed latents vs encoding on the fly: U-Net {channels} on {C}x{h}x{h} latents, "
                 f"SD-VAE architecture at {args.res} px, {args.text} text, batch {args.batch}")
    rep.add("step, precomputed latents (fastest)", t_pre * 1e3, "ms")
    rep.add("  data wait, precomputed (all steps, of step time)", wait_frac, "", fmt="{:.2%}")
    rep.add("step, encoding on the fly (fastest)", t_fly * 1e3, "ms")
    rep.add("  of which encoding, VAE + text (fastest)", t_enc * 1e3, "ms")
    rep.add("  data wait, on the fly (all steps, of step time)", sum(fly_wait) / sum(fly_step), "", fmt="{:.2%}")
    rep.add("speedup from precompute", speedup, "x", fmt="{:.2f}")
    rep.add("bound: on-the-fly step / (step - encoding)", bound, "x", fmt="{:.2f}")
    rep.add("speedup / bound", speedup / bound, "", fmt="{:.0%}")
    m_pre, m_fly, m_enc = med(pre_step), med(fly_step), med(fly_enc)
    rep.add("medians: step pre / step fly / encoding", f"{m_pre * 1e3:.0f} / {m_fly * 1e3:.0f} / {m_enc * 1e3:.0f}", "ms")
    rep.add("medians: speedup (bound)", f"{m_fly / m_pre:.2f} ({m_fly / (m_fly - m_enc):.2f})", "x")
    c_pre, c_fly, c_enc = min(pre_cpu), min(fly_cpu), min(fly_enc_cpu)
    rep.add("CPU time, fastest: step pre / step fly / encoding", f"{c_pre:.2f} / {c_fly:.2f} / {c_enc:.2f}", "s")
    rep.add("CPU time: speedup (bound)", f"{c_fly / c_pre:.2f} ({c_fly / (c_fly - c_enc):.2f})", "x")
    rep.add("U-Net fwd+bwd per sample", f_unet / 1e9, "GFLOP")
    rep.add("VAE encoder per image", f_vae / 1e9, "GFLOP")
    rep.add("text encoder per caption", f_text / 1e9, "GFLOP")
    rep.add("bound from FLOPs, this config", flop_bound, "x", fmt="{:.2f}")
    sd2 = sd2_flop_bound()
    if sd2:
        rep.add("sd2-base-256: U-Net fwd+bwd / VAE / text", f"{sd2['unet']:.0f} / {sd2['vae']:.0f} / {sd2['text']:.0f}",
                "GFLOP per sample")
        rep.add("sd2-base-256: bound from FLOPs", (sd2["unet"] + sd2["vae"] + sd2["text"]) / sd2["unet"], "x",
                fmt="{:.2f}")
    rep.add("steps timed per mode (interleaved)", len(pre_step), "", fmt="{:d}")
    rep.add("one-time precompute of these images", t_precompute, "s", fmt="{:.1f}")
    saved_per_epoch = (t_fly - t_pre) * n_images / args.batch  # seconds of training saved per pass over the data
    rep.add("  repaid after (epochs)", t_precompute / saved_per_epoch, "", fmt="{:.2f}")
    rep.print(args.json)
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
