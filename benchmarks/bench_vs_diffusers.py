"""latentforge against diffusers' example training script, in turns, on this machine (issue 15).

    .venv/bin/python benchmarks/bench_vs_diffusers.py [--procs 1,2] [--steps 320] [--short 20]
                                                      [--repeats 3] [--peer-venv .venv-peer] [--json]

The peer is diffusers' examples/text_to_image/train_text_to_image.py at v0.40.0, unmodified:
benchmarks/peer/train_text_to_image.py, checked against its sha256 before every run. It
runs in a virtualenv of its own (--peer-venv), made on first use: diffusers 0.40.0 and the
script's requirements (datasets, ftfy, tensorboard, Jinja2) from the package registry,
and our torch, torchvision, transformers and accelerate through a .pth file, so both sides
use the same torch build. latentforge does not depend on any of it.

The same job on both sides:
  data     N synthetic shapes at 16 px (`latentforge data synth`); the peer reads them as an
           imagefolder (image files + metadata.jsonl), latentforge precomputes them once
           (not timed: that is the design).
  models   one random tiny AutoencoderKL (32/64 channels, 4 x 8 x 8 latents), latentforge's
           tiny open_clip text tower (width 64; CLIPTextModel on the peer's side) and the
           U-Net of bench_peer.py (block_out_channels 32/64, cross-attention width 64, 0.8M
           parameters). The peer starts from latentforge's pipeline export of a 1-step run,
           so both train the same weights.
  step     16 samples per process, fp32, AdamW. The peer runs the VAE and text encoder at
           every step (that is how it works); latentforge reads precomputed latents and
           keeps an EMA (its default; the peer's --use_ema is off by default).
  launch   1 process: a plain process with 2 torch threads. 2 processes: torchrun for the
           peer (DDP, gloo), `latentforge train nproc=2` for us (DeepSpeed, gloo), 1 thread
           each. Ours runs with the demo preset's settings for a model this small on CPU:
           ZeRO stage 0 and latents loaded in the training process (--set changes any).
           Tracking: each side's default (tensorboard; a local MLflow store).

Timing. Every side runs twice per turn: --short and --steps optimizer steps. The
steady-state rate is (steps - short) x 16 x processes / (T_long - T_short): start-up, data
set-up, the final save, the final eval and the exit cancel. "fixed cost" is what is left
of a run besides its steps: T_short - short x the step time (process start to first step,
plus the end). The turns alternate the sides, so drift in the machine's load hits both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import Report  # noqa: E402
from benchmarks.bench_peer import BATCH  # noqa: E402  (samples per process per step, both sides)
from benchmarks.bench_train import MODELS  # noqa: E402  (MODELS["peer"]: registered by bench_peer)

REPO = Path(__file__).resolve().parent.parent
PEER_SCRIPT = Path(__file__).resolve().parent / "peer" / "train_text_to_image.py"
PEER_SHA256 = "d4430bca96ab52aaed12d99132a4410b2db4b1114ec4cf85fb24cc0889ed8408"  # git show v0.40.0:examples/...
PEER_REQUIREMENTS = ["diffusers==0.40.0", "datasets>=2.19.1", "ftfy", "tensorboard", "Jinja2"]
RES = 16  # pixels; the VAE halves it: 4 x 8 x 8 latents

# bench_peer.py's U-Net (the peer's 0.8M-parameter model) on the tiny preset.
OURS = [*MODELS["peer"][0], "codec.kind=vae", f"synth.image_size={RES}", f"data.resolution={RES}",
        "optim.lr=1e-4", "optim.warmup_steps=0", "train.ckpt_every_steps=0", "eval.every_steps=0",
        "eval.num_prompts=1", "eval.images_per_prompt=1", "eval.steps=2", "eval.heldout_samples=16",
        "eval.heldout_buckets=1", "eval.clip_score=false",
        # The demo preset's CPU settings for a model this small: ZeRO-0 (all-reduce, as DDP)
        # and in-process loading (latentforge/config.py `demo`, where the measurements are).
        "train.zero_stage=0", "data.num_workers=0"]


def check_peer_script() -> None:
    digest = hashlib.sha256(PEER_SCRIPT.read_bytes()).hexdigest()
    if digest != PEER_SHA256:
        raise SystemExit(f"bench_vs_diffusers: {PEER_SCRIPT} is not diffusers v0.40.0's script "
                         f"(sha256 {digest}, expected {PEER_SHA256})")


def ensure_peer_venv(path: Path) -> Path:
    """The peer's python: a venv with diffusers 0.40.0 + datasets etc. over our site-packages."""
    py = path / "bin" / "python"
    stamp = path / "latentforge-peer.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("requirements") == PEER_REQUIREMENTS:
        return py
    print(f"[bench] making the peer's virtualenv at {path} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    theirs = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    Path(theirs, "latentforge_base.pth").write_text(ours + "\n")  # after the venv's own packages on sys.path
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PEER_REQUIREMENTS],
                   check=True)
    stamp.write_text(json.dumps({"requirements": PEER_REQUIREMENTS}))
    return py


def run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = REPO) -> float:
    """Run `cmd` with its output in `log`; its wall time in seconds. A failure exits with
    the log's tail."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=cwd).returncode
    if code:
        raise SystemExit(f"bench_vs_diffusers: {' '.join(cmd[:5])} ... exited with {code}\n{log.read_text()[-4000:]}")
    return time.perf_counter() - t0


def lf(*argv: str, log: Path, env: dict[str, str] | None = None) -> float:
    """`latentforge ARGV` in our venv (run_logged)."""
    return run_logged([sys.executable, "-m", "latentforge.launch.cli", *argv], log, env)


def prepare(work: Path, samples: int) -> tuple[list[str], Path, Path]:
    """(our overrides, the peer's imagefolder, the pipeline export both start from)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                  sample_size=RES).save_pretrained(work / "vae")
    overrides = [f"run_root={work / 'runs'}", f"codec.path={work / 'vae'}", f"data.raw_shards={work / 'raw'}/*.tar",
                 f"data.latent_dir={work / 'latents'}", *OURS]
    lf("data", "synth", "--out", str(work / "raw"), f"--num={samples}", "--per-shard=256", f"--size={RES}",
       log=work / "synth.log")
    lf("precompute", "--preset", "tiny", *overrides, log=work / "precompute.log")
    folder = work / "imagefolder"
    folder.mkdir()
    rows = []
    for shard in sorted((work / "raw").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar if m.isfile()}
            for name, m in members.items():
                if name.endswith(".png"):
                    key = name[:-4]
                    (folder / name).write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
                    rows.append({"file_name": name, "text": tar.extractfile(members[key + ".txt"]).read().decode()})  # type: ignore[union-attr]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lf("train", "--preset", "tiny", *overrides, "run_name=init", "train.max_steps=1", "nproc=1",
       "tracking.enabled=false", log=work / "init.log")
    lf("export", str(work / "runs" / "init"), "--out", str(work / "init-export"), log=work / "export.log")
    return overrides, folder, work / "init-export"


def _env(procs: int, **extra: str) -> dict[str, str]:
    """Both sides: no inherited rank variables, and the thread split latentforge's own
    launcher uses (latentforge/spawn.py), set explicitly so the peer gets it too."""
    from latentforge.spawn import threads_per_rank

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads_per_rank(procs)), TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_ours(work: Path, overrides: list[str], procs: int, steps: int, tag: str) -> float:
    return lf("train", "--preset", "tiny", *overrides, f"run_name=ours-{tag}", f"train.max_steps={steps}",
              f"train.global_batch_size={BATCH * procs}", f"nproc={procs}", f"train.log_every={max(1, steps // 4)}",
              env=_env(procs), log=work / f"ours-{tag}.log")


def run_peer(work: Path, py: Path, folder: Path, export: Path, procs: int, steps: int, tag: str) -> float:
    out = work / f"peer-{tag}"
    args = [str(PEER_SCRIPT), f"--pretrained_model_name_or_path={export}", f"--train_data_dir={folder}",
            "--image_column=image", "--caption_column=text", f"--resolution={RES}", "--center_crop",
            f"--train_batch_size={BATCH}", f"--max_train_steps={steps}", "--learning_rate=1e-4",
            "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--output_dir={out}", "--seed=0",
            "--checkpointing_steps=1000000", "--mixed_precision=no", f"--cache_dir={work / 'hf-cache'}"]
    launch = [str(py)] if procs == 1 else [str(py), "-m", "torch.distributed.run", "--standalone",
                                           f"--nproc_per_node={procs}"]
    env = _env(procs, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(work / "hf-home"))
    elapsed = run_logged([*launch, *args], work / f"peer-{tag}.log", env, cwd=work)
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    ap.add_argument("--steps", type=int, default=320, help="optimizer steps of the long run")
    ap.add_argument("--short", type=int, default=20, help="optimizer steps of the short run")
    ap.add_argument("--repeats", type=int, default=3, help="turns (the median of each figure is reported)")
    ap.add_argument("--samples", type=int, default=1024, help="synthetic images")
    ap.add_argument("--peer-venv", default=str(REPO / ".venv-peer"), help="the peer's virtualenv (made if absent)")
    ap.add_argument("--sides", default="peer,ours", help="which sides run (peer, ours or both)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for latentforge's runs (repeatable), e.g. train.zero_stage=0")
    ap.add_argument("--dir", default=None, help="work directory (default: a new temporary one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.steps <= args.short:
        raise SystemExit("bench_vs_diffusers: --steps must exceed --short")
    sides_on = args.sides.split(",")
    if not set(sides_on) <= {"peer", "ours"}:
        raise SystemExit(f"bench_vs_diffusers: --sides takes peer and/or ours, not {args.sides}")
    check_peer_script()
    py = ensure_peer_venv(Path(args.peer_venv)) if "peer" in sides_on else Path()
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_vs_diffusers_"))
    print(f"[bench] work dir {work}", flush=True)
    load0 = os.getloadavg()[0]
    overrides, folder, export = prepare(work, args.samples)
    overrides += args.set
    procs = [int(p) for p in args.procs.split(",")]
    times: dict[tuple[str, int, int], list[float]] = {}
    for r in range(args.repeats):
        for p in procs:
            sides = ("peer", "ours") if r % 2 == 0 else ("ours", "peer")
            for side in (s for s in sides if s in sides_on):
                for steps in (args.short, args.steps):
                    tag = f"{p}p-{steps}s-{r}"
                    t = (run_peer(work, py, folder, export, p, steps, tag) if side == "peer"
                         else run_ours(work, overrides, p, steps, tag))
                    times.setdefault((side, p, steps), []).append(t)
                    print(f"[bench] turn {r + 1}: {side}, {p} process(es), {steps} steps: {t:.1f} s", flush=True)
    rep = Report(f"latentforge vs diffusers' train_text_to_image.py v0.40.0: 0.8M-parameter U-Net, 4x8x8 latents, "
                 f"{BATCH} samples per process, steady state from {args.short}- and {args.steps}-step runs, "
                 f"medians of {args.repeats}")
    for p in procs:
        rate, fixed = {}, {}
        for side in sides_on:
            t_short = statistics.median(times[(side, p, args.short)])
            t_long = statistics.median(times[(side, p, args.steps)])
            step_s = (t_long - t_short) / (args.steps - args.short)
            if step_s <= 0:
                raise SystemExit(f"bench_vs_diffusers: {side}, {p} process(es): the {args.steps}-step runs took no "
                                 f"longer than the {args.short}-step ones (run-to-run noise); raise --steps")
            rate[side] = BATCH * p / step_s
            fixed[side] = t_short - args.short * step_s
        names = {"peer": "diffusers example", "ours": "latentforge" + (f" ({' '.join(args.set)})" if args.set else "")}
        for side in sides_on:
            rep.add(f"{p} process(es): {names[side]}", rate[side], "samples/s")
        if len(sides_on) == 2:
            rep.add(f"{p} process(es): latentforge / example", rate["ours"] / rate["peer"], "x (goal >= 1.5x at 2)")
        for side in sides_on:
            rep.add(f"{p} process(es): fixed cost per run, {names[side]} (start-up, end"
                    + (", final eval)" if side == "ours" else ")"), fixed[side], "s")
    rep.add("load average (1 min) at the start", load0, "")
    rep.print(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
