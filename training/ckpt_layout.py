"""The checkpoint directory's conventions: names, tags, `latest`, COMPLETE records.

Files only, no torch: `latentforge status` and the job objects that submitit pickles read
these without importing the model stack. Saving and loading are training/checkpoint.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CKPT = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
UNIVERSAL_FLAG = "load_universal"
UNIVERSAL_SUFFIX = "_universal"
SAVE_NOW = "SAVE_NOW"
TAG_RE = re.compile(r"^step_(\d{8})$")
UTAG_RE = re.compile(r"^step_(\d{8})_universal$")


def ckpt_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CKPT


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def universal_tag(tag: str) -> str:
    return tag + UNIVERSAL_SUFFIX


def complete_tags(run_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    tags = [p.name for p in d.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def latest_tag(run_dir: Path) -> str | None:
    """The tag `latest` names if it is complete; otherwise the newest complete tag."""
    d = ckpt_dir(run_dir)
    p = d / LATEST
    if p.is_file():
        tag = p.read_text().strip()
        if TAG_RE.match(tag) and (d / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(run_dir)
    return tags[-1] if tags else None


def meta(run_dir: Path, tag: str) -> dict[str, Any]:
    """The COMPLETE record of a checkpoint: step, world_size, zero_stage, time."""
    return json.loads((ckpt_dir(run_dir) / tag / COMPLETE).read_text())
