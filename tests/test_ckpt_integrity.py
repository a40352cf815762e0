"""Checkpoint integrity: COMPLETE lists every file with its size and content hash; a resume
checks what it will read, renames a damaged checkpoint aside and continues bitwise from
the newest intact one (also through a universal checkpoint); `latentforge ckpt verify`;
pruning keeps the newest intact checkpoint; checkpoint files load weights-only and a file
holding a pickled object is refused."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from latentforge.config import AbortError
from latentforge.launch.cli import main as cli
from latentforge.training import checkpoint
from latentforge.training import ckpt_layout as cl
from latentforge.training.state import TrainState

MODEL_STATES = "mp_rank_00_model_states.pt"


class FakeEngine:
    """Writes one model-states file and one optimizer shard as DeepSpeed does (torch.save),
    hashed as written like the real engine's save."""

    def __init__(self) -> None:
        self.cfg = SimpleNamespace(train=SimpleNamespace(zero_stage=2))

    def save(self, d: Path, tag: str, client_state: dict) -> dict:
        from latentforge.hashing import HashingWriter

        (d / tag).mkdir(parents=True, exist_ok=True)
        out = {}
        for name, obj in ((MODEL_STATES, {"module": {"w": torch.arange(4096.0)}, **client_state}),
                          ("zero_pp_rank_0_mp_rank_00_optim_states.pt", {"exp_avg": torch.ones(4096)})):
            with HashingWriter(d / tag / name) as f:
                torch.save(obj, f)
            out[name] = {"size": f.size, "hash": f.hexdigest()}
        return out


def _run(tmp_path: Path, steps=(10, 20, 30), keep_last: int = 10) -> Path:
    for step in steps:
        checkpoint.save(FakeEngine(), tmp_path, TrainState(step=step), keep_last=keep_last)
    return tmp_path


def flip_byte(path: Path) -> None:
    """Flip one bit in the middle of the file: same size, different content."""
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x01
    path.write_bytes(bytes(b))


def truncate(path: Path, size: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# ---------------------------------------------------------------------------------------
# One process, no DeepSpeed.


def test_complete_lists_every_file_with_size_and_hash_as_written(tmp_path):
    from latentforge.hashing import FAST_HASH, fast_file_hash

    _run(tmp_path, steps=(10,))
    folder = cl.ckpt_dir(tmp_path) / "step_00000010"
    rec = cl.read_record(folder)
    assert rec["format"] == cl.FORMAT and rec["hash"] == FAST_HASH and rec["step"] == 10
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != cl.COMPLETE)
    assert sorted(rec["files"]) == on_disk == [MODEL_STATES, "rank_00000.pt",
                                              "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    for name, f in rec["files"].items():  # the digest taken while writing is the file's
        assert f["size"] == (folder / name).stat().st_size and f["hash"] == fast_file_hash(folder / name)
    assert cl.check(folder).state == "intact"


def test_check_finds_truncation_flipped_byte_missing_file_and_lost_marker(tmp_path):
    _run(tmp_path, steps=(10, 20, 30, 40))
    d = cl.ckpt_dir(tmp_path)
    truncate(d / "step_00000040" / MODEL_STATES)
    flip_byte(d / "step_00000030" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (d / "step_00000020" / "rank_00000.pt").unlink()
    (d / "step_00000010" / cl.COMPLETE).unlink()

    st = {s.name: s for s in cl.check_run(tmp_path)}
    assert st["step_00000040"].state == "damaged"
    assert st["step_00000040"].problems[0].startswith(f"{MODEL_STATES}: 1000 bytes, ")
    assert st["step_00000040"].problems[0].endswith(" written (truncated)")
    assert st["step_00000030"].problems == ["zero_pp_rank_0_mp_rank_00_optim_states.pt: content differs from what "
                                            "was written (xxh3_128 mismatch)"]
    assert st["step_00000020"].problems == ["rank_00000.pt: missing"]
    assert st["step_00000010"].state == "incomplete"
    # A flipped bit leaves the size as it was: only the content hash can see it.
    assert cl.check(d / "step_00000030", hashes=False).state == "intact"


def test_resume_renames_damaged_aside_and_falls_back_to_newest_intact(tmp_path):
    _run(tmp_path)
    d = cl.ckpt_dir(tmp_path)
    truncate(d / "step_00000030" / MODEL_STATES)
    flip_byte(d / "step_00000020" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    # Sizes only: the flipped bit in step 20 passes, so the resume takes step 20.
    sizes = tmp_path / "sizes"
    shutil.copytree(tmp_path, sizes, ignore=shutil.ignore_patterns("sizes"))
    assert checkpoint.prepare_resume(sizes, 1, 2, hashes=False).tag == "step_00000020"

    plan = checkpoint.prepare_resume(tmp_path, 1, 2, hashes=True)
    assert (plan.tag, plan.universal) == ("step_00000010", False)
    assert [line.split(":")[0] for line in plan.fallback] == ["step_00000030", "step_00000020"]
    assert (d / "step_00000030.corrupt" / MODEL_STATES).stat().st_size == 1000  # kept, not deleted
    assert (d / "step_00000020.corrupt").is_dir() and not (d / "step_00000020").exists()
    assert (d / cl.LATEST).read_text() == "step_00000010"

    # The run re-saves step 20, which is damaged again: the second copy goes to .corrupt.1.
    checkpoint.save(FakeEngine(), tmp_path, TrainState(step=20), keep_last=10)
    truncate(d / "step_00000020" / "rank_00000.pt", 10)
    assert checkpoint.prepare_resume(tmp_path, 1, 2).tag == "step_00000010"
    assert (d / "step_00000020.corrupt.1").is_dir()

    # Nothing intact left: one clear error on every rank (said once by the CLI), nothing deleted.
    truncate(d / "step_00000010" / MODEL_STATES)
    with pytest.raises(AbortError, match="no intact checkpoint left .*step_00000010.corrupt") as e:
        checkpoint.prepare_resume(tmp_path, 1, 2)
    assert e.value.agreed and len(str(e.value).splitlines()) == 1
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == [
        "step_00000010.corrupt", "step_00000020.corrupt", "step_00000020.corrupt.1", "step_00000030.corrupt"]


def test_lost_complete_of_latest_is_damage_but_a_crashed_newer_save_is_removed(tmp_path):
    _run(tmp_path)
    d = cl.ckpt_dir(tmp_path)
    (d / "step_00000030" / cl.COMPLETE).unlink()  # `latest` names it: it was complete
    (d / "step_00000040").mkdir()  # newer than `latest`, no COMPLETE: a crashed save
    plan = checkpoint.prepare_resume(tmp_path, 1, 2)
    assert plan.tag == "step_00000020" and plan.fallback[0].startswith("step_00000030: COMPLETE: missing")
    assert (d / "step_00000030.corrupt").is_dir() and not (d / "step_00000040").exists()


def test_prune_keeps_newest_intact_while_newer_is_damaged_and_leaves_corrupt_alone(tmp_path):
    _run(tmp_path, steps=(10, 20), keep_last=1)
    d = cl.ckpt_dir(tmp_path)
    assert cl.complete_tags(tmp_path) == ["step_00000020"]
    (d / "step_00000005.corrupt").mkdir()
    truncate(d / "step_00000020" / MODEL_STATES)  # damaged after it was written
    checkpoint.save(FakeEngine(), tmp_path, TrainState(step=30), keep_last=1)
    truncate(d / "step_00000030" / MODEL_STATES)
    checkpoint.save(FakeEngine(), tmp_path, TrainState(step=40), keep_last=1)
    # 40 is intact and the newest: kept. 30 and 20 are damaged: kept, not counted.
    assert cl.complete_tags(tmp_path) == ["step_00000020", "step_00000030", "step_00000040"]
    checkpoint.save(FakeEngine(), tmp_path, TrainState(step=50), keep_last=1)
    assert cl.complete_tags(tmp_path) == ["step_00000020", "step_00000030", "step_00000050"]
    assert (d / "step_00000005.corrupt").is_dir()

    # The two newest damaged: keep_last=1 keeps the newest intact one, step 10.
    other = tmp_path / "other"
    _run(other, steps=(10, 20, 30), keep_last=3)
    for step in (20, 30):
        truncate(cl.ckpt_dir(other) / checkpoint.tag_for(step) / MODEL_STATES)
    checkpoint.prune(other, keep_last=1)
    assert cl.complete_tags(other) == ["step_00000010", "step_00000020", "step_00000030"]


def test_ckpt_verify_prints_each_status_and_fails_on_damaged_latest(tmp_path, capsys):
    _run(tmp_path)
    d = cl.ckpt_dir(tmp_path)
    capsys.readouterr()  # the saves' log lines
    assert cli(["ckpt", "verify", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["  step_00000010: intact", "  step_00000020: intact",
                                                   "* step_00000030: intact"]
    flip_byte(d / "step_00000010" / MODEL_STATES)  # an older one: reported, exit 0
    (d / "step_00000020" / cl.COMPLETE).unlink()
    assert cli(["ckpt", "verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"  step_00000010: damaged: {MODEL_STATES}: content differs from what was written (xxh3_128 mismatch)"
    assert out[1].startswith("  step_00000020: incomplete: COMPLETE: missing")
    assert cli(["ckpt", "verify", str(tmp_path), "--sizes-only"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "  step_00000010: intact"

    (d / "step_00000030" / "rank_00000.pt").unlink()
    assert cli(["ckpt", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[2:] == ["* step_00000030: damaged: rank_00000.pt: missing",
                       "latest checkpoint step_00000030 is damaged; a resume falls back to the newest intact one"]
    assert cli(["ckpt", "verify", str(tmp_path), "--tag", "step_00000020"]) == 1
    assert cli(["ckpt", "verify", str(tmp_path / "nothing")]) == 2  # one line, no traceback


def test_ckpt_verify_stays_light():
    """`ckpt verify` and `status` need no torch: the checking lives in ckpt_layout."""
    code = ("import sys; from latentforge.launch.cli import main; import latentforge.training.ckpt_layout; "
            "main(['ckpt', 'verify', '/nonexistent']); assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_readers_refuse_damaged_checkpoint_with_one_line(tmp_path):
    _run(tmp_path, steps=(10,))
    assert checkpoint.client_state(tmp_path).step == 10
    flip_byte(cl.ckpt_dir(tmp_path) / "step_00000010" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError) as e:
        checkpoint.consolidated_weights(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "damaged checkpoint: zero_pp_rank_0_mp_rank_00_optim_states.pt: content differs" in msg


def test_export_and_eval_stop_with_one_line_naming_the_damaged_file(tmp_path, capsys):
    from latentforge import config as config_mod

    run_dir = tmp_path / "run"
    _run(run_dir, steps=(10,))
    config_mod.save(config_mod.resolve("tiny", None, [f"run_root={tmp_path}"]), run_dir / "config.yaml")
    truncate(cl.ckpt_dir(run_dir) / "step_00000010" / MODEL_STATES)
    capsys.readouterr()
    want = f"{MODEL_STATES}: 1000 bytes, "
    assert cli(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged checkpoint: " + want in err[0], err
    assert not (tmp_path / "export").exists()
    assert cli(["eval", str(run_dir), "tracking.enabled=false"]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "latentforge:" in ln]
    assert len(err) == 1 and "damaged checkpoint: " + want in err[0], err


# ---------------------------------------------------------------------------------------
# Trust: weights-only loads.


class Payload:
    """Unpickling this runs a command: what a hostile checkpoint file would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_file_holding_a_pickled_object_is_refused(tmp_path):
    from latentforge.training import deepspeed_compat

    _run(tmp_path, steps=(10,))
    folder = cl.ckpt_dir(tmp_path) / "step_00000010"
    marker = tmp_path / "pwned"
    torch.save({"module": {}, "step": 10, "evil": Payload(marker)}, folder / MODEL_STATES)
    # The rewritten file no longer matches COMPLETE, so the check would refuse it first:
    # read it unchecked to show that the load itself refuses it.
    with pytest.raises(ValueError, match=f"{MODEL_STATES}: refused: holds objects other than tensors"):
        checkpoint._read_state(tmp_path, None, verify=False)
    with pytest.raises(pickle.UnpicklingError, match="GLOBAL posix.system"):  # DeepSpeed's files, through the adapter
        deepspeed_compat.load_file(folder / MODEL_STATES)
    with deepspeed_compat.weights_only_loads():  # DeepSpeed's own torch.load(weights_only=False) calls
        with pytest.raises(pickle.UnpicklingError, match="GLOBAL posix.system"):
            torch.load(folder / MODEL_STATES, weights_only=False)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None
    assert not marker.exists()

    # The allowlist admits DeepSpeed's own objects, also after a nested load has returned
    # (the engine's load runs inside weights_only_loads; torch's context is not re-entrant).
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"loss_scaler": LossScaler(2.0), "zero_stage": ZeroStageEnum.gradients}, tmp_path / "optim.pt")
    with deepspeed_compat.weights_only_loads():
        assert deepspeed_compat.load_file(tmp_path / "optim.pt")["loss_scaler"].cur_scale == 2.0
        assert torch.load(tmp_path / "optim.pt", weights_only=False)["zero_stage"] == ZeroStageEnum.gradients
    with pytest.raises(pickle.UnpicklingError, match="LossScaler"):  # outside: not allowed
        torch.load(tmp_path / "optim.pt", weights_only=True)


def test_rank_file_rng_state_is_weights_only_and_restores_every_generator(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # Python keeps a cached gaussian: part of its state
    torch.save({"rng": checkpoint.rng_state()}, tmp_path / "rank.pt")
    want = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    checkpoint.set_rng_state(checkpoint.load_file(tmp_path / "rank.pt")["rng"])  # weights_only=True
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))
    assert got[:4] == want[:4] and torch.equal(got[4], want[4])


def test_train_state_holds_only_plain_values():
    TrainState(step=3, loader={"epoch": 1, "base": [1, 2]}, null_text={"tokens": torch.zeros(2)}).state_dict()
    with pytest.raises(TypeError, match=r"TrainState.loader.epoch: a int64 cannot be saved"):
        TrainState(loader={"epoch": np.int64(1)}).state_dict()
    with pytest.raises(TypeError, match=r"TrainState.shapes.latent: a tuple"):
        TrainState(shapes={"latent": (4, 8, 8)}).state_dict()


def test_deepspeed_version_check_is_one_line(monkeypatch):
    from latentforge.training import deepspeed_compat

    deepspeed_compat.check_version("0.19.8")
    with pytest.raises(AbortError, match=r"^deepspeed 0.99.0 is not a tested version \(tested: 0.19.8\)") as e:
        deepspeed_compat.check_version("0.99.0")
    assert "\n" not in str(e.value)
    monkeypatch.setenv(deepspeed_compat.ALLOW_UNTESTED_ENV, "1")
    deepspeed_compat.check_version("0.99.0")


# ---------------------------------------------------------------------------------------
# Real DeepSpeed: a 2-rank ZeRO-2 run with checkpoints at steps 2, 4, 6, 8, 10, damaged in
# every way at once, resumed; and its universal form, damaged, resumed on 1 rank.

SOURCE = ("integrity", "train.max_steps=10", "train.ckpt_every_steps=2", "train.keep_last=10", "train.log_every=2")


def _train(tiny_data, run_dir: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    root, overrides = tiny_data
    return subprocess.run([sys.executable, "-m", "latentforge.launch.cli", "train", "--preset", "tiny", *overrides,
                           *SOURCE[1:], f"run_dir={run_dir}", f"nproc={nproc}", *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


def assert_bitwise_equal(run_a: Path, run_b: Path, tag: str) -> None:
    from test_trainer import optim_tensors

    w_a, c_a = checkpoint.consolidated_weights(run_a, tag)
    w_b, c_b = checkpoint.consolidated_weights(run_b, tag)
    assert w_a.keys() == w_b.keys()
    differ = [k for k in w_a if not torch.equal(w_a[k], w_b[k])]
    assert not differ, f"{len(differ)} tensors differ at {tag}, e.g. {differ[:3]}"
    assert all(torch.equal(c_a.ema["shadow"][k], c_b.ema["shadow"][k]) for k in c_a.ema["shadow"])
    o_a, o_b = optim_tensors(cl.ckpt_dir(run_a) / tag), optim_tensors(cl.ckpt_dir(run_b) / tag)
    assert o_a.keys() == o_b.keys() and all(torch.equal(o_a[k], o_b[k]) for k in o_a)
    assert (c_a.step, c_a.samples_seen, c_a.loader) == (c_b.step, c_b.samples_seen, c_b.loader)


@pytest.mark.slow
def test_resume_skips_every_kind_of_damage_and_continues_bitwise(tiny_data, train_run, tmp_path):
    from mlflow.tracking import MlflowClient

    src, _ = train_run(*SOURCE)
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    d = cl.ckpt_dir(run_dir)
    (d / "step_00000010" / cl.COMPLETE).unlink()  # `latest` names it
    truncate(d / "step_00000008" / MODEL_STATES)
    # One flipped bit inside rank 1's optimizer shard: the size stays the same, so only the
    # content hash (train.verify_checkpoints, on by default) can tell.
    flip_byte(d / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (d / "step_00000004" / "rank_00001.pt").unlink()

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = _train(tiny_data, run_dir, "tracking.enabled=true", f"tracking.uri={uri}")
    assert done.returncode == 0, done.stdout[-4000:]
    warnings = [ln for ln in done.stdout.splitlines() if "[checkpoint] warning: checkpoint" in ln]
    assert len(warnings) == 4, "\n".join(warnings)
    for tag, what in (("step_00000010", "COMPLETE: missing"),
                      ("step_00000008", f"{MODEL_STATES}: 1000 bytes, "),
                      ("step_00000006", "zero_pp_rank_1_mp_rank_00_optim_states.pt: content differs"),
                      ("step_00000004", "rank_00001.pt: missing")):
        line = next(ln for ln in warnings if f"/{tag} is damaged" in ln)
        assert what in line and f"renamed aside to {tag}.corrupt" in line, line
        assert (d / f"{tag}.corrupt").is_dir()
    assert f"[train] resumed from {d / 'step_00000002'} at step 2, skipping 4 damaged checkpoint(s)" in done.stdout
    assert "Traceback" not in done.stdout

    # The rest of the run is the uninterrupted run's, bit for bit.
    assert_bitwise_equal(src, run_dir, "step_00000010")
    assert (d / cl.LATEST).read_text() == "step_00000010"
    assert cli(["ckpt", "verify", str(run_dir)]) == 0

    # The fallback is on the MLflow run: a tag and the run's note.
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("latentforge").experiment_id])
    assert run.data.tags["checkpoint_fallback"] == "resumed from step_00000002; skipped 4 damaged"
    note = run.data.tags["mlflow.note.content"]
    assert "resumed from step_00000002" in note and "- step_00000006: zero_pp_rank_1_mp_rank_00_optim_states" in note

    # Nothing intact left: the run fails with one line (every rank agrees; said once).
    for tag in cl.complete_tags(run_dir):
        truncate(d / tag / MODEL_STATES)
    failed = _train(tiny_data, run_dir, "tracking.enabled=false")
    assert failed.returncode == 1, failed.stdout[-4000:]
    errors = [ln for ln in failed.stdout.splitlines() if "latentforge: aborted:" in ln]
    assert len(errors) == 1 and "no intact checkpoint left" in errors[0], failed.stdout[-4000:]
    assert "Traceback" not in failed.stdout


UNIVERSAL_DAMAGE = {  # what `check` says about each
    "truncated model-states file": (lambda u: truncate(u / MODEL_STATES), f"{MODEL_STATES}: 1000 bytes, "),
    "flipped byte in an optimizer shard": (lambda u: flip_byte(u / "zero" / "conv_in.weight" / "exp_avg.pt"),
                                           "zero/conv_in.weight/exp_avg.pt: content differs"),
    "missing parameter file": (lambda u: (u / "zero" / "conv_in.weight" / "fp32.pt").unlink(),
                               "zero/conv_in.weight/fp32.pt: missing"),
    "deleted COMPLETE": (lambda u: (u / cl.COMPLETE).unlink(), "COMPLETE: missing"),
}


@pytest.mark.slow
def test_damaged_universal_checkpoint_is_renamed_aside_and_made_again(train_run, tmp_path):
    """A universal checkpoint is derived from its (intact) source: a damaged one is renamed
    aside and converted again, so the resume keeps the newest step. In-process: the
    resume decision only (the next test loads one for real, truncated). Every kind of
    damage is found; the two that take different paths through `prepare_resume` (a file
    that fails its check, a lost COMPLETE) are resumed from (each costs a conversion)."""
    src, _ = train_run(*SOURCE)
    flagged = tmp_path / "flagged"
    shutil.copytree(src, flagged)
    u = cl.ckpt_dir(flagged) / checkpoint.make_universal(flagged)  # flagged for the next start
    assert cl.check(u).state == "intact" and len(cl.read_record(u)["files"]) > 100
    for i, (what, (damage, found)) in enumerate(UNIVERSAL_DAMAGE.items()):
        run_dir = tmp_path / f"u{i}"
        shutil.copytree(flagged, run_dir)
        u = cl.ckpt_dir(run_dir) / "step_00000010_universal"
        damage(u)
        status = cl.check(u)
        assert not status.ok and status.problems[0].startswith(found), (what, status)
        if what not in ("flipped byte in an optimizer shard", "deleted COMPLETE"):
            continue
        plan = checkpoint.prepare_resume(run_dir, world_size=1, zero_stage=2)
        assert (plan.tag, plan.load_tag, plan.universal) == ("step_00000010", "step_00000010_universal", True), what
        assert plan.fallback and plan.fallback[0].startswith("step_00000010_universal: "), (what, plan.fallback)
        assert (cl.ckpt_dir(run_dir) / "step_00000010_universal.corrupt").is_dir(), what
        assert cl.check(u).state == "intact", what  # made again from step 10


@pytest.mark.slow
def test_resume_through_damaged_universal_checkpoint_continues_bitwise(tiny_data, train_run, tmp_path):
    src, _ = train_run(*SOURCE)
    runs = {}
    for name in ("reference", "damaged"):
        runs[name] = tmp_path / name
        shutil.copytree(src, runs[name])
        checkpoint.make_universal(runs[name])  # `latentforge ckpt universal`: step 10, flagged
    truncate(cl.ckpt_dir(runs["damaged"]) / "step_00000010_universal" / MODEL_STATES)
    for name, run_dir in runs.items():  # 2 ranks -> 1, two more steps
        done = _train(tiny_data, run_dir, "train.max_steps=12", "tracking.enabled=false", nproc=1)
        assert done.returncode == 0, done.stdout[-4000:]
        assert "through its universal form" in done.stdout and "at step 10" in done.stdout, done.stdout[-3000:]
    assert (cl.ckpt_dir(runs["damaged"]) / "step_00000010_universal.corrupt").is_dir()
    assert_bitwise_equal(runs["reference"], runs["damaged"], "step_00000012")
    meta = json.loads((cl.ckpt_dir(runs["damaged"]) / "step_00000012" / cl.COMPLETE).read_text())
    assert meta["world_size"] == 1
