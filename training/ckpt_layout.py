"""The checkpoint directory's conventions: names, tags, `latest`, COMPLETE records, and
checking a checkpoint's files against its record.

Files only, no torch: `latentforge status`, `latentforge ckpt verify` and the job objects
that submitit pickles read these without importing the model stack. Saving and loading
are training/checkpoint.py; docs/checkpoints.md describes the layout and the guarantees.

COMPLETE (JSON, written last, fsynced) describes the checkpoint:

    {"format": 2, "step": 400, "world_size": 2, "zero_stage": 2, "time": 1764000000.0,
     "hash": "xxh3_128",
     "files": {"mp_rank_00_model_states.pt": {"size": 9025403, "hash": "3f...", "rank": 0}, ...}}

`files` lists every file of the tag folder (DeepSpeed's shards, the rank files, a
universal checkpoint's per-parameter files under zero/) by its path relative to the
folder, with its size in bytes, its fast content hash (latentforge.hashing.FAST_HASH)
and the rank that wrote it. A universal checkpoint's record adds "universal_of".
Records written before file lists existed (format 1) have no `files`: such a checkpoint
is "unverified", loaded as before.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from latentforge.hashing import FAST_HASH, fast_file_hash

CKPT = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
UNIVERSAL_FLAG = "load_universal"
UNIVERSAL_SUFFIX = "_universal"
SAVE_NOW = "SAVE_NOW"
CORRUPT = ".corrupt"  # a damaged checkpoint renamed aside: step_00002000.corrupt, then .corrupt.1, ...
FORMAT = 2  # COMPLETE records with a file list
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


def latest_name(run_dir: Path) -> str | None:
    """What the `latest` file says, complete or not (None without one)."""
    p = ckpt_dir(run_dir) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if TAG_RE.match(tag) else None


def latest_tag(run_dir: Path) -> str | None:
    """The tag `latest` names if it is complete; otherwise the newest complete tag."""
    tag = latest_name(run_dir)
    if tag is not None and (ckpt_dir(run_dir) / tag / COMPLETE).is_file():
        return tag
    tags = complete_tags(run_dir)
    return tags[-1] if tags else None


def meta(run_dir: Path, tag: str) -> dict[str, Any]:
    """The COMPLETE record of a checkpoint: step, world_size, zero_stage, time, files."""
    return read_record(ckpt_dir(run_dir) / tag)


def read_record(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / COMPLETE).read_text())


# ---------------------------------------------------------------------------------------
# Describing and checking a checkpoint's files.


def describe(folder: Path, known: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "hash", "rank"}} for every file under `folder` (COMPLETE
    and hidden temporary files excepted). Entries in `known` (hashed as their writer wrote
    them) are taken as they are, after checking the size on disk; the rest are hashed now
    and marked as rank 0's."""
    folder = Path(folder)
    known = known or {}
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or rel == COMPLETE or p.name.startswith("."):
            continue
        size = p.stat().st_size
        if rel in known and known[rel]["size"] == size:
            out[rel] = dict(known[rel])
        else:
            out[rel] = {"size": size, "hash": fast_file_hash(p), "rank": int(known.get(rel, {}).get("rank", 0))}
    return out


def record(files: dict[str, dict[str, Any]], **fields: Any) -> str:
    """The COMPLETE text for a checkpoint with these files and fields."""
    return json.dumps({"format": FORMAT, **fields, "hash": FAST_HASH, "files": files}, indent=1, sort_keys=True)


def check_files(folder: Path, files: dict[str, dict[str, Any]], names: Iterable[str] | None = None,
                hash_names: Iterable[str] = ()) -> list[str]:
    """Problems of the listed files under `folder`, one line each ("NAME: what is wrong"):
    every file in `names` (default: all listed) must exist with its recorded size; the ones
    in `hash_names` must also have their recorded content hash."""
    folder = Path(folder)
    problems = []
    hashed = set(hash_names)
    for name in sorted(files if names is None else names):
        want = files.get(name)
        if want is None:
            continue
        p = folder / name
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if size != want["size"]:
            what = "truncated" if size < want["size"] else "longer than written"
            problems.append(f"{name}: {size} bytes, {want['size']} written ({what})")
        elif name in hashed and fast_file_hash(p) != want["hash"]:
            problems.append(f"{name}: content differs from what was written ({FAST_HASH} mismatch)")
    return problems


@dataclass
class Status:
    """What `check` found about one checkpoint folder."""

    name: str  # the folder's name (a tag, a universal tag, or a name renamed aside)
    state: str  # intact | damaged | incomplete | unverified (a record without a file list) | renamed aside
    problems: list[str] = field(default_factory=list)  # one line each, naming the file
    step: int | None = None

    @property
    def ok(self) -> bool:
        return self.state in ("intact", "unverified")

    def line(self) -> str:
        why = f": {'; '.join(self.problems)}" if self.problems else ""
        return f"{self.name}: {self.state}{why}"


def check(folder: Path, hashes: bool = True) -> Status:
    """Check every file of one checkpoint folder against its COMPLETE record."""
    folder = Path(folder)
    if not (folder / COMPLETE).is_file():
        return Status(folder.name, "incomplete", ["COMPLETE: missing (a crashed save, or the marker was lost)"])
    try:
        rec = read_record(folder)
    except (OSError, ValueError) as e:
        return Status(folder.name, "damaged", [f"COMPLETE: unreadable ({e})"])
    step = rec.get("step")
    if "files" not in rec:
        return Status(folder.name, "unverified", ["COMPLETE has no file list (written by an older latentforge)"], step)
    files = rec["files"]
    problems = check_files(folder, files, hash_names=files if hashes else ())
    return Status(folder.name, "damaged" if problems else "intact", problems, step)


def check_run(run_dir: Path, hashes: bool = True, tag: str | None = None) -> list[Status]:
    """The status of every checkpoint folder of a run (or of `tag` alone), oldest first;
    folders renamed aside are listed as such, unchecked."""
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    if tag is not None:
        return [check(d / tag, hashes)] if (d / tag).is_dir() else [Status(tag, "damaged", [f"{d / tag}: missing"])]
    out = []
    for p in sorted(d.iterdir()):
        if not p.is_dir():
            continue
        if TAG_RE.match(p.name) or UTAG_RE.match(p.name):
            out.append(check(p, hashes))
        elif CORRUPT in p.name and (TAG_RE.match(p.name.split(CORRUPT)[0]) or UTAG_RE.match(p.name.split(CORRUPT)[0])):
            out.append(Status(p.name, "renamed aside"))
    return out


def rename_aside(folder: Path) -> Path:
    """Move a damaged checkpoint folder out of the way, never deleting it: NAME.corrupt,
    then NAME.corrupt.1, ... Returns the new path."""
    folder = Path(folder)
    dst = folder.with_name(folder.name + CORRUPT)
    n = 0
    while dst.exists():
        n += 1
        dst = folder.with_name(f"{folder.name}{CORRUPT}.{n}")
    os.replace(folder, dst)
    return dst
