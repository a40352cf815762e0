"""LoRA (model.lora_rank) on a model started with model.init_from, under ZeRO stages 1-3 (ZeRO-0
runs in test_pipeline_export.py): the base weights stay the source's bit for bit, every
adapter trains, the optimizer holds state for the adapters alone, and a LoRA run resumes
from its checkpoint as a full run does. The export's adapter file and merged U-Net give
the same images."""

from __future__ import annotations

import pytest
import torch
from conftest import SRC_OVERRIDES
from test_trainer import tensors

pytestmark = pytest.mark.slow

LORA = (*SRC_OVERRIDES, "model.lora_rank=4", "optim.lr=1e-2", "optim.warmup_steps=0", "train.global_batch_size=16",
        "train.max_steps=2", "train.log_every=1", "train.ckpt_every_steps=2", "tracking.enabled=false")


def adam_elements(tag_dir) -> int:
    """Elements of Adam's first moment over every file of a checkpoint (all ranks)."""
    total = 0
    for f in sorted(tag_dir.glob("*.pt")):
        found = tensors(torch.load(f, map_location="cpu", weights_only=False), f.name)
        total += sum(t.numel() for k, t in found.items() if k.endswith("/exp_avg"))
    return total


@pytest.mark.parametrize("stage,nproc", [(1, 1), (2, 1), (3, 2)])
def test_only_the_adapters_train(train_run, src_export, stage, nproc):
    from diffusers import UNet2DConditionModel

    from latentforge.training import checkpoint

    run_dir, log = train_run(f"lora{stage}", *LORA, f"model.init_from={src_export}", f"train.zero_stage={stage}",
                             nproc=nproc)
    weights, state = checkpoint.consolidated_weights(run_dir)
    src = UNet2DConditionModel.from_pretrained(src_export / "unet_ema", local_files_only=True).state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in weights.items() if ".lora_" not in k}
    assert base.keys() == src.keys() and all(torch.equal(base[k], src[k]) for k in src)
    adapters = {k: v for k, v in weights.items() if ".lora_" in k}
    ups = [k for k in adapters if ".lora_B." in k]
    assert len(ups) == 56 and all(adapters[k].abs().sum() > 0 for k in ups)  # B starts at zero: every one moved
    assert set(state.ema["shadow"]) == set(adapters)  # the EMA follows what trains
    n_adapter = sum(v.numel() for v in adapters.values())
    n_opt = adam_elements(run_dir / "checkpoints" / checkpoint.latest_tag(run_dir))
    print(f"ZeRO-{stage}: Adam state for {n_opt} elements; adapters {n_adapter}, base {sum(v.numel() for v in src.values())}")
    assert n_adapter <= n_opt <= n_adapter + 64 * nproc  # ZeRO may pad each rank's partition


def test_lora_run_resumes(train_run, src_export, tmp_path):
    import subprocess
    import sys

    from latentforge.training import checkpoint

    run_dir, _ = train_run("lora2", *LORA, f"model.init_from={src_export}", "train.zero_stage=2", nproc=1)
    from conftest import TINY_OVERRIDES

    root = run_dir.parent
    out = subprocess.run([sys.executable, "-m", "latentforge.launch.cli", "train", "--preset", "tiny",
                          f"run_root={root}", *TINY_OVERRIDES, f"run_name={run_dir.name}", "nproc=1",
                          "tracking.enabled=false", *LORA, f"model.init_from={src_export}", "train.zero_stage=2",
                          "train.max_steps=4"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} at step 2" in out.stdout
    assert "step-0 weights from" not in out.stdout  # the checkpoint wins over the source
    w2, _ = checkpoint.consolidated_weights(run_dir, "step_00000002")
    w4, _ = checkpoint.consolidated_weights(run_dir, "step_00000004")
    assert all(torch.equal(w2[k], w4[k]) for k in w2 if ".lora_" not in k)
    assert any(not torch.equal(w2[k], w4[k]) for k in w2 if ".lora_B." in k)


def test_lora_export_adapters_and_merged_unet_agree(train_run, src_export, tmp_path):
    import json

    from latentforge.eval.sample import sample_images
    from latentforge.launch.cli import main

    run_dir, _ = train_run("lora2", *LORA, f"model.init_from={src_export}", "train.zero_stage=2", nproc=1)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "lora")]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    meta = json.loads((tmp_path / "lora" / "latentforge.json").read_text())
    assert meta["lora"]["files"] == {"ema": "pytorch_lora_weights.safetensors",
                                     "raw": "lora_raw/pytorch_lora_weights.safetensors"}
    assert meta["unets"] == {"base": "unet"} and meta["pipeline"] is False and "pixel" in meta["pipeline_reason"]
    prompts = ["a large red circle in the center on a white background"]
    kw = dict(n=2, steps=4, cfg_scale=3.0, seed=3)
    a, b = sample_images(tmp_path / "lora", prompts, **kw), sample_images(tmp_path / "merged", prompts, **kw)
    base = sample_images(src_export, prompts, **kw)
    assert (a - b).abs().max() < 1e-4  # the same adapters, folded in at export or at load time
    assert (a - base).abs().max() > 1e-2  # and they changed the model
