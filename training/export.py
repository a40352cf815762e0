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
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from latentforge.training import checkpoint
from latentforge.training import config as config_mod
from latentforge.training.unet import build_unet

META = "latentforge.json"


def export(run_dir: str | Path, out: str | Path, tag: str | None = None) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    cfg = config_mod.load_resolved(run_dir / "config.yaml")
    tag = tag or checkpoint.latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to export")
    weights, client = checkpoint.consolidated_weights(run_dir, tag)
    shapes = client.get("shapes")
    if shapes is None:
        raise ValueError(f"{run_dir / 'checkpoints' / tag}: checkpoint lacks the latent shapes")
    C, h, _ = shapes["latent"]
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    unet = build_unet(cfg.model, C, h, shapes["text"][-1], shapes["pooled"][-1])
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not fit the U-Net: missing {missing[:3]}, unexpected {unexpected[:3]}")
    unet.save_pretrained(tmp / "unet")
    has_ema = bool(client.get("ema"))
    if has_ema:
        sd = unet.state_dict()
        for k, v in client["ema"]["shadow"].items():
            sd[k] = v
        unet.load_state_dict(sd)
        unet.save_pretrained(tmp / "unet_ema")
    shutil.copy(run_dir / "config.yaml", tmp / "config.yaml")
    null = client.get("null_text")
    if null is None:
        raise ValueError(f"{run_dir / 'checkpoints' / tag}: checkpoint lacks the null text embedding")
    import numpy as np

    np.savez(tmp / "null_text.npz", tokens=null["tokens"].numpy(), pooled=null["pooled"].numpy())
    meta = {
        "format": "latentforge-export/1",
        "step": client.get("step"),
        "samples_seen": client.get("samples_seen"),
        "run_dir": str(run_dir.resolve()),
        "checkpoint": tag,
        "mlflow_run_id": client.get("mlflow_run_id"),
        "ema": has_ema,
        "shapes": shapes,
        "text_encoder": {**config_mod.to_dict(cfg.text), "identity": client.get("identity", {}).get("text")},
        "codec": {**config_mod.to_dict(cfg.codec), "identity": client.get("identity", {}).get("codec")},
        "scale": client.get("scale"),
        "shift": client.get("shift"),
        "diffusion": config_mod.to_dict(cfg.diffusion),
    }
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    record_export(cfg, meta.get("mlflow_run_id"), out)
    return out


def record_export(cfg: config_mod.Config, run_id: str | None, out: Path) -> None:
    """Put the export's path (tag `export_path`) and its metadata (artifact) on the training
    run in MLflow. Best effort: an unreachable tracking server costs a warning, not the export."""
    if not run_id or not cfg.tracking.enabled:
        return
    import os
    import warnings

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
        client.set_tag(run_id, "export_path", str(out.resolve()))
        client.log_artifact(run_id, str(out / META), artifact_path="export")
    except Exception as e:  # tracking never stops the pipeline (DESIGN.md guarantee 7)
        warnings.warn(f"export: could not record {out} on MLflow run {run_id}: {str(e).splitlines()[0]}")


def load_export(model_dir: str | Path, use_ema: bool = True, device: torch.device | str = "cpu"
                ) -> tuple[torch.nn.Module, config_mod.Config, dict[str, Any]]:
    from diffusers import UNet2DConditionModel

    model_dir = Path(model_dir)
    if not (model_dir / META).is_file():
        raise FileNotFoundError(f"{model_dir}: not a latentforge export (no {META})")
    meta = json.loads((model_dir / META).read_text())
    sub = "unet_ema" if use_ema and meta["ema"] else "unet"
    unet = UNet2DConditionModel.from_pretrained(model_dir / sub, local_files_only=True).to(device).eval()
    cfg = config_mod.load_resolved(model_dir / "config.yaml")
    return unet, cfg, meta


def sample_from_export(model_dir: str | Path, prompts: list[str], out: str | Path, n: int = 4,
                       steps: int | None = None, cfg_scale: float | None = None, sampler: str | None = None,
                       seed: int = 0, use_ema: bool = True) -> Path:
    import numpy as np

    from latentforge.data.codecs import build_codec
    from latentforge.data.text import build_text_encoder
    from latentforge.eval.evaluate import make_grid, noise_for, to_uint8
    from latentforge.eval.sampling import sample
    from latentforge.training import dist
    from latentforge.training.diffusion import Schedule
    from latentforge.training.unet import unet_forward

    device = dist.device()
    unet, cfg, meta = load_export(model_dir, use_ema, device)
    text = build_text_encoder(cfg.text, device)
    codec = build_codec(cfg.codec, device)
    with np.load(Path(model_dir) / "null_text.npz") as z:
        null_tokens, null_pooled = torch.from_numpy(z["tokens"]), torch.from_numpy(z["pooled"])
    emb = text.encode(prompts)
    idx = torch.arange(len(prompts)).repeat_interleave(n)
    C, h, w = meta["shapes"]["latent"]
    x_T = torch.stack([noise_for(seed, i, j, (C, h, w)) for i in range(len(prompts)) for j in range(n)]).to(device)
    cond = {"text": emb.tokens.float()[idx].to(device), "pooled": emb.pooled.float()[idx].to(device)}
    uncond = {"text": null_tokens.expand(len(idx), -1, -1).to(device),
              "pooled": null_pooled.expand(len(idx), -1).to(device)}
    with torch.no_grad():
        z = sample(lambda x, t, c: unet_forward(unet, x, t, c), (len(idx), C, h, w), cond, uncond,
                   schedule=Schedule.from_config(cfg.diffusion), diffusion_cfg=cfg.diffusion,
                   sampler=sampler or cfg.eval.sampler, steps=steps or cfg.eval.steps,
                   cfg_scale=cfg.eval.cfg_scale if cfg_scale is None else cfg_scale,
                   generator=torch.Generator().manual_seed(seed), x_T=x_T)
        images = to_uint8(codec.decode(z.float() / codec.scale + codec.shift))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, prompts, n).save(out)
    return out
