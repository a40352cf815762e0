"""open_clip's private and undocumented APIs, in one place, behind a version check
(see latentforge/compat.py).

What latentforge reaches into, and why:

- `factory._find_checkpoint_in_dir`: the weights file open_clip's `local-dir:` loader
  picks, so that the file hashed for the encoder's identity is the file loaded;
- the text tower's internals (`token_embedding`, `positional_embedding`, `transformer`
  with `resblocks`, `batch_first` and `get_cast_dtype`, `attn_mask`, `ln_final`,
  `text_projection`, `text_pool_type`, `text_eos_id`): SD-2's text conditioning is the
  penultimate block's output, which `encode_text` does not return, so `text_layers` runs
  the same ops as `CLIP.encode_text` and keeps it on the way through;
- `transform.PreprocessCfg` and `transform.image_transform_v2` (not exported at the top
  level) and `visual.image_size`: the inference transform of a CLIP built from a config
  dict, as `create_model_and_transforms` gives it for a built-in name.

open_clip is imported inside the functions (it is slow to import and optional until a
text encoder or a CLIP score is built).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from latentforge.compat import check_tested

DIST = "open_clip_torch"
TESTED = ">=3.3,<3.4"  # requirements/lock.txt: 3.3.0
USES = ("private and undocumented APIs (factory._find_checkpoint_in_dir, the text tower's internals, "
        "transform.PreprocessCfg/image_transform_v2)")
TEXT_TOWER_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask",
                    "text_projection", "text_pool_type")


def check_version(version: str | None = None) -> str:
    """The installed open_clip version if it is tested, else UntestedVersionError (one line)."""
    return check_tested(DIST, TESTED, USES, version)


def find_checkpoint_in_dir(d: Path) -> Path | None:
    """The weights file open_clip's `local-dir:` loader would load from `d` (None: none there)."""
    check_version()
    from open_clip.factory import _find_checkpoint_in_dir

    found = _find_checkpoint_in_dir(d)
    return None if found is None else Path(found)


def text_tower_problem(model: Any) -> str:
    """"" if `model` has open_clip's built-in text transformer pooled at an EOT token (what
    `text_layers` and `eot_index` read), else what is missing."""
    check_version()
    missing = [a for a in TEXT_TOWER_PARTS if not hasattr(model, a)]
    if missing:
        return f"builds an open_clip {type(model).__name__} without {', '.join(missing)}"
    if model.text_pool_type not in ("argmax", "eos"):
        return f"pools text with {model.text_pool_type!r}; expected 'argmax' or 'eos' (an EOT token)"
    return ""


def text_width(model: Any) -> int:
    """D, the text transformer's width."""
    return int(model.transformer.width)


def pooled_dim(model: Any) -> int:
    """P, the size of the projected pooled embedding (D without a projection)."""
    proj = model.text_projection
    if proj is None:
        return text_width(model)
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    return int(proj.shape[1])


def text_layers(model: Any, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate, last): the outputs of the last two residual blocks for tokens `text`
    (N, L), each (N, L, D), before `ln_final`. The same ops, in the same order and dtypes,
    as open_clip's `CLIP.encode_text`."""
    m = model
    cast = m.transformer.get_cast_dtype()
    x = m.token_embedding(text).to(cast)  # (N, L, D)
    x = x + m.positional_embedding.to(cast)
    batch_first = getattr(m.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)  # (L, N, D)
    blocks = m.transformer.resblocks
    for blk in blocks[:-1]:
        x = blk(x, attn_mask=m.attn_mask)  # causal mask, exactly as Transformer.forward passes it
    penultimate = x
    x = blocks[-1](x, attn_mask=m.attn_mask)
    if not batch_first:
        x, penultimate = x.transpose(0, 1), penultimate.transpose(0, 1)
    return penultimate, x


def eot_index(model: Any, text: torch.Tensor) -> torch.Tensor:
    """Position of the token open_clip pools (N,): the EOT. Mirrors `text_global_pool`."""
    if model.text_pool_type == "argmax":
        return text.argmax(dim=-1)  # the CLIP BPE gives EOT the highest id
    return (text == model.text_eos_id).int().argmax(dim=-1)


def project_pooled(model: Any, pooled: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, P) through `text_projection`, as `encode_text` does."""
    proj = model.text_projection
    if isinstance(proj, torch.nn.Linear):
        return proj(pooled)
    if proj is not None:
        return pooled @ proj
    return pooled


def inference_transform(model: Any) -> tuple[dict[str, Any], Callable[[Any], torch.Tensor]]:
    """(preprocess config, transform) for a CLIP built from a config dict: open_clip's
    defaults (OpenAI mean/std) at the model's image size, as `create_model_and_transforms`
    gives a built-in name. Record the config on the model with `set_model_preprocess_cfg`."""
    check_version()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pp = {**dataclasses.asdict(PreprocessCfg()), "size": model.visual.image_size}
    return pp, image_transform_v2(PreprocessCfg(**pp), is_train=False)
