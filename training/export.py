"""Export a run to a diffusers-format U-Net, and sample from an export.

    EXPORT/
      unet/              UNet2DConditionModel.save_pretrained of the raw (consolidated) weights
      unet_ema/          the same architecture with the EMA weights (if the run kept an EMA)
      config.yaml        the run's resolved config
      null_text.npz      the empty caption's embedding (the unconditional input for CFG)
      latentforge.json   what a sampler needs besides the U-Net: text encoder, codec, scale,
                         shift, diffusion settings, and where the weights came from

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

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge import config as config_mod
from latentforge import outputs
from latentforge.fileio import write_json
from latentforge.log import get_logger
from latentforge.training import checkpoint
from latentforge.training.state import overlay_ema
from latentforge.training.unet import unet_from_weights

log = get_logger("export")
META = "latentforge.json"


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


def export(run_dir: str | Path, out: str | Path, tag: str | None = None) -> Path:
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
    tmp = outputs.temp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        unet = unet_from_weights(cfg.model, state.shapes, weights, str(where))
        unet.save_pretrained(tmp / "unet")
        has_ema = bool(state.ema)
        if has_ema:
            overlay_ema(unet, state.ema["shadow"])
            unet.save_pretrained(tmp / "unet_ema")
        shutil.copy(run_dir / "config.yaml", tmp / "config.yaml")
        np.savez(tmp / "null_text.npz", tokens=null_tokens.numpy(), pooled=null_pooled.numpy())
        meta = {
            "format": "latentforge-export/1",
            "step": state.step,
            "samples_seen": state.samples_seen,
            "run_dir": str(run_dir.resolve()),
            "checkpoint": tag,
            "mlflow_run_id": state.mlflow_run_id,
            "ema": has_ema,
            "shapes": state.shapes,
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
    record_export(cfg, meta.get("mlflow_run_id"), out)
    return out


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
    from diffusers import UNet2DConditionModel

    model_dir = Path(model_dir)
    outputs.recover_dir(model_dir, is_export)  # an export whose replacement was interrupted
    if not (model_dir / META).is_file():
        raise FileNotFoundError(f"{model_dir}: not a latentforge export (no {META})")
    meta = json.loads((model_dir / META).read_text())
    sub = "unet_ema" if use_ema and meta["ema"] else "unet"
    unet = UNet2DConditionModel.from_pretrained(model_dir / sub, local_files_only=True).to(device).eval()
    cfg = config_mod.load_resolved(model_dir / "config.yaml")
    return unet, cfg, meta
