"""CLIP score of (image, prompt) pairs with an open_clip model loaded from local files.

CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning") of one pair is w * max(cos(E_image, E_text), 0). We use w = 100, the
convention of torchmetrics' `CLIPScore` and of text-to-image papers, and clamp each pair
at 0 as Hessel et al. define it. (torchmetrics clamps the mean instead; the two agree
whenever no pair has a negative cosine, which is the normal case for a trained CLIP.)

The reported number is the mean over all pairs on all ranks: each rank sums its per-pair
scores in float64 and counts them, one all-reduce of [sum, count], then sum / count.
Ranks may hold different numbers of pairs.

Weights come only from local paths (docs/security.md, "Offline by design"):

- `pretrained="/path/open_clip_pytorch_model.bin"` (or .safetensors, or an open_clip
  training checkpoint with a `state_dict`) with `arch` a built-in open_clip name such as
  "ViT-B-32"; the file goes to `open_clip.create_model_and_transforms(arch, pretrained=...)`.
- `pretrained="local-dir:/path/DIR"`: a folder as open_clip's `save_for_hf` writes it
  (`open_clip_config.json` + weights); the architecture is read from that folder.
- `arch="tiny"`: `TINY_CLIP_CONFIG` below, a CPU-sized CLIP for tests and the tiny preset.
- `pretrained=None` (or ""): random weights, seeded; `is_random` is True and the metric
  must be logged as "eval/clip_score_randinit" (`scorer.metric_name`), never as
  "eval/clip_score".

A pretrained tag such as "laion2b_s34b_b79k" is refused: open_clip would download it.

Images are preprocessed by the model's own inference transform (resize the shorter side
to the model's image size, centre crop, normalise with its mean/std). uint8 tensors are
turned into PIL images first, so tensors and PIL images take the identical path.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from latentforge import dist
from latentforge.data import open_clip_compat

CLIP_CONFIG_KEY = "eval.clip_pretrained"  # the config field callers read `pretrained` from
LOCAL_DIR_PREFIX = "local-dir:"

# A CPU-sized CLIP: ViT 32 px / patch 8 (16 tokens), 2 layers of width 64; the standard
# 77-token context and 49408-token BPE vocabulary, so open_clip's bundled tokenizer works.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class ClipScorer:
    """An open_clip model, its tokenizer and its inference image transform, in eval mode."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor],
                 preprocess: Callable[[Any], torch.Tensor], device: torch.device | str, *,
                 arch: str, source: str | None, is_random: bool) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.arch = arch
        self.source = source  # the weights file or local-dir: it came from; None if random
        self.is_random = is_random
        self.metric_name = "eval/clip_score_randinit" if is_random else "eval/clip_score"
        self._weights_sha256: str | None = None

    @property
    def weights_sha256(self) -> str:
        """sha256 of the weights file(s) it was loaded from; for random init, of the
        generated state (a pure function of the seed). For the eval protocol. Computed
        once, on first use (ViT-B-32 is ~600 MB to hash)."""
        if self._weights_sha256 is None:
            from latentforge.hashing import sha256_file, sha256_files, state_dict_sha256

            if self.source is None:
                self._weights_sha256 = state_dict_sha256(self.model)
            elif self.source.startswith(LOCAL_DIR_PREFIX):
                d = Path(self.source[len(LOCAL_DIR_PREFIX):])
                files = [p for pat in ("*.safetensors", "*.bin", "*.pth") for p in d.glob(pat)]
                self._weights_sha256 = sha256_files(files, d)
            else:
                self._weights_sha256 = sha256_file(self.source)
        return self._weights_sha256

    def protocol(self) -> dict[str, Any]:
        """What identifies these scores, for the eval protocol artifact."""
        return {"metric": self.metric_name, "arch": self.arch, "weights": self.source, "random_init": self.is_random,
                "weights_sha256": self.weights_sha256, "formula": "100 * max(cos(image, text), 0), mean over pairs",
                "preprocess": "open_clip inference transform (resize shorter side, centre crop, normalise)"}

    def _pixels(self, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        """The model's input (N, 3, S, S) float from uint8 (N, 3, H, W) or PIL images."""
        from PIL import Image

        if torch.is_tensor(images):
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"images: expected uint8 (N, 3, H, W) or a list of PIL images, got "
                                 f"{images.dtype} {tuple(images.shape)}")
            arr = images.detach().cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) uint8
            pil = [Image.fromarray(a) for a in arr]
        else:
            pil = list(images)
            for i, im in enumerate(pil):
                if not isinstance(im, Image.Image):
                    raise ValueError(f"images[{i}]: expected a PIL image, got {type(im).__name__}")
        if not pil:
            return torch.zeros(0, 3, 1, 1, device=self.device)
        return torch.stack([self.preprocess(im) for im in pil]).to(self.device)  # (N, 3, S, S)

    @torch.no_grad()
    def score(self, images: torch.Tensor | Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
        """Per-pair scores 100 * max(cos(image_emb, text_emb), 0), float32 (N,) on CPU."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = images.shape[0] if torch.is_tensor(images) else len(images)
        if len(prompts) != n:
            raise ValueError(f"prompts: {len(prompts)} prompts for {n} images; need one per image")
        if n == 0:
            return torch.zeros(0)
        pixels = self._pixels(images)
        tokens = self.tokenizer(prompts).to(self.device)  # (N, context_length)
        img = self.model.encode_image(pixels, normalize=True).float()  # (N, E)
        txt = self.model.encode_text(tokens, normalize=True).float()  # (N, E)
        cos = (img * txt).sum(dim=-1)  # (N,)
        return (100.0 * cos.clamp(min=0.0)).cpu()


def clip_score(scorer: ClipScorer, images: torch.Tensor | Sequence[Any], prompts: Sequence[str],
               batch_size: int = 64) -> float:
    """Mean CLIP score over every pair on every rank. Collective: every rank calls it,
    also a rank with no pairs."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = images.shape[0] if torch.is_tensor(images) else len(images)
    if len(prompts) != n:
        raise ValueError(f"prompts: {len(prompts)} prompts for {n} images; need one per image")
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    total = 0.0
    for i in range(0, n, batch_size):
        total += float(scorer.score(images[i:i + batch_size], prompts[i:i + batch_size]).double().sum())
    return mean_over_ranks(total, n)


def mean_over_ranks(total: float, count: int) -> float:
    """sum(total) / sum(count) over all ranks: the mean over every pair, whatever each rank
    holds. Callers that score batch by batch (eval) sum per-pair scores locally and call
    this once. Collective: every rank calls it, also a rank with count 0."""
    # [sum, count] in float64: one collective, exact counts.
    packed = torch.tensor([float(total), float(count)], dtype=torch.float64, device=dist.device())
    dist.all_reduce_sum(packed)
    total_all, count_all = packed.tolist()
    if count_all == 0:
        raise ValueError("clip_score: no (image, prompt) pairs on any rank")
    return total_all / count_all




def _check_local_dir(directory: str) -> None:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{CLIP_CONFIG_KEY}: open_clip model directory not found: {d}")
    if not (d / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{CLIP_CONFIG_KEY}: {d / 'open_clip_config.json'} not found (a local-dir: "
                                f"folder is what open_clip's save_for_hf writes)")
    if not any(any(d.glob(pat)) for pat in ("*.safetensors", "*.bin", "*.pth")):
        # open_clip would warn and carry on with random weights; a silent random CLIP
        # score under the real metric's name is exactly what we must not produce.
        raise FileNotFoundError(f"{CLIP_CONFIG_KEY}: no weights (*.safetensors, *.bin, *.pth) in {d}")


def _build_tiny(device: torch.device | str) -> tuple[torch.nn.Module, Callable, Callable]:
    import open_clip

    model = open_clip.CLIP(**copy.deepcopy(TINY_CLIP_CONFIG))
    # What create_model does for built-in names: default (OpenAI) mean/std, the model's size.
    pp, preprocess = open_clip_compat.inference_transform(model)
    open_clip.set_model_preprocess_cfg(model, pp)
    tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CONFIG["text_cfg"]["context_length"])
    return model.to(device), tokenizer, preprocess


def load_clip_scorer(arch: str, pretrained: str | os.PathLike | None, device: torch.device | str,
                     random_init_seed: int = 0) -> ClipScorer:
    """A ClipScorer for open_clip architecture `arch` ("ViT-B-32", ..., or "tiny").

    `pretrained`: a local weights file, "local-dir:DIR", or None/"" for seeded random
    weights (`is_random=True`). A missing file or folder raises FileNotFoundError naming
    it; nothing is ever downloaded.
    """
    import open_clip

    src = None if pretrained is None or str(pretrained) == "" else str(pretrained)

    if src is None:
        # Random init is a pure function of the seed; fork_rng leaves the caller's RNG alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(random_init_seed))
            if arch == "tiny":
                model, tokenizer, preprocess = _build_tiny(device)
            else:
                if open_clip.get_model_config(arch) is None:
                    raise ValueError(f"arch: unknown open_clip architecture {arch!r} (use 'tiny' or one of "
                                     f"open_clip.list_models())")
                # pretrained_image/text=False: no timm or HF tower weights are fetched either.
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=None, device=device, pretrained_image=False, pretrained_text=False)
                tokenizer = open_clip.get_tokenizer(arch)
        return ClipScorer(model, tokenizer, preprocess, device, arch=arch, source=None, is_random=True)

    if src.startswith(LOCAL_DIR_PREFIX):
        directory = src[len(LOCAL_DIR_PREFIX):]
        _check_local_dir(directory)
        model, _, preprocess = open_clip.create_model_and_transforms(src, device=device, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(src)
        return ClipScorer(model, tokenizer, preprocess, device, arch=arch, source=src, is_random=False)

    if not Path(src).is_file():
        # Checked here, before open_clip: it would read a non-file as a pretrained tag and
        # try to download it.
        raise FileNotFoundError(f"{CLIP_CONFIG_KEY}: open_clip weights file not found: {src} (give a local "
                                f"file or local-dir:DIR; pretrained tags are not downloaded)")
    if arch == "tiny":
        model, tokenizer, preprocess = _build_tiny(device)
        open_clip.load_checkpoint(model, src, strict=True, device="cpu")  # open_clip's own loader
        model.to(device)
    else:
        if open_clip.get_model_config(arch) is None:
            raise ValueError(f"arch: unknown open_clip architecture {arch!r} (use 'tiny' or one of "
                             f"open_clip.list_models())")
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=src, device=device, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(arch)
    return ClipScorer(model, tokenizer, preprocess, device, arch=arch, source=src, is_random=False)
