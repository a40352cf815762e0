"""Shared pytest set-up. Tests run on 2 CPU cores: keep each process to one thread."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from slurm_cluster import slurm_cluster, slurm_env  # noqa: E402,F401  (fixtures: a real one-node SLURM cluster)


# ---------------------------------------------------------------------------------------
# A tiny latent dataset shared by the end-to-end tests: synthetic shapes -> precompute.

import pytest  # noqa: E402

# Small enough for CPU tests: 32 px images, pixel codec 4x4 -> 48 x 8 x 8 latents,
# a (32, 64) U-Net, the tiny random open_clip.
TINY_OVERRIDES = [
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
    from latentforge.data import precompute
    from latentforge.launch.cli import ensure_synth
    from latentforge.training.config import resolve

    root = tmp_path_factory.mktemp("tiny_data")
    overrides = [f"run_root={root}", *TINY_OVERRIDES]
    cfg = resolve("tiny", None, overrides)
    ensure_synth(cfg)
    precompute.run(cfg)
    return root, overrides
