"""A run on VAE latents exports as a whole diffusers StableDiffusionPipeline: it loads with
`from_pretrained(dir, local_files_only=True)` and its images equal `latentforge sample`'s for
the same prompts, noise, sampler (DDIM) and steps; a LoRA run's adapter file loads into it
with `load_lora_weights` and gives the LoRA model's images. The open_clip -> CLIPTextModel
conversion keeps the penultimate layer and the tokenizer's ids.

Tolerance for "equal": 1e-4 on images in [-1, 1] (observed: a few 1e-6). Both sides compute
in fp32 with the same weights; they differ in kernels and op order (transformers' attention
against open_clip's nn.MultiheadAttention, the batch order [uncond; cond] against [cond;
uncond]) and in the scheduler's coefficients (diffusers float32, latentforge float64): each
is ~1e-7 relative, grown through ~20 layers, 4 steps and a guidance scale of 3 to ~1e-6.
1e-4 keeps two orders of margin and stays 40x below one uint8 level (2/255): the pictures
are the same pictures. A wrong scheduler, prediction type, text layer, latent scale or
guidance convention moves images by 1e-2 or more.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

PROMPTS = ["a large red circle in the center on a white background",
           "a small blue square at the top on a gray background"]
TOL = 1e-4


def test_text_tower_converts_with_its_penultimate_layer_and_tokens():
    from latentforge.config import TextConfig
    from latentforge.data.hf_text import clip_text_model, clip_tokenizer
    from latentforge.data.text import build_text_encoder

    for layer in ("penultimate", "last"):
        enc = build_text_encoder(TextConfig(model="tiny", layer=layer))
        model, tok = clip_text_model(enc), clip_tokenizer(enc)
        assert model.config.num_hidden_layers == 3 - (layer == "penultimate")
        prompts = [*PROMPTS, ""]
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ids, enc.tokenize(prompts))
        with torch.no_grad():
            hidden = model(ids)[0]  # last_hidden_state: what StableDiffusionPipeline uses (clip_skip None)
        # fp32, 3 layers of width 64: ~1e-6 apart; a missing or extra layer differs by O(1).
        assert (hidden - enc.encode(prompts).tokens).abs().max() < 1e-4


@pytest.fixture(scope="module")
def vae_data(tmp_path_factory):
    """(run_root, overrides): the tiny data encoded with a tiny random AutoencoderKL (4 x 16 x 16)."""
    from conftest import TINY_OVERRIDES
    from diffusers import AutoencoderKL

    from latentforge.config import resolve
    from latentforge.data import precompute
    from latentforge.data.synth import ensure_synth

    root = tmp_path_factory.mktemp("vae_data")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                  sample_size=32).save_pretrained(root / "vae")
    # v prediction with zero terminal SNR: the scheduler must carry both.
    overrides = [f"run_root={root}", *TINY_OVERRIDES, "codec.kind=vae", f"codec.path={root / 'vae'}",
                 "diffusion.prediction=v", "diffusion.zero_terminal_snr=true", "tracking.enabled=false",
                 "train.log_every=1", "nproc=1"]
    cfg = resolve("tiny", None, overrides)
    ensure_synth(cfg)
    precompute.run(cfg)
    return root, overrides


def _train_and_export(vae_data, name, *extra, export_args=()):
    from latentforge.launch.cli import main

    root, overrides = vae_data
    out = subprocess.run([sys.executable, "-m", "latentforge.launch.cli", "train", "--preset", "tiny", *overrides,
                          f"run_name={name}", *extra], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert main(["export", str(root / name), "--out", str(root / f"{name}-export"), *export_args]) == 0
    return root / f"{name}-export"


@pytest.fixture(scope="module")
def pipeline_export(vae_data):
    return _train_and_export(vae_data, "v1", "train.max_steps=4")


def _pipeline_images(pipe, steps=4, cfg_scale=3.0, seed=5):
    from latentforge.eval.images import noise_for

    lat = torch.stack([noise_for(seed, i, 0, (4, 16, 16)) for i in range(len(PROMPTS))])
    out = pipe(PROMPTS, latents=lat, num_inference_steps=steps, guidance_scale=cfg_scale, output_type="pt",
               height=32, width=32).images  # (N, 3, H, W) in [0, 1]
    return out * 2 - 1


@pytest.mark.slow
def test_pipeline_export_loads_in_diffusers_and_matches_latentforge_sample(pipeline_export):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from latentforge.eval.sample import sample_images

    meta = json.loads((pipeline_export / "latentforge.json").read_text())
    assert meta["pipeline"] is True and meta["unets"] == {"ema": "unet", "raw": "unet_raw"}
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_export, local_files_only=True)
    s = pipe.scheduler
    assert isinstance(s, DDIMScheduler) and s.config.prediction_type == "v_prediction"
    assert s.config.rescale_betas_zero_snr and s.config.timestep_spacing == "trailing"
    assert float(s.alphas_cumprod[-1]) == 0.0 and pipe.vae.config.scaling_factor == meta["scale"]
    raw = UNet2DConditionModel.from_pretrained(pipeline_export / "unet_raw", local_files_only=True)
    assert any(not torch.equal(a, b) for a, b in zip(raw.parameters(), pipe.unet.parameters()))  # EMA != raw

    ours = sample_images(pipeline_export, PROMPTS, n=1, steps=4, cfg_scale=3.0, sampler="ddim", seed=5)
    theirs = _pipeline_images(pipe)
    diff = (theirs - ours).abs()
    print(f"pipeline vs latentforge sample: max {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() < TOL
    assert ours.std() > 0.01  # not a blank image that would match anything


@pytest.mark.slow
def test_lora_weights_load_into_the_pipeline(vae_data, pipeline_export):
    """ZeRO-0 LoRA on the pipeline export; pipeline.load_lora_weights(export) gives its images."""
    from diffusers import StableDiffusionPipeline

    from latentforge.eval.sample import sample_images

    lora = _train_and_export(vae_data, "vlora", f"model.init_from={pipeline_export}", "model.lora_rank=4",
                             "train.zero_stage=0", "train.max_steps=3", "optim.lr=1e-2")
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    ours = sample_images(lora, PROMPTS, n=1, steps=4, cfg_scale=3.0, seed=5)
    base = sample_images(pipeline_export, PROMPTS, n=1, steps=4, cfg_scale=3.0, seed=5)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_export, local_files_only=True)
    pipe.load_lora_weights(lora)
    theirs = _pipeline_images(pipe)
    assert (theirs - ours).abs().max() < TOL
    assert (ours - base).abs().max() > 1e-2  # the adapters matter
