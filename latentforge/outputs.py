"""Output directories that never destroy a user's work (standard library only).

Every command that writes a directory the user names (export `--out`, `data synth --out`,
precompute's latent directory) calls `check_output_dir` before it writes anything. It
refuses, with one line naming the path and the reason, an output that

- is, contains or lies inside a run directory (config.yaml and checkpoints/), a checkpoint
  directory, a latent directory (manifest.json, identity.json or shards/) or an MLflow
  store folder (mlruns/, mlartifacts/);
- is or contains an MLflow database (mlflow.db, or the sqlite file the config names);
- is a file, or a non-empty directory that is not an earlier output of the same command
  (each command recognises its own outputs by its metadata file: export's
  latentforge.json, synth's synth.json, precompute's identity.json).

A directory that merely holds an MLflow database (RUN_ROOT with its mlflow.db) may hold
outputs; it may not be one.

`replace_dir` puts a freshly written directory under the output's name, replacing an
earlier output: the new one is written to a temporary sibling, the old one is moved aside,
the new one moved in, then the old one deleted. A crash at any point leaves a complete
output under the name, or the old one aside with nothing under the name; `recover_dir`
(run by the command on its next start, and by readers of the output) moves it back.

The marker names are the ones data/latents.py and training/ckpt_layout.py write; they
are spelled out here because the core cannot import those layers (tests/test_outputs.py
checks that they agree).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterable

from latentforge.fileio import fsync_dir

RUN_CONFIG, CHECKPOINTS = "config.yaml", "checkpoints"  # a run directory holds both
CKPT_COMPLETE, CKPT_LATEST = "COMPLETE", "latest"  # training/ckpt_layout.py
CKPT_TAG_RE = re.compile(r"^step_\d{8}(_universal)?$")
LATENT_MARKERS = ("manifest.json", "identity.json", "shards")  # data/latents.py
MLFLOW_DIRS = ("mlruns", "mlartifacts")  # a file store, and a sqlite store's artifacts
MLFLOW_DB = "mlflow.db"


class OutputError(ValueError):
    """An output path that would destroy existing work; the message says which and why."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` tracking URI (four slashes: absolute path)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def store_paths(uri: str) -> list[Path]:
    """The files and folders of the MLflow store a tracking URI names on this machine:
    a sqlite database (and the mlartifacts/ beside it), or a file store folder."""
    db = sqlite_path(uri)
    if db is not None:
        return [db, db.parent / "mlartifacts"]
    if uri.startswith("file:"):
        from urllib.parse import urlparse

        return [Path(urlparse(uri).path)]
    if uri and "://" not in uri and ":" not in uri.split("/", 1)[0]:  # a plain path is a file store
        return [Path(uri)]
    return []


def protected(d: Path, *, strict: bool = False) -> tuple[str, str] | None:
    """(what, evidence) when directory `d` is something no output may be, replace or lie
    inside: ("a run directory", "config.yaml and checkpoints/"), ...; else None.

    `strict` (for the folders above an output): a latent directory needs shards/ beside
    manifest.json or identity.json, as precompute writes it, so that a project folder that
    happens to hold a manifest.json does not fence off everything below it."""
    try:
        names = set(os.listdir(d))
    except OSError:  # absent, not a directory, unreadable
        return None
    if RUN_CONFIG in names and (d / CHECKPOINTS).is_dir():
        return "a run directory", f"{RUN_CONFIG} and {CHECKPOINTS}/"
    if CKPT_COMPLETE in names:
        return "a checkpoint directory", CKPT_COMPLETE
    if CKPT_TAG_RE.match(d.name):
        return "a checkpoint directory", f"named {d.name}"
    if d.name == CHECKPOINTS and (CKPT_LATEST in names or any(CKPT_TAG_RE.match(n) for n in names)):
        return "a checkpoint directory", f"{CKPT_LATEST} or step_* folders"
    found = [m for m in LATENT_MARKERS if m in names]
    if found and (not strict or ("shards" in found and len(found) > 1)):
        return "a latent directory", ", ".join(found)
    if d.name in MLFLOW_DIRS:
        return "an MLflow store folder", f"{d.name}/"
    return None


def _is_store_file(p: Path, stores: Iterable[Path]) -> bool:
    return p.name == MLFLOW_DB or any(p == s for s in stores)


def _contents_problem(out: Path, stores: list[Path], max_depth: int | None = None) -> str | None:
    """Why the tree under `out` must not be replaced, or None (`out` itself is judged by
    the caller). Looks `max_depth` levels down (None: the whole tree)."""
    for dirpath, dirnames, filenames in os.walk(out):
        here = Path(dirpath)
        if max_depth is not None and len(here.relative_to(out).parts) >= max_depth:
            dirnames.clear()
        for name in filenames:
            if _is_store_file(here / name, stores):
                return f"contains an MLflow database ({here / name})"
        for name in list(dirnames):
            sub = here / name
            if sub in stores:
                return f"contains the MLflow store ({sub})"
            found = protected(sub)
            if found is not None:
                return f"contains {found[0]}, {sub} ({found[1]})"
    return None


def check_output_dir(out: str | os.PathLike, *, command: str, metadata: str,
                     is_earlier_output: Callable[[Path], bool], own_kind: str | None = None,
                     stores: Iterable[Path] = ()) -> Path:
    """Refuse `out` (OutputError, one line) unless writing it cannot destroy anyone's work.
    Returns the resolved path.

    Args:
        command: the command, for the message ("export", "data synth", "precompute").
        metadata: the file that marks an earlier output of the command (for the message).
        is_earlier_output: True for a directory this command wrote before (it may be
            written again or replaced).
        own_kind: what `protected()` calls an earlier output of this command itself
            ("a latent directory" for precompute), so that re-running the command on its
            own output is allowed.
        stores: the MLflow store of the config (`store_paths(uri)`), protected besides
            any mlflow.db, mlruns/ and mlartifacts/.
    """
    path = Path(out).expanduser().resolve()
    store_list = [Path(s).expanduser().resolve() for s in stores if s]

    def refuse(reason: str) -> OutputError:
        return OutputError(f"{command}: refusing to write {out}: it {reason}")

    if path.exists() and not path.is_dir():
        if _is_store_file(path, store_list):
            raise refuse("is an MLflow database")
        raise refuse("is a file, not a directory")
    # It lies inside something no output may touch.
    for parent in path.parents:
        if parent in store_list:
            raise refuse(f"lies inside an MLflow store folder, {parent} ({parent.name}/)")
        found = protected(parent, strict=True)
        if found is not None:
            raise refuse(f"lies inside {found[0]}, {parent} ({found[1]})")
    if path in store_list:
        raise refuse(f"is an MLflow store folder ({path.name}/)")
    held = [s for s in store_list if s.is_relative_to(path) and s.exists()]
    if held:
        raise refuse(f"contains the MLflow store ({held[0]})")
    if not path.exists():
        return path
    earlier = is_earlier_output(path)
    found = protected(path)
    if found is not None and not (earlier and found[0] == own_kind):
        raise refuse(f"is {found[0]} ({found[1]})")
    try:
        empty = not any(path.iterdir())
    except OSError as e:
        raise refuse(f"cannot be read ({e.strerror})") from None
    if empty:
        return path
    # Someone else's directory is refused anyway; a look two levels down names the worst of it.
    problem = _contents_problem(path, store_list, None if earlier else 2)
    if problem is None and not earlier:
        problem = f"is not empty and is not an earlier {command} output (no {metadata})"
    if problem is not None:
        raise refuse(problem)
    return path


# ---------------------------------------------------------------------------------------
# Replacing an earlier output.


def _owner_tag() -> str:
    """host-pid: tells this process's temporary siblings from another live process's."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


def temp_sibling(out: Path) -> Path:
    """Where a new output is written before `replace_dir` moves it to `out`."""
    return out.with_name(f".{out.name}.tmp-{_owner_tag()}")


def _aside(out: Path) -> Path:
    return out.with_name(f".{out.name}.old-{_owner_tag()}")


def _others_alive(p: Path) -> bool:
    """True when `p` (a temporary sibling) belongs to another live process on this host."""
    m = re.search(r"\.(?:tmp|old)-(.+)-(\d+)$", p.name)
    if not m:
        return False
    host, pid = m.group(1), int(m.group(2))
    if host != socket.gethostname().split(".")[0] or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dir(out: str | os.PathLike, is_complete: Callable[[Path], bool]) -> str | None:
    """Finish an interrupted `replace_dir` of `out`: with nothing under the name, the newest
    complete copy that was moved aside goes back; leftover temporary and aside copies of
    dead processes are deleted. Returns what was done, for a log line, or None."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return None
    siblings = [p for p in parent.iterdir()
                if p.name.startswith(f".{out.name}.") and re.search(r"\.(tmp|old)-.+-\d+$", p.name)]
    siblings = [p for p in siblings if not _others_alive(p)]
    done = None
    if not out.exists():
        asides = sorted((p for p in siblings if ".old-" in p.name and is_complete(p)),
                        key=lambda p: p.stat().st_mtime)
        if asides:
            os.replace(asides[-1], out)
            fsync_dir(parent)
            siblings.remove(asides[-1])
            done = f"moved the earlier output back from {asides[-1].name} (an interrupted replacement)"
    for p in siblings:
        shutil.rmtree(p, ignore_errors=True)
    return done


def replace_dir(new: Path, out: Path) -> None:
    """Put the complete directory `new` (from `temp_sibling(out)`) under the name `out`.

    An earlier `out` is moved aside first and deleted last, so the name holds the old or the
    new output at every moment except between the two renames, when the old one is aside
    and `recover_dir` finds it. An OSError on the way (a full disk, permissions) puts the
    old output back at once.
    """
    aside = _aside(out)
    had_old = out.exists()
    if had_old:
        os.replace(out, aside)
    try:
        os.replace(new, out)
    except OSError:
        if had_old and not out.exists():
            os.replace(aside, out)
        raise
    fsync_dir(out.parent)
    if had_old:
        shutil.rmtree(aside)
