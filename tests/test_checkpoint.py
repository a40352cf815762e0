"""Checkpoints are whole or absent: `latest` moves only after every rank's files and
COMPLETE are on disk, a crash mid-save leaves the previous checkpoint usable, stale
partial directories are cleaned, the last K are kept; checkpoints on demand; the resume
plan (same layout, universal, stage 0); `latentforge ckpt universal`."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from latentforge.config import ConfigError
from latentforge.training import checkpoint
from latentforge.training.state import TrainState


def _complete(run_dir: Path, step: int, world_size: int = 2, zero_stage: int = 2, universal: bool = False) -> Path:
    tag = checkpoint.tag_for(step) + (checkpoint.UNIVERSAL_SUFFIX if universal else "")
    d = checkpoint.ckpt_dir(run_dir) / tag
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (d / checkpoint.COMPLETE).write_text(json.dumps({"step": step, "world_size": world_size,
                                                     "zero_stage": zero_stage}))
    return d


class FakeEngine:
    """Writes files the way DeepSpeed does (one model-states file); can crash mid-save."""

    def __init__(self, crash: bool = False):
        self.cfg = SimpleNamespace(train=SimpleNamespace(zero_stage=2))
        self.crash = crash

    def save(self, d: Path, tag: str, client_state: dict) -> dict:
        (d / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {}, **client_state}, d / tag / "mp_rank_00_model_states.pt")
        if self.crash:
            raise KeyboardInterrupt("killed after DeepSpeed wrote its files")
        return {}  # nothing hashed as written: checkpoint.save hashes it right after


# ---------------------------------------------------------------------------------------
# One process, no DeepSpeed.


def test_save_moves_latest_only_when_complete_and_keeps_last_k(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(FakeEngine(), tmp_path, TrainState(step=step), keep_last=2)
    ck = checkpoint.ckpt_dir(tmp_path)
    assert checkpoint.latest_tag(tmp_path) == "step_00000030" == (ck / "latest").read_text()
    assert checkpoint.complete_tags(tmp_path) == ["step_00000020", "step_00000030"]  # step 10 pruned
    assert json.loads((ck / "step_00000030" / "COMPLETE").read_text())["world_size"] == 1
    assert (ck / "step_00000030" / "rank_00000.pt").is_file()  # this rank's RNG

    with pytest.raises(KeyboardInterrupt):  # dies after DeepSpeed's files, before COMPLETE and latest
        checkpoint.save(FakeEngine(crash=True), tmp_path, TrainState(step=40), keep_last=2)
    assert (ck / "step_00000040" / "mp_rank_00_model_states.pt").is_file()
    assert not (ck / "step_00000040" / "COMPLETE").exists()
    assert checkpoint.latest_tag(tmp_path) == "step_00000030"  # the previous checkpoint is the one
    assert checkpoint.client_state(tmp_path).step == 30
    assert checkpoint.plan_resume(tmp_path, 1, 2).tag == "step_00000030"

    # Start-up removes the stale partial directory; a retried save of that step also would.
    (ck / ".step_00000030_universal.tmp").mkdir()  # a crashed universal conversion
    assert checkpoint.clean_partial(tmp_path) == [".step_00000030_universal.tmp", "step_00000040"]
    assert checkpoint.complete_tags(tmp_path) == ["step_00000020", "step_00000030"]
    checkpoint.save(FakeEngine(), tmp_path, TrainState(step=40), keep_last=2)
    assert checkpoint.latest_tag(tmp_path) == "step_00000040"


def test_latest_falls_back_to_newest_complete(tmp_path):
    assert checkpoint.latest_tag(tmp_path) is None and checkpoint.plan_resume(tmp_path, 2, 2) is None
    _complete(tmp_path, 10)
    _complete(tmp_path, 20)
    (checkpoint.ckpt_dir(tmp_path) / "step_00000030").mkdir()  # partial
    (checkpoint.ckpt_dir(tmp_path) / "latest").write_text("step_00000030")
    assert checkpoint.latest_tag(tmp_path) == "step_00000020"


def test_prune_drops_universal_copies_no_resume_needs(tmp_path):
    _complete(tmp_path, 10)
    _complete(tmp_path, 10, universal=True)
    _complete(tmp_path, 20)
    (checkpoint.ckpt_dir(tmp_path) / "latest").write_text("step_00000020")
    checkpoint.prune(tmp_path, keep_last=3)
    assert not (checkpoint.ckpt_dir(tmp_path) / "step_00000010_universal").exists()
    _complete(tmp_path, 20, universal=True)
    checkpoint.prune(tmp_path, keep_last=3)
    assert (checkpoint.ckpt_dir(tmp_path) / "step_00000020_universal").exists()  # latest's: a resume may load it


def test_resume_plan_same_layout_universal_and_stage_zero(tmp_path):
    _complete(tmp_path, 10, world_size=2, zero_stage=2)
    same = checkpoint.plan_resume(tmp_path, 2, 2)
    assert (same.tag, same.load_tag, same.universal) == ("step_00000010", "step_00000010", False)
    other = checkpoint.plan_resume(tmp_path, 1, 2)
    assert (other.load_tag, other.universal) == ("step_00000010_universal", True)
    assert other.reason == "saved with world size 2 and ZeRO stage 2, now 1 and 2"
    assert checkpoint.plan_resume(tmp_path, 2, 1).universal  # stage 2 -> 1 re-partitions too
    for stage in (0, 3):  # file layouts DeepSpeed's universal load cannot bridge: a clear error
        with pytest.raises(ConfigError, match="train.zero_stage: .* saved with ZeRO stage 2"):
            checkpoint.plan_resume(tmp_path, 2, stage)

    # A flag left by `latentforge ckpt universal` is honoured once, even at the same size.
    _complete(tmp_path, 10, universal=True)
    (checkpoint.ckpt_dir(tmp_path) / checkpoint.UNIVERSAL_FLAG).write_text("step_00000010_universal")
    assert checkpoint.plan_resume(tmp_path, 2, 2).universal
    checkpoint.drop_universal_flag(tmp_path)
    assert not checkpoint.plan_resume(tmp_path, 2, 2).universal

    stage0 = tmp_path / "s0"
    _complete(stage0, 10, world_size=2, zero_stage=0)
    assert not checkpoint.plan_resume(stage0, 4, 0).universal  # one unpartitioned state: loads as it is


# ---------------------------------------------------------------------------------------
# Real DeepSpeed, 2 ranks: a crash right after DeepSpeed's save; on-demand checkpoints.

CRASH_PREAMBLE = """
import os, signal
from latentforge.training import engine
_save = engine.Engine.save
def save(self, ckpt_dir, tag, client_state):
    written = _save(self, ckpt_dir, tag, client_state)
    if tag == "step_00000012":  # every rank's DeepSpeed files are written; COMPLETE and latest are not
        os.kill(os.getpid(), signal.SIGKILL)
    return written
engine.Engine.save = save
"""


@pytest.mark.slow
def test_crash_mid_save_leaves_previous_checkpoint_and_on_demand_saves(tiny_data, start_ranks, tmp_path):
    root, overrides = tiny_data
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / checkpoint.SAVE_NOW).touch()  # asks for a checkpoint at the first step boundary
    argv = ["train", "--preset", "tiny", *overrides, f"run_dir={run_dir}", "nproc=2", "tracking.enabled=false",
            "train.max_steps=16", "train.ckpt_every_steps=4", "train.keep_last=10", "train.log_every=1"]
    procs = start_ranks(argv, 2, tmp_path, preamble=CRASH_PREAMBLE)
    log0 = tmp_path / "rank0.log"
    try:
        deadline = time.monotonic() + 300
        while "[train] step 5/" not in log0.read_text():
            assert procs[0].poll() is None, log0.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGUSR1)  # on demand, to one rank only: the ranks agree on it
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = log0.read_text()
    assert codes == [-signal.SIGKILL, -signal.SIGKILL], log[-3000:]

    # On demand: the SAVE_NOW file at step 1 (then removed), SIGUSR1 a step or two after step 5.
    assert "[train] on-demand checkpoint at step 1\n" in log
    assert not (run_dir / checkpoint.SAVE_NOW).exists()
    asked = [int(line.split()[-1]) for line in log.splitlines() if "[train] on-demand checkpoint" in line]
    assert len(asked) == 2 and 5 <= asked[1] < 12, asked

    ck = run_dir / "checkpoints"
    assert (ck / "step_00000012" / "mp_rank_00_model_states.pt").is_file()  # DeepSpeed's files ...
    assert not (ck / "step_00000012" / checkpoint.COMPLETE).exists()  # ... but not ours
    assert checkpoint.latest_tag(run_dir) == "step_00000008" == (ck / "latest").read_text()
    assert checkpoint.complete_tags(run_dir) == sorted({"step_00000001", f"step_{asked[1]:08d}", "step_00000004",
                                                         "step_00000008"})
    weights, client = checkpoint.consolidated_weights(run_dir)  # the previous checkpoint is usable
    assert client.step == 8 and all(torch.isfinite(v).all() for v in weights.values())
    plan = checkpoint.plan_resume(run_dir, 2, 2)
    assert (plan.tag, plan.universal) == ("step_00000008", False)
    assert checkpoint.clean_partial(run_dir) == ["step_00000012"]


# ---------------------------------------------------------------------------------------
# `latentforge ckpt universal`.


@pytest.mark.slow
def test_ckpt_universal_command_converts_and_flags_the_next_start(train_run, tmp_path):
    from test_trainer import ZERO_RUNS

    from latentforge.launch.cli import main

    src, _ = train_run(*ZERO_RUNS[3])  # ZeRO-3: per-rank model and optimizer files
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    assert main(["ckpt", "universal", str(run_dir), "--tag", "step_00000012"]) == 0
    ck = run_dir / "checkpoints"
    u = ck / "step_00000012_universal"
    assert json.loads((u / checkpoint.COMPLETE).read_text())["universal_of"] == "step_00000012"
    assert (ck / checkpoint.UNIVERSAL_FLAG).read_text() == u.name
    assert not (ck / "latest_universal").exists() and not list(ck.glob(".*tmp"))
    # Whole fp32 weights and Adam moments per parameter, for any world size to slice.
    weights, _ = checkpoint.consolidated_weights(run_dir, "step_00000012")
    name = next(iter(weights))
    fp32 = torch.load(u / "zero" / name / "fp32.pt", weights_only=False)
    fp32 = fp32["param"] if isinstance(fp32, dict) else fp32  # ZeRO-1/2 wrap it, ZeRO-3 does not
    assert torch.equal(fp32.float().view(weights[name].shape), weights[name])
    assert (u / "zero" / name / "exp_avg.pt").is_file() and (u / "zero" / name / "exp_avg_sq.pt").is_file()
    # The flag names the latest checkpoint's universal form only: this one is for step 12,
    # latest is step 16, so the next start-up resumes from step 16 as usual.
    assert not checkpoint.plan_resume(run_dir, 2, 3).universal
    assert main(["ckpt", "universal", str(run_dir)]) == 0
    plan = checkpoint.plan_resume(run_dir, 2, 3)
    assert (plan.load_tag, plan.universal) == ("step_00000016_universal", True)
    assert main(["ckpt", "universal", str(tmp_path / "nothing")]) == 2  # a clear error, no traceback
