"""Shared pytest set-up. Tests run on 2 CPU cores: keep each process to one thread."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

# ---------------------------------------------------------------------------------------
# Launcher environments faked by tests (tests/test_env.py, tests/test_gpu_paths.py):
# everything any launcher may have left in the environment of the process running pytest,
# and what latentforge exports itself.
LAUNCH_PREFIXES = ("SLURM_", "SUBMITIT_", "TORCHELASTIC_")
LAUNCH_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "NODE_RANK", "GROUP_RANK",
                "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES",
                "LATENTFORGE_NODE_LOCAL_RANK")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch):
    """monkeypatch, with every launcher variable removed from os.environ for the test. The
    whole environment is put back afterwards: the code under test exports variables itself
    (env.apply, engine.bind_device_env), which monkeypatch would not undo."""
    saved = dict(os.environ)
    for k in list(os.environ):
        if k in LAUNCH_NAMES or k.startswith(LAUNCH_PREFIXES):
            monkeypatch.delenv(k)
    yield monkeypatch
    monkeypatch.undo()  # first, or its own undo would bring back values it recorded mid-test
    os.environ.clear()
    os.environ.update(saved)


# ---------------------------------------------------------------------------------------
# A tiny latent dataset shared by the end-to-end tests: synthetic shapes -> precompute.
from slurm_cluster import slurm_cluster, slurm_env  # noqa: E402,F401  (fixtures: a real one-node SLURM cluster)
from slurm_multinode import slurm_multinode  # noqa: E402,F401  (fixture: several SLURM nodes in network namespaces)

# Small enough for CPU tests: 32 px images, the tiny preset's pixel codec,
# a (32, 64) U-Net, the tiny random open_clip. The tests train the eps objective (the
# default everywhere but the tiny preset, which predicts x0 for the demo's sample quality).
TINY_OVERRIDES = [
    "diffusion.prediction=eps", "diffusion.zero_terminal_snr=false",
    "synth.num_samples=256", "synth.samples_per_shard=64", "synth.image_size=32",
    "data.latent_samples_per_shard=64", "data.num_workers=1", "data.heldout_shards=1",
    "model.block_out_channels=[32, 64]", "model.attention_head_dim=32",
    "train.global_batch_size=16", "train.log_every=5", "train.ckpt_every_steps=10",
    "optim.lr=1e-3", "optim.warmup_steps=5",
    "eval.every_steps=0", "eval.num_prompts=2", "eval.images_per_prompt=1", "eval.steps=4",
    "eval.heldout_samples=16", "eval.heldout_buckets=2",
    "tracking.system_metrics=false",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(run_root, overrides): synthetic raw shards and their latents, made once per session."""
    from latentforge.config import resolve
    from latentforge.data import precompute
    from latentforge.data.synth import ensure_synth

    root = tmp_path_factory.mktemp("tiny_data")
    overrides = [f"run_root={root}", *TINY_OVERRIDES]
    cfg = resolve("tiny", None, overrides)
    ensure_synth(cfg)
    precompute.run(cfg)
    return root, overrides


# ---------------------------------------------------------------------------------------
# Ranks started directly, as torchrun or SLURM would (RANK/WORLD_SIZE/MASTER_* in the
# environment), not through latentforge/spawn.py: tests can SIGKILL one rank and watch the others,
# and can run a test-only preamble (monkeypatches) in every rank before the CLI.


@pytest.fixture(scope="session")
def start_ranks():
    """start(argv, nproc, log_dir, preamble="", env=None) -> [Popen]: `latentforge ARGV` as
    `nproc` ranks; rank r writes stdout and stderr to log_dir/rank{r}.log."""
    import socket
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    def start(argv, nproc, log_dir, preamble="", env=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        script = (textwrap.dedent(preamble) + "\nimport sys\nfrom latentforge.launch.cli import main\n"
                  "sys.exit(main(sys.argv[1:]))\n")
        procs = []
        for r in range(nproc):
            e = dict(os.environ, **(env or {}), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                     LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     OMP_NUM_THREADS="1")
            with open(Path(log_dir) / f"rank{r}.log", "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-c", script, *argv], env=e, stdout=log,
                                              stderr=subprocess.STDOUT))
        return procs

    return start


@pytest.fixture(scope="session")
def tiny_eval_run(tiny_data):
    """(run_root, run_dir, overrides, stdout): a 10-step 1-rank training run on tiny_data
    with periodic eval at steps 5 and 10, FID on 4 held-out captions (random Inception,
    random tiny CLIP). Shared by tests/test_evaluate.py and tests/test_eval_standalone.py.

    `latentforge train` runs in a child process, through the CLI's own main(): in this
    process DeepSpeed would leave a process group, RANK/WORLD_SIZE in os.environ (which
    would make later `nproc=2` runs think they are already launched) and signal handlers.
    """
    import subprocess
    import sys

    root, overrides = tiny_data
    args = [sys.executable, "-m", "latentforge.launch.cli", "train", "--preset", "tiny", *overrides,
            "run_name=evalrun", "nproc=1", "train.max_steps=10", "eval.every_steps=5", "eval.fid_num_images=4"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    return root, root / "evalrun", overrides, proc.stdout


@pytest.fixture(scope="session")
def train_run(tiny_data):
    """train_run(name, *overrides, nproc=2) -> (run_dir, log text): `latentforge train` on the
    tiny data in a subprocess (through latentforge/spawn.py), once per session for each distinct
    (name, overrides, nproc), so test files share runs. Fails the test if the run fails."""
    import hashlib
    import subprocess
    import sys

    root, base = tiny_data
    done = {}

    def run(name, *overrides, nproc=2):
        key = hashlib.sha256(repr((name, overrides, nproc)).encode()).hexdigest()[:8]
        if key not in done:
            run_name = f"{name}-{key}"
            log = root / f"{run_name}.log"
            with open(log, "w") as f:
                rc = subprocess.run([sys.executable, "-m", "latentforge.launch.cli", "train", "--preset", "tiny",
                                     *base, f"run_name={run_name}", f"nproc={nproc}", "tracking.enabled=false",
                                     *overrides], stdout=f, stderr=subprocess.STDOUT).returncode
            assert rc == 0, f"run {run_name} failed with exit code {rc}:\n{log.read_text()[-4000:]}"
            done[key] = (root / run_name, log.read_text())
        return done[key]

    return run


# ---------------------------------------------------------------------------------------
# A briefly trained source model for fine-tuning, stages, LoRA and inpainting tests: the
# tiny preset's own x0 objective (flat shapes are quick to learn), one rank, MLflow on.
SRC_OVERRIDES = ("diffusion.prediction=sample", "diffusion.zero_terminal_snr=true", "optim.lr=3e-3",
                 "optim.warmup_steps=50", "optim.decay=cosine", "optim.min_lr_ratio=0.1",
                 "train.global_batch_size=64", "train.max_steps=100", "train.ckpt_every_steps=50",
                 "train.log_every=25", "tracking.enabled=true")


@pytest.fixture(scope="session")
def src_run(train_run):
    """(run_dir, log): the source run (SRC_OVERRIDES on tiny_data)."""
    return train_run("src", *SRC_OVERRIDES, nproc=1)


@pytest.fixture(scope="session")
def src_export(src_run, tmp_path_factory):
    """A `latentforge export` of src_run (pixel codec: unet/ raw, unet_ema/ EMA)."""
    from latentforge.launch.cli import main

    out = tmp_path_factory.mktemp("src_export") / "model"
    assert main(["export", str(src_run[0]), "--out", str(out)]) == 0
    return out
