"""The encoders a latent dataset is made with: an image codec and a text encoder.

Precompute encodes with them; training and eval rebuild them from the config to check the
dataset's identity, to embed prompts and to decode samples.
"""

from __future__ import annotations

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


def build_encoders(cfg: Config, device: torch.device | str = "cpu") -> Encoders:
    """The codec and text encoder `cfg` names, on `device`. A VAE runs channels-last (NHWC):
    faster convolutions on CPUs and GPUs alike; the layout is no part of the identity."""
    from latentforge.data.codecs import VAECodec, build_codec
    from latentforge.data.text import build_text_encoder

    c = cfg.codec
    codec = (VAECodec(c.path, dtype=c.dtype, scale=c.scale, shift=c.shift, device=device, channels_last=True)
             if c.kind == "vae" else build_codec(c, device))
    return Encoders(codec=codec, text=build_text_encoder(cfg.text, device))
