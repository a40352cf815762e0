"""`model.init_from`: a run's step-0 weights from a pretrained or earlier-stage U-Net.

The source is located and its architecture adopted at config time (latentforge/sources.py:
the syntax, PATH[@TAG][:ema|:raw], and the kinds of source). Here:

    preflight(cfg)      before any rank starts (the launcher, `submit`, and every rank
                        again): the source's latent channels, cross-attention width and
                        pooled width against the latent manifest, the source's U-Net
                        config against the run's model.* (weights that cannot fit), a LoRA
                        rank on a U-Net without attention, and a resumed run's latent set.
                        Each problem is one line naming it; all of them in one ConfigError.
    prepare(cfg, ...)   collective, at step 0 only: a run-directory source is turned into a
                        diffusers U-Net folder once, by rank 0, in RUN_DIR/init_from/ (its
                        EMA or raw weights, LoRA adapters merged); the others wait.
    load_unet(...)      every rank: the U-Net built on the meta device, then each tensor
                        read from the weight file and assigned as the parameter itself.

Memory: the rank holds the model once while it loads, as a random initialisation would.
`safetensors.torch.load_file` maps the file, and the mapped pages count in the rank's
resident set beside the copies, so a load through it holds the model twice on every rank.
Reading each tensor with one `readinto` into a fresh buffer avoids that. Under ZeRO-3
the loaded model is then partitioned by deepspeed.initialize exactly as a random one is
(see benchmarks/bench_init_from.py for the peak resident memory per rank).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from latentforge import config as config_mod
from latentforge import dist, sources
from latentforge.config import Config, ConfigError, ModelConfig
from latentforge.fileio import atomic_write
from latentforge.hashing import sha256_files
from latentforge.log import get_logger

log = get_logger("init_from")
KEY = sources.KEY
MATERIALIZED = "init_from"  # RUN_DIR/init_from/: a run-directory source as a diffusers U-Net


@dataclass
class Prepared:
    """A source ready to load, and what MLflow records about it."""

    source: sources.Source
    unet_dir: Path  # the diffusers U-Net folder every rank reads
    weights_sha256: str  # of the weight files read
    mlflow_run_id: str | None  # the source's own MLflow run, where it has one

    def tags(self) -> dict[str, str]:
        s = self.source
        tags = {"init_from": s.spec, "init_from.path": str(s.path.resolve()), "init_from.kind": s.kind,
                "init_from.weights": s.weights, "init_from.weights_sha256": self.weights_sha256}
        if s.tag:
            tags["init_from.checkpoint"] = s.tag
        if self.mlflow_run_id:
            tags["init_from.mlflow_run_id"] = self.mlflow_run_id
            tags["mlflow.parentRunId"] = self.mlflow_run_id  # the MLflow UI nests this run under its source
        return tags

    def record(self) -> dict[str, Any]:
        """What the train state keeps about the source (export metadata, lineage)."""
        return {"spec": self.source.spec, "path": str(self.source.path.resolve()), "kind": self.source.kind,
                "weights": self.source.weights, "checkpoint": self.source.tag,
                "weights_sha256": self.weights_sha256, "mlflow_run_id": self.mlflow_run_id}


# ---------------------------------------------------------------------------------------
# Reading a source without loading its weights.


def _run_client(run_dir: Path, tag: str) -> Any:
    """A run checkpoint's train state, memory-mapped (shapes, MLflow id: no weights read)."""
    from latentforge.training.checkpoint import ckpt_dir, model_states_file
    from latentforge.training.state import TrainState

    d = ckpt_dir(run_dir) / tag
    return TrainState.from_state_dict(torch.load(model_states_file(d), map_location="cpu", mmap=True,
                                                 weights_only=True))


def source_unet_config(src: sources.Source) -> dict[str, Any]:
    """The source U-Net's diffusers config (config.json, or built from a run's config and shapes)."""
    if src.unet_dir is not None:
        return json.loads((src.unet_dir / "config.json").read_text())
    from latentforge.training.unet import unet_kwargs

    state = _run_client(src.path, src.tag)
    if not state.shapes:
        raise ConfigError(f"{KEY}: {src.describe()}: the checkpoint lacks its latent shapes (an older latentforge)")
    run_cfg = config_mod.load_resolved(src.path / "config.yaml")
    C, h, _ = state.shapes["latent"]
    return _meta_config(unet_kwargs(run_cfg.model, C, h, state.shapes["text"][-1], state.shapes["pooled"][-1]))


def _meta_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The full diffusers config of the U-Net `kwargs` build (on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return dict(UNet2DConditionModel(**kwargs).config)


def _norm(v: Any) -> Any:
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def _heads(c: dict[str, Any]) -> list[int]:
    n = len(c["block_out_channels"])
    h = c.get("num_attention_heads") or c.get("attention_head_dim") or 8
    return list(h) if isinstance(h, (list, tuple)) else [h] * n


def preflight(cfg: Config, shapes: dict[str, list[int]] | None = None) -> None:
    """Everything about model.init_from and model.lora_rank that can be checked without
    loading weights; raises one ConfigError with a line per problem. `shapes` default:
    the latent manifest's."""
    if not cfg.model.init_from:
        return
    from latentforge.data import latents as lat
    from latentforge.data.sources import sources_of
    from latentforge.training.unet import attention_projections, unet_kwargs

    latent_dir = sources_of(cfg)[0].latent_dir  # data.latent_dir, or the first of data.sources (same encoders)
    if shapes is None:
        if not (latent_dir / lat.MANIFEST).is_file():
            return  # no latents yet (a precompute still running): the ranks check when they open them
        shapes = lat.load_manifest(latent_dir)["shapes"]
    src = sources.locate(cfg.model.init_from)
    sc = source_unet_config(src)
    where = f"{KEY}: {src.describe()}"
    C, h, _ = shapes["latent"]
    D, P = shapes["text"][-1], shapes["pooled"][-1]
    data = f"the latents in {latent_dir}"
    problems = []
    if sc.get("in_channels") != C or sc.get("out_channels") != C:
        problems.append(f"{where} has in/out channels {sc.get('in_channels')}/{sc.get('out_channels')}; "
                        f"{data} have {C} latent channels")
    if sc.get("cross_attention_dim") != D:
        problems.append(f"{where} has cross_attention_dim {sc.get('cross_attention_dim')}; {data} have text "
                        f"width {D} (text.model {cfg.text.model!r})")
    if sc.get("class_embed_type") == "projection" and sc.get("projection_class_embeddings_input_dim") != P:
        problems.append(f"{where} takes a pooled text embedding of width "
                        f"{sc.get('projection_class_embeddings_input_dim')}; {data} have {P}")
    ours = _meta_config(unet_kwargs(cfg.model, C, h, D, P))
    skip = {"sample_size", "in_channels", "out_channels", "cross_attention_dim", "attention_head_dim",
            "num_attention_heads", "projection_class_embeddings_input_dim"}
    for k in sorted(sc):
        if k.startswith("_") or k in skip or k not in ours:
            continue
        if _norm(sc[k]) != _norm(ours[k]):
            problems.append(f"{where} has {k}={_norm(sc[k])!r}; the run's model.* builds {_norm(ours[k])!r} "
                            f"(remove the model.* override, or start from another source)")
    if _heads(sc) != _heads(ours):
        problems.append(f"{where} has {_heads(sc)} attention heads per level; model.attention_head_dim="
                        f"{cfg.model.attention_head_dim} builds {_heads(ours)}")
    if cfg.model.lora_rank:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            if not attention_projections(UNet2DConditionModel(**unet_kwargs(cfg.model, C, h, D, P))):
                problems.append(f"model.lora_rank: {cfg.model.lora_rank}, but the U-Net has no attention "
                                f"projections to adapt (block types {list(cfg.model.down_block_types)}, "
                                f"mid block {cfg.model.mid_block!r})")
    if problems:
        raise ConfigError("\n".join(problems))


# ---------------------------------------------------------------------------------------
# Preparing (rank 0) and loading (every rank).


def prepare(cfg: Config, run_dir: Path) -> Prepared:
    """Collective. The diffusers U-Net folder the source's weights are read from: the
    source's own, or (a run directory) one rank 0 writes once into RUN_DIR/init_from/."""
    src = sources.locate(cfg.model.init_from)
    if src.kind == "run":
        unet_dir = Path(run_dir) / MATERIALIZED / "unet"
        if dist.is_main():
            _materialize(src, unet_dir.parent)
        dist.barrier()
        mlflow_run_id = json.loads((unet_dir.parent / "source.json").read_text()).get("mlflow_run_id")
    else:
        assert src.unet_dir is not None
        unet_dir = src.unet_dir
        mlflow_run_id = (src.meta or {}).get("mlflow_run_id")
    files = sources.diffusers_weight_files(unet_dir, KEY)
    return Prepared(src, unet_dir, sha256_files(files, unet_dir), mlflow_run_id)


def _materialize(src: sources.Source, out: Path) -> None:
    """Rank 0: the run checkpoint's EMA or raw weights (LoRA adapters merged) as a diffusers
    U-Net in `out`/unet, with `out`/source.json naming what it came from. Kept across
    restarts of this run's step 0; rewritten when the source changes."""
    from latentforge.training import checkpoint
    from latentforge.training.state import overlay_ema
    from latentforge.training.unet import merge_lora, unet_from_weights

    record = {"spec": src.spec, "path": str(src.path.resolve()), "checkpoint": src.tag, "weights": src.weights}
    stamp = out / "source.json"
    if stamp.is_file() and {k: v for k, v in json.loads(stamp.read_text()).items() if k in record} == record:
        return
    where = src.path / checkpoint.CKPT / src.tag
    log.info(f"reading {src.weights} weights of {where} for {KEY}")
    weights, state = checkpoint.consolidated_weights(src.path, src.tag)
    run_cfg = config_mod.load_resolved(src.path / "config.yaml")
    unet = unet_from_weights(run_cfg.model, state.shapes, weights, str(where))
    del weights
    if src.weights == "ema":
        if not state.ema:
            raise ConfigError(f"{KEY}: {where} has no EMA weights (ema.enabled was false); use {src.path}:raw")
        overlay_ema(unet, state.ema["shadow"])
    if run_cfg.model.lora_rank:
        merge_lora(unet)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet")
    atomic_write(tmp / "source.json", json.dumps({**record, "step": state.step,
                                                  "mlflow_run_id": state.mlflow_run_id}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a .safetensors file in file order, each read with one readinto into
    a fresh buffer: nothing stays mapped (see the module docstring). Format: an 8-byte
    little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, data."""
    with open(path, "rb", buffering=0) as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base = 8 + n
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            start, end = info["data_offsets"]
            buf = torch.empty(end - start, dtype=torch.uint8)
            f.seek(base + start)
            if f.readinto(buf.numpy()) != end - start:
                raise ValueError(f"{KEY}: {path} ends inside tensor {name} (truncated?)")
            yield name, buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def read_weights(unet_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a diffusers U-Net folder's weights: safetensors (one file or shards)
    read lean; a .bin through torch.load (memory-mapped)."""
    files = sources.diffusers_weight_files(unet_dir, KEY)
    for f in files:
        if f.name.endswith(".index.json"):
            continue
        if f.suffix == ".safetensors":
            yield from read_safetensors(f)
        else:
            yield from torch.load(f, map_location="cpu", mmap=True, weights_only=True).items()


def load_unet(model: ModelConfig, shapes: dict[str, list[int]], unet_dir: Path) -> torch.nn.Module:
    """The run's U-Net (model.*, sized for `shapes`) holding the weights of `unet_dir`, in
    fp32: built on the meta device, each parameter then the tensor read from the file."""
    from latentforge.training.unet import build_unet

    C, h, _ = shapes["latent"]
    with torch.device("meta"):
        unet = build_unet(model, C, h, shapes["text"][-1], shapes["pooled"][-1])
    want = unet.state_dict()
    sd, bad = {}, []
    for name, t in read_weights(unet_dir):
        if name in want and tuple(want[name].shape) != tuple(t.shape):
            bad.append(f"{name} {tuple(t.shape)} vs {tuple(want[name].shape)}")
        sd[name] = t if t.dtype == torch.float32 else t.float()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected or bad:
        raise ValueError(f"{KEY}: the weights in {unet_dir} do not fit the run's U-Net: "
                         f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]}), {len(bad)} of another shape (e.g. {bad[:2]})")
    unet.load_state_dict(sd, assign=True)
    left = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{KEY}: {len(left)} U-Net tensors are not in {unet_dir}, e.g. {left[:2]}")
    return unet
