"""Signals on local runs (training/control.py, latentforge/spawn.py): Ctrl-C on a 2-rank
training run ends with one consistent checkpoint, the MLflow run KILLED and no traceback
storm; a stop signal interrupts a stand-alone eval at the next batch boundary. The SLURM
side (a stop during periodic eval, then the requeue) is tests/test_slurm_signals.py."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from job_procs import start_job as _start
from job_procs import wait_for_line as _wait_for

pytestmark = pytest.mark.slow


def _mlflow(root: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client, client.get_experiment_by_name("latentforge").experiment_id


def test_ctrl_c_on_a_two_rank_run_ends_with_one_checkpoint_and_a_killed_run(tiny_data) -> None:
    root, overrides = tiny_data
    name = "ctrl-c"
    log = root / f"{name}.log"
    proc = _start(["train", "--preset", "tiny", *overrides, f"run_name={name}", "nproc=2", "train.max_steps=400",
                   "train.log_every=1", "train.ckpt_every_steps=1000"], log)
    _wait_for(log, "[train] step 5/400", proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the launcher and both ranks get it once
    assert proc.wait(300) == 130, log.read_text()[-3000:]

    text = log.read_text()
    m = re.findall(r"\[train\] interrupted \(Ctrl-C\): checkpointed at step (\d+), exiting\n", text)
    assert len(m) == 1, text[-3000:]  # rank 0 says it, once
    step = int(m[0])
    assert 5 <= step < 400
    assert "latentforge: interrupted; the ranks save a checkpoint and exit" in text  # the launcher, once
    assert "already stopping" not in text  # the launcher did not send the ranks a second SIGINT
    assert "Traceback" not in text and "KeyboardInterrupt" not in text and "exited unexpectedly" not in text

    from latentforge.training import checkpoint

    run_dir = root / name
    tag = checkpoint.latest_tag(run_dir)
    assert tag == f"step_{step:08d}" and [p.name for p in (run_dir / "checkpoints").iterdir()
                                          if p.name.startswith("step_")] == [tag]
    assert checkpoint.meta(run_dir, tag)["world_size"] == 2
    assert {p.name for p in (run_dir / "checkpoints" / tag).glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
    client, exp = _mlflow(root)
    (run,) = client.search_runs([exp], filter_string=f"tags.mlflow.runName = '{name}'")
    assert run.info.status == "KILLED"
    assert sorted(x.step for x in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, step + 1))


def test_a_stop_signal_interrupts_a_standalone_eval_at_a_batch_boundary(tiny_eval_run, tmp_path: Path) -> None:
    root, run_dir, overrides, _ = tiny_eval_run
    log = tmp_path / "eval.log"
    # 64 held-out images through a random Inception at 299 px: far longer than the wait below.
    proc = _start(["eval", str(run_dir), "nproc=2", "eval.fid_num_images=64", "eval.fid_batch_size=2",
                   f"eval.fid_cache_dir={tmp_path / 'fid_cache'}"], log)
    t0 = _wait_for(log, "FID reference statistics", proc)
    os.kill(proc.pid, signal.SIGTERM)  # to the launcher, which forwards it to both ranks
    assert proc.wait(300) == 3, log.read_text()[-3000:]
    waited = time.monotonic() - t0
    text = log.read_text()
    assert re.search(r"\[eval\] stop signal 15: eval of .* stopped at a batch boundary after [\d.]+s", text), text
    assert "Traceback" not in text and not list((tmp_path / "fid_cache").glob("fid_ref_*.pt"))  # nothing half-done
    client, exp = _mlflow(root)
    runs = client.search_runs([exp], filter_string="tags.`latentforge.kind` = 'eval'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert runs and runs[0].info.status == "KILLED"
    print(f"[test] stand-alone eval: signal to exit {waited:.1f} s")
