"""U-Net construction: a diffusers `UNet2DConditionModel` from `ModelConfig`.

The latent shape and the text width come from the latent manifest, not the config, so
the model always matches the data it trains on. With buckets the latent shape is the
nominal bucket's (the U-Net's `sample_size`); the network itself takes any size.

Micro-conditioning (model.micro_conditioning) is SD-XL's (Podell et al. 2023, sec. 2.2):
six numbers per sample, (orig h, orig w, crop top, crop left, target h, target w), each
through a sinusoidal embedding of model.micro_conditioning_dim features, concatenated with
the pooled text embedding and added to the time embedding: diffusers'
`addition_embed_type="text_time"`, fed with `added_cond_kwargs={"text_embeds": pooled,
"time_ids": ...}` (`projection_class_embeddings_input_dim` = pooled + 6 x dim).
"""

from __future__ import annotations

from typing import Any

import torch

from latentforge.config import ModelConfig

MICRO_CONDITIONS = 6  # original (h, w), crop (top, left), target (h, w)


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
        mid_block_type="UNetMidBlock2DCrossAttn" if cfg.mid_block == "cross_attn" else None,
    )
    if cfg.micro_conditioning:
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=cfg.micro_conditioning_dim,
                  projection_class_embeddings_input_dim=pooled_dim + MICRO_CONDITIONS * cfg.micro_conditioning_dim)
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
    mismatch fails with one line naming `where` the weights came from. With
    model.lora_rank the U-Net carries its adapters (the weights hold them too)."""
    C, h, _ = shapes["latent"]
    unet = build_unet(cfg, C, h, shapes["text"][-1], shapes["pooled"][-1])
    if cfg.lora_rank:
        add_lora(unet, cfg)
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not fit the U-Net of the config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return unet


def _diffusers_config(unet: Any) -> Any:
    """The diffusers model's config, under any wrappers that hold it as `.module` (our
    Engine, DeepSpeed's engine, DDP): a wrapper has no `.config`."""
    m = unet
    while getattr(m, "config", None) is None and getattr(m, "module", None) is not None:
        m = m.module
    config = getattr(m, "config", None)
    if config is None:
        raise TypeError(f"unet_forward: {type(unet).__name__} is neither a diffusers U-Net nor a wrapper of one "
                        f"(.module)")
    return config


def takes_pooled(unet: Any) -> bool:
    """Whether `unet` adds the pooled text embedding to its time embedding (a "projection"
    class embedding). Decided by the diffusers model itself, under any wrappers."""
    return _diffusers_config(unet).class_embed_type == "projection"


def unet_forward(unet: Any, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The one call signature everything uses: x (N, C, h, w), t (N,), cond {"text": (N, L, D),
    "pooled": (N, P), "time_ids": (N, 6) with micro-conditioning} -> prediction (N, C, h, w).
    `unet` is a U-Net or a wrapper of one."""
    kwargs: dict[str, Any] = {"class_labels": cond["pooled"]} if takes_pooled(unet) else {}
    if _diffusers_config(unet).addition_embed_type == "text_time":
        if "time_ids" not in cond:
            raise ValueError("cond: a micro-conditioned U-Net needs time_ids (N, 6): original size, crop, target size")
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
    return unet(x, t, encoder_hidden_states=cond["text"], return_dict=False, **kwargs)[0]


# ---------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021) through peft, on the attention projections, as diffusers'
# train_text_to_image_lora.py does: W x + (alpha / r) B A x with A (r, in) Gaussian and
# B (out, r) zero, so the adapted U-Net starts equal to the base.

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers Attention's projections


def attention_projections(unet: torch.nn.Module) -> list[str]:
    """Names of the modules LoRA adapts: every attention block's q, k, v and output projection."""
    return [n for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in LORA_TARGETS)]


def lora_config(cfg: ModelConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, init_lora_weights="gaussian",
                      target_modules=list(LORA_TARGETS))


def add_lora(unet: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """Freeze the U-Net and add rank-`cfg.lora_rank` adapters (trainable) to its attention
    projections (diffusers' PeftAdapterMixin.add_adapter). The adapters' A matrices draw from
    torch's global RNG: seed it first for equal adapters on every rank."""
    if not attention_projections(unet):
        raise ValueError(f"model.lora_rank: {cfg.lora_rank} but the U-Net has no attention projections to adapt "
                         f"(block types {list(cfg.down_block_types)}, mid block {cfg.mid_block!r})")
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(cfg))
    return unet


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in diffusers' LoRA file layout ("unet.<module>.lora_A.weight", ...): what
    StableDiffusionPipeline.save_lora_weights writes and load_lora_weights reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"unet.{k}": v.detach().float().contiguous() for k, v in sd.items()}


def merge_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """A plain UNet2DConditionModel with the adapters folded into the base weights."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
