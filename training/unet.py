"""U-Net construction: a diffusers `UNet2DConditionModel` from `ModelConfig`.

The latent shape and the text width come from the latent manifest, not the config, so
the model always matches the data it trains on.
"""

from __future__ import annotations

from typing import Any

import torch

from latentforge.config import ModelConfig


def unet_kwargs(cfg: ModelConfig, latent_channels: int, latent_size: int, text_dim: int,
                pooled_dim: int) -> dict[str, Any]:
    heads = tuple(max(1, c // cfg.attention_head_dim) for c in cfg.block_out_channels)
    kw: dict[str, Any] = dict(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        cross_attention_dim=text_dim,
        # diffusers' historical naming: `attention_head_dim` is the number of heads per block
        # when `num_attention_heads` is unset; SD-2 passes channels-per-head. We pass heads.
        attention_head_dim=heads,
        norm_num_groups=cfg.norm_num_groups,
        transformer_layers_per_block=cfg.transformer_layers_per_block,
        use_linear_projection=cfg.linear_projection,
    )
    if cfg.pooled_text_conditioning:
        # Pooled text embedding added to the time embedding (a "projection" class embedding).
        kw.update(class_embed_type="projection", projection_class_embeddings_input_dim=pooled_dim)
    return kw


def build_unet(cfg: ModelConfig, latent_channels: int, latent_size: int, text_dim: int,
               pooled_dim: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_kwargs(cfg, latent_channels, latent_size, text_dim, pooled_dim))


def unet_from_weights(cfg: ModelConfig, shapes: dict[str, list[int]], weights: dict[str, torch.Tensor],
                      where: str) -> torch.nn.Module:
    """The U-Net of `cfg` for latents of `shapes` (a checkpoint's), holding `weights`; a
    mismatch fails with one line naming `where` the weights came from."""
    C, h, _ = shapes["latent"]
    unet = build_unet(cfg, C, h, shapes["text"][-1], shapes["pooled"][-1])
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not fit the U-Net of the config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return unet


def takes_pooled(unet: Any) -> bool:
    """Whether `unet` adds the pooled text embedding to its time embedding (a "projection"
    class embedding). Decided by the diffusers model itself, under any wrappers that hold it
    as `.module` (our Engine, DeepSpeed's engine, DDP): a wrapper has no `.config`."""
    m = unet
    while getattr(m, "config", None) is None and getattr(m, "module", None) is not None:
        m = m.module
    config = getattr(m, "config", None)
    if config is None:
        raise TypeError(f"unet_forward: {type(unet).__name__} is neither a diffusers U-Net nor a wrapper of one "
                        f"(.module)")
    return config.class_embed_type == "projection"


def unet_forward(unet: Any, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The one call signature everything uses: x (N, C, h, w), t (N,), cond {"text": (N, L, D),
    "pooled": (N, P)} -> prediction (N, C, h, w). `unet` is a U-Net or a wrapper of one."""
    kwargs = {"class_labels": cond["pooled"]} if takes_pooled(unet) else {}
    return unet(x, t, encoder_hidden_states=cond["text"], return_dict=False, **kwargs)[0]


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
