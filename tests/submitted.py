"""What the tests of jobs submitted to a local SLURM cluster share (tests/test_slurm_jobs.py on
one node, tests/test_slurm_multinode_jobs.py on two): a clean environment to submit from,
polling, the jobs' states and logs, MLflow runs, file trees, and the bitwise comparison of
two runs' ends."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from slurm_cluster import SlurmCluster

# Variables of the process running pytest that would leak into the jobs through sbatch: a
# launcher's rank variables, and interfaces chosen by hand (which would hide the derived ones).
_LEAKS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GLOO_SOCKET_IFNAME",
          "NCCL_SOCKET_IFNAME")


@contextlib.contextmanager
def submitting_to(cluster: SlurmCluster, cwd: Path, submitted: list[str]) -> Iterator[SlurmCluster]:
    """SLURM_CONF exported for submitit calls, a clean rank environment, `cwd` as the working
    directory, and every job id in `submitted` cancelled at the end (a failed test must not
    leave jobs on a cluster other sessions' jobs run on too)."""
    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith(("SLURM_", "SUBMITIT_")) or k in _LEAKS:
                mp.delenv(k)
        for k, v in cluster.env.items():
            mp.setenv(k, v)
        mp.chdir(cwd)
        yield cluster
        if submitted:
            cluster.run(["scancel", *sorted({j.split("_")[0] for j in submitted})], check=False)


def poll(what: str, cond: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    """Poll `cond` until it returns something truthy (SLURM and the job's files give us no
    event to wait on); fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)  # polling interval


def sacct(cluster: SlurmCluster, job_id: str) -> list[tuple[str, str, str]]:
    """(JobID, State, NodeList) of every attempt of a job (or array task), oldest first (-D
    lists requeued attempts)."""
    out = cluster.run(["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "JobID,State,NodeList"],
                      check=False).stdout
    rows = [ln.split("|") for ln in out.splitlines() if ln.count("|") >= 2]
    return [(r[0], r[1].split()[0] if r[1].split() else "", r[2]) for r in rows]


def job_log(run_dir: Path, job_id: str, rank: int = 0, ext: str = "out") -> str:
    """submitit's log of one task (appended to by every attempt of the job)."""
    p = run_dir / "slurm" / job_id / f"{job_id}_{rank}_log.{ext}"
    return p.read_text() if p.exists() else ""


def mlflow_runs(root: Path, name: str) -> tuple[Any, list[Any]]:
    """(client, the runs named `name`) in RUN_ROOT's sqlite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("latentforge")
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")


def file_tree(d: Path) -> dict[str, bytes]:
    """Every file below `d`, by relative path, with its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def assert_runs_end_bitwise_equal(run_a: Path, run_b: Path, steps: int) -> None:
    """The latest checkpoints of two runs: the same step, weights, EMA and samples seen, bit for bit."""
    import torch

    from latentforge.training.checkpoint import consolidated_weights

    w_a, c_a = consolidated_weights(run_a)
    w_b, c_b = consolidated_weights(run_b)
    assert c_a.step == c_b.step == steps
    assert w_a.keys() == w_b.keys()
    diff = [k for k in w_a if not torch.equal(w_a[k], w_b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
    ema_a, ema_b = c_a.ema["shadow"], c_b.ema["shadow"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert c_a.samples_seen == c_b.samples_seen
