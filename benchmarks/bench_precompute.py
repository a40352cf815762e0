"""Precompute throughput (images/s) with the SD-VAE architecture at 256 px and the ViT-H-14
text tower, vs a naive per-sample loop, and as a fraction of this machine's matmul peak
measured in the same run.

    .venv/bin/python benchmarks/bench_precompute.py [--images 16] [--batch 8] [--naive 8] [--workers 1]

Random weights give the same FLOPs as the real ones: the VAE is an `AutoencoderKL` with
SD's config (block_out_channels 128/256/512/512, 4 down blocks, 2 layers per block,
4 latent channels), saved with save_pretrained and loaded through `codec.path` as a user
would; the text encoder is open_clip's ViT-H-14 built with `text.pretrained=""` (random
init, vision tower dropped). Synthetic 256 px shapes are the raw images.

Figures:
  pipeline      precompute.run over the raw shards: decoding workers, batched encoding,
                writing parts and manifests. Model building is excluded (timed apart).
  encode only   one batch through codec.encode + text.encode, no decoding or writing: the
                compute bound of this machine for this batch size.
  naive loop    one sample at a time in one process: decode, encode image, encode caption,
                write; the loop precompute replaces. It takes turns with "encode only".
  On a CPU, batching barely changes convolution efficiency; the gains of the pipeline
  over the naive loop are the overlapped decoding and, on a GPU, the batching.
  FLOPs         counted with torch.utils.flop_counter (convolutions, matmuls, attention)
                for one batch, per image; achieved FLOP/s = FLOPs/image x images/s, divided
                by the fp32 (CPU) or bf16 (CUDA) matmul peak measured in this process.

With --web it measures instead the web-scale data path against today's (issue 14): the
pipeline on square images (centre crop) and on images of aspect ratios up to 2:1 with
aspect-ratio buckets on, every metadata filter on (set so that none rejects: both runs
encode the same number of images) and the filter fields in a parquet beside each shard.
The two runs take turns (--repeats), best of each; the ratio is the figure (goal >= 95%).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import Report, count_flops, cpu_seconds, matmul_peak, sync, time_calls  # noqa: E402

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              sample_size=256, scaling_factor=0.18215)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="raw images for the pipeline run")
    ap.add_argument("--batch", type=int, default=8, help="data.precompute_batch_size")
    ap.add_argument("--naive", type=int, default=8, help="images per turn of the per-sample loop")
    ap.add_argument("--workers", type=int, default=1, help="data.precompute_workers (decoding processes)")
    ap.add_argument("--size", type=int, default=256, help="resolution")
    ap.add_argument("--text", default="ViT-H-14", help="open_clip architecture of the text tower")
    ap.add_argument("--repeats", type=int, default=1, help="turns of encode-only batch + naive loop")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--web", action="store_true", help="buckets + filters against square data (see above)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from diffusers import AutoencoderKL

    from latentforge import dist
    from latentforge.config import resolve
    from latentforge.data import latents as lat
    from latentforge.data import precompute, raw, synth
    from latentforge.data.encoders import build_encoders

    device = dist.device()
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_precompute_"))
    print(f"[bench_precompute] {device}, torch threads {torch.get_num_threads()}, work dir {tmp}", flush=True)
    rep = Report(f"precompute throughput: SD-VAE architecture at {args.size} px + {args.text} text tower, "
                 f"batch {args.batch}, {args.workers} decoding workers")

    # The peak first, in this process, before the models take memory.
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(dt, device)
    print(f"[bench_precompute] {peak.describe()}", flush=True)

    # Models, saved and loaded the way users do it.
    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE).save_pretrained(tmp / "sd-vae")
    synth.write_shards(tmp / "raw", args.images, max(args.batch, args.images // 2), args.size, seed=0)
    ov = [f"run_root={tmp}", f"data.raw_shards={tmp / 'raw'}/*.tar", f"data.latent_dir={tmp / 'latents'}",
          f"data.resolution={args.size}", f"data.precompute_batch_size={args.batch}",
          f"data.precompute_workers={args.workers}", "data.latent_samples_per_shard=1024", "codec.kind=vae",
          f"codec.path={tmp / 'sd-vae'}", f"text.model={args.text}", "text.pretrained="]
    cfg = resolve("tiny", None, ov)
    t0 = time.perf_counter()
    enc = build_encoders(cfg, device)
    t_build = time.perf_counter() - t0
    print(f"[bench_precompute] encoders built in {t_build:.1f} s (codec {enc.codec.identity()['dtype']}, "
          f"text {enc.text.identity()['dtype']})", flush=True)

    if args.web:
        web_vs_square(args, enc, tmp, rep)
        rep.print(args.json)
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)
        return 0

    # FLOPs per image and caption, counted on one batch (it runs for real, and so also warms
    # up the kernels for the batch shape; one single image warms up the naive loop's shape).
    samples = [s for u in sorted((tmp / "raw").glob("*.tar"))
               for s in raw.iter_shard(str(u), raw.RawConfig(resolution=args.size))]
    imgs = torch.stack([raw.to_tensor(s.image) for s in samples[:args.batch]])  # (B, 3, R, R)
    caps = [s.caption for s in samples[:args.batch]]
    with torch.inference_mode():
        f_img = count_flops(lambda: enc.codec.encode(imgs)) / len(caps)
        f_txt = count_flops(lambda: enc.text.encode(caps)) / len(caps)
        enc.codec.encode(imgs[:1]), enc.text.encode(caps[:1])
    flops = f_img + f_txt

    def naive(n: int) -> int:
        """The naive per-sample loop over the first n raw samples: decode, encode, write."""
        w = lat.TarWriter(tmp / "naive.tar")
        done = 0
        with torch.inference_mode():
            for u in sorted((tmp / "raw").glob("*.tar")):
                for s in raw.iter_shard(str(u), raw.RawConfig(resolution=args.size)):
                    if done == n:
                        break
                    mean, std = enc.codec.encode(raw.to_tensor(s.image)[None])
                    t = enc.text.encode([s.caption])
                    w.write_sample(s.key, lat.encode_sample(
                        s.key, s.caption, mean[0].cpu().numpy(), std[0].cpu().numpy(), t.tokens[0].cpu().numpy(),
                        t.pooled[0].cpu().numpy(), dict(s.meta, text_len=int(t.lengths[0]))))
                    done += 1
        w.close()
        sync(device)
        return done

    # Encode only (one batch, no I/O: the compute bound at this batch size) and the naive
    # loop take turns, so both see the same load on a shared machine.
    t_enc, t_naive = [], []
    for _ in range(args.repeats):
        t_enc += time_calls(lambda: (enc.codec.encode(imgs), enc.text.encode(caps)), repeats=1, warmup=0,
                            device=device)
        t0 = time.perf_counter()
        n = naive(args.naive)
        t_naive.append((time.perf_counter() - t0) / n)
    enc_rate = len(caps) / statistics.median(t_enc)
    naive_rate = 1.0 / statistics.median(t_naive)

    # The pipeline.
    t0 = time.perf_counter()
    result = precompute.run(cfg, encoders=enc)
    sync(device)
    t_pipe = time.perf_counter() - t0
    assert result["written"] == args.images, result
    pipe_rate = args.images / t_pipe

    # The peak again, at the end: on a shared machine the two can differ a lot; the higher
    # one is the denominator (a conservative utilisation).
    peak2 = matmul_peak(dt, device)
    print(f"[bench_precompute] again at the end: {peak2.describe()}", flush=True)
    peak = max(peak, peak2, key=lambda p: p.best)

    rep.add("pipeline (precompute.run)", pipe_rate, "images/s")
    rep.add("encode only (same batches, no I/O)", enc_rate, "images/s")
    rep.add("naive per-sample loop", naive_rate, "images/s")
    rep.add("pipeline / naive", pipe_rate / naive_rate, "x", fmt="{:.2f}")
    rep.add("pipeline / encode only", pipe_rate / enc_rate, "", fmt="{:.0%}")
    rep.add("VAE encoder FLOPs per image", f_img / 1e9, "GFLOP")
    rep.add("text encoder FLOPs per caption", f_txt / 1e9, "GFLOP")
    rep.add(f"matmul peak ({peak.dtype}, best of 2 x {len(peak.runs)}: start and end)", peak.best / 1e9, "GFLOP/s")
    rep.add("pipeline achieved", flops * pipe_rate / 1e9, "GFLOP/s")
    rep.add("pipeline / matmul peak", flops * pipe_rate / peak.best, "", fmt="{:.0%}")
    rep.add("encode only / matmul peak", flops * enc_rate / peak.best, "", fmt="{:.0%}")
    rep.add("encoder build (excluded above)", t_build, "s", fmt="{:.1f}")
    rep.add("images (pipeline / naive per turn)", f"{args.images} / {n}")
    rep.print(args.json)
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def web_vs_square(args: argparse.Namespace, enc: object, tmp: Path, rep: Report) -> None:
    """Precompute.run on square images vs bucketed, filtered ones, taking turns."""
    import json
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from latentforge.config import resolve
    from latentforge.data import precompute, synth

    per = max(args.batch, args.images // 2)
    synth.write_shards(tmp / "web", args.images, per, args.size, seed=0, max_aspect=2.0, metadata=True)
    for shard in sorted((tmp / "web").glob("*.tar")):  # img2dataset's parquet beside each tar
        with tarfile.open(shard) as tar:
            rows = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]  # type: ignore
        pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("key", "original_width", "original_height",
                                                                "aesthetic", "pwatermark", "punsafe")}
                                             for r in rows]), shard.with_suffix(".parquet"))
    web_ov = [f"data.raw_shards={tmp / 'web'}/*.tar", "data.bucket_max_ratio=2", "data.bucket_multiple=64",
              f"data.bucket_area={args.size ** 2}", "data.filter_min_original_side=8",
              "data.filter_max_original_side=100000", "data.filter_min_aesthetic=1", "data.filter_max_watermark=0.9995",
              "data.filter_max_unsafe=0.9995", "data.filter_min_caption_words=3"]
    times: dict[str, list[float]] = {"square": [], "web": []}
    cpu: dict[str, list[float]] = {"square": [], "web": []}
    pixels: dict[str, int] = {}
    for r in range(args.repeats):
        for kind in ("square", "web"):
            ov = [f"data.raw_shards={tmp / 'raw'}/*.tar"] if kind == "square" else web_ov
            c = resolve("tiny", None, [f"run_root={tmp}", f"data.latent_dir={tmp / f'lat-{kind}-{r}'}",
                                       f"data.resolution={args.size}", f"data.precompute_batch_size={args.batch}",
                                       f"data.precompute_workers={args.workers}", "data.latent_samples_per_shard=1024",
                                       "codec.kind=vae", f"codec.path={tmp / 'sd-vae'}", f"text.model={args.text}",
                                       "text.pretrained=", *ov])
            t0, c0 = time.perf_counter(), cpu_seconds()
            out = precompute.run(c, encoders=enc)  # type: ignore[arg-type]
            times[kind].append(time.perf_counter() - t0)
            cpu[kind].append(cpu_seconds() - c0)
            assert out["written"] == args.images, (kind, out)
            m = json.loads((c.resolved_latent_dir / "manifest.json").read_text())
            pixels[kind] = sum(b["count"] * b["size"][0] * b["size"][1] for b in m["buckets"]) if "buckets" in m \
                else args.images * args.size ** 2
    square, web = args.images / min(times["square"]), args.images / min(times["web"])
    rep.add("pipeline, square images (centre crop)", square, "images/s")
    rep.add("pipeline, aspect ratios to 2:1, buckets + every filter + parquet", web, "images/s")
    rep.add(f"buckets + filters / square (best of {args.repeats} each, taking turns)", web / square, "",
            fmt="{:.1%}")
    rep.add("  the same in CPU time (all processes)", min(cpu["square"]) / min(cpu["web"]), "", fmt="{:.1%}")
    # Buckets below the square hold fewer pixels (192x320 = 94% of 256x256): per pixel too.
    rep.add("pixels encoded per image, web / square", pixels["web"] / pixels["square"], "", fmt="{:.1%}")
    rep.add("buckets + filters / square, per pixel encoded", web * pixels["web"] / (square * pixels["square"]), "",
            fmt="{:.1%}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
