"""open_clip text encoder: captions -> token sequence (cross-attention context) + pooled embedding.

The token sequence follows SD-2's `FrozenOpenCLIPEmbedder` (Stability-AI/stablediffusion,
`ldm/modules/encoders/modules.py`): token + positional embedding, the text transformer's
residual blocks except the last (`layer="penultimate"`) or all of them (`layer="last"`),
then `ln_final`. The pooled embedding is exactly open_clip's `encode_text(normalize=False)`:
the EOT token of the final layer after `ln_final`, projected by `text_projection`.
Both come out of one pass: the penultimate activations are kept on the way through.

Weights load offline (docs/security.md, "Offline by design"), from `text.pretrained`:

- a checkpoint file (what open_clip's `create_model(name, pretrained=FILE)` accepts: a
  plain state dict, or open_clip_train's `{"state_dict": ...}` checkpoint);
- `local-dir:DIR` (or a bare directory), as `open_clip.push_to_hf_hub.save_for_hf` writes
  it and as a Hugging Face snapshot of an open_clip repo looks: `open_clip_config.json`
  plus `open_clip_model.safetensors` / `open_clip_pytorch_model.bin`. The architecture
  then comes from that config and `text.model` is only a label;
- "" (empty): random init with a fixed seed, so every process (precompute ranks, eval)
  builds the identical encoder. `is_random` is True and `identity()` says so.

`model="tiny"` is a small CLIP (text width 64, 3 layers, context 77, standard BPE vocab)
registered with open_clip at runtime through its public `add_model_config`.

Only the text tower is kept: the model is built on the CPU with open_clip's own loader
(so checkpoint conversions and strict key checks stay open_clip's), then `model.visual`
is deleted before moving to the device. The trade-off: the vision tower exists briefly in
host memory while loading (ViT-H-14: about 2.5 GB fp32), never on the GPU.
open_clip is imported late (it is slow to import).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from pathlib import Path
from typing import Any, NamedTuple

import torch

from latentforge.config import TextConfig
from latentforge.data import open_clip_compat
from latentforge.data.codecs import parse_dtype, resolve_dtype_name
from latentforge.fileio import atomic_write
from latentforge.hashing import sha256_file

TINY = "tiny"
TINY_OPEN_CLIP_NAME = "latentforge-tiny"  # the name it is registered under in open_clip
# A valid open_clip CLIP config: open_clip's loader insists on a vision tower, so it gets
# the smallest one (one 64-wide layer on 32x32 images); it is deleted after loading anyway.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
RANDOM_INIT_SEED = 0  # random encoders are a pure function of this seed (and torch's RNG algorithm)
LOCAL_DIR = "local-dir:"


class TextWeightsNotFound(FileNotFoundError):
    """Pretrained text-encoder weights are not where `text.pretrained` says. The message names both."""


class TextEmbeddings(NamedTuple):
    tokens: torch.Tensor  # (N, L, D) float32: the cross-attention context
    pooled: torch.Tensor  # (N, P) float32: projected EOT embedding (encode_text, unnormalised)
    lengths: torch.Tensor  # (N,) int64: tokens up to and including EOT; positions beyond are padding


_REGISTER_LOCK = threading.Lock()


def register_tiny() -> None:
    """Make `TINY_OPEN_CLIP_NAME` known to open_clip (idempotent, process-safe)."""
    import open_clip

    with _REGISTER_LOCK:
        if TINY_OPEN_CLIP_NAME in open_clip.list_models():
            return
        blob = json.dumps(TINY_CONFIG, sort_keys=True, indent=1)
        # A directory named by the content: concurrent processes write identical bytes, and a
        # changed TINY_CONFIG never reads a stale file. Atomic rename: no reader sees half a file.
        d = Path(tempfile.gettempdir()) / f"latentforge-open-clip-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{TINY_OPEN_CLIP_NAME}.json"
        if not path.is_file() or path.read_text() != blob:
            atomic_write(path, blob)
        open_clip.add_model_config(path)


def _resolve_pretrained(pretrained: str) -> tuple[str, Path | None]:
    """`text.pretrained` -> ("file" | "dir" | "random", path). Raises TextWeightsNotFound."""
    if not pretrained:
        return "random", None
    if pretrained.startswith("hf-hub:"):
        raise ValueError(f"text.pretrained: {pretrained!r}: downloads are off by design; point it at a local "
                         f"checkpoint file or local-dir:DIR (a Hugging Face snapshot directory works)")
    is_dir_form = pretrained.startswith(LOCAL_DIR)
    p = Path(pretrained[len(LOCAL_DIR):] if is_dir_form else pretrained).expanduser()
    if is_dir_form or p.is_dir():
        if not p.is_dir():
            raise TextWeightsNotFound(f"text.pretrained: open_clip directory not found: {str(p)!r}")
        if not (p / "open_clip_config.json").is_file():
            raise TextWeightsNotFound(f"text.pretrained: {str(p / 'open_clip_config.json')!r} not found "
                                      f"(local-dir:DIR needs the directory open_clip's save_for_hf writes)")
        return "dir", p
    if not p.is_file():
        raise TextWeightsNotFound(f"text.pretrained: open_clip checkpoint not found: {str(p)!r} (expected a local "
                                  f"file, or local-dir:DIR; use \"\" for a random-init encoder)")
    return "file", p


def _checkpoint_in_dir(d: Path) -> Path:
    """The weights file open_clip's local-dir loader picks in `d` (we hash the same file).

    open_clip silently random-inits a local-dir model with no weights; we refuse instead.
    """
    found = open_clip_compat.find_checkpoint_in_dir(d)
    if found is None:
        raise TextWeightsNotFound(f"text.pretrained: no open_clip weights (*.safetensors, *.bin, *.pth) in {str(d)!r}")
    return found


class TextEncoder:
    """A frozen open_clip CLIP text tower. Build with `build_text_encoder`.

    Attributes: `width` (D), `pooled_dim` (P), `context_length` (L), `is_random`, `layer`,
    `device`. Outputs live on `device`; callers move them (precompute: `.cpu()`).
    """

    def __init__(self, cfg: TextConfig, device: torch.device | str = "cpu") -> None:
        import open_clip

        open_clip_compat.check_version()  # before anything slow: this class reads open_clip's internals
        if cfg.layer not in ("penultimate", "last"):
            raise ValueError(f"text.layer: expected 'penultimate' or 'last', got {cfg.layer!r}")
        self.dtype_name = resolve_dtype_name(cfg.dtype, device, "text.dtype")  # "auto" -> bf16 on CUDA, else fp32
        self.dtype = parse_dtype(self.dtype_name, "text.dtype")
        self.cfg = cfg
        self.layer = cfg.layer
        self.device = torch.device(device)
        source, path = _resolve_pretrained(cfg.pretrained)
        self.is_random = source == "random"

        if cfg.model.startswith(("hf-hub:", LOCAL_DIR)):  # open_clip would fetch hf-hub: names
            raise ValueError(f"text.model: {cfg.model!r}: give an architecture name here and the weights as "
                             f"text.pretrained (a file or local-dir:DIR)")
        name = TINY_OPEN_CLIP_NAME if cfg.model == TINY else cfg.model
        if cfg.model == TINY:
            register_tiny()
        if source == "dir":
            open_clip_name = LOCAL_DIR + str(path)
            self.arch = json.loads((path / "open_clip_config.json").read_text()).get("model_cfg")
            if not isinstance(self.arch, dict):
                raise ValueError(f"text.pretrained: {str(path / 'open_clip_config.json')!r} has no 'model_cfg'")
            self.weights_file: Path | None = _checkpoint_in_dir(path)
        else:
            open_clip_name = name
            self.arch = open_clip.get_model_config(name)
            if self.arch is None:
                raise ValueError(f"text.model: unknown open_clip architecture {cfg.model!r} "
                                 f"(\"tiny\" or one of open_clip.list_models(), e.g. ViT-H-14)")
            self.weights_file = path

        # Build on the CPU (open_clip's own loader and precision handling), drop the vision
        # tower, then move. Random init runs in a forked RNG: seeded, and the caller's global
        # RNG stream is left exactly as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(
                open_clip_name,
                pretrained=str(path) if source == "file" else None,
                precision=self.dtype_name,
                device="cpu",
            )
        problem = open_clip_compat.text_tower_problem(model)
        if problem:
            raise ValueError(f"text.model: {cfg.model!r} {problem}; only CLIP models with open_clip's built-in "
                             f"text transformer are supported")
        del model.visual
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(open_clip_name)

        self.context_length = int(model.context_length)
        if getattr(self.tokenizer, "context_length", self.context_length) != self.context_length:
            raise ValueError(f"text.model: tokenizer context length {self.tokenizer.context_length} != "
                             f"model context length {self.context_length}")
        self.width = open_clip_compat.text_width(model)
        self.pooled_dim = open_clip_compat.pooled_dim(model)
        self._weights_sha256: str | None = None

    # -----------------------------------------------------------------------------------

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """captions -> (N, L) int64 on the CPU; long captions are truncated (EOT kept last)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"captions: expected a list of str, got {type(captions).__name__}"
                             + ("" if isinstance(captions, str) else " with non-str items"))
        if len(captions) == 0:
            return torch.zeros(0, self.context_length, dtype=torch.int64)
        return self.tokenizer(list(captions)).to(torch.int64)  # (N, L)

    def encode(self, captions: list[str]) -> TextEmbeddings:
        """captions -> TextEmbeddings(tokens (N, L, D), pooled (N, P), lengths (N,)). "" is fine (the CFG null)."""
        text = self.tokenize(captions).to(self.device)  # (N, L)
        n = text.shape[0]
        if n == 0:
            dev = self.device
            return TextEmbeddings(torch.zeros(0, self.context_length, self.width, device=dev),
                                  torch.zeros(0, self.pooled_dim, device=dev),
                                  torch.zeros(0, dtype=torch.int64, device=dev))
        m = self.model
        with torch.inference_mode():
            penultimate, x = open_clip_compat.text_layers(m, text)  # (N, L, D) each, before ln_final
            last = m.ln_final(x)  # (N, L, D)
            tokens = m.ln_final(penultimate) if self.layer == "penultimate" else last  # (N, L, D)

            eot = open_clip_compat.eot_index(m, text)  # (N,)
            pooled = last[torch.arange(n, device=text.device), eot]  # (N, D): open_clip's text_global_pool
            pooled = open_clip_compat.project_pooled(m, pooled)  # (N, P)
            return TextEmbeddings(tokens.float(), pooled.float(), (eot + 1).to(torch.int64))

    # -----------------------------------------------------------------------------------

    def weights_sha256(self) -> str:
        """sha256 of the checkpoint file, or "random-init:<seed>"."""
        if self._weights_sha256 is None:
            self._weights_sha256 = (f"random-init:{RANDOM_INIT_SEED}" if self.weights_file is None
                                    else sha256_file(self.weights_file))
        return self._weights_sha256

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {
            "kind": "open_clip", "model": self.cfg.model, "arch": self.arch, "weights_sha256": self.weights_sha256(),
            "layer": self.layer, "dtype": self.dtype_name, "context_length": self.context_length,
            "width": self.width, "pooled_dim": self.pooled_dim, "tokenizer": type(self.tokenizer).__name__,
        }
        return ident


def build_text_encoder(cfg: TextConfig, device: torch.device | str = "cpu") -> TextEncoder:
    """The frozen text encoder `cfg` names, on `device`, computing in `cfg.dtype`."""
    return TextEncoder(cfg, device)
