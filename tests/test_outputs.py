"""No command destroys a user's work (latentforge/outputs.py): export, synth and
precompute refuse an output that is, contains or lies inside a run, checkpoint or latent
directory or an MLflow store, or a non-empty folder that is not their own earlier output;
replacing an earlier output survives a crash at every step."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from latentforge import outputs
from latentforge.config import resolve, save
from latentforge.launch.cli import main


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """RUN_ROOT as a user has it: a run with a checkpoint, latents, the MLflow store, other files."""
    runs = tmp_path / "runs"
    run = runs / "demo"
    save(resolve("tiny", None, [f"run_root={runs}"]), run / "config.yaml")
    ck = run / "checkpoints" / "step_00000010"
    ck.mkdir(parents=True)
    (ck / "COMPLETE").write_text("{}")
    (ck / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (run / "checkpoints" / "latest").write_text("step_00000010")
    (run / "samples").mkdir()
    (run / "samples" / "step_00000010.png").write_bytes(b"png")
    lat = runs / "latents"
    (lat / "shards").mkdir(parents=True)
    (lat / "identity.json").write_text("{}")
    (lat / "manifest.json").write_text("{}")
    (runs / "mlflow.db").write_bytes(b"sqlite")
    (runs / "mlartifacts" / "1").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    return tmp_path


def test_marker_names_are_the_ones_the_layers_write() -> None:
    from latentforge.data import latents as lat
    from latentforge.training import ckpt_layout

    assert outputs.LATENT_MARKERS == (lat.MANIFEST, lat.IDENTITY, lat.SHARDS)
    assert (outputs.CHECKPOINTS, outputs.CKPT_LATEST, outputs.CKPT_COMPLETE) == (
        ckpt_layout.CKPT, ckpt_layout.LATEST, ckpt_layout.COMPLETE)
    for name in ("step_00000010", "step_00000010_universal"):
        assert outputs.CKPT_TAG_RE.match(name)
        assert ckpt_layout.TAG_RE.match(name) or ckpt_layout.UTAG_RE.match(name)


@pytest.mark.parametrize("out, reason", [
    ("runs/demo", "is a run directory (config.yaml and checkpoints/)"),
    ("runs", "contains"),
    ("runs/demo/checkpoints", "lies inside a run directory, {root}/runs/demo"),
    ("runs/demo/export", "lies inside a run directory, {root}/runs/demo"),
    ("runs/latents", "is a latent directory (manifest.json, identity.json, shards)"),
    ("runs/latents/export", "lies inside a latent directory, {root}/runs/latents"),
    ("runs/mlartifacts", "is an MLflow store folder (mlartifacts/)"),
    ("runs/mlartifacts/1/x", "lies inside an MLflow store folder, {root}/runs/mlartifacts"),
    ("runs/mlflow.db", "is an MLflow database"),
    ("notes", "is not empty and is not an earlier export output (no latentforge.json)"),
    ("a-file", "is a file, not a directory"),
])
def test_export_refuses_an_output_that_would_destroy_work(root: Path, out: str, reason: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    before = _tree(root)
    code = main(["export", str(root / "runs" / "demo"), "--out", str(root / out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith(f"latentforge: export: refusing to write {root / out}: it {reason.format(root=root)}"), err
    assert _tree(root) == before  # nothing written, nothing removed


def test_an_output_holding_work_is_refused_with_what_it_holds(root: Path) -> None:
    def check(out: Path, **kw: object) -> None:
        outputs.check_output_dir(out, command="export", metadata="latentforge.json",
                                 is_earlier_output=lambda p: (p / "latentforge.json").is_file(), **kw)

    # An earlier export that someone put a run into, and a copied checkpoint.
    exp = root / "exports" / "old"
    exp.mkdir(parents=True)
    (exp / "latentforge.json").write_text("{}")
    shutil.copytree(root / "runs" / "demo", exp / "copy-of-demo")
    with pytest.raises(outputs.OutputError, match=r"it contains a run directory, .*copy-of-demo"):
        check(exp)
    shutil.rmtree(exp / "copy-of-demo")
    shutil.copytree(root / "runs" / "demo" / "checkpoints" / "step_00000010", exp / "ckpt")
    with pytest.raises(outputs.OutputError, match=r"it contains a checkpoint directory, .*ckpt \(COMPLETE\)"):
        check(exp)
    shutil.rmtree(exp / "ckpt")
    (exp / "sub").mkdir()
    (exp / "sub" / "mlflow.db").write_bytes(b"sqlite")
    with pytest.raises(outputs.OutputError, match=r"contains an MLflow database"):
        check(exp)
    shutil.rmtree(exp / "sub")
    check(exp)  # an earlier export holding only an export: may be replaced
    # The configured sqlite store, wherever it is and whatever its name.
    store = root / "team" / "tracking.sqlite"
    store.parent.mkdir()
    store.write_bytes(b"sqlite")
    stores = outputs.store_paths(f"sqlite:///{store}")
    assert stores == [store, store.parent / "mlartifacts"]
    with pytest.raises(outputs.OutputError, match=r"it contains the MLflow store \(.*tracking.sqlite\)"):
        check(root / "team", stores=stores)
    with pytest.raises(outputs.OutputError, match="it is an MLflow database"):
        check(store, stores=stores)
    with pytest.raises(outputs.OutputError, match=r"it is an MLflow store folder \(mlartifacts/\)"):
        check(store.parent / "mlartifacts", stores=stores)
    # A folder that merely holds a store, with room for outputs beside it: fine.
    check(root / "runs" / "exports" / "demo")
    # A project folder with a manifest.json is not a latent directory for what lies below it.
    (root / "project").mkdir()
    (root / "project" / "manifest.json").write_text("{}")
    check(root / "project" / "exports" / "x")


def test_synth_refuses_work_and_rewrites_its_own_output(root: Path) -> None:
    from latentforge.data.synth import STAMP, write_shards

    for out, reason in ((root / "runs" / "latents", "is a latent directory"),
                        (root / "runs" / "demo", "is a run directory"),
                        (root / "notes", "is not an earlier data synth output (no synth.json)"),
                        (root / "runs" / "demo" / "synth", "lies inside a run directory")):
        with pytest.raises(outputs.OutputError, match=re.escape(reason)):
            write_shards(out, num_samples=4, samples_per_shard=2, image_size=8, seed=0)
    out = root / "synth"
    paths = write_shards(out, num_samples=4, samples_per_shard=2, image_size=8, seed=0)
    assert len(paths) == 2 and json.loads((out / STAMP).read_text())["num_samples"] == 4
    first = _tree(out)
    (out / STAMP).unlink()  # a synth killed before its stamp: only its shards are there
    assert write_shards(out, num_samples=4, samples_per_shard=2, image_size=8, seed=0) == paths
    assert _tree(out) == first
    # The command line says it in one line.
    assert main(["data", "synth", "--out", str(root / "runs" / "demo"), "--num", "4"]) == 2


def test_precompute_refuses_a_latent_directory_that_would_destroy_work(root: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    before = _tree(root)
    for latent_dir, reason in ((root / "runs" / "demo", "is a run directory"),
                               (root / "notes", "is not empty and is not an earlier precompute output (no identity.json)"),
                               (root / "runs" / "latents" / "nested", "lies inside a latent directory"),
                               (root / "runs", "contains")):
        code = main(["precompute", f"run_root={root / 'runs'}", f"data.latent_dir={latent_dir}",
                     f"data.raw_shards={root / 'none' / '*.tar'}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"precompute: refusing to write {latent_dir}: it {reason}" in err, err
    assert _tree(root) == before
    # Its own earlier output (identity.json), or a folder holding only what precompute writes.
    from latentforge.data.precompute import is_latent_output

    assert is_latent_output(root / "runs" / "latents")
    (root / "fresh" / "shards").mkdir(parents=True)
    (root / "fresh" / ".identity.json.tmp-12").write_text("{")
    assert is_latent_output(root / "fresh") and not is_latent_output(root / "notes")


# ---------------------------------------------------------------------------------------
# Replacing an earlier output: every step of replace_dir interrupted.


class Crash(Exception):
    """A process dying at this point: not an OSError, so no clean-up code runs for it."""


def _export_like(d: Path, version: str) -> Path:
    (d / "unet").mkdir(parents=True)
    (d / "unet" / "weights.bin").write_text(version * 100)
    (d / "latentforge.json").write_text(json.dumps({"version": version}))
    return d


def _complete(d: Path) -> bool:
    return (d / "latentforge.json").is_file() and (d / "unet" / "weights.bin").is_file()


def _version(d: Path) -> str:
    v = json.loads((d / "latentforge.json").read_text())["version"]
    assert (d / "unet" / "weights.bin").read_text() == v * 100
    return v


def _fail_at(monkeypatch: pytest.MonkeyPatch, out: Path, step: str, exc: type[BaseException]) -> None:
    """Make one step of replace_dir(new, out) raise, once: 'aside' (rename out away), 'in'
    (rename new to out), 'delete' (remove the old copy)."""
    real_replace, real_rmtree = os.replace, shutil.rmtree
    fired: list[str] = []

    def replace(src, dst, *a, **kw):
        if not fired and ((step == "aside" and Path(src) == out) or (step == "in" and Path(dst) == out)):
            fired.append(step)
            raise exc(f"injected failure at {step}")
        return real_replace(src, dst, *a, **kw)

    def rmtree(path, *a, **kw):
        if not fired and step == "delete" and ".old-" in Path(path).name:
            fired.append(step)
            real_rmtree(Path(path) / "unet")  # half-deleted, then the process dies
            raise exc(f"injected failure at {step}")
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)


@pytest.mark.parametrize("step", ["aside", "in", "delete"])
@pytest.mark.parametrize("exc", [Crash, OSError])
def test_replacing_an_output_survives_a_failure_at_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              step: str, exc: type[BaseException]) -> None:
    out = _export_like(tmp_path / "model", "old")
    new = _export_like(outputs.temp_sibling(out), "new")
    with monkeypatch.context() as m:
        _fail_at(m, out, step, exc)
        with pytest.raises(exc, match="injected"):
            outputs.replace_dir(new, out)
    if exc is OSError or step != "in":
        # An error is undone at once; a crash before or after the swap leaves a whole export.
        assert _complete(out) and _version(out) == ("new" if step == "delete" else "old")
    else:
        assert not out.exists()  # the one window: the old export is aside, nothing under the name
    # The next export (or a reader) recovers: a complete export under the name, no leftovers.
    outputs.recover_dir(out, _complete)
    assert _complete(out) and _version(out) == ("new" if step == "delete" else "old")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_recover_leaves_another_live_process_alone(tmp_path: Path) -> None:
    out = _export_like(tmp_path / "model", "old")
    busy = _export_like(tmp_path / ".model.tmp-" f"{os.uname().nodename.split('.')[0]}-1", "new")  # pid 1 lives
    assert outputs.recover_dir(out, _complete) is None
    assert busy.is_dir()
