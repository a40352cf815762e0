"""MLflow tracking: runs across requeues and outages, against a real server on loopback
(tests/mlflow_server.py) and the embedded sqlite store; and run comparison."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from job_procs import start_job
from job_procs import wait_for_line as _wait_for
from mlflow_server import _free_port, live_mlflow_server, mlflow_server  # noqa: F401
from PIL import Image

from latentforge.training import runs
from latentforge.training.mlflow_store import MAX_PARAM_VAL_LENGTH, TRUNCATION_MARKER, truncate
from latentforge.training.tracking import Tracker, run_key_for

# Short intervals so outages and recoveries take fractions of a second.
FAST = dict(flush_interval_s=0.1, retry_initial_s=0.1, retry_max_s=0.5, request_timeout_s=5,
            start_timeout_s=120.0, system_metrics=False)
WARN_UNREACHABLE = "[tracking] warning: MLflow at"


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str) -> list:
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else list(c.search_runs([exp.experiment_id]))


def _history(uri: str, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


# ----------------------------------------------------------------------------------------
# Without a store.


def test_import_does_not_load_mlflow() -> None:
    code = ("import sys, latentforge.training.tracking, latentforge.training.runs; "
            "assert 'mlflow' not in sys.modules and 'torch' not in sys.modules, 'heavy import at module level'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bad_input_fails_loudly_on_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    t = Tracker(uri="", experiment="e", enabled=False)  # a rank other than 0
    with pytest.raises(RuntimeError, match="start"):
        t.log_metrics({"train/loss": 1.0}, step=0)
    assert t.start() is None and t.run_id is None
    with pytest.raises(ValueError, match="metric name 'train loss!'"):
        t.log_metrics({"train loss!": 1.0}, step=0)
    with pytest.raises(ValueError, match="step"):
        t.log_metrics({"train/loss": 1.0}, step=1.5)
    with pytest.raises(ValueError, match="train/loss"):
        t.log_metrics({"train/loss": "high"}, step=1)
    with pytest.raises(ValueError, match="param key"):
        t.log_params({"a//b": 1})
    with pytest.raises(ValueError, match="artifact_file"):
        t.log_image(Image.new("RGB", (4, 4)), "samples/x.jpg")
    with pytest.raises(ValueError, match="status"):
        t.finish("DONE")
    t.log_metrics({"train/loss": 1.0}, step=0)  # valid input on a disabled tracker: a no-op
    assert t.buffered == 0 and t._thread is None and t.finish() is True
    with pytest.raises(ValueError, match="max_buffer"):
        Tracker(uri="sqlite:///x.db", experiment="e", max_buffer=0)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="uri"):
        Tracker(uri="", experiment="e")


def test_truncate_and_run_key(tmp_path: Path) -> None:
    long = "x" * (MAX_PARAM_VAL_LENGTH + 1)
    cut = truncate(long, MAX_PARAM_VAL_LENGTH)
    assert len(cut) == MAX_PARAM_VAL_LENGTH and cut.endswith(TRUNCATION_MARKER)
    assert truncate("short", MAX_PARAM_VAL_LENGTH) == "short"
    key = run_key_for(tmp_path / "run")
    assert key == run_key_for(tmp_path / "run")  # stable across requeues of one run dir
    assert key != run_key_for(tmp_path / "other")


def test_unreachable_store_buffers_bounded_and_warns_once(capfd: pytest.CaptureFixture) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t = Tracker(uri=uri, experiment="nowhere", max_buffer=10, **FAST)
    assert t.start() is None  # returns after the first failed attempt, not after start_timeout_s
    for step in range(25):
        t.log_metrics({"train/loss": float(step)}, step=step)
    assert not t.flush(timeout_s=0.3)
    assert t.dropped == 15 and t.buffered == 10 + 1  # and this job's standard tags
    assert t.failed_attempts >= 2
    assert not t.finish("FAILED", timeout_s=0.3)
    err = capfd.readouterr().err
    assert err.count(WARN_UNREACHABLE) == 1
    assert err.count("metric buffer full") == 1
    assert "15 metric records were dropped" in err


# ----------------------------------------------------------------------------------------
# The embedded default: a sqlite store with artifacts beside it.


def test_sqlite_store_with_artifacts_and_system_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    store = tmp_path / "runs"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    (tmp_path / "config.yaml").write_text("train:\n  max_steps: 3\n")
    image = Image.new("RGB", (8, 6), (10, 200, 30))
    t = Tracker(uri=uri, experiment="local", run_name="demo", **{**FAST, "system_metrics": True})
    t.start()
    t.log_artifact(tmp_path / "config.yaml")
    t.log_image(image, "samples/step_000001.png")
    t.log_metrics({"train/loss": 0.5}, step=1)
    assert t.finish()
    run = _client(uri).get_run(t.run_id)
    art = store / "mlartifacts" / t.run_id / "artifacts"
    assert run.info.artifact_uri == art.as_uri()
    with Image.open(art / "samples" / "step_000001.png") as png:
        assert png.size == (8, 6) and png.convert("RGB").getpixel((3, 3)) == (10, 200, 30)
    assert (art / "config.yaml").read_text() == "train:\n  max_steps: 3\n"
    assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] == 0.5
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert run.data.tags["versions.mlflow"] == __import__("importlib.metadata").metadata.version("mlflow")
    assert run.data.tags["git_dirty"] in ("true", "false", "unknown")
    assert run.data.tags["world_size"] == "1"


# ----------------------------------------------------------------------------------------
# A real server.


@pytest.mark.mlflow_server
def test_two_runs_compare(live_mlflow_server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    uri, exp = live_mlflow_server.uri, "compare"
    losses = {"lr-small": [1.0 / (s + 1) for s in range(10)], "lr-big": [2.0 - 0.1 * s for s in range(10)]}
    lrs = {"lr-small": 1e-4, "lr-big": 3e-4}
    for name, curve in losses.items():
        t = Tracker(uri=uri, experiment=exp, run_name=name, **FAST)
        t.start()
        t.log_params({"optim.lr": lrs[name], "train.global_batch_size": 8, "run_name": name})
        for step, loss in enumerate(curve):
            t.log_metrics({"train/loss": loss, "train/lr": lrs[name]}, step=step)
        t.log_metrics({"eval/fid": 50.0 if name == "lr-small" else 80.0, "eval/clip_score": 0.3}, step=9)
        assert t.finish()

    found = {r.info.run_name: r for r in _runs(uri, exp)}
    assert set(found) == set(losses)
    for name, r in found.items():  # comparable: same names, same step axis
        assert set(r.data.metrics) == {"train/loss", "train/lr", "eval/fid", "eval/clip_score"}
        assert _history(uri, r.info.run_id) == list(enumerate(losses[name]))

    plot = tmp_path / "loss.png"
    text = runs.compare(exp, uri, keys=["train.global_batch_size"], metrics=None, plot=str(plot))
    lines = text.splitlines()
    header = lines[0]
    assert "optim.lr" in header and "train.global_batch_size" in header and "run_name" not in header
    assert "train/loss last / best" in header and "eval/fid last / best" in header
    row = {n: next(ln for ln in lines[2:] if ln.startswith(n)) for n in losses}
    assert "0.0001" in row["lr-small"] and "0.0003" in row["lr-big"]
    assert "0.1 / 0.1" in row["lr-small"]  # train/loss: last = best = 1/10
    assert "1.1 / 1.1" in row["lr-big"]  # 2.0 - 0.9
    assert "FINISHED" in row["lr-big"] and found["lr-big"].info.run_id[:8] in row["lr-big"]
    with Image.open(plot) as png:
        assert png.format == "PNG" and png.size == (800, 500)

    # Without --keys the identical batch size is not shown; the CLI prints the same table.
    capsys.readouterr()  # drop MLflow's "View run at" lines
    assert runs.main([exp, "--uri", uri]) == 0  # what `latentforge runs compare ...` passes
    out = capsys.readouterr().out
    assert "optim.lr" in out.splitlines()[0] and "train.global_batch_size" not in out
    with pytest.raises(SystemExit) as e:
        runs.main(["compare", "no-such-experiment", "--uri", uri])  # a leading "compare" is accepted
    assert e.value.code == 2


CHILD = textwrap.dedent("""
    import os, signal, sys
    from latentforge.training.tracking import Tracker
    t = Tracker(uri=sys.argv[1], experiment=sys.argv[2], run_name="resumable", flush_interval_s=0.1,
                start_timeout_s=120, system_metrics=False)
    run_id = t.start()
    t.log_params({"optim.lr": 0.0001})
    for step in range(5):
        t.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    assert t.flush(120)
    print(run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no finish(), no atexit: a node failure
""")


@pytest.mark.mlflow_server
def test_killed_run_resumes_as_the_same_run(live_mlflow_server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    uri, exp = live_mlflow_server.uri, "requeue"
    env = {**os.environ, "SLURM_JOB_ID": "1001"}
    child = subprocess.run([sys.executable, "-c", CHILD, uri, exp], env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    run_id = child.stdout.strip()
    assert _client(uri).get_run(run_id).info.status == "RUNNING"  # nobody said otherwise

    monkeypatch.setenv("SLURM_JOB_ID", "1002")  # the requeued job
    t = Tracker(uri=uri, experiment=exp, run_name="resumable", **FAST)
    assert t.start(run_id=run_id) == run_id
    assert _client(uri).get_run(run_id).info.status == "RUNNING"
    t.log_params({"optim.lr": 0.0001})  # the same config again: no error
    for step in range(5, 10):
        t.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    assert t.finish("FINISHED")

    (run,) = _runs(uri, exp)  # one run, not two
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert _history(uri, run_id) == [(s, 1.0 / (s + 1)) for s in range(10)]
    assert run.data.tags["slurm_job_ids"] == "1001,1002"
    assert run.data.params == {"optim.lr": "0.0001"}


@pytest.mark.mlflow_server
def test_outage_loses_nothing_mid_run_or_at_start(live_mlflow_server, tmp_path: Path,  # noqa: F811
                                                   capfd: pytest.CaptureFixture) -> None:
    """One outage (server restarts are the slow part) hits a run mid-way and a job that
    starts while the server is down."""
    server, exp = live_mlflow_server, "outage"
    mid = Tracker(uri=server.uri, experiment=exp, run_name="mid", **FAST)
    mid_id = mid.start()
    for step in range(5):
        mid.log_metrics({"train/loss": float(step)}, step=step)
    assert mid.flush(60)

    server.stop()
    # The running job keeps logging; every call returns at once and nothing raises.
    slowest = 0.0
    for step in range(5, 25):
        t0 = time.perf_counter()
        mid.log_metrics({"train/loss": float(step)}, step=step)
        slowest = max(slowest, time.perf_counter() - t0)
        if step % 5 == 0:
            assert not mid.flush(timeout_s=0.2)  # an immediate attempt that fails
    assert mid.failed_attempts >= 3 and mid.buffered == 20
    assert slowest < 1.0  # guarantee 7: logging does not wait on the dead server
    # A job that starts now: no run can be created, and none is faked.
    key = run_key_for(tmp_path / "late-run")
    late = Tracker(uri=server.uri, experiment=exp, run_name="late", run_key=key, **FAST)
    assert late.start() is None and late.run_id is None
    late.log_params({"optim.lr": 0.001})
    late.set_tags({"note": "created late"})
    for step in range(10):
        late.log_metrics({"train/loss": 10.0 - step}, step=step)
    assert not late.flush(timeout_s=0.2) and late.run_id is None
    err = capfd.readouterr().err
    assert err.count(WARN_UNREACHABLE) == 2  # one per tracker for the outage, not one per step

    server.start()
    assert mid.flush(60) and late.flush(60)
    assert mid.finish()
    assert _history(server.uri, mid_id) == [(s, float(s)) for s in range(25)]
    assert _client(server.uri).get_run(mid_id).info.status == "FINISHED"
    late_id = late.run_id
    assert late_id is not None
    run = _client(server.uri).get_run(late_id)
    assert run.info.run_name == "late" and run.info.status == "RUNNING"
    assert run.data.params == {"optim.lr": "0.001"} and run.data.tags["note"] == "created late"
    assert _history(server.uri, late_id) == [(s, 10.0 - s) for s in range(10)]
    assert late.finish("KILLED")
    out, err = capfd.readouterr()
    assert out.count("reachable again") == 2 and WARN_UNREACHABLE not in err  # recovery is INFO (stdout)

    # The late job died before a checkpoint stored its run id: the next job starts
    # without one, and the run key leads it back to the same run.
    again = Tracker(uri=server.uri, experiment=exp, run_name="late", run_key=key, **FAST)
    assert again.start(run_id=None) == late_id
    assert again.finish()
    assert sorted(r.info.run_name for r in _runs(server.uri, exp)) == ["late", "mid"]


@pytest.mark.mlflow_server
def test_params_truncated_and_resume_with_same_params(live_mlflow_server, capfd: pytest.CaptureFixture) -> None:  # noqa: F811
    uri, exp = live_mlflow_server.uri, "params"
    params = {"data.raw_shards": "s" * 10_000, "optim.lr": 0.0001, "model.block_out_channels": [64, 128]}
    params.update({f"extra.p{i:03d}": i for i in range(150)})  # more than one batch (100)
    t = Tracker(uri=uri, experiment=exp, run_name="p", **FAST)
    run_id = t.start()
    t.log_params(params)
    for step in range(2500):  # more than two batches (1000)
        t.log_metrics({"train/grad_norm": float(step)}, step=step)
    assert t.finish("KILLED")  # preempted
    assert len(_history(uri, run_id, "train/grad_norm")) == 2500
    assert _client(uri).get_run(run_id).info.status == "KILLED"

    t = Tracker(uri=uri, experiment=exp, run_name="p", **FAST)
    assert t.start(run_id=run_id) == run_id
    assert _client(uri).get_run(run_id).info.status == "RUNNING"  # reopened
    t.log_params(params)  # identical: skipped, no error
    t.log_params({"optim.lr": 0.0002})  # changed on resume: a tag, not a crash
    assert t.finish()

    run = _client(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    raw = run.data.params["data.raw_shards"]
    assert len(raw) == MAX_PARAM_VAL_LENGTH and raw.endswith(TRUNCATION_MARKER)
    assert run.data.params["optim.lr"] == "0.0001"
    assert run.data.params["model.block_out_channels"] == "[64, 128]"
    assert run.data.tags["param_changed/optim.lr"] == "0.0002"
    assert len(run.data.params) == 153 and run.data.params["extra.p149"] == "149"
    err = capfd.readouterr().err
    assert err.count("param 'optim.lr' was logged as") == 1 and "rejected" not in err


# ----------------------------------------------------------------------------------------
# No metric is ever lost: the spool in the run directory.


@pytest.mark.mlflow_server
def test_a_repeated_batch_is_stored_once_by_sqlite_and_by_the_server(live_mlflow_server, tmp_path: Path) -> None:  # noqa: F811
    """What makes the one repeat after a crash harmless (training/tracking.py): both SQL
    paths keep one point per identical (key, value, timestamp, step)."""
    from latentforge.training.mlflow_store import MlflowStore

    for uri in (f"sqlite:///{tmp_path / 'mlflow.db'}", live_mlflow_server.uri):
        store = MlflowStore(uri, "dedup")
        run_id = store.open(None, None, "dedup", int(time.time() * 1000)).run_id
        batch = [("train/loss", 0.5 + s, 1000 + s, s) for s in range(5)]
        store.log_batch(run_id, batch, [("optim.lr", "0.001")], [("note", "x")])
        store.log_batch(run_id, batch, [("optim.lr", "0.001")], [("note", "x")])  # its answer was lost: again
        store.logged_params.clear()  # a new process, which does not know what the run holds
        store.log_batch(run_id, batch[3:] + [("train/loss", 9.0, 2000, 5)], [("optim.lr", "0.001")], [])
        hist = sorted((m.step, m.value, m.timestamp) for m in _client(uri).get_metric_history(run_id, "train/loss"))
        assert hist == [(s, 0.5 + s, 1000 + s) for s in range(5)] + [(5, 9.0, 2000)], uri
        run = _client(uri).get_run(run_id)
        assert run.data.params == {"optim.lr": "0.001"} and run.data.tags["note"] == "x"


def _train(tiny_data, run_name: str, uri: str) -> tuple[subprocess.Popen, Path]:
    """`latentforge train nproc=2` (through latentforge/spawn.py) in its own session, so a
    test can signal the whole job; 40 steps, every step logged, a checkpoint at 25."""
    root, overrides = tiny_data
    log = root / f"{run_name}.log"
    return start_job(["train", "--preset", "tiny", *overrides, f"run_name={run_name}", "nproc=2",
                      f"tracking.uri={uri}", "train.log_every=1", "train.max_steps=40", "train.ckpt_every_steps=25"],
                     log), log


@pytest.mark.mlflow_server
@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.long)],
                         ids=["sigterm", "sigkill"])  # sigkill: make test-long (90 s)
def test_no_metric_is_lost_when_the_server_is_down_at_a_stop(live_mlflow_server, tiny_data, stop) -> None:  # noqa: F811
    """The issue's case: the server dies at step 10 and is still down when the job stops at
    step 30 (SIGTERM: it checkpoints and exits; SIGKILL: nothing runs, the last checkpoint
    is step 25). With the server back, `runs sync` (SIGTERM) or the resumed job itself
    (SIGKILL) delivers what the spool kept; after the resume every step of train/loss is in
    the run exactly once."""
    from latentforge.launch.cli import main

    server = live_mlflow_server
    name = f"spool-{stop.name.lower()}"
    run_dir = tiny_data[0] / name
    proc, log = _train(tiny_data, name, server.uri)
    _wait_for(log, "[train] step 10/40", proc)
    os.killpg(proc.pid, signal.SIGSTOP)  # hold the job while the server goes down
    server.stop()
    os.killpg(proc.pid, signal.SIGCONT)
    _wait_for(log, "[train] step 30/40", proc)
    if stop == signal.SIGTERM:
        os.kill(proc.pid, signal.SIGTERM)  # to the launcher, which forwards it to the ranks
        assert proc.wait(300) == 3, log.read_text()[-3000:]  # checkpointed, asks for a requeue
        text = log.read_text()
        m = re.search(r"stop signal 15: checkpointed at step (\d+)", text)
        assert m and 30 <= int(m.group(1)) < 40, text[-3000:]
        assert re.search(rf"records not delivered to {server.uri}; they wait in {run_dir / 'tracking'}", text)
        assert "gave up after" not in text  # it did not wait out the outage
    else:
        os.killpg(proc.pid, signal.SIGKILL)  # the node is gone
        proc.wait(60)
    assert any((run_dir / "tracking").glob("spool-*.jsonl"))

    server.start()
    (run,) = [r for r in _runs(server.uri, "latentforge") if r.info.run_name == name]
    if stop == signal.SIGTERM:  # the server is back: `latentforge runs sync RUN_DIR`
        assert main(["runs", "sync", str(run_dir)]) == 0
        assert _client(server.uri).get_run(run.info.run_id).info.status == "KILLED"  # as the job left it
        steps = [s for s, _ in _history(server.uri, run.info.run_id)]
        assert steps == list(range(1, int(m.group(1)) + 1))
        assert not any((run_dir / "tracking").glob("spool-*.jsonl"))
        assert main(["runs", "sync", str(run_dir)]) == 0  # nothing left: a no-op
    proc, log = _train(tiny_data, name, server.uri)  # the resumed job
    assert proc.wait(1200) == 0, log.read_text()[-3000:]
    text = log.read_text()
    if stop == signal.SIGKILL:
        assert f"resumed from {run_dir / 'checkpoints' / 'step_00000025'} at step 25" in text
        assert re.search(r"\d+ records that earlier jobs could not deliver wait in", text), text[-3000:]
        assert re.search(r"\d+ metric records not logged: an earlier job had logged those keys", text)
    run = _client(server.uri).get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _history(server.uri, run.info.run_id)] == list(range(1, 41))  # each step once
    assert len([r for r in _runs(server.uri, "latentforge") if r.info.run_name == name]) == 1
    assert not any((run_dir / "tracking").glob("spool-*.jsonl"))
