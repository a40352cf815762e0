"""Typed configuration, named presets, file loading and command-line overrides.

A config is a tree of dataclasses. Every field has a default and a one-line comment.
Presets are plain Python functions that return a `Config`; `resolve()` applies, in order,
the preset, a YAML/TOML file, then `section.field=value` overrides, and validates types.
Errors are one line that names the key: `ConfigError: train.max_steps: expected int, got 'ten'`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from latentforge.errors import AbortError, ConfigError  # noqa: F401  (re-exported: callers import them from here)


@dataclass
class SynthConfig:
    num_samples: int = 2048  # images in the synthetic dataset
    samples_per_shard: int = 256  # images per raw shard
    image_size: int = 64  # side of the rendered square images, pixels
    seed: int = 0  # the dataset is a pure function of this seed
    max_aspect: float = 1.0  # random long/short side ratio up to this (area about image_size**2); 1 = square
    captions: int = 1  # captions per image: 2 adds a rephrased caption (KEY.json "captions" holds both)
    metadata: bool = False  # KEY.json gets filterable fields: original_width/height, aesthetic, pwatermark, punsafe


@dataclass
class SourceConfig:
    name: str = ""  # names the source in metrics (train/samples_seen/<name>); unique
    raw_shards: str = ""  # its raw WebDataset shards (as data.raw_shards)
    latent_dir: str = ""  # where its latents go; "" = <data.latent_dir or run_root/latents>/<name>
    weight: float = 1.0  # its share of every epoch's samples, relative to the other sources' weights


@dataclass
class DataConfig:
    raw_shards: str = ""  # raw WebDataset shards (brace, glob, list file or URL); "" = synthesize into run_root/synth
    latent_dir: str = ""  # where precompute writes latent shards and training reads them; "" = run_root/latents
    resolution: int = 32  # training resolution in pixels (shorter side resized, then centre-cropped)
    min_size: int = 0  # reject raw images whose shorter side is below this (0 = keep all)
    max_aspect: float = 0.0  # reject raw images with long/short side above this (0 = keep all)
    max_pixels: int = 64_000_000  # refuse raw images with more pixels (decompression bombs)
    latent_samples_per_shard: int = 512  # samples per latent shard written by precompute
    precompute_batch_size: int = 64  # images per encoder batch in precompute
    precompute_workers: int = 2  # precompute: worker processes decoding raw shards while the main one encodes; 0 = none
    heldout_shards: int = 1  # the last N latent shards (in name order) are held out from training
    num_workers: int = 1  # DataLoader workers per rank for latent shards
    prefetch_factor: int = 4  # batches prefetched per worker
    bucket_max_ratio: float = 1.0  # aspect-ratio buckets up to this long/short side ratio; 1 = square only
    bucket_area: int = 0  # pixels per bucket (width * height at most this); 0 = data.resolution ** 2
    bucket_multiple: int = 64  # bucket sides are multiples of this (>= codec downsample x 2**(U-Net levels-1))
    caption_fields: tuple[str, ...] = ()  # extra captions: KEY.json fields (string or list) or member extensions
    max_captions: int = 4  # most captions encoded per image, the .txt caption first
    caption_weights: tuple[float, ...] = ()  # loader: relative weight of caption 0 (.txt), 1, 2, ...; () = uniform
    filter_min_original_side: int = 0  # reject an original (json/parquet) shorter side below this; 0 = off
    filter_max_original_side: int = 0  # reject when the original image's longer side is above this; 0 = off
    filter_min_aesthetic: float = 0.0  # reject an aesthetic score below this; 0 = off
    filter_max_watermark: float = 1.0  # reject a watermark probability above this; 1 = off
    filter_max_unsafe: float = 1.0  # reject an unsafe (NSFW) probability above this; 1 = off
    filter_min_caption_words: int = 0  # reject captions with fewer words; 0 = off
    filter_max_caption_words: int = 0  # reject captions with more words; 0 = off
    sources: tuple[SourceConfig, ...] = ()  # weighted mixing of several sources; () = data.raw_shards alone
    epoch_samples: int = 0  # with sources: samples per epoch, all sources together; 0 = their sizes summed


@dataclass
class CodecConfig:
    kind: str = "pixel"  # "pixel" (parameter-free pixel-unshuffle) or "vae" (diffusers AutoencoderKL)
    path: str = ""  # vae: local directory written by AutoencoderKL.save_pretrained (or HF cache snapshot)
    patch: int = 2  # pixel: unshuffle factor; latent grid is resolution / patch
    scale: float = 0.0  # multiply latents by this after subtracting shift; 0 = the codec's own default
    shift: float = 0.0  # subtracted from latents before scaling (SD-1/2 VAE: 0)
    dtype: str = "auto"  # compute dtype for encoding: fp32, bf16, fp16 or auto (bf16 on a GPU with native bf16, else fp32; resolved once per dataset by precompute)


@dataclass
class TextConfig:
    model: str = "tiny"  # open_clip architecture name ("ViT-H-14", ...) or "tiny" (random, for CPU)
    pretrained: str = ""  # local open_clip checkpoint file, or "local-dir:DIR"; "" = random init
    layer: str = "penultimate"  # token sequence from the "penultimate" (SD-2) or "last" layer
    dtype: str = "auto"  # compute dtype for encoding: fp32, bf16, fp16 or auto (bf16 on a GPU with native bf16, else fp32; resolved once per dataset by precompute)


@dataclass
class ModelConfig:
    block_out_channels: tuple[int, ...] = (64, 128)  # U-Net channels per resolution level
    layers_per_block: int = 1  # resnet blocks per level
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "DownBlock2D")  # diffusers block names
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D")  # diffusers block names
    attention_head_dim: int = 32  # channels per attention head
    norm_num_groups: int = 32  # GroupNorm groups
    transformer_layers_per_block: int = 1  # transformer blocks inside each cross-attention block
    linear_projection: bool = True  # SD-2 style linear (not 1x1 conv) projections in transformers
    pooled_text_conditioning: bool = False  # also add the pooled text embedding to the time embedding
    micro_conditioning: bool = False  # SD-XL size/crop + pooled text via the added time embedding ("text_time")
    micro_conditioning_dim: int = 256  # sinusoidal features per size/crop number (addition_time_embed_dim)
    mid_block: str = "cross_attn"  # middle block: "cross_attn" (UNetMidBlock2DCrossAttn) or "none" (no middle block)
    init_from: str = ""  # start weights: diffusers U-Net dir, export, or RUN_DIR[@TAG][:ema|:raw] (docs/finetuning.md); "" = random
    lora_rank: int = 0  # > 0: train only rank-r LoRA adapters (peft) on the attention projections of init_from's model
    lora_alpha: float = 0.0  # LoRA scale numerator (scale = alpha / rank); 0 = the rank (scale 1)


@dataclass
class DiffusionConfig:
    objective: str = "ddpm"  # "ddpm" or "flow" (rectified flow)
    schedule: str = "scaled_linear"  # beta schedule: linear, scaled_linear or cosine
    num_train_timesteps: int = 1000  # discrete training timesteps
    beta_start: float = 0.00085  # first beta (linear / scaled_linear)
    beta_end: float = 0.012  # last beta (linear / scaled_linear)
    prediction: str = "eps"  # what the network predicts: eps, v or sample
    min_snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off
    offset_noise: float = 0.0  # strength of per-channel offset noise; 0 = off
    zero_terminal_snr: bool = False  # rescale betas to zero terminal SNR (Lin et al. 2023)
    cfg_dropout: float = 0.1  # probability of replacing the caption with the empty caption
    flow_logit_mean: float = 0.0  # flow: training tau = sigmoid(u), u ~ N(this, flow_logit_std^2); > 0 trains noisier timesteps more (SD3 3.1)
    flow_logit_std: float = 1.0  # flow: the spread of u; > 1 trains both ends (nearly clean, nearly pure noise) more
    flow_tail_frac: float = 0.0  # flow: this fraction of training tau uniform on [flow_tail_from, 1) instead (high noise only)
    flow_tail_from: float = 0.9  # flow: where that band starts


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 500  # linear warmup steps
    decay: str = "constant"  # after warmup: "constant" or "cosine"
    min_lr_ratio: float = 0.0  # cosine decays to lr * this
    grad_clip: float = 1.0  # max global gradient norm; 0 = off


@dataclass
class TrainConfig:
    global_batch_size: int = 256  # samples per optimizer step, all ranks together
    micro_batch_size: int = 0  # samples per rank per forward; 0 = global / world (no accumulation)
    max_steps: int = 1000  # optimizer steps to train
    seed: int = 0  # every random stream is a pure function of (seed, rank, step)
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    precision: str = "auto"  # fp32, bf16, fp16; auto = bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU
    activation_checkpointing: bool = False  # recompute U-Net activations in backward
    offload_optimizer: bool = False  # keep optimizer states on CPU (ZeRO-Offload)
    compile: bool = False  # torch.compile the U-Net
    ckpt_every_steps: int = 500  # checkpoint every N optimizer steps; 0 = off
    ckpt_every_minutes: float = 0.0  # also checkpoint every N minutes of wall time; 0 = off
    keep_last: int = 3  # intact checkpoints kept on disk (a damaged one is never removed and does not count)
    verify_checkpoints: bool = True  # on resume, also compare every file's content hash (sizes are always checked)
    log_every: int = 10  # log train/* metrics every N steps
    max_nonfinite_steps: int = 5  # abort after this many consecutive non-finite losses
    collective_timeout_s: float = 600.0  # a collective that takes longer (e.g. a dead rank) aborts the run


@dataclass
class EMAConfig:
    enabled: bool = True  # keep an exponential moving average of the weights
    decay: float = 0.9999  # EMA decay after warmup
    warmup_power: float = 0.75  # decay_t = min(decay, 1 - (1 + t) ** -power); 0 = no warmup
    start_step: int = 0  # EMA tracks the raw weights exactly until this step


@dataclass
class EvalConfig:
    every_steps: int = 500  # periodic eval every N optimizer steps; 0 = only at the end
    prompts: tuple[str, ...] = ()  # fixed prompts for sample grids; () = built-in synthetic-shapes prompts
    num_prompts: int = 8  # built-in prompts used when `prompts` is empty
    images_per_prompt: int = 2  # samples per prompt in the grid
    sampler: str = "ddim"  # ddim, dpm++ or euler
    steps: int = 25  # sampler steps
    cfg_scale: float = 4.0  # classifier-free guidance scale
    seed: int = 1234  # seeds of the fixed sample noise
    heldout_buckets: int = 4  # timestep buckets for the held-out denoising loss
    heldout_samples: int = 256  # held-out latents used per eval
    heldout_batch_size: int = 64  # held-out latents per U-Net forward pass in the held-out loss
    use_ema: bool = True  # evaluate the EMA weights (if any)
    inception_path: str = ""  # torch-fidelity FID Inception weights (weights-inception-2015-12-05-6726825d.pth); "" = random init, logged as eval/fid_randinit
    fid_num_images: int = 0  # generated and reference images for FID; 0 = no FID
    fid_final_only: bool = False  # FID (and CLIP score on its set) only in a training run's final eval, not the periodic ones
    fid_batch_size: int = 64  # images per sampler batch and per Inception forward in FID/CLIP eval
    fid_cache_dir: str = ""  # reference-statistics cache; "" = run_root/fid_cache
    clip_arch: str = "ViT-B-32"  # open_clip architecture for CLIP score, or "tiny"
    clip_pretrained: str = ""  # local open_clip weights file or "local-dir:DIR"; "" = random init, logged as eval/clip_score_randinit
    clip_score: bool = True  # CLIP score of the generated images (FID set if any, else the grid); false = skip
    cfg_sweep: tuple[float, ...] = ()  # stand-alone eval: CFG scales to sweep (plus eval.cfg_scale); () = only eval.cfg_scale
    sample_size: tuple[int, int] = (0, 0)  # (height, width) of grid samples in pixels; (0, 0) = data.resolution square
    sample_crop: tuple[int, int] = (0, 0)  # micro-conditioning crop (top, left) when sampling


@dataclass
class TrackingConfig:
    uri: str = ""  # MLflow tracking URI; "" = $MLFLOW_TRACKING_URI, else sqlite:///<run_root>/mlflow.db
    experiment: str = "latentforge"  # MLflow experiment that groups runs
    run_name: str = ""  # MLflow run name; "" = the run directory's name
    enabled: bool = True  # log to MLflow at all
    system_metrics: bool = True  # sample CPU/memory/disk/network (and GPU with nvidia-ml-py) into system/* metrics
    max_buffer: int = 100_000  # records held in memory while neither MLflow nor the spool can take them


@dataclass
class Config:
    preset: str = "tiny"  # the preset this config started from
    run_root: str = "runs"  # parent of run directories, the default data and the MLflow store
    run_name: str = "demo"  # run directory is run_root/run_name unless run_dir is set
    run_dir: str = ""  # explicit run directory; "" = run_root/run_name
    nproc: int = 1  # local processes (ranks) to start when not under SLURM/torchrun
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # Derived paths. They are properties, not fields, so they never disagree with run_root.
    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.run_root) / self.run_name

    @property
    def resolved_latent_dir(self) -> Path:
        return Path(self.data.latent_dir) if self.data.latent_dir else Path(self.run_root) / "latents"

    @property
    def resolved_raw_shards(self) -> str:
        return self.data.raw_shards or str(Path(self.run_root) / "synth" / "*.tar")

    @property
    def resolved_tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{Path(self.run_root).resolve() / 'mlflow.db'}"


# ---------------------------------------------------------------------------------------
# Presets.

PRESETS: dict[str, Callable[[], Config]] = {}


def preset(name: str) -> Callable[[Callable[[], Config]], Callable[[], Config]]:
    def register(fn: Callable[[], Config]) -> Callable[[], Config]:
        PRESETS[name] = fn
        return fn

    return register


@preset("tiny")
def tiny() -> Config:
    """CPU-sized, the tests' preset and the base of `demo`: 32 px synthetic shapes, the
    pixel codec (4x4 patches -> 48 x 8 x 8 latents), the random tiny open_clip, a
    1.1M-param U-Net.

    x0 ("sample") prediction: with 48-channel patches and a 32-channel first level,
    eps/v prediction must push per-pixel noise through a bottleneck and leaves residual
    noise in samples, while x0 targets are flat shapes; colour, size, position and
    background are learnt within a few hundred steps (fine-tuning tests start from such
    a model), but two draws of one prompt come out alike. The `demo` preset trades speed
    for pictures. The linear schedule (DDPM's) with zero terminal SNR suits pixel-range data."""
    return Config(
        preset="tiny",
        data=DataConfig(resolution=32, latent_samples_per_shard=512, heldout_shards=1, bucket_multiple=8),
        codec=CodecConfig(kind="pixel", patch=4),
        text=TextConfig(model="tiny"),
        model=ModelConfig(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=32,
            norm_num_groups=32,
        ),
        diffusion=DiffusionConfig(schedule="linear", beta_start=1e-4, beta_end=0.02, zero_terminal_snr=True,
                                  prediction="sample", cfg_dropout=0.1),
        optim=OptimConfig(lr=3e-3, warmup_steps=50, decay="cosine", min_lr_ratio=0.1),
        train=TrainConfig(global_batch_size=64, max_steps=2000, ckpt_every_steps=1000, log_every=50),
        ema=EMAConfig(decay=0.99, warmup_power=0.75),
        eval=EvalConfig(every_steps=1000, steps=25, cfg_scale=3.0, heldout_samples=128, clip_arch="tiny"),
    )


@preset("demo")
def demo() -> Config:
    """`make demo`'s preset: the tiny preset's data, text encoder and U-Net widths, with the
    objective, codec patch and attention layout chosen by measurement (docs/demo.md,
    benchmarks/tune_demo.py) for samples that follow their prompt, differ between noise
    draws and show no patch seams, in about 10 minutes on 2 CPU cores.

    Rectified flow with logit-normal timesteps (SD3) rather than tiny's x0 prediction: an
    x0 model predicts the per-prompt mean at high noise and the deterministic sampler
    keeps it, so every draw of a prompt gave the same image (eval/diversity_same 0). 2x2
    patches (12 x 16 x 16 latents) rather than 4x4: the velocity target holds per-pixel
    noise, which 48-channel patches squeezed into a 32-channel first level cannot carry
    (flow on 4x4 patches sampled noise), and 4x4 patches left seams at patch borders.
    Cross-attention only at the 8 x 8 level: at 16 x 16 it doubles the step time. The
    tests keep the tiny preset (and pin the eps objective): they need speed, not pictures."""
    cfg = tiny()
    cfg.preset = "demo"
    cfg.codec.patch = 2
    cfg.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
    cfg.model.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
    cfg.diffusion = DiffusionConfig(objective="flow", prediction="v", cfg_dropout=0.1)
    # 1,500 x 64 samples: make demo in 6.0-6.4 minutes on 2 AVX-512 cores, 8.4 with AVX2
    # kernels only (docs/demo.md); 2,000 steps scored a little better but took 11.7 there.
    cfg.train.max_steps = 1500
    # Speed on CPU ranks (benchmarks/bench_peer.py, bench_vs_diffusers.py; README): ZeRO
    # partitions optimizer state to save memory, which a 1M-parameter model does not need,
    # and its extra collectives cost ~20% of the step; a loader worker takes a core from
    # the step's threads, while these small latents load in-process in ~4% of a small step
    # (16 samples of 4x8x8). The SD-sized presets keep ZeRO-2 and loader workers (mid-size
    # U-Net on 2 ranks: ZeRO-2 0.64 samples/s, ZeRO-0 0.59; benchmarks/bench_scaling.py).
    cfg.train.zero_stage = 0
    cfg.data.num_workers = 0
    return cfg


@preset("sd2-base-256")
def sd2_base_256() -> Config:
    """The real-cluster reference: SD-2-base-shaped U-Net at 256 px on SD VAE latents,
    conditioned on the OpenCLIP ViT-H-14 text tower's penultimate layer."""
    return Config(
        preset="sd2-base-256",
        nproc=1,
        synth=SynthConfig(num_samples=65536, samples_per_shard=1024, image_size=256),
        data=DataConfig(resolution=256, min_size=256, max_aspect=2.0, latent_samples_per_shard=1024,
                        precompute_batch_size=128, precompute_workers=8, heldout_shards=1, num_workers=4),
        codec=CodecConfig(kind="vae", path="/path/to/sd-vae-ft-mse", scale=0.18215, dtype="bf16"),
        text=TextConfig(model="ViT-H-14", pretrained="/path/to/open_clip_vit_h_14/open_clip_pytorch_model.bin",
                        layer="penultimate", dtype="bf16"),
        model=ModelConfig(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                              "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=64,
            norm_num_groups=32,
            linear_projection=True,
        ),
        diffusion=DiffusionConfig(prediction="v", cfg_dropout=0.1),
        optim=OptimConfig(lr=1e-4, warmup_steps=10000, decay="constant"),
        train=TrainConfig(global_batch_size=2048, max_steps=550000, zero_stage=2, precision="bf16",
                          activation_checkpointing=True, ckpt_every_steps=2000, ckpt_every_minutes=30,
                          keep_last=3, log_every=50),
        ema=EMAConfig(decay=0.9999),
        eval=EvalConfig(every_steps=10000, num_prompts=32, images_per_prompt=4, steps=50, cfg_scale=7.5,
                        heldout_samples=2048),
    )


@preset("sd2-base-512")
def sd2_base_512() -> Config:
    """Stage 2 of the SD-2-base recipe (550k steps at 256 px, then 850k at 512 px): the same
    U-Net at 512 px (64 x 64 latents) on its own latent set, started from stage 1's EMA
    weights with a fresh optimizer and LR schedule. Set model.init_from=STAGE1_RUN_DIR
    (README, "Training in stages")."""
    cfg = sd2_base_256()
    cfg.preset = "sd2-base-512"
    cfg.synth.image_size = 512
    cfg.data.resolution, cfg.data.min_size = 512, 512
    cfg.optim = OptimConfig(lr=1e-4, warmup_steps=5000, decay="constant")
    cfg.train.max_steps = 850000
    return cfg


# ---------------------------------------------------------------------------------------
# Conversion between dataclasses and plain dicts, with type checks.


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return _from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected bool, got {value!r}")
    if tp in (int, float):  # an int field takes no float (1.5 is not silently cut to 1)
        accepted = (int, str) if tp is int else (int, float, str)
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return str(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in config")  # keep fields simple
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    obj = base if base is not None else cls()
    for k, v in data.items():
        if k not in names:
            close = [n for n in names if n.startswith(k[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{prefix}{k}: unknown key{hint}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{prefix}{k}: expected a mapping (section), got {v!r}")
            setattr(obj, k, _from_dict(tp, v, prefix=f"{prefix}{k}.", base=getattr(obj, k)))
        else:
            setattr(obj, k, _coerce(prefix + k, v, tp))
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from a nested dict: the preset it names (default tiny), then the dict."""
    name = data.get("preset", "tiny")
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return _from_dict(Config, data, base=PRESETS[name]())


def flatten(cfg: Config) -> dict[str, Any]:
    """{"train.max_steps": 1000, ...}: the form MLflow params take."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(to_dict(cfg), "")
    return out


def config_hash(cfg: Config, sections: tuple[str, ...] = ("codec", "text", "model", "diffusion")) -> str:
    """Hash of the sections that define what a checkpoint's weights mean."""
    from latentforge.hashing import json_sha256

    d = to_dict(cfg)
    return json_sha256({s: d[s] for s in sections})


# ---------------------------------------------------------------------------------------
# Loading files and overrides.


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            try:
                import tomllib  # Python 3.11+
            except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` backport
                try:
                    import tomli as tomllib
                except ModuleNotFoundError:
                    raise ConfigError(f"{p}: TOML configs need Python 3.11+ or the tomli package "
                                      f"(latentforge depends on it on Python 3.10: pip install tomli)") from None

            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml", ".json"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{p}: config files must end in .yaml, .yml, .toml or .json")
    except ConfigError:
        raise
    except Exception as e:  # parse errors from yaml/tomllib; keep it to one line
        raise ConfigError(f"{p}: cannot parse: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.field=value` -> (["section", "field"], value). The value is YAML-parsed
    (so `[32, 64]`, `true` and `1e-4` work) and then checked against the field's type."""
    if "=" not in item:
        raise ConfigError(f"{item}: overrides look like section.field=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{item}: empty key")
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = ""
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    d: dict[str, Any] = {}
    cur = d
    for p in path[:-1]:
        cur = cur.setdefault(p, {})
    cur[path[-1]] = value
    return d


def overrides_dict(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`section.field=value` items as one nested dict, later items winning."""
    data: dict[str, Any] = {}
    for item in overrides:
        path, value = parse_override(item)
        data = merge(data, _nest(path, value))
    return data


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`b` over `a`, section by section (nested dicts merge, other values replace)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(preset_name: str | None = None, file: str | os.PathLike | None = None,
            overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset, then file, then overrides. Validates every key and type. With model.init_from
    the source's U-Net architecture goes between the preset and the file: it holds unless
    the file or an override sets a model field itself."""
    data = merge(load_file(file) if file else {}, overrides_dict(overrides))
    if preset_name:  # an explicit --preset wins over the file's
        data["preset"] = preset_name
    cfg = from_dict(data)
    if cfg.model.init_from:
        from latentforge.sources import source_architecture

        arch = source_architecture(cfg.model.init_from, resumed=cfg.resolved_run_dir / "config.yaml")
        cfg = from_dict(merge({"model": arch}, data))
    validate(cfg)
    return cfg


def batch_split(cfg: Config, world_size: int, where: str = "") -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) from the global batch size.
    `where` names the layout in the error (e.g. a cluster profile)."""
    g = cfg.train.global_batch_size
    at = f" ({where})" if where else ""
    if g % world_size:
        raise ConfigError(f"train.global_batch_size: {g} is not divisible by the world size {world_size}{at}")
    per_rank = g // world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size: {micro} does not divide the per-rank batch {per_rank} "
                          f"(global {g} / world {world_size}){at}")
    return micro, per_rank // micro


def validate_diffusion(d: DiffusionConfig) -> None:
    """The diffusion settings that cannot work, each refused with a ConfigError naming the
    field. One place for both callers: `validate` (at start-up, before any rank) and
    training.diffusion.Schedule.from_config (wherever a schedule is built)."""
    if d.objective not in ("ddpm", "flow"):
        raise ConfigError(f"diffusion.objective: expected 'ddpm' or 'flow', got {d.objective!r}")
    if d.prediction not in ("eps", "v", "sample"):
        raise ConfigError(f"diffusion.prediction: expected eps, v or sample, got {d.prediction!r}")
    if d.min_snr_gamma < 0:
        raise ConfigError(f"diffusion.min_snr_gamma: must be >= 0 (0 = off), got {d.min_snr_gamma}")
    if d.offset_noise < 0:
        raise ConfigError(f"diffusion.offset_noise: must be >= 0 (0 = off), got {d.offset_noise}")
    if d.objective == "flow":
        if d.prediction != "v":
            raise ConfigError(f"diffusion.prediction: objective 'flow' trains the velocity eps - x0; "
                              f"set diffusion.prediction=v (got {d.prediction!r})")
        if d.min_snr_gamma > 0:
            raise ConfigError("diffusion.min_snr_gamma: Min-SNR weighting is defined for objective 'ddpm'; "
                              "flow weights timesteps by logit-normal sampling instead (set it to 0)")
        if d.zero_terminal_snr:
            raise ConfigError("diffusion.zero_terminal_snr: only applies to objective 'ddpm' "
                              "(rectified flow reaches pure noise at tau = 1 already)")
    if not math.isfinite(d.flow_logit_mean) or (d.flow_logit_mean and d.objective != "flow"):
        raise ConfigError(f"diffusion.flow_logit_mean: a finite number, used by objective 'flow' only "
                          f"(got {d.flow_logit_mean} with objective {d.objective!r})")
    if not (math.isfinite(d.flow_logit_std) and d.flow_logit_std > 0) or (
            d.flow_logit_std != 1.0 and d.objective != "flow"):
        raise ConfigError(f"diffusion.flow_logit_std: a positive number, used by objective 'flow' only "
                          f"(got {d.flow_logit_std} with objective {d.objective!r})")
    if not 0.0 <= d.flow_tail_frac < 1.0 or (d.flow_tail_frac and d.objective != "flow"):
        raise ConfigError(f"diffusion.flow_tail_frac: a fraction in [0, 1), used by objective 'flow' only "
                          f"(got {d.flow_tail_frac} with objective {d.objective!r})")
    if not 0.0 <= d.flow_tail_from < 1.0:
        raise ConfigError(f"diffusion.flow_tail_from: a noise level tau in [0, 1), got {d.flow_tail_from}")
    if d.objective == "ddpm" and d.zero_terminal_snr and d.prediction == "eps":
        # At SNR 0, x_t = eps: an eps prediction says nothing about x0 (Lin et al. 2023, 3.2).
        raise ConfigError("diffusion.zero_terminal_snr: needs diffusion.prediction v or sample "
                          "(x0 cannot be recovered from an eps prediction at SNR 0)")


def validate(cfg: Config) -> None:
    """Checks that span fields. One line per failure, naming the key."""
    if cfg.codec.kind not in ("pixel", "vae"):
        raise ConfigError(f"codec.kind: expected 'pixel' or 'vae', got {cfg.codec.kind!r}")
    if cfg.codec.kind == "pixel" and cfg.data.resolution % cfg.codec.patch:
        raise ConfigError(f"codec.patch: {cfg.codec.patch} does not divide data.resolution {cfg.data.resolution}")
    for sec, name in (("codec", cfg.codec.dtype), ("text", cfg.text.dtype)):
        if name not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"{sec}.dtype: expected auto, fp32, bf16 or fp16, got {name!r}")
    if cfg.text.layer not in ("penultimate", "last"):
        raise ConfigError(f"text.layer: expected 'penultimate' or 'last', got {cfg.text.layer!r}")
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: expected 0-3, got {cfg.train.zero_stage}")
    if cfg.train.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision: expected auto, fp32, bf16 or fp16, got {cfg.train.precision!r}")
    validate_diffusion(cfg.diffusion)
    if cfg.diffusion.schedule not in ("linear", "scaled_linear", "cosine"):
        raise ConfigError(f"diffusion.schedule: expected linear, scaled_linear or cosine, got {cfg.diffusion.schedule!r}")
    if not 0.0 <= cfg.diffusion.cfg_dropout < 1.0:
        raise ConfigError(f"diffusion.cfg_dropout: expected a probability in [0, 1), got {cfg.diffusion.cfg_dropout}")
    if cfg.optim.decay not in ("constant", "cosine"):
        raise ConfigError(f"optim.decay: expected 'constant' or 'cosine', got {cfg.optim.decay!r}")
    if cfg.train.global_batch_size <= 0:
        raise ConfigError(f"train.global_batch_size: must be positive, got {cfg.train.global_batch_size}")
    if cfg.train.max_steps < 0:
        raise ConfigError(f"train.max_steps: must be >= 0, got {cfg.train.max_steps}")
    if not isinstance(cfg.train.verify_checkpoints, bool):
        raise ConfigError(f"train.verify_checkpoints: expected true or false, got {cfg.train.verify_checkpoints!r}")
    if len(cfg.model.down_block_types) != len(cfg.model.block_out_channels):
        raise ConfigError("model.down_block_types: needs one entry per model.block_out_channels")
    if len(cfg.model.up_block_types) != len(cfg.model.block_out_channels):
        raise ConfigError("model.up_block_types: needs one entry per model.block_out_channels")
    for c in cfg.model.block_out_channels:
        if c % cfg.model.norm_num_groups:
            raise ConfigError(f"model.block_out_channels: {c} is not a multiple of model.norm_num_groups "
                              f"{cfg.model.norm_num_groups}")
    m = cfg.model
    if m.mid_block not in ("cross_attn", "none"):
        raise ConfigError(f"model.mid_block: expected 'cross_attn' or 'none', got {m.mid_block!r}")
    if m.lora_rank < 0 or m.lora_alpha < 0:
        raise ConfigError(f"model.lora_rank/lora_alpha: must be >= 0, got {m.lora_rank}, {m.lora_alpha}")
    if m.lora_rank and not m.init_from:
        raise ConfigError("model.lora_rank: LoRA adapts pretrained weights; set model.init_from to the model to adapt")
    if cfg.eval.heldout_batch_size < 1:
        raise ConfigError(f"eval.heldout_batch_size: must be >= 1, got {cfg.eval.heldout_batch_size}")
    if cfg.eval.sampler not in ("ddim", "dpm++", "euler"):
        raise ConfigError(f"eval.sampler: expected ddim, dpm++ or euler, got {cfg.eval.sampler!r}")
    if cfg.nproc < 1:
        raise ConfigError(f"nproc: must be >= 1, got {cfg.nproc}")
    _validate_data(cfg)
    m = cfg.model
    if m.micro_conditioning and m.pooled_text_conditioning:
        raise ConfigError("model.pooled_text_conditioning: model.micro_conditioning already feeds the pooled text "
                          "embedding through the added time embedding; set one of them")
    if m.micro_conditioning_dim < 2 or m.micro_conditioning_dim % 2:
        raise ConfigError(f"model.micro_conditioning_dim: must be an even number >= 2, got {m.micro_conditioning_dim}")
    size, crop = cfg.eval.sample_size, cfg.eval.sample_crop
    if (size[0] > 0) != (size[1] > 0) or min(size) < 0:
        raise ConfigError(f"eval.sample_size: expected (height, width) both > 0, or (0, 0), got {list(size)}")
    if min(crop) < 0:
        raise ConfigError(f"eval.sample_crop: expected (top, left) >= 0, got {list(crop)}")
    if cfg.synth.max_aspect < 1:
        raise ConfigError(f"synth.max_aspect: must be >= 1 (1 = square), got {cfg.synth.max_aspect}")
    if cfg.synth.captions not in (1, 2):
        raise ConfigError(f"synth.captions: expected 1 or 2, got {cfg.synth.captions}")


def _validate_data(cfg: Config) -> None:
    """Buckets, captions, filters and sources."""
    d = cfg.data
    if d.bucket_max_ratio < 1:
        raise ConfigError(f"data.bucket_max_ratio: must be >= 1 (1 = square only), got {d.bucket_max_ratio}")
    if d.bucket_area < 0:
        raise ConfigError(f"data.bucket_area: must be >= 0 (0 = data.resolution ** 2), got {d.bucket_area}")
    if d.bucket_multiple < 1:
        raise ConfigError(f"data.bucket_multiple: must be >= 1, got {d.bucket_multiple}")
    if d.bucket_max_ratio > 1:
        area = d.bucket_area or d.resolution ** 2
        if area < d.bucket_multiple ** 2:
            raise ConfigError(f"data.bucket_area: {area} pixels hold no bucket of sides that are multiples of "
                              f"data.bucket_multiple {d.bucket_multiple}")
        levels = 2 ** (len(cfg.model.block_out_channels) - 1)
        if cfg.codec.kind == "pixel" and d.bucket_multiple % (cfg.codec.patch * levels):
            raise ConfigError(f"data.bucket_multiple: {d.bucket_multiple} is not a multiple of codec.patch x 2 ** "
                              f"(U-Net levels - 1) = {cfg.codec.patch * levels}, so some bucket's latents would not "
                              f"fit the U-Net")
    if d.max_captions < 1:
        raise ConfigError(f"data.max_captions: must be >= 1, got {d.max_captions}")
    if any(w < 0 for w in d.caption_weights) or (d.caption_weights and not sum(d.caption_weights) > 0):
        raise ConfigError(f"data.caption_weights: expected weights >= 0, not all 0, got {list(d.caption_weights)}")
    if any(not f or "/" in f for f in d.caption_fields):
        raise ConfigError(f"data.caption_fields: expected json field names or member extensions, got "
                          f"{list(d.caption_fields)}")
    for key in ("filter_min_original_side", "filter_max_original_side", "filter_min_caption_words",
                "filter_max_caption_words"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key}: must be >= 0 (0 = off), got {getattr(d, key)}")
    for key in ("filter_max_watermark", "filter_max_unsafe"):
        if not 0 <= getattr(d, key) <= 1:
            raise ConfigError(f"data.{key}: expected a probability in [0, 1] (1 = off), got {getattr(d, key)}")
    if d.filter_min_aesthetic < 0:
        raise ConfigError(f"data.filter_min_aesthetic: must be >= 0 (0 = off), got {d.filter_min_aesthetic}")
    if 0 < d.filter_max_original_side < d.filter_min_original_side:
        raise ConfigError("data.filter_max_original_side: below data.filter_min_original_side")
    if 0 < d.filter_max_caption_words < d.filter_min_caption_words:
        raise ConfigError("data.filter_max_caption_words: below data.filter_min_caption_words")
    if d.epoch_samples < 0:
        raise ConfigError(f"data.epoch_samples: must be >= 0 (0 = the sources' sizes summed), got {d.epoch_samples}")
    names = [s.name for s in d.sources]
    for i, s in enumerate(d.sources):
        if not s.name or not all(c.isalnum() or c in "-_." for c in s.name):
            raise ConfigError(f"data.sources[{i}].name: expected a non-empty name of letters, digits, '-', '_' "
                              f"or '.', got {s.name!r}")
        if s.name in names[:i]:
            raise ConfigError(f"data.sources[{i}].name: {s.name!r} names two sources")
        if not s.raw_shards:
            raise ConfigError(f"data.sources[{i}].raw_shards: empty (every source needs its raw shards)")
        if not s.weight > 0:
            raise ConfigError(f"data.sources[{i}].weight: must be > 0, got {s.weight}")


def save(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    import yaml

    from latentforge.fileio import atomic_write

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_resolved(path: str | os.PathLike) -> Config:
    """Read a config written by `save` (e.g. run_dir/config.yaml)."""
    cfg = from_dict(load_file(path))
    validate(cfg)
    return cfg
