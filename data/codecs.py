"""Image codecs: pixels <-> latents.

Two codecs share one small interface (`ImageCodec`):

- `PixelCodec`: parameter-free and exactly invertible. `pixel_unshuffle` folds each
  p x p patch into channels, (N, 3, H, W) -> (N, 3 p^2, H/p, W/p). It lets the whole
  pipeline run on a laptop with no pretrained weights, and its exactness makes data-path
  bugs visible (decode(encode(x)) == x bitwise).
- `VAECodec`: a diffusers `AutoencoderKL` loaded from a local directory (offline by
  design, docs/security.md). `encode` returns the posterior (mean, std); precompute stores it
  raw and the loader samples `mean + std * eps` and applies `(z - shift) * scale` just in
  time (as EDM2's `training/encoders.py` does). `decode` takes the UNscaled
  latent: the caller undoes `z / scale + shift` first.

`identity()` lists everything that shapes the numbers (kind, architecture, weights hash,
dtype, scale, shift) and never the path, so a moved copy of the same weights still
matches the manifests written with it. diffusers is imported late (it is slow to import).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import torch

from latentforge import dist
from latentforge.config import CodecConfig
from latentforge.hashing import sha256_files
from latentforge.sources import diffusers_weight_files

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CodecWeightsNotFound(FileNotFoundError):
    """Pretrained codec weights are not where `codec.path` says. The message names both."""


def parse_dtype(name: str, key: str) -> torch.dtype:
    """"fp32" | "bf16" | "fp16" -> torch dtype, or a ValueError naming the config `key`."""
    if name not in DTYPES:
        raise ValueError(f"{key}: expected auto, fp32, bf16 or fp16, got {name!r}")
    return DTYPES[name]


def resolve_dtype_name(name: str, device: torch.device | str, key: str) -> str:
    """"auto" -> this device's encoder dtype (latentforge.dist.compute_dtype: bf16 on a GPU
    with native bf16, else fp32); any other name is checked and returned. The resolved name
    is what identities record."""
    if name == "auto":
        return dist.compute_dtype(name, device)
    parse_dtype(name, key)
    return name


# ---------------------------------------------------------------------------------------
# The interface.


class ImageCodec:
    """Pixels (N, 3, H, W) float32 in [-1, 1] <-> latents (N, C, H/d, W/d) float32.

    Attributes: `name`, `latent_channels` (C), `downsample` (d, pixels per latent cell),
    `scale` and `shift` (the loader's `(z - shift) * scale`), `deterministic` (std is None).
    Outputs live on the codec's device; callers move them (precompute: `.cpu()`).
    """

    name: str
    latent_channels: int
    downsample: int
    scale: float
    shift: float
    deterministic: bool
    device: torch.device

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images (N, 3, H, W) float32 in [-1, 1] -> (mean, std), each (N, C, H/d, W/d) float32."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """UNscaled latents (N, C, h, w) -> images (N, 3, h d, w d) float32 clamped to [-1, 1]."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """JSON-serialisable description of everything that shapes the numbers."""
        raise NotImplementedError

    # Shared input checks: a clear ValueError beats a shape error deep inside a conv.
    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{self.name}.encode: expected images (N, 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"{self.name}.encode: expected float images in [-1, 1], got {images.dtype}")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"{self.name}.encode: image size {h}x{w} is not a multiple of the codec's "
                             f"downsample factor {self.downsample}")
        if images.numel():
            lo, hi = images.aminmax()
            # A little slack for resize ringing; [0, 1] or [0, 255] inputs are the bug this catches.
            if lo < -1.001 or hi > 1.001:
                raise ValueError(f"{self.name}.encode: images must be in [-1, 1], got range "
                                 f"[{lo.item():.3g}, {hi.item():.3g}]")

    def _check_latents(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != self.latent_channels:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{self.name}.decode: expected latents (N, {self.latent_channels}, h, w), got {shape}")


# ---------------------------------------------------------------------------------------
# Pixel codec.


class PixelCodec(ImageCodec):
    """Parameter-free codec: `pixel_unshuffle` by `patch` and `pixel_shuffle` back.

    Always computes in float32: there are no weights, and any other dtype would only
    break the exact round trip.
    """

    def __init__(self, patch: int = 2, scale: float = 1.0, shift: float = 0.0,
                 device: torch.device | str = "cpu") -> None:
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise ValueError(f"codec.patch: expected a positive int, got {patch!r}")
        if not scale > 0:
            raise ValueError(f"codec.scale: expected a positive number, got {scale!r}")
        self.patch = patch
        self.name = f"pixel-p{patch}"
        self.latent_channels = 3 * patch * patch
        self.downsample = patch
        self.scale = float(scale)
        self.shift = float(shift)
        self.deterministic = True
        self.device = torch.device(device)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        self._check_images(images)
        with torch.inference_mode():
            x = images.to(self.device, torch.float32)
            return torch.nn.functional.pixel_unshuffle(x, self.patch), None  # (N, 3 p^2, H/p, W/p)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check_latents(z)
        with torch.inference_mode():
            x = torch.nn.functional.pixel_shuffle(z.to(self.device, torch.float32), self.patch)  # (N, 3, H, W)
            return x.clamp(-1.0, 1.0)

    def identity(self) -> dict[str, Any]:
        return {"kind": "pixel", "name": self.name, "patch": self.patch, "latent_channels": self.latent_channels,
                "downsample": self.downsample, "weights_sha256": None, "dtype": "fp32",
                "scale": self.scale, "shift": self.shift}


# ---------------------------------------------------------------------------------------
# diffusers AutoencoderKL.

# A Hugging Face repo id ("org/name"): only looked up in the local cache, never fetched.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_vae_dir(path: str) -> Path:
    """The directory holding the VAE's config.json and weights, from what `codec.path` names:

    - a directory written by `AutoencoderKL.save_pretrained` (config.json + weights);
    - a full pipeline directory (or HF cache snapshot of one) with a `vae/` subfolder;
    - a Hugging Face repo id, if and only if it is already in the local HF cache.
    """
    if not path:
        raise CodecWeightsNotFound("codec.path: codec.kind is 'vae' but codec.path is empty; set it to a "
                                   "local directory written by AutoencoderKL.save_pretrained")
    p = Path(path).expanduser()
    if not p.exists() and _REPO_ID.match(path):
        p = _cached_snapshot(path)
    if not p.exists():
        raise CodecWeightsNotFound(f"codec.path: VAE weights not found at {str(p)!r} (expected a directory "
                                   f"written by AutoencoderKL.save_pretrained, a pipeline directory with vae/, "
                                   f"or a Hugging Face repo id already in the local cache)")
    if not p.is_dir():
        raise CodecWeightsNotFound(f"codec.path: {str(p)!r} is a file; expected a directory with config.json "
                                   f"and diffusion_pytorch_model.safetensors")
    for d in (p, p / "vae"):
        if (d / "config.json").is_file():
            return d
    raise CodecWeightsNotFound(f"codec.path: neither {str(p / 'config.json')!r} nor "
                               f"{str(p / 'vae' / 'config.json')!r} exists")


def _cached_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        raise CodecWeightsNotFound(f"codec.path: {repo_id!r} is neither a local directory nor a Hugging Face "
                                   f"repo in the local cache ({type(e).__name__}); downloads are off by "
                                   f"design: copy the weights and point codec.path at the directory") from None


def _vae_weight_files(d: Path) -> list[Path]:
    """The weight files diffusers will load from `d` (safetensors preferred, as diffusers does)."""
    try:
        return diffusers_weight_files(d, "codec.path")
    except FileNotFoundError as e:
        raise CodecWeightsNotFound(str(e).replace("no weights", "no VAE weights")) from None


class VAECodec(ImageCodec):
    """diffusers `AutoencoderKL` from a local directory; the model is cast to `dtype`.

    `scale` / `shift` of 0 mean "the VAE's own" (`scaling_factor` / `shift_factor`, None -> 0):
    0.18215 for the SD-1/2 VAE. `slicing=True` encodes/decodes one image at a time
    (diffusers' `enable_slicing`), trading speed for peak memory. Tiling is not offered:
    it changes the numbers at tile seams. `channels_last=True` keeps weights and
    activations NHWC, the layout oneDNN (CPU) and tensor-core (CUDA) convolutions run
    fastest in (~1.6x for the SD VAE encoder on a Xeon); fp32 results move at ~1e-6.
    """

    def __init__(self, path: str, dtype: str = "fp32", scale: float = 0.0, shift: float = 0.0,
                 device: torch.device | str = "cpu", slicing: bool = False, channels_last: bool = False) -> None:
        from diffusers import AutoencoderKL

        self.dtype_name = resolve_dtype_name(dtype, device, "codec.dtype")
        self.dtype = parse_dtype(self.dtype_name, "codec.dtype")
        if scale < 0:
            raise ValueError(f"codec.scale: expected a positive number (or 0 for the VAE's scaling_factor), "
                             f"got {scale}")
        self.dir = resolve_vae_dir(path)
        cfg = json.loads((self.dir / "config.json").read_text())
        cls = cfg.get("_class_name", "AutoencoderKL")
        if cls != "AutoencoderKL":
            raise ValueError(f"codec.path: {str(self.dir / 'config.json')!r} describes a {cls}, not an AutoencoderKL")
        self.weight_files = _vae_weight_files(self.dir)
        self.device = torch.device(device)
        # Without accelerate, diffusers' low_cpu_mem_usage default only prints a warning and
        # falls back; say what we get instead (a VAE is small: ~80M parameters).
        low_mem = importlib.util.find_spec("accelerate") is not None
        vae = AutoencoderKL.from_pretrained(str(self.dir), local_files_only=True, torch_dtype=self.dtype,
                                            low_cpu_mem_usage=low_mem)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.channels_last = channels_last
        if channels_last:
            self.vae = self.vae.to(memory_format=torch.channels_last)
        if slicing:
            self.vae.enable_slicing()
        self.slicing = slicing

        c = self.vae.config
        self.name = f"AutoencoderKL-{c.latent_channels}ch-f{2 ** (len(c.block_out_channels) - 1)}"
        self.latent_channels = int(c.latent_channels)
        self.downsample = 2 ** (len(c.block_out_channels) - 1)  # one 2x downsample between levels
        self.scale = float(scale) if scale else float(c.scaling_factor)
        self.shift = float(shift) if shift else float(c.shift_factor or 0.0)
        self.deterministic = False
        self._weights_sha256: str | None = None

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_images(images)
        with torch.inference_mode():
            x = images.to(self.device, self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            post = self.vae.encode(x).latent_dist  # DiagonalGaussianDistribution
            mean = post.mean.float()  # (N, C, H/d, W/d)
            # std from the (clamped) log-variance in fp32 rather than exp() in bf16: same value
            # as `post.std` in fp32, fewer rounding steps when computing in half precision.
            std = torch.exp(0.5 * post.logvar.float())  # (N, C, H/d, W/d)
            return mean, std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check_latents(z)
        with torch.inference_mode():
            x = self.vae.decode(z.to(self.device, self.dtype)).sample  # (N, 3, h d, w d)
            return x.float().clamp(-1.0, 1.0)

    def weights_sha256(self) -> str:
        if self._weights_sha256 is None:
            self._weights_sha256 = sha256_files(self.weight_files, self.dir)
        return self._weights_sha256

    def identity(self) -> dict[str, Any]:
        c = self.vae.config
        arch = {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()
                if not k.startswith("_") and k not in ("force_upcast",)}  # force_upcast is pipeline policy
        return {"kind": "vae", "name": self.name, "class": "AutoencoderKL", "config": arch,
                "latent_channels": self.latent_channels, "downsample": self.downsample,
                "weights_sha256": self.weights_sha256(), "dtype": self.dtype_name,
                "scale": self.scale, "shift": self.shift}


def build_codec(cfg: CodecConfig, device: torch.device | str = "cpu") -> ImageCodec:
    """The codec `cfg` names. `cfg.dtype` applies to the VAE only (the pixel codec is exact in fp32)."""
    if cfg.kind == "pixel":
        return PixelCodec(cfg.patch, scale=cfg.scale or 1.0, shift=cfg.shift, device=device)
    if cfg.kind == "vae":
        return VAECodec(cfg.path, dtype=cfg.dtype, scale=cfg.scale, shift=cfg.shift, device=device)
    raise ValueError(f"codec.kind: expected 'pixel' or 'vae', got {cfg.kind!r}")
