"""A short 2-rank training run on web-scale data: two weighted sources of non-square
images with metadata filters and two captions, aspect-ratio buckets and SD-XL size/crop
micro-conditioning; then export and sampling at a non-square size."""

from __future__ import annotations

import json

import pytest

from latentforge.launch.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from latentforge.data import synth

    root = tmp_path_factory.mktemp("web")
    synth.write_shards(root / "rawA", 96, 32, 32, seed=0, max_aspect=2.5, captions=2, metadata=True)
    synth.write_shards(root / "rawB", 48, 16, 32, seed=1, max_aspect=2.5, captions=2, metadata=True)
    ov = [f"run_root={root}", "diffusion.prediction=eps", "diffusion.zero_terminal_snr=false",
          f"data.sources=[{{name: web, raw_shards: '{root}/rawA/*.tar', weight: 1}}, "
          f"{{name: curated, raw_shards: '{root}/rawB/*.tar', weight: 1}}]",
          "data.bucket_max_ratio=2", "data.caption_fields=[captions]", "data.caption_weights=[1, 1]",
          "data.filter_min_aesthetic=3.5", "data.filter_max_unsafe=0.95", "data.latent_samples_per_shard=16",
          "data.num_workers=1", "data.precompute_workers=0", "model.block_out_channels=[32, 64]",
          "model.micro_conditioning=true", "model.micro_conditioning_dim=16", "train.global_batch_size=8",
          "train.log_every=5", "train.ckpt_every_steps=10", "optim.lr=1e-3", "optim.warmup_steps=5",
          "eval.every_steps=0", "eval.num_prompts=2", "eval.images_per_prompt=1", "eval.steps=4",
          "eval.heldout_samples=16", "eval.heldout_buckets=2", "eval.sample_size=[24, 40]",
          "eval.fid_num_images=6", "eval.fid_batch_size=4", "tracking.system_metrics=false"]
    assert main(["precompute", "--preset", "tiny", *ov]) == 0
    assert main(["train", "--preset", "tiny", *ov, "run_name=web", "nproc=2", "train.max_steps=20"]) == 0
    return root, root / "web"


def test_metrics_per_source_padding_and_loss(run):
    from mlflow.tracking import MlflowClient

    root, run_dir = run
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("latentforge")
    (r,) = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'web'")

    def last(name):
        return max(client.get_metric_history(r.info.run_id, name), key=lambda m: m.step).value

    seen = last("train/samples_seen")  # real samples: 20 steps x 8 rows, less the bucket schedule's padding rows
    assert last("train/samples_seen/web") + last("train/samples_seen/curated") == seen
    assert 160 * (1 - last("train/padding_frac")) - 8 <= seen < 160 and 0 < last("train/padding_frac") < 0.2
    loss = [m.value for m in sorted(client.get_metric_history(r.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(loss) == 4 and loss[-1] < loss[0], loss
    for name in ("eval/loss_t250", "eval/fid_randinit", "eval/shape_adherence"):
        assert client.get_metric_history(r.info.run_id, name), name
    protocol = json.loads(sorted((run_dir / "eval").glob("protocol_step_*.json"))[-1].read_text())
    assert protocol["grid"]["time_ids"] == [24.0, 40.0, 0.0, 0.0, 24.0, 40.0]


def test_checkpoint_export_and_sampling_at_a_bucket_size(run, tmp_path):
    from PIL import Image

    from latentforge.eval.sample import sample_from_export
    from latentforge.training import checkpoint

    root, run_dir = run
    _, state = checkpoint.consolidated_weights(run_dir, checkpoint.latest_tag(run_dir))
    assert sum(state.samples_by_source.values()) == state.samples_seen > 0
    assert set(state.samples_by_source) == {"web", "curated"}
    assert state.loader["version"] == 2 and len(state.loader["starts"]) == 2
    # The position records the training set: one id over both sources' latents.
    from latentforge.config import load_resolved
    from latentforge.data.sources import training_set_id

    assert state.loader["dataset"] and state.loader["dataset"] == training_set_id(load_resolved(run_dir / "config.yaml"))
    assert {tuple(b["size"]) for b in state.buckets} <= {(40, 24), (32, 32), (24, 40)}
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    meta = json.loads((tmp_path / "export" / "latentforge.json").read_text())
    assert meta["micro_conditioning"] is True and meta["buckets"] == state.buckets and meta["resolution"] == 32
    out = sample_from_export(tmp_path / "export", ["a large red circle in the center on a white background"],
                             tmp_path / "wide.png", n=2, steps=3, size=(24, 40))
    wide = Image.open(out).size
    out = sample_from_export(tmp_path / "export", ["a large red circle in the center on a white background"],
                             tmp_path / "square.png", n=2, steps=3)
    square = Image.open(out).size
    assert wide[1] == square[1] and wide[0] - square[0] == 2 * (160 - 96)  # 2 cells a row, 96 px high, 40:24 wide
