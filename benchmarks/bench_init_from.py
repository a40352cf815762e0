"""Peak memory per rank while a 300M-parameter U-Net loads through model.init_from under
ZeRO-3, against ZeRO-3 from random weights; and optimizer-state memory, LoRA against full
fine-tuning.

    .venv/bin/python benchmarks/bench_init_from.py [--model 300m|mid] [--ranks 2] [--steps 2]
                                                   [--lora-rank 8] [--skip-memory] [--json]

Memory (the issue's goal: the init_from run's peak at most 10% above ZeRO-3's own):
the `300m` U-Net of bench_train.py is saved once with `save_pretrained` (safetensors) to a
temporary folder. Then two jobs of --ranks local processes each build the DeepSpeed engine
(ZeRO-3, fp32, our AdamW) and the EMA and take --steps optimizer steps, exactly as in
bench_memory.py: one from random weights, one loading the saved U-Net as the trainer does
for model.init_from (built on the meta device, each tensor read into its parameter:
training/init_from.py). Ranks run with MALLOC_MMAP_THRESHOLD_=131072, as bench_memory.py
explains, so resident memory follows live tensors. Figure: getrusage's peak resident set.

Optimizer state: one rank, ZeRO-2, the same model loaded from the same folder, once fully
trainable and once with rank --lora-rank adapters on the attention projections (the
trainer's LoRA path, training/unet.py add_lora). The figure is the bytes of the optimizer's
state tensors (Adam's two moments and DeepSpeed's fp32 master partitions of what trains).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import bench_memory  # noqa: E402
from benchmarks._common import Report  # noqa: E402
from benchmarks.bench_train import MODELS, Stepper, spawn_ranks  # noqa: E402


def save_model(model: str, out: Path) -> int:
    from latentforge.config import resolve
    from latentforge.training.unet import build_unet, count_params

    overrides, latent, text, pooled = MODELS[model]
    cfg = resolve("tiny", None, overrides)
    torch.manual_seed(1)
    unet = build_unet(cfg.model, latent[0], latent[1], text[1], pooled)
    unet.save_pretrained(out)
    return count_params(unet)


def optimizer_bytes(model: str, init_dir: str, lora_rank: int) -> tuple[int, int, int]:
    """(optimizer state bytes, trainable parameters, all parameters) after one step, one rank."""
    s = Stepper(model, 1, 2, init_dir=init_dir, lora_rank=lora_rank, ema=False)
    s.step(0)
    opt = s.engine.ds.optimizer
    state = sum(v.numel() * v.element_size() for st in s.engine.client_optimizer.state.values()
                for v in st.values() if torch.is_tensor(v))
    masters = sum(t.numel() * t.element_size() for t in getattr(opt, "single_partition_of_fp32_groups", []))
    return state + masters, s.n_trainable, s.n_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="300m", choices=["300m", "mid"])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--skip-memory", action="store_true", help="only the optimizer-state figures")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    rep = Report(f"model.init_from under ZeRO-3 and LoRA optimizer state, `{args.model}` U-Net, fp32, "
                 f"MALLOC_MMAP_THRESHOLD_=131072")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # inherited by the ranks
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "unet"
        print(f"[bench] saving a random `{args.model}` U-Net to {src}", flush=True)
        n = save_model(args.model, src)
        rep.add("parameters", n / 1e6, "M")
        rep.add("weights file", sum(f.stat().st_size for f in src.iterdir()) / 1e9, "GB")
        peaks = {}
        for what, init in ([] if args.skip_memory else [("random", ""), ("init_from", str(src))]):
            with tempfile.TemporaryDirectory() as out:
                print(f"[bench] ZeRO-3 {what}: starting {args.ranks} ranks", flush=True)
                # bench_memory.py's worker: engine, EMA and steps as the trainer builds them.
                codes = spawn_ranks(bench_memory.__file__, ["--worker", "--stage=3", f"--out={out}",
                                                            f"--steps={args.steps}", f"--model={args.model}",
                                                            f"--init-dir={init}"], args.ranks)
                if any(codes):
                    print(f"[bench] ZeRO-3 {what}: ranks exited with {codes}", file=sys.stderr)
                    return 1
                ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(args.ranks)]
            peaks[what] = max(r["peak"] for r in ranks)
            for r in ranks:
                rep.add(f"ZeRO-3 {what} rank {r['rank']}: peak", r["peak"], f"GB resident (baseline "
                        f"{r['baseline']:.2f} GB, after the steps {r['after_steps']:.2f} GB)")
        if peaks:
            rep.add("init_from peak / random-init peak", 100 * peaks["init_from"] / peaks["random"],
                    "% (goal: <= 110%)")
        print("[bench] optimizer state: full fine-tuning, then LoRA (one rank, ZeRO-2)", flush=True)
        full, n_full, _ = optimizer_bytes(args.model, str(src), 0)
        lora, n_lora, _ = optimizer_bytes(args.model, str(src), args.lora_rank)
        rep.add("full fine-tuning: trainable parameters", n_full / 1e6, "M")
        rep.add("full fine-tuning: optimizer state", full / 1e9, "GB")
        rep.add(f"LoRA rank {args.lora_rank}: trainable parameters", n_lora / 1e6, "M")
        rep.add(f"LoRA rank {args.lora_rank}: optimizer state", lora / 1e9, "GB")
        rep.add("LoRA / full optimizer state", 100 * lora / full, "%")
    rep.print(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
