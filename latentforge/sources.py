"""Where `model.init_from` points, read from files alone (no torch): what kind of source it
is, which weights it names, and the U-Net architecture it holds.

    model.init_from = PATH[@TAG][:ema|:raw]

PATH is one of

    a diffusers U-Net directory   config.json (UNet2DConditionModel) + diffusion_pytorch_model.*,
                                  as `save_pretrained` writes it
    a pipeline directory          a folder with unet/ inside (an HF cache snapshot of
                                  stabilityai/stable-diffusion-2-base, a pipeline export)
    a latentforge export          latentforge.json beside unet folders (`latentforge export`)
    a run directory               config.yaml + checkpoints/ (another latentforge run)

@TAG names a checkpoint of a run directory (`step_00002000`; default: its latest complete
one). :ema / :raw choose the weights of a run or an export (default: EMA when the source
kept one, else raw). A plain U-Net directory has only its own weights.

The architecture a source holds becomes the run's `model.*` (`config.resolve`), unless the
user's file or overrides set a model field. It maps to `ModelConfig` where that can
describe it; a U-Net it cannot describe (a head count fixed across levels, as SD-1.x has,
a block or embedding type latentforge does not build) is refused with one line naming the
key. The weights themselves load in training/init_from.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentforge.errors import ConfigError

KEY = "model.init_from"
EXPORT_META = "latentforge.json"  # the file that marks a latentforge export (training/export.py)
UNET_CLASS = "UNet2DConditionModel"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TAG_RE = re.compile(r"^step_\d{8}$")
# The ModelConfig fields that describe the U-Net's architecture (the others say how to train it).
ARCH_FIELDS = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "attention_head_dim",
               "norm_num_groups", "transformer_layers_per_block", "linear_projection", "pooled_text_conditioning",
               "mid_block", "micro_conditioning", "micro_conditioning_dim")
MID_BLOCKS = {"UNetMidBlock2DCrossAttn": "cross_attn", None: "none"}


@dataclass
class Source:
    spec: str  # what model.init_from says
    path: Path  # the source directory
    kind: str  # "unet" (a diffusers U-Net dir), "pipeline", "export" or "run"
    weights: str  # "ema" or "raw"
    tag: str | None = None  # run: the checkpoint
    unet_dir: Path | None = None  # unet/pipeline/export: the diffusers U-Net folder to read
    meta: dict[str, Any] | None = None  # export: its latentforge.json

    def describe(self) -> str:
        at = f"@{self.tag}" if self.tag else ""
        return f"{self.path}{at} ({self.kind}, {self.weights} weights)"


def parse(spec: str) -> tuple[Path, str | None, str | None]:
    """PATH[@TAG][:ema|:raw] -> (path, tag or None, "ema" | "raw" | None)."""
    rest, weights = spec, None
    for w in ("ema", "raw"):
        if rest.endswith(":" + w):
            rest, weights = rest[: -len(w) - 1], w
    tag = None
    if "@" in rest:
        head, _, t = rest.rpartition("@")
        if TAG_RE.match(t) or t == "latest":
            rest, tag = head, (None if t == "latest" else t)
        elif not Path(rest).exists():
            raise ConfigError(f"{KEY}: {t!r} after '@' is not a checkpoint tag (step_NNNNNNNN or latest)")
    if not rest:
        raise ConfigError(f"{KEY}: empty path in {spec!r}")
    return Path(rest).expanduser(), tag, weights


def diffusers_weight_files(d: Path, key: str) -> list[Path]:
    """The weight files diffusers loads from `d` (safetensors preferred, as diffusers does;
    a sharded checkpoint: its index and shards). FileNotFoundError names `key`."""
    for name in WEIGHT_NAMES:
        if (d / name).is_file():
            return [d / name]
        index = d / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [index] + [d / s for s in shards]
    raise FileNotFoundError(f"{key}: no weights in {str(d)!r} (expected one of {', '.join(WEIGHT_NAMES)})")


def _unet_config(d: Path) -> dict[str, Any] | None:
    f = d / "config.json"
    if not f.is_file():
        return None
    c = json.loads(f.read_text())
    return c if c.get("_class_name") == UNET_CLASS else None


def _latest_tag(run: Path) -> str | None:
    ck = run / "checkpoints"
    latest = ck / "latest"
    if latest.is_file():
        t = latest.read_text().strip()
        if TAG_RE.match(t) and (ck / t / "COMPLETE").is_file():
            return t
    tags = sorted(p.name for p in ck.iterdir() if TAG_RE.match(p.name) and (p / "COMPLETE").is_file())
    return tags[-1] if tags else None


def locate(spec: str) -> Source:
    """The source `spec` names. ConfigError (one line, naming the key) when it is missing or
    not a kind of source latentforge reads."""
    path, tag, weights = parse(spec)
    if not path.exists():
        raise ConfigError(f"{KEY}: {str(path)!r} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{KEY}: {str(path)!r} is a file; expected a diffusers U-Net directory, a pipeline or "
                          f"export directory, or a run directory")
    if (path / EXPORT_META).is_file():
        meta = json.loads((path / EXPORT_META).read_text())
        unets = meta.get("unets") or {"raw": "unet", **({"ema": "unet_ema"} if meta.get("ema") else {})}
        w = weights or ("ema" if "ema" in unets else "raw")
        if w not in unets:
            raise ConfigError(f"{KEY}: the export {path} has no {w} U-Net (it holds {', '.join(sorted(unets))})")
        lora = meta.get("lora")
        if lora and not lora.get("merged"):
            raise ConfigError(f"{KEY}: the export {path} holds LoRA adapters beside its base U-Net; export it "
                              f"with --merge-lora, or start from its run directory")
        if tag:
            raise ConfigError(f"{KEY}: @{tag} names a checkpoint; {path} is an export (it has none)")
        return Source(spec, path, "export", w, unet_dir=path / unets[w], meta=meta)
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        t = tag or _latest_tag(path)
        if t is None:
            raise ConfigError(f"{KEY}: the run {path} has no complete checkpoint")
        if not (path / "checkpoints" / t / "COMPLETE").is_file():
            raise ConfigError(f"{KEY}: {path / 'checkpoints' / t} is not a complete checkpoint")
        return Source(spec, path, "run", weights or "ema", tag=t)
    if weights or tag:
        raise ConfigError(f"{KEY}: {'@' + tag if tag else ':' + weights} applies to a run directory or an "
                          f"export; {path} is neither")
    if _unet_config(path) is not None:
        return Source(spec, path, "unet", "raw", unet_dir=path)
    if _unet_config(path / "unet") is not None:
        return Source(spec, path, "pipeline", "raw", unet_dir=path / "unet")
    raise ConfigError(f"{KEY}: {path} is none of: a diffusers U-Net directory (config.json of a {UNET_CLASS}), "
                      f"a folder with unet/, a latentforge export, a run directory (config.yaml + checkpoints/)")


# ---------------------------------------------------------------------------------------
# The architecture.


def _run_model_section(config_yaml: Path) -> dict[str, Any]:
    import yaml

    model = (yaml.safe_load(config_yaml.read_text()) or {}).get("model") or {}
    return {k: model[k] for k in ARCH_FIELDS if k in model}


def _same(values: Any, n: int, name: str, where: str) -> Any:
    """One value for every level: an int/str as is, a list whose entries are all equal."""
    if isinstance(values, (list, tuple)):
        if len(set(values)) != 1:
            raise ConfigError(f"{KEY}: {where} has {name} {list(values)} differing per level; latentforge's "
                              f"model.{name} is one value for all levels")
        return values[0]
    return values


def unet_config_to_model(c: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields that build the diffusers U-Net config `c` (a config.json)."""
    boc = [int(b) for b in c["block_out_channels"]]
    n = len(boc)
    # diffusers' historical naming: attention_head_dim holds the number of heads when
    # num_attention_heads is unset (SD-2: [5, 10, 20, 20] heads of 64 channels).
    heads = c.get("num_attention_heads") or c.get("attention_head_dim") or 8
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
    widths = sorted({b // h for b, h in zip(boc, heads)})
    if len(widths) != 1 or any(b % h for b, h in zip(boc, heads)):
        raise ConfigError(f"{KEY}: {where} has {heads} attention heads for channels {boc} (head widths "
                          f"{widths}); latentforge builds one head width for all levels (model.attention_head_dim)")
    mid = c.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in MID_BLOCKS:
        raise ConfigError(f"{KEY}: {where} has mid_block_type {mid!r}; latentforge builds "
                          f"{', '.join(str(k) for k in MID_BLOCKS)}")
    cls = c.get("class_embed_type")
    if cls not in (None, "projection"):
        raise ConfigError(f"{KEY}: {where} has class_embed_type {cls!r}; latentforge builds None or 'projection' "
                          f"(model.pooled_text_conditioning)")
    add = c.get("addition_embed_type")
    if add not in (None, "text_time"):
        raise ConfigError(f"{KEY}: {where} has addition_embed_type {add!r}; latentforge builds None or 'text_time' "
                          f"(model.micro_conditioning)")
    return {
        "block_out_channels": boc,
        "layers_per_block": int(_same(c.get("layers_per_block", 2), n, "layers_per_block", where)),
        "down_block_types": list(c["down_block_types"]),
        "up_block_types": list(c["up_block_types"]),
        "attention_head_dim": widths[0],
        "norm_num_groups": int(c.get("norm_num_groups", 32)),
        "transformer_layers_per_block": int(_same(c.get("transformer_layers_per_block", 1), n,
                                                  "transformer_layers_per_block", where)),
        "linear_projection": bool(c.get("use_linear_projection", False)),
        "pooled_text_conditioning": cls == "projection",
        "mid_block": MID_BLOCKS[mid],
        "micro_conditioning": add == "text_time",
        **({"micro_conditioning_dim": int(c["addition_time_embed_dim"])} if add == "text_time" else {}),
    }


def source_architecture(spec: str, resumed: Path | None = None) -> dict[str, Any]:
    """The ModelConfig fields of the U-Net `spec` names (see the module docstring).
    `resumed`: the config.yaml of the run being started; when it was started from the same
    spec already, its architecture holds (the run's checkpoint wins; the source may be gone)."""
    if resumed is not None and resumed.is_file():
        import yaml

        model = (yaml.safe_load(resumed.read_text()) or {}).get("model") or {}
        if model.get("init_from") == spec and (resumed.parent / "checkpoints").is_dir():
            return _run_model_section(resumed)
    src = locate(spec)
    if src.kind == "run":
        return _run_model_section(src.path / "config.yaml")
    if src.kind == "export" and (src.path / "config.yaml").is_file():
        return _run_model_section(src.path / "config.yaml")
    assert src.unet_dir is not None
    return unet_config_to_model(_unet_config(src.unet_dir) or {}, str(src.unet_dir / "config.json"))
