#!/usr/bin/env python3
"""`make gpu-check`: the tiny pipeline end to end on this machine's CUDA GPU(s).

    .venv/bin/python scripts/gpu_check.py [--work DIR] [--inception FILE] [--keep]
    .venv/bin/python scripts/gpu_check.py --dry-run      # no GPU: parse, resolve, list the steps

The steps, each in a process of its own (every DeepSpeed start is a clean one, and one
failure cannot hide behind another):

  1. precompute  synthetic shapes -> latents on CUDA; "auto" encoder dtypes resolve on this
                 GPU and are recorded in the dataset identity
  2. train-z2    bf16, ZeRO-2, 1 GPU rank, eval at the end (held-out loss, grid, FID)
  3. train-z3    bf16, ZeRO-3, 1 GPU rank
  4. cpu-2rank   fp32, ZeRO-2, 2 CPU ranks (gloo, CUDA_VISIBLE_DEVICES=""), a checkpoint
  5. resume-gpu  that checkpoint resumed on 1 GPU rank in bf16: a universal checkpoint
                 (world 2 -> 1), the fused AdamW step counters moved to the GPU
  6. eval        stand-alone eval of train-z2 with FID: the real FID Inception if its weights
                 are found (--inception, $LATENTFORGE_INCEPTION, weights/fid_inception_v3.pt
                 from `make fid-weights`, torch hub's cache), else a seeded random one
                 (eval/fid_randinit), and it says which
  7. export      train-z2 exported and sampled from the export

Each GPU training step prints samples/s, MFU against this GPU's bf16 matmul peak (measured
in the same process, just before training: benchmarks/_common.matmul_peak) and the peak GPU
memory. The script exits non-zero on any failure. It installs nothing: it runs on what
`make venv` installed. Budget: 8 minutes on one GPU (checked; most of it is process
start-up: imports and deepspeed.initialize).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks._common and a plain checkout's latentforge/

BUDGET_S = 480.0  # the whole check, on one GPU
RESULT = "GPU_CHECK_RESULT "  # a step's last stdout line: this prefix, then its figures as JSON
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"

# The pipeline: the synthetic shapes at 64 px, the pixel codec (2x2 patches: 12 x 32 x 32
# latents), the tiny random open_clip and a (128, 256) U-Net: big enough for the GPU to
# show a figure, small enough for 2 CPU ranks to take a few steps.
BASE = [
    "synth.num_samples=2048", "synth.samples_per_shard=256", "synth.image_size=64",
    "data.resolution=64", "codec.patch=2", "data.latent_samples_per_shard=512", "data.heldout_shards=1",
    "data.num_workers=4", "model.block_out_channels=[128, 256]", "model.layers_per_block=2",
    "model.attention_head_dim=64", "diffusion.prediction=eps", "diffusion.zero_terminal_snr=false",
    "train.global_batch_size=128", "optim.warmup_steps=20", "train.log_every=40", "train.keep_last=2",
    "ema.decay=0.99", "eval.every_steps=0", "eval.num_prompts=4", "eval.images_per_prompt=2", "eval.steps=20",
    "eval.heldout_samples=256", "eval.heldout_batch_size=64", "eval.fid_batch_size=64",
    "tracking.system_metrics=false",
]
GPU_TRAIN = ["train.precision=auto", "train.max_steps=160", "train.ckpt_every_steps=160"]


# --cpu-rehearsal (internal): the same steps on a CPU at toy sizes, to check this script
# itself where there is no GPU; no figures, no budget.
REHEARSAL = ["synth.num_samples=256", "synth.samples_per_shard=64", "data.resolution=32", "codec.patch=4",
             "data.latent_samples_per_shard=64", "model.block_out_channels=[32, 64]", "model.layers_per_block=1",
             "model.attention_head_dim=32", "train.global_batch_size=8", "data.num_workers=1",
             "eval.num_prompts=2", "eval.images_per_prompt=1", "eval.steps=2", "eval.heldout_samples=16"]
REHEARSAL_STEPS = {"train-z2": ["train.max_steps=2", "train.ckpt_every_steps=2", "eval.fid_num_images=8"],
                   "train-z3": ["train.max_steps=2", "train.ckpt_every_steps=2"],
                   "cpu-2rank": ["train.max_steps=2", "train.ckpt_every_steps=2"],
                   "resume-gpu": ["train.max_steps=4", "train.ckpt_every_steps=4"],
                   "eval": ["eval.fid_num_images=8"]}


@dataclass
class Step:
    name: str
    what: str
    overrides: list[str] = field(default_factory=list)  # on top of BASE and run_root
    timeout_s: float = 240.0
    cpu_only: bool = False  # run with CUDA_VISIBLE_DEVICES="" (the 2-rank gloo checkpoint)


STEPS = [
    Step("precompute", "synthetic shapes -> latents on CUDA, auto dtypes recorded"),
    Step("train-z2", "bf16 ZeRO-2 on 1 GPU, eval with FID at the end",
         ["run_name=z2", "train.zero_stage=2", *GPU_TRAIN, "eval.fid_num_images=256"]),
    Step("train-z3", "bf16 ZeRO-3 on 1 GPU", ["run_name=z3", "train.zero_stage=3", *GPU_TRAIN]),
    Step("cpu-2rank", "fp32 ZeRO-2 on 2 CPU ranks (gloo), a checkpoint at step 4",
         ["run_name=resume", "nproc=2", "train.zero_stage=2", "train.precision=auto", "train.max_steps=4",
          "train.ckpt_every_steps=4", "train.global_batch_size=16", "train.log_every=2", "data.num_workers=1"],
         timeout_s=300.0, cpu_only=True),
    Step("resume-gpu", "step 4's checkpoint resumed on 1 GPU rank in bf16 (universal checkpoint)",
         ["run_name=resume", "nproc=1", "train.zero_stage=2", "train.precision=auto", "train.max_steps=44",
          "train.ckpt_every_steps=44", "train.global_batch_size=16", "train.log_every=20"]),
    Step("eval", "stand-alone eval of train-z2 with FID", ["eval.fid_num_images=256", "eval.cfg_sweep=[1.5]"]),
    Step("export", "train-z2 exported, then sampled from the export"),
]


def config_args(work: Path, step: Step, rehearsal: bool = False) -> list[str]:
    extra = [*REHEARSAL, *REHEARSAL_STEPS.get(step.name, [])] if rehearsal else []
    return [f"run_root={work}", *BASE, *step.overrides, *extra]


def find_inception(given: str | None) -> Path | None:
    """The FID Inception weights: --inception, $LATENTFORGE_INCEPTION, the checkout's
    weights/fid_inception_v3.pt (`make fid-weights`, which `make gpu-check` runs first), or
    torch hub's cache (where torch-fidelity puts its file), whichever is there first."""
    candidates = [given, os.environ.get("LATENTFORGE_INCEPTION"), str(ROOT / "weights" / "fid_inception_v3.pt")]
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    candidates.append(str(torch_home / "hub" / "checkpoints" / INCEPTION_FILE))
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    if given:
        raise SystemExit(f"gpu_check: --inception: no such file: {given}")
    return None


# ---------------------------------------------------------------------------------------
# The steps (each runs in its own process: `gpu_check.py --step NAME --work DIR`).


def _emit(figures: dict[str, Any]) -> None:
    print(RESULT + json.dumps(figures, default=str), flush=True)


def _gpu_figures(cfg: Any, shapes: dict[str, list[int]], samples_per_s: float) -> dict[str, Any]:
    """MFU of the U-Net's forward + backward (torch FlopCounterMode) at `samples_per_s`
    against the bf16 matmul peak measured now, in this process, on this GPU."""
    import torch

    from benchmarks._common import count_flops, matmul_peak
    from latentforge.training.unet import build_unet, unet_forward

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    C, h, w = shapes["latent"]
    n = 8
    unet = build_unet(cfg.model, C, h, shapes["text"][-1], shapes["pooled"][-1]).to(dev)
    x, t = torch.randn(n, C, h, w, device=dev), torch.randint(0, 1000, (n,), device=dev)
    cond = {"text": torch.randn(n, *shapes["text"], device=dev),
            "pooled": torch.randn(n, *shapes["pooled"], device=dev)}
    flops = count_flops(lambda: unet_forward(unet, x, t, cond).float().square().mean().backward()) / n
    peak = matmul_peak(torch.bfloat16 if dev.type == "cuda" else torch.float32, dev)
    return {"gflop_per_sample": flops / 1e9, "samples_per_s": samples_per_s,
            "bf16_peak_tflops": peak.best / 1e12, "mfu_percent": 100 * flops * samples_per_s / peak.best,
            "gpu": peak.device}


def _train_in_process(cfg: Any) -> Any:
    import torch

    from latentforge.env import apply, discover
    from latentforge.eval.evaluate import Evaluator
    from latentforge.training.loop import train

    apply(discover())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, make_evaluator=Evaluator)
    result.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return result


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def run_step(name: str, work: Path, inception: Path | None, rehearsal: bool = False) -> None:
    import torch

    from latentforge.config import resolve
    from latentforge.data import latents as lat

    step = next(s for s in STEPS if s.name == name)
    cfg = resolve("tiny", None, config_args(work, step, rehearsal))
    if not step.cpu_only and not rehearsal:
        _check(torch.cuda.is_available(), "CUDA is not available in this step's process")
    figures: dict[str, Any] = {}

    if name == "precompute":
        from latentforge import dist
        from latentforge.data import precompute
        from latentforge.data.synth import ensure_synth

        ensure_synth(cfg)
        t0 = time.monotonic()
        summary = precompute.run(cfg)
        manifest = lat.load_manifest(cfg.resolved_latent_dir)
        _check(rehearsal or dist.device().type == "cuda", f"precompute ran on {dist.device()}")
        want = dist.compute_dtype("auto")
        _check(manifest["identity"]["text"]["dtype"] == want,
               f"identity records text dtype {manifest['identity']['text']['dtype']}, expected {want} on this GPU")
        figures = {"samples": manifest["written"], "seconds": round(time.monotonic() - t0, 1),
                   "text_dtype": want, "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float))}}

    elif name in ("train-z2", "train-z3", "resume-gpu"):
        from latentforge.training import checkpoint

        run_dir = cfg.resolved_run_dir
        plan = checkpoint.plan_resume(run_dir, 1, cfg.train.zero_stage) if name == "resume-gpu" else None
        if name == "resume-gpu":
            _check(plan is not None and plan.universal, f"expected a universal resume plan, got {plan}")
        result = _train_in_process(cfg)
        _check(result.step == cfg.train.max_steps, f"stopped at step {result.step}")
        loss = result.last_metrics.get("train/loss", float("nan"))
        _check(loss == loss and loss < 10, f"train/loss {loss}")
        ds = json.loads((run_dir / "ds_config.json").read_text())
        _check(ds["bf16"]["enabled"] == (torch.cuda.is_bf16_supported(including_emulation=False)),
               f"bf16 enabled={ds['bf16']['enabled']} on this GPU")
        if ds["bf16"]["enabled"]:
            _check(ds.get("communication_data_type") == "fp32" and ds.get("data_types", {}).get("grad_accum_dtype")
                   == "fp32", "bf16 without fp32 gradient reduction and accumulation")
        state = checkpoint.client_state(run_dir)
        _check(state.ema is not None and state.ema["updates"] == result.step, "the EMA missed updates")
        figures = {"step": result.step, "loss": loss, "peak_gpu_memory_gib": round(result.peak_memory_gib, 2),
                   "data_wait_frac": result.last_metrics.get("train/data_wait_frac")}
        if plan is not None:
            figures["resumed_from"] = f"{plan.tag} via {plan.load_tag} ({plan.reason})"
        latents = lat.load_manifest(cfg.resolved_latent_dir)
        figures.update(_gpu_figures(cfg, latents["shapes"], result.last_metrics["train/samples_per_s"]))

    elif name == "eval":
        from latentforge.eval.standalone import main as eval_main

        run_dir = work / "z2"
        extra = [f"eval.inception_path={inception}"] if inception else []
        overrides = [*step.overrides, *(REHEARSAL_STEPS["eval"] if rehearsal else []), *extra]
        _check(eval_main(str(run_dir), None, None, overrides) == 0, "eval failed")
        protocols = sorted((run_dir / "eval").rglob("protocol_*.json"), key=lambda p: p.stat().st_mtime)
        _check(bool(protocols), f"no eval protocol under {run_dir / 'eval'}")
        fid = json.loads(protocols[-1].read_text())["fid"]
        _check(fid["metric"] == ("eval/fid" if inception else "eval/fid_randinit"), f"FID logged as {fid['metric']}")
        figures = {"fid_metric": fid["metric"], "fid": fid["value"], "images": fid["count"],
                   "inception": str(inception) if inception else "none found: seeded random Inception"}

    elif name == "export":
        from latentforge.eval.sample import sample_from_export
        from latentforge.training.export import export

        out = export(work / "z2", work / "z2-export")
        png = sample_from_export(out, ["a large red circle in the center on a white background"],
                                 work / "z2-export-sample.png", n=2)
        _check(png.is_file(), "no sample written")
        figures = {"export": str(out), "sample": str(png)}

    _emit(figures)


# ---------------------------------------------------------------------------------------
# The driver.


def dry_run(work: Path, inception: Path | None) -> int:
    """Everything but the GPU: each step's config resolves and validates, the helpers import."""
    from benchmarks._common import count_flops, matmul_peak  # noqa: F401  (the MFU helpers exist)
    from latentforge.config import resolve

    print(f"gpu-check dry run: {len(STEPS)} steps, work directory {work}, budget {BUDGET_S / 60:.0f} min")
    for i, step in enumerate(STEPS, 1):
        cfg = resolve("tiny", None, config_args(work, step))
        where = "2 CPU ranks (gloo)" if step.cpu_only else f"{cfg.nproc} GPU rank" if step.name != "precompute" \
            else "1 GPU"
        print(f"  {i}. {step.name:<11} {step.what} [{where}, timeout {step.timeout_s:.0f} s]")
        if step.overrides:
            print(f"     overrides: {' '.join(step.overrides)}")
    print(f"  FID Inception weights: {inception or 'none found (the eval step uses a seeded random Inception)'}")
    print("dry run OK: nothing ran on a GPU")
    return 0


def run_all(work: Path | None, inception: Path | None, keep: bool, rehearsal: bool = False) -> int:
    import torch

    if not torch.cuda.is_available() and not rehearsal:
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); --dry-run checks the script "
              "without one", file=sys.stderr)
        return 2
    work = work or Path(tempfile.mkdtemp(prefix="latentforge-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    where = "a CPU (rehearsal: toy sizes, no budget)" if rehearsal else \
        f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)"
    print(f"gpu-check on {where}, torch {torch.__version__}, work directory {work}", flush=True)
    if inception is None:
        print("  no FID Inception weights found: eval uses a seeded random Inception (eval/fid_randinit)")
    t_start = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    failed: str | None = None
    for i, step in enumerate(STEPS, 1):
        left = BUDGET_S - (time.monotonic() - t_start) if not rehearsal else 3600.0
        if left <= 0:
            failed = f"{step.name}: the {BUDGET_S / 60:.0f}-minute budget is spent"
            break
        print(f"[{i}/{len(STEPS)}] {step.name}: {step.what} ...", flush=True)
        log = work / f"{step.name}.log"
        env = dict(os.environ)
        if step.cpu_only:
            env["CUDA_VISIBLE_DEVICES"] = ""
            cmd = [sys.executable, "-m", "latentforge.launch.cli", "train", "--preset", "tiny",
                   *config_args(work, step, rehearsal)]
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step.name, "--work", str(work)] + \
                  (["--inception", str(inception)] if inception else []) + (["--cpu-rehearsal"] if rehearsal else [])
        t0 = time.monotonic()
        try:
            with open(log, "w") as f:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=min(step.timeout_s if not rehearsal else 3600.0, left)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        text = log.read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.startswith(RESULT)]
        if rc != 0 or (not step.cpu_only and not lines):
            failed = f"{step.name}: exit {rc} after {time.monotonic() - t0:.0f} s; log {log}"
            print("\n".join(text.splitlines()[-40:]), file=sys.stderr)
            break
        results[step.name] = json.loads(lines[-1][len(RESULT):]) if lines else {}
        results[step.name]["seconds"] = round(time.monotonic() - t0, 1)
        print(f"    ok in {results[step.name]['seconds']:.0f} s: "
              + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in results[step.name].items() if k not in ("seconds", "summary")), flush=True)
    total = time.monotonic() - t_start
    print()
    print("== gpu-check figures")
    for name in ("train-z2", "train-z3", "resume-gpu"):
        r = results.get(name)
        if r:
            print(f"   {name:<10} {r['samples_per_s']:9.1f} samples/s  MFU {r['mfu_percent']:5.2f}% of "
                  f"{r['bf16_peak_tflops']:.0f} TFLOP/s (bf16 matmul, measured)  peak GPU memory "
                  f"{r['peak_gpu_memory_gib']:.2f} GiB  ({r['gflop_per_sample']:.2f} GFLOP/sample)")
    if "eval" in results:
        print(f"   eval       {results['eval']['fid_metric']} {results['eval']['fid']:.2f} on "
              f"{results['eval']['images']} images ({results['eval']['inception']})")
    print(f"   total      {total / 60:.1f} min (budget {BUDGET_S / 60:.0f} min)")
    (work / "gpu_check.json").write_text(json.dumps({"results": results, "failed": failed, "total_s": total},
                                                    indent=1, default=str))
    if failed:
        print(f"gpu-check FAILED: {failed}", file=sys.stderr)
        return 1
    if total > BUDGET_S and not rehearsal:
        print(f"gpu-check FAILED: took {total / 60:.1f} min, over the {BUDGET_S / 60:.0f}-minute budget",
              file=sys.stderr)
        return 1
    print("gpu-check OK")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="resolve every step's config and list the steps; no GPU")
    p.add_argument("--work", default=None, help="work directory (default: a new temporary one)")
    p.add_argument("--inception", default=None, help=f"FID Inception weights ({INCEPTION_FILE})")
    p.add_argument("--keep", action="store_true", help="keep the work directory after a successful check")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step in this process
    p.add_argument("--cpu-rehearsal", action="store_true", help=argparse.SUPPRESS)  # internal: see REHEARSAL
    args = p.parse_args(argv)
    inception = find_inception(args.inception)
    if args.step:
        run_step(args.step, Path(args.work), inception, args.cpu_rehearsal)
        return 0
    if args.dry_run:
        return dry_run(Path(args.work or Path(tempfile.gettempdir()) / "latentforge-gpu-check-XXXX"), inception)
    return run_all(Path(args.work) if args.work else None, inception, args.keep or args.work is not None,
                   args.cpu_rehearsal)


if __name__ == "__main__":
    sys.exit(main())
