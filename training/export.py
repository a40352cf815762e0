"""Export a run: a diffusers StableDiffusionPipeline when the codec is a VAE, else the
diffusers-format U-Nets; LoRA runs also get diffusers-loadable adapter weights.

    EXPORT/ (codec.kind = vae: `StableDiffusionPipeline.from_pretrained(EXPORT)` loads it)
      model_index.json   the pipeline's components
      unet/              the EMA U-Net (the raw one when the run kept no EMA)
      unet_raw/          the raw (consolidated) U-Net, beside it
      vae/               the run's AutoencoderKL, scaling_factor = the run's latent scale
      text_encoder/      the open_clip text tower as transformers' CLIPTextModel (penultimate
      tokenizer/         layer kept: data/hf_text.py) and its CLIPTokenizer
      scheduler/         DDIM over the run's schedule (eps/v/sample, zero terminal SNR) with
                         "trailing" timesteps: latentforge's own DDIM; flow matching: DPM-Solver++
                         with flow sigmas (StableDiffusionPipeline calls scale_model_input, which
                         FlowMatchEulerDiscreteScheduler lacks)

    EXPORT/ (codec.kind = pixel, or a VAE run the pipeline cannot represent)
      unet/              UNet2DConditionModel.save_pretrained of the raw weights
      unet_ema/          the same architecture with the EMA weights (if the run kept an EMA)

    both
      config.yaml        the run's resolved config
      null_text.npz      the empty caption's embedding (the unconditional input for CFG)
      latentforge.json   what a sampler needs besides the U-Net (text encoder, codec, scale,
                         shift, diffusion settings, the sizes it was trained at ("buckets"),
                         whether it takes SD-XL's size/crop micro-conditioning), which folder
                         holds which U-Net ("unets"), whether it is a pipeline and if not why
                         ("pipeline_reason"), LoRA, and where the weights came from

    LoRA runs (model.lora_rank > 0)
      pytorch_lora_weights.safetensors       the adapters (EMA if kept) in diffusers' layout:
                                             pipeline.load_lora_weights(EXPORT)
      lora_raw/pytorch_lora_weights.safetensors   the raw adapters, when the EMA ones are above
      U-Net folders hold the base (frozen) U-Net; with merge_lora (--merge-lora) the adapted
      U-Nets with the adapters folded in instead.

The consolidation reads DeepSpeed's sharded files directly (zero_to_fp32), so export
runs in one process with no process group, from any ZeRO stage.

EXPORT is refused when it is, contains or lies inside a run, checkpoint or latent
directory or an MLflow store, or is a non-empty directory other than an earlier export
(latentforge/outputs.py). An earlier export is replaced atomically: the new one is written
to a temporary sibling, the old one moved aside, the new one moved in, the old one
deleted; the next export (or a reader of the export) puts an aside copy back if a crash
left nothing under the name.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge import config as config_mod
from latentforge import outputs
from latentforge.fileio import write_json
from latentforge.hashing import sha256_files
from latentforge.log import get_logger
from latentforge.training import checkpoint
from latentforge.training.state import TrainState, overlay_ema
from latentforge.training.unet import lora_state_dict, merge_lora, unet_from_weights

log = get_logger("export")
META = "latentforge.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


def is_export(path: Path) -> bool:
    return (Path(path) / META).is_file()


def check_out(out: Path, cfg: config_mod.Config) -> None:
    """Refuse an EXPORT path that would destroy work (one line), after putting back an
    earlier export that an interrupted replacement left aside."""
    recovered = outputs.recover_dir(out, is_export)
    if recovered:
        log.info(f"{out}: {recovered}")
    outputs.check_output_dir(out, command="export", metadata=META, is_earlier_output=is_export,
                             stores=outputs.store_paths(cfg.resolved_tracking_uri))


def pipeline_reason(cfg: config_mod.Config, state: TrainState) -> str | None:
    """Why this run cannot be a StableDiffusionPipeline, or None when it can."""
    if cfg.codec.kind != "vae":
        return (f"codec.kind is {cfg.codec.kind!r}: StableDiffusionPipeline decodes latents with an AutoencoderKL "
                f"(its vae/ folder), and the pixel codec is a parameter-free pixel_unshuffle, not an autoencoder")
    if state.shift:
        return (f"the latents are shifted (codec.shift {state.shift}); StableDiffusionPipeline decodes "
                f"latents / scaling_factor and applies no shift")
    if cfg.model.pooled_text_conditioning:
        return ("model.pooled_text_conditioning: the U-Net takes the pooled text embedding as class labels, which "
                "StableDiffusionPipeline does not pass")
    if cfg.model.micro_conditioning:
        return ("model.micro_conditioning: the U-Net takes SD-XL's size/crop time_ids with the pooled text "
                "embedding, which StableDiffusionPipeline does not pass (`latentforge sample --size` does)")
    return None


def pipeline_scheduler(d: config_mod.DiffusionConfig) -> Any:
    """The diffusers scheduler a pipeline export samples with, matching the training objective."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if d.objective == "flow":
        return DPMSolverMultistepScheduler(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=1.0,
                                           prediction_type="flow_prediction", algorithm_type="dpmsolver++",
                                           solver_order=2, lower_order_final=True, final_sigmas_type="zero")
    schedule = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}[d.schedule]
    return DDIMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                         beta_schedule=schedule, prediction_type={"eps": "epsilon", "v": "v_prediction",
                                                                  "sample": "sample"}[d.prediction],
                         rescale_betas_zero_snr=d.zero_terminal_snr, timestep_spacing="trailing",
                         set_alpha_to_one=True, steps_offset=0, clip_sample=False)


def _unets(cfg: config_mod.Config, state: TrainState, weights: dict[str, torch.Tensor], where: str,
           merge: bool) -> tuple[dict[str, torch.nn.Module], dict[str, dict[str, torch.Tensor]]]:
    """({"raw": U-Net, "ema": U-Net (if kept)} or, for LoRA not merged, {"base": U-Net};
    LoRA adapters {"raw": ..., "ema": ...} in diffusers' layout, or {})."""
    unets: dict[str, torch.nn.Module] = {}
    loras: dict[str, dict[str, torch.Tensor]] = {}
    for name, shadow in (("raw", None), *((("ema", state.ema["shadow"]),) if state.ema else ())):
        u = unet_from_weights(cfg.model, state.shapes, weights, where)
        if shadow is not None:
            overlay_ema(u, shadow)  # a LoRA run's EMA covers its adapters only
        if cfg.model.lora_rank:
            loras[name] = lora_state_dict(u)
            if not merge:
                continue
            u = merge_lora(u)
        unets[name] = u
    if cfg.model.lora_rank and not merge:  # the frozen base U-Net, as peft found it
        base = {k.replace(".base_layer.", "."): v for k, v in weights.items() if ".lora_" not in k}
        unets["base"] = unet_from_weights(dataclasses.replace(cfg.model, lora_rank=0), state.shapes, base, where)
    return unets, loras


def export(run_dir: str | Path, out: str | Path, tag: str | None = None, merge_lora: bool = False) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    cfg = config_mod.load_resolved(run_dir / "config.yaml")
    check_out(out, cfg)
    tag = tag or checkpoint.latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to export")
    where = run_dir / checkpoint.CKPT / tag
    weights, state = checkpoint.consolidated_weights(run_dir, tag)  # checked against COMPLETE first
    if not state.shapes:
        raise ValueError(f"{where}: checkpoint lacks the latent shapes")
    null_tokens, null_pooled = state.null_embeddings()
    reason = pipeline_reason(cfg, state)
    unets, loras = _unets(cfg, state, weights, str(where), merge_lora)
    del weights
    tmp = outputs.temp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:

        # Which folder holds which U-Net: the pipeline's own unet/ is the one it samples with.
        if "base" in unets:
            folders = {"base": "unet"}
        elif reason is None:
            folders = {("ema" if "ema" in unets else "raw"): "unet", **({"raw": "unet_raw"} if "ema" in unets else {})}
        else:
            folders = {"raw": "unet", **({"ema": "unet_ema"} if "ema" in unets else {})}
        main = unets[next(k for k, f in folders.items() if f == "unet")]
        if reason is None:
            _save_pipeline(cfg, state, main, tmp)
        else:
            main.save_pretrained(tmp / "unet")
        for name, folder in folders.items():
            if folder != "unet":
                unets[name].save_pretrained(tmp / folder)
        lora_meta = None
        if loras:
            from safetensors.torch import save_file

            lora_files = {("ema" if "ema" in loras else "raw"): LORA_FILE}
            save_file(loras["ema" if "ema" in loras else "raw"], str(tmp / LORA_FILE))
            if "ema" in loras:
                (tmp / "lora_raw").mkdir()
                save_file(loras["raw"], str(tmp / "lora_raw" / LORA_FILE))
                lora_files["raw"] = f"lora_raw/{LORA_FILE}"
            lora_meta = {"rank": cfg.model.lora_rank, "alpha": cfg.model.lora_alpha or cfg.model.lora_rank,
                         "files": lora_files, "merged": merge_lora}
        shutil.copy(run_dir / "config.yaml", tmp / "config.yaml")
        np.savez(tmp / "null_text.npz", tokens=null_tokens.numpy(), pooled=null_pooled.numpy())
        meta = {
            "format": "latentforge-export/2",
            "step": state.step,
            "samples_seen": state.samples_seen,
            "run_dir": str(run_dir.resolve()),
            "checkpoint": tag,
            "mlflow_run_id": state.mlflow_run_id,
            "ema": bool(state.ema),
            "unets": folders,
            "pipeline": reason is None,
            "pipeline_reason": reason,
            "lora": lora_meta,
            "init_from": state.init_from,
            "shapes": state.shapes,
            "resolution": cfg.data.resolution,  # the nominal (height = width) size of a square run
            "buckets": state.buckets,  # [{"size": [H, W], "latent": [C, h, w], "count"}]; [] = square only
            "micro_conditioning": cfg.model.micro_conditioning,  # time_ids (orig h, w, crop top, left, target h, w)
            "text_encoder": {**config_mod.to_dict(cfg.text), "identity": state.identity.get("text")},
            "codec": {**config_mod.to_dict(cfg.codec), "identity": state.identity.get("codec")},
            "scale": state.scale,
            "shift": state.shift,
            "diffusion": config_mod.to_dict(cfg.diffusion),
        }
        write_json(tmp / META, meta)  # last: an export is recognised by it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    outputs.replace_dir(tmp, out)
    if reason is not None:
        log.info(f"not a StableDiffusionPipeline: {reason}")
    record_export(cfg, meta.get("mlflow_run_id"), out)
    return out


def _save_pipeline(cfg: config_mod.Config, state: TrainState, unet: torch.nn.Module, tmp: Path) -> None:
    """The whole StableDiffusionPipeline in `tmp` (pipeline.save_pretrained writes
    model_index.json and each component's folder). The VAE and text tower must be the ones
    the run's latents were made with: their weight hashes are checked against the checkpoint's
    identity."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from latentforge.data.codecs import resolve_vae_dir
    from latentforge.data.hf_text import clip_text_model, clip_tokenizer
    from latentforge.data.text import build_text_encoder
    from latentforge.sources import diffusers_weight_files

    vae_dir = resolve_vae_dir(cfg.codec.path)
    want = (state.identity.get("codec") or {}).get("weights_sha256")
    got = sha256_files(diffusers_weight_files(vae_dir, "codec.path"), vae_dir)
    if want and got != want:
        raise ValueError(f"codec.path: {vae_dir} holds other weights (sha256 {got[:12]}) than the run's latents were "
                         f"made with ({want[:12]})")
    text = build_text_encoder(config_mod.TextConfig(**{**config_mod.to_dict(cfg.text), "dtype": "fp32"}), "cpu")
    want = (state.identity.get("text") or {}).get("weights_sha256")
    if want and text.weights_sha256() != want:
        raise ValueError(f"text.pretrained: holds other weights ({text.weights_sha256()[:12]}) than the run's latents "
                         f"were made with ({want[:12]})")
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
    if vae.config.scaling_factor != state.scale:  # the pipeline scales latents by the VAE's own factor
        vae.register_to_config(scaling_factor=state.scale)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip_text_model(text), tokenizer=clip_tokenizer(text),
                                   unet=unet, scheduler=pipeline_scheduler(cfg.diffusion), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp)


def record_export(cfg: config_mod.Config, run_id: str | None, out: Path) -> None:
    """Put the export's path (tag `export_path`) and its metadata (artifact) on the training
    run in MLflow. Best effort: an unreachable tracking server costs a warning, not the export."""
    if not run_id or not cfg.tracking.enabled:
        return
    from latentforge.training import mlflow_store

    mlflow_store.configure_env()
    try:
        client = mlflow_store.make_client(cfg.resolved_tracking_uri)
        client.set_tag(run_id, "export_path", str(out.resolve()))
        client.log_artifact(run_id, str(out / META), artifact_path="export")
    except Exception as e:  # tracking never stops the pipeline
        log.warning(f"could not record {out} on MLflow run {run_id}: {mlflow_store.first_line(e)}")


def load_export(model_dir: str | Path, use_ema: bool = True, device: torch.device | str = "cpu"
                ) -> tuple[torch.nn.Module, config_mod.Config, dict[str, Any]]:
    """(a plain UNet2DConditionModel in eval mode, the run's config, latentforge.json) of an
    export: the EMA U-Net when there is one and `use_ema`, else the raw one; LoRA adapters
    not merged at export are loaded over the base U-Net and folded in."""
    from diffusers import UNet2DConditionModel

    model_dir = Path(model_dir)
    outputs.recover_dir(model_dir, is_export)  # an export whose replacement was interrupted
    if not (model_dir / META).is_file():
        raise FileNotFoundError(f"{model_dir}: not a latentforge export (no {META})")
    meta = json.loads((model_dir / META).read_text())
    folders = meta.get("unets") or {"raw": "unet", **({"ema": "unet_ema"} if meta["ema"] else {})}
    which = "ema" if use_ema and "ema" in folders else "raw"
    unet = UNet2DConditionModel.from_pretrained(model_dir / folders.get(which, folders.get("base")),
                                                local_files_only=True)
    lora = meta.get("lora")
    if lora and not lora.get("merged"):
        files = lora["files"]
        f = model_dir / files["ema" if use_ema and "ema" in files else "raw"]
        unet.load_lora_adapter(str(f.parent), weight_name=f.name, prefix="unet")
        merge_lora(unet)
    cfg = config_mod.load_resolved(model_dir / "config.yaml")
    return unet.to(device).eval(), cfg, meta
