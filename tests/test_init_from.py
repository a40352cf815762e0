"""model.init_from: the source syntax and the architecture taken from it; bad sources refused
by the launcher before any rank starts, one line per problem; a fine-tuning run whose step-0
weights (and EMA) are the source's bit for bit and whose first loss is the source's, not a
random model's; a stage-2 run at twice the resolution under ZeRO-3 from stage 1's run
directory, recorded in MLflow under its source; a resume on another latent set refused."""

from __future__ import annotations

import json

import pytest
import torch

from latentforge import sources
from latentforge.config import ConfigError, resolve
from latentforge.launch.cli import main


def _tiny_unet(**kw):
    from diffusers import UNet2DConditionModel

    args = dict(sample_size=8, in_channels=48, out_channels=48, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=64, attention_head_dim=(1, 2), norm_num_groups=32, use_linear_projection=True)
    args.update(kw)
    torch.manual_seed(0)
    return UNet2DConditionModel(**args)


def test_spec_names_path_checkpoint_and_weights(tmp_path):
    assert sources.parse("/runs/a@step_00002000:ema") == (sources.Path("/runs/a"), "step_00002000", "ema")
    assert sources.parse("/runs/a:raw") == (sources.Path("/runs/a"), None, "raw")
    assert sources.parse("/runs/a@latest") == (sources.Path("/runs/a"), None, None)
    with pytest.raises(ConfigError, match="model.init_from: 'step_2' after '@'"):
        sources.parse(str(tmp_path / "x@step_2"))


def test_architecture_comes_from_the_source_unless_overridden(tmp_path):
    d = tmp_path / "unet"
    _tiny_unet(block_out_channels=(64, 128), attention_head_dim=(2, 4), layers_per_block=2).save_pretrained(d)
    cfg = resolve("tiny", None, [f"model.init_from={d}"])
    m = cfg.model
    assert (m.block_out_channels, m.layers_per_block, m.attention_head_dim) == ((64, 128), 2, 32)
    assert m.down_block_types == ("CrossAttnDownBlock2D", "DownBlock2D") and m.linear_projection is True
    cfg = resolve("tiny", None, [f"model.init_from={d}", "model.layers_per_block=1"])  # the user's word wins
    assert cfg.model.layers_per_block == 1 and cfg.model.block_out_channels == (64, 128)
    # SD-1.x style: 8 heads at every level is no fixed head width
    _tiny_unet(attention_head_dim=8, block_out_channels=(64, 128)).save_pretrained(tmp_path / "sd1")
    with pytest.raises(ConfigError, match="model.init_from: .*head widths"):
        resolve("tiny", None, [f"model.init_from={tmp_path / 'sd1'}"])


def _train_refused(tiny_data, tmp_path, capsys, *overrides):
    root, base = tiny_data
    run_dir = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", *base, f"run_dir={run_dir}", "nproc=2", "tracking.enabled=false",
               *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not run_dir.exists(), err  # refused in the launcher: no rank made the run directory
    return err.splitlines()


def test_bad_sources_fail_before_any_rank_starts_one_line_each(tiny_data, tmp_path, capsys):
    lines = _train_refused(tiny_data, tmp_path, capsys, f"model.init_from={tmp_path / 'nope'}")
    assert len(lines) == 1 and "model.init_from" in lines[0] and "nope" in lines[0]

    _tiny_unet(in_channels=4, out_channels=4, cross_attention_dim=32).save_pretrained(tmp_path / "sd")
    lines = _train_refused(tiny_data, tmp_path, capsys, f"model.init_from={tmp_path / 'sd'}")
    assert len(lines) == 2, lines  # one line per mismatch, each naming it
    assert "in/out channels 4/4" in lines[0] and "48 latent channels" in lines[0]
    assert "cross_attention_dim 32" in lines[1] and "text width 64" in lines[1]

    # A U-Net without attention (no cross-attention blocks, no middle block): nothing for LoRA.
    _tiny_unet(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
               mid_block_type=None).save_pretrained(tmp_path / "noattn")
    lines = _train_refused(tiny_data, tmp_path, capsys, f"model.init_from={tmp_path / 'noattn'}", "model.lora_rank=4")
    assert len(lines) == 1 and "model.lora_rank: 4, but the U-Net has no attention projections" in lines[0], lines


def test_lora_needs_a_source():
    with pytest.raises(ConfigError, match="model.lora_rank: LoRA adapts pretrained weights"):
        resolve("tiny", None, ["model.lora_rank=4"])


# ---------------------------------------------------------------------------------------
# Runs (slow).


def first_batch_loss(run_dir, unet) -> float:
    """The trainer's step-0 loss (rank 0 of 1, micro-step 0) of `unet` on the run's first
    batch: the same batch, noise, timesteps and caption dropout as the run's first step."""
    from latentforge.config import load_resolved
    from latentforge.data import latents as lat
    from latentforge.data.loader import LatentLoader, split_parts
    from latentforge.training.diffusion import Schedule, cfg_drop, loss_fn
    from latentforge.training.loop import step_generator
    from latentforge.training.unet import unet_forward

    cfg = load_resolved(run_dir / "config.yaml")
    d = cfg.resolved_latent_dir
    manifest = lat.load_manifest(d)
    parts, _ = split_parts(manifest, cfg.data.heldout_shards)
    null_tokens, null_pooled = (torch.from_numpy(a) for a in lat.load_null_text(d))
    loader = LatentLoader(d, parts, micro_batch=cfg.train.global_batch_size, seed=cfg.train.seed, rank=0,
                          world_size=1, num_workers=cfg.data.num_workers, shapes=manifest["shapes"],
                          scale=cfg.codec.scale or 1.0)
    batch = next(iter(loader))
    gen = step_generator(cfg.train.seed, 0, 0, 0)
    text, pooled, _ = cfg_drop(batch["text"], null_tokens, cfg.diffusion.cfg_dropout, gen, pooled=batch["pooled"],
                               null_pooled=null_pooled)
    with torch.no_grad():
        return float(loss_fn(lambda x, t, c: unet_forward(unet, x, t, {k: v.float() for k, v in c.items()}),
                             batch["latents"], {"text": text, "pooled": pooled}, cfg.diffusion,
                             Schedule.from_config(cfg.diffusion), gen, mask=batch["mask"])["loss"])


@pytest.mark.slow
def test_finetune_starts_bitwise_at_a_saved_diffusers_unet(train_run, src_export):
    from conftest import SRC_OVERRIDES
    from diffusers import UNet2DConditionModel
    from test_trainer import losses

    from latentforge.training import checkpoint
    from latentforge.training.loop import build_model

    source = src_export / "unet_ema"  # a plain save_pretrained folder
    # lr 0: the one step leaves the weights as loaded; EMA without warmup (decay 0.99 from its
    # first update), so it too equals the source only if it started from the loaded weights.
    run_dir, log = train_run("ft0", *SRC_OVERRIDES, f"model.init_from={source}", "optim.lr=0", "train.max_steps=1",
                             "train.log_every=1", "ema.warmup_power=0", "tracking.enabled=false", nproc=1)
    weights, state = checkpoint.consolidated_weights(run_dir)
    src = UNet2DConditionModel.from_pretrained(source, local_files_only=True).state_dict()
    assert weights.keys() == src.keys()
    assert all(torch.equal(weights[k], src[k]) for k in src)
    assert all(torch.equal(state.ema["shadow"][k], src[k]) for k in src)
    assert state.init_from["kind"] == "unet" and state.init_from["weights_sha256"]

    # The first step's loss is the source model's on that batch, far below a random model's.
    from latentforge.config import load_resolved

    src_unet = UNet2DConditionModel.from_pretrained(source, local_files_only=True).eval()
    cfg = load_resolved(run_dir / "config.yaml")
    random_unet = build_model(cfg, state.shapes).eval()  # the trainer's seeded random initialisation
    logged = losses(log)[1]
    expected, scratch = first_batch_loss(run_dir, src_unet), first_batch_loss(run_dir, random_unet)
    print(f"step-1 loss: logged {logged:.4f}, source {expected:.4f}, random init {scratch:.4f}")
    assert abs(logged - expected) < 1e-3 and logged < 0.5 * scratch


@pytest.fixture(scope="module")
def latents_64(tiny_data):
    """The tiny data's raw shards precomputed again at 64 px: a new latent set for stage 2."""
    from latentforge.data import precompute

    root, base = tiny_data
    cfg = resolve("tiny", None, [*base, "data.resolution=64", f"data.latent_dir={root / 'latents-64'}"])
    precompute.run(cfg)
    return root / "latents-64"


@pytest.mark.slow
def test_stage_two_at_a_higher_resolution_from_stage_one(train_run, src_run, latents_64):
    from conftest import SRC_OVERRIDES
    from mlflow.tracking import MlflowClient

    from latentforge.training import checkpoint

    stage1, _ = src_run
    s1_state = checkpoint.client_state(stage1)
    run_dir, log = train_run("stage2", *SRC_OVERRIDES, f"model.init_from={stage1}", "data.resolution=64",
                             f"data.latent_dir={latents_64}", "train.zero_stage=3", "train.max_steps=4",
                             "train.log_every=1", "train.ckpt_every_steps=4", nproc=2)
    assert f"step-0 weights from {stage1}@{checkpoint.latest_tag(stage1)} (run, ema weights)" in log
    state = checkpoint.client_state(run_dir)
    assert state.step == 4 and state.shapes["latent"] == [48, 16, 16] and s1_state.shapes["latent"] == [48, 8, 8]
    assert state.init_from["mlflow_run_id"] == s1_state.mlflow_run_id is not None
    # Stage 1's EMA weights, written once as a diffusers U-Net the ranks read.
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(run_dir / "init_from" / "unet").state_dict()
    assert all(torch.equal(loaded[k], s1_state.ema["shadow"][k]) for k in s1_state.ema["shadow"])
    # A fresh optimizer and schedule: warmup from step 0 (lr 3e-3 * (s + 1) / 50).
    assert "step 1/4 loss" in log and "lr 6.00e-05" in log

    root = stage1.parent
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(state.mlflow_run_id)
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == s1_state.mlflow_run_id == tags["init_from.mlflow_run_id"]
    assert tags["init_from.path"] == str(stage1.resolve()) and tags["init_from.weights"] == "ema"
    assert tags["init_from.checkpoint"] == checkpoint.latest_tag(stage1) and len(tags["init_from.weights_sha256"]) == 64


@pytest.mark.slow
def test_resume_refuses_a_changed_latent_set(tiny_data, train_run, tmp_path, capsys):
    from latentforge.data import precompute

    root, base = tiny_data
    run_dir, _ = train_run("zero2", "train.max_steps=16", "train.log_every=4", "train.ckpt_every_steps=4",
                           "train.keep_last=10", "train.zero_stage=2")  # test_trainer's ZeRO-2 run
    # The same raw shards and encoders (so the same manifest identity), cut into other parts.
    other = tmp_path / "latents-32"
    precompute.run(resolve("tiny", None, [*base, "data.latent_samples_per_shard=32", f"data.latent_dir={other}"]))
    rc = main(["train", "--preset", "tiny", *base, f"run_name={run_dir.name}", "nproc=2", "train.max_steps=20",
               "tracking.enabled=false", f"data.latent_dir={other}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert "data.latent_dir" in lines[0] and "latent set" in lines[0] and str(other) in lines[0]
    from latentforge.training import checkpoint

    assert checkpoint.latest_tag(run_dir) == "step_00000016"


def test_loader_refuses_a_position_of_another_latent_set(tmp_path):
    from latentforge.data import latents as lat
    from latentforge.data.loader import LatentLoader

    shapes = {"latent": [4, 2, 2], "text": [3, 8], "pooled": [8]}
    m = lat.write_random_dataset(tmp_path, [6, 6], shapes)
    a = lat.dataset_id(tmp_path, m, m["parts"])
    b = lat.dataset_id(tmp_path, m, m["parts"][:1])
    kw = dict(micro_batch=2, seed=0, rank=0, world_size=1, shapes=shapes)
    loader = LatentLoader(tmp_path, m["parts"], dataset=a, **kw)
    next(iter(loader))
    pos = loader.state_dict()
    assert pos["dataset"] == a and a != b
    LatentLoader(tmp_path, m["parts"], position=pos, dataset=a, **kw)  # the same set resumes
    with pytest.raises(ValueError, match="data.latent_dir: the saved loader position belongs to latent set"):
        LatentLoader(tmp_path, m["parts"][:1], position=pos, dataset=b, **kw)


def test_run_and_export_sources_are_located(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "config.yaml").write_text("preset: tiny\n")
    with pytest.raises(ConfigError, match="has no complete checkpoint"):
        sources.locate(str(run))
    (run / "checkpoints" / "step_00000004" / "COMPLETE").write_text("{}")
    src = sources.locate(f"{run}:raw")
    assert (src.kind, src.tag, src.weights) == ("run", "step_00000004", "raw")
    exp = tmp_path / "export"
    exp.mkdir()
    (exp / sources.EXPORT_META).write_text(json.dumps({"unets": {"raw": "unet_raw", "ema": "unet"}}))
    src = sources.locate(str(exp))
    assert (src.kind, src.weights, src.unet_dir) == ("export", "ema", exp / "unet")
    with pytest.raises(ConfigError, match="is an export"):
        sources.locate(f"{exp}@step_00000004")
