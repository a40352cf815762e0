"""The encoders a latent dataset is made with: an image codec and a text encoder.

Precompute encodes with them; training and eval rebuild them from the config to check the
dataset's identity, to embed prompts and to decode samples.

`codec.dtype` / `text.dtype` "auto" is resolved once, by the precompute that starts a
dataset, on its device (bf16 on a GPU with native bf16, else fp32), and recorded in the
identity; a later precompute of the same dataset (a re-run, another array task on another
kind of node) encodes in the recorded dtype (`with_recorded_dtypes`). Training and eval
compute in their own device's choice and accept such latents: for "auto" the identity
they check against takes the recorded dtype (`expected_identity`); an explicit dtype must
equal the recorded one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from latentforge.config import Config
from latentforge.data.codecs import ImageCodec
from latentforge.data.raw import RawConfig, extra_identity
from latentforge.data.text import TextEncoder


@dataclass
class Encoders:
    codec: ImageCodec
    text: TextEncoder

    def identity(self, cfg: Config) -> dict[str, Any]:
        """Everything that shapes the stored numbers. Latents made under another identity
        are refused by the trainer and never mixed into one dataset. Buckets, metadata
        filters and extra captions add entries only when they are on."""
        rcfg = RawConfig.from_data_config(cfg.data)
        return {
            "codec": self.codec.identity(),
            "text": self.text.identity(),
            "resolution": cfg.data.resolution,
            "crop": rcfg.crop_policy,
            "storage_dtype": "fp16",
            "min_size": cfg.data.min_size,
            "max_aspect": cfg.data.max_aspect,
            **extra_identity(rcfg),
        }


DTYPE_SECTIONS = ("codec", "text")  # config sections whose `dtype` may be "auto"


def _recorded_dtype(recorded: dict[str, Any] | None, section: str) -> str | None:
    entry = (recorded or {}).get(section)
    return entry.get("dtype") if isinstance(entry, dict) else None


def expected_identity(encoders: Encoders, cfg: Config, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The identity latents made with `cfg`'s encoders must have, given the identity they
    `recorded`: `encoders.identity(cfg)`, where a dtype the config leaves "auto" is the
    recorded one (whatever precompute resolved it to, on whatever device)."""
    want = encoders.identity(cfg)
    for section in DTYPE_SECTIONS:
        dtype = _recorded_dtype(recorded, section)
        if getattr(cfg, section).dtype == "auto" and dtype is not None and isinstance(want.get(section), dict):
            want[section] = {**want[section], "dtype": dtype}
    return want


def with_recorded_dtypes(cfg: Config, recorded: dict[str, Any] | None) -> Config:
    """`cfg` with each "auto" encoder dtype replaced by the one a dataset recorded, so a
    precompute that continues a dataset encodes as the one that started it did."""
    out = cfg
    for section in DTYPE_SECTIONS:
        dtype = _recorded_dtype(recorded, section)
        if getattr(cfg, section).dtype == "auto" and dtype is not None:
            out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), dtype=dtype)})
    return out


def build_encoders(cfg: Config, device: torch.device | str = "cpu") -> Encoders:
    """The codec and text encoder `cfg` names, on `device`. A VAE runs channels-last (NHWC):
    faster convolutions on CPUs and GPUs alike; the layout is no part of the identity."""
    from latentforge.data.codecs import VAECodec, build_codec
    from latentforge.data.text import build_text_encoder

    c = cfg.codec
    codec = (VAECodec(c.path, dtype=c.dtype, scale=c.scale, shift=c.shift, device=device, channels_last=True)
             if c.kind == "vae" else build_codec(c, device))
    return Encoders(codec=codec, text=build_text_encoder(cfg.text, device))
