"""What a checkpoint carries besides the engine's own weights and optimizer state.

`TrainState` is saved as DeepSpeed's client state (every rank passes its own; DeepSpeed
writes rank 0's into the model-states file, and under ZeRO-3 each rank's into its own).
The training loop, export and stand-alone eval all read it through this one type, so a
field is named in one place. Everything in it is a plain container of tensors, numbers
and strings: a checkpoint loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # real (unpadded) samples consumed, all ranks
    samples_by_source: dict[str, int] = field(default_factory=dict)  # the same per named source (data.sources)
    nonfinite_total: int = 0  # steps skipped for a non-finite loss or gradient
    loader: dict[str, Any] | None = None  # the latent loader's position (data/loader.py Position)
    ema: dict[str, Any] | None = None  # EMA.state_dict(): this rank's shard under ZeRO-3, else whole
    mlflow_run_id: str | None = None  # the run's MLflow run, reopened on resume
    config_hash: str = ""  # config.config_hash of the model/codec/text/diffusion sections
    # What export and stand-alone eval need without the latent directory:
    shapes: dict[str, list[int]] = field(default_factory=dict)  # {"latent": [C, h, w], "text": [L, D], "pooled": [P]}
    buckets: list[dict[str, Any]] = field(default_factory=list)  # [{"size": [H, W], "latent", "count"}]; [] = square
    identity: dict[str, Any] = field(default_factory=dict)  # the encoders' identity ({"text": ..., "codec": ...})
    scale: float = 1.0  # latent = (z - shift) * scale
    shift: float = 0.0
    null_text: dict[str, torch.Tensor] | None = None  # {"tokens": (L, D), "pooled": (P,)}: CFG's empty caption
    init_from: dict[str, Any] | None = None  # where the step-0 weights came from (training/init_from.py record)

    def state_dict(self) -> dict[str, Any]:
        """The client state to save (shallow: tensors are shared, not copied). Refuses a
        value a weights-only load could not read back (TypeError naming the field)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in out.items():
            _check_plain(value, name)
        return out

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "TrainState":
        """From a saved client state. Extra keys (DeepSpeed's among them) are ignored; a field
        an older checkpoint lacks, or saved as None, keeps its default."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def null_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (L, D), pooled (P,)) float32: the unconditional input for guidance."""
        if self.null_text is None:
            raise ValueError("checkpoint lacks the null text embedding (written by an older latentforge)")
        return self.null_text["tokens"].float(), self.null_text["pooled"].float()


def _check_plain(value: Any, where: str) -> None:
    """Only tensors, str, int, float, bool, None, lists and str-keyed dicts."""
    if value is None or isinstance(value, (str, int, float, torch.Tensor)):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"TrainState.{where}: key {k!r} is a {type(k).__name__}, not str or int")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"TrainState.{where}: a {type(value).__name__} cannot be saved (a checkpoint holds only "
                    f"tensors, str, int, float, None, lists and dicts, so it loads with weights_only=True)")


def overlay_ema(module: torch.nn.Module, ema_shadow: dict[str, torch.Tensor]) -> None:
    """Load whole EMA weights over a plain module's parameters (buffers stay as they are)."""
    sd = module.state_dict()
    missing = [k for k in ema_shadow if k not in sd]
    if missing:
        raise ValueError(f"EMA weights do not fit the module: {len(missing)} unknown names, e.g. {missing[:3]}")
    sd.update(ema_shadow)
    module.load_state_dict(sd)
