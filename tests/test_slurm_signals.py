"""A stop signal during periodic eval, on the real one-node SLURM cluster: SLURM's
pre-timeout USR2 (as `--signal=USR2@N` sends it: to every task of the job's steps) lands
while a 2-task training job is in an eval whose FID would outlast the profile's
`signal_delay_s`. The eval stops at the next batch boundary on both ranks, both
checkpoint at that step, and rank 0 requeues the job, well inside the delay; the requeued
attempt resumes from that checkpoint."""

from __future__ import annotations

import re
import time
from typing import Iterator

import pytest
from slurm_cluster import SlurmCluster
from submitted import job_log as _log
from submitted import poll as _poll
from submitted import sacct, submitting_to

from latentforge.launch import submit
from latentforge.launch.profiles import find_profile, load_profile

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
_SUBMITTED: list[str] = []  # job ids this module submitted (cancelled at the end if still there)


@pytest.fixture(scope="module")
def cluster(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with submitting_to(slurm_cluster, tmp_path_factory.mktemp("slurm_signals_cwd"), _SUBMITTED) as c:
        yield c


def test_a_stop_signal_during_periodic_eval_checkpoints_and_requeues_within_the_delay(cluster, tiny_data) -> None:
    root, overrides = tiny_data
    delay = load_profile(find_profile("local")).signal_delay_s
    # 128 held-out images (2 of the 4 latent parts) through a random Inception at 299 px,
    # twice (reference, then the generated set): minutes on these CPUs.
    ov = [*overrides, "run_name=eval-preempt", "data.heldout_shards=2", "train.max_steps=8", "eval.every_steps=4",
          "eval.fid_num_images=128", "eval.fid_batch_size=2", f"eval.fid_cache_dir={root / 'fid_cache_preempt'}"]
    sub = submit.submit_jobs("train", "local", "tiny", None, ov)
    job = sub.jobs[0].job_id
    _SUBMITTED.append(job)
    run_dir = sub.run_dir

    # The periodic eval at step 4 is in its FID. Its progress line (every 10 s) shows that
    # it would outlast the delay; now SLURM's USR2.
    t_fid = _poll("the eval at step 4 to start its FID",
                  lambda: "FID reference statistics" in _log(run_dir, job) and time.monotonic(), 600)
    line = re.compile(r"\[eval\] FID (reference|set)[^:]*: rank 0 (\d+)/(\d+) images, .* ETA ([\d.]+) min")
    progress = _poll("a FID progress line", lambda: next(
        (m for m in line.finditer(_log(run_dir, job)) if int(m.group(2)) < int(m.group(3))), None), 600)
    elapsed, left = time.monotonic() - t_fid, float(progress.group(4)) * 60
    # The generated set takes at least as long as the reference (the same images through
    # the same Inception, plus sampling).
    would_take = elapsed + left + ((elapsed + left) if progress.group(1) == "reference" else 0)
    assert would_take > delay, f"the eval would take ~{would_take:.0f} s, not more than the {delay} s delay"
    cluster.run(["scancel", "--signal=USR2", job])
    sent = time.time()

    _poll(f"job {job} to requeue itself", lambda: "requeueing job" in _log(run_dir, job), 300)
    log0, log1 = _log(run_dir, job, 0), _log(run_dir, job, 1)
    assert "[train] stop signal 12 during eval: checkpointed at step 4, exiting for requeue" in log0, log0[-3000:]
    assert "[job] rank 1: checkpointed at step 4; rank 0 decides the requeue" in log1, log1[-3000:]
    since_signal = time.time() - sent
    requeue = next(ln for ln in log0.splitlines() if "requeueing job" in ln)
    assert re.search(r"\[job\] (preempted|timed out): checkpointed at step 4; requeueing job", requeue)
    assert since_signal < delay, f"{since_signal:.0f} s from the signal to the requeue; the profile allows {delay} s"
    n = progress.group(3)
    assert not re.search(rf"FID {progress.group(1)}[^:]*: rank 0 {n}/{n} images", log0.split(requeue)[0])  # cut short
    print(f"[test] signal to requeue: {since_signal:.1f} s (signal_delay_s {delay} s); the eval would have taken "
          f"~{would_take:.0f} s")

    from latentforge.training import checkpoint

    assert checkpoint.latest_tag(run_dir) == "step_00000004"
    # The requeued attempt resumes from that checkpoint; then the test ends the job.
    _poll(f"the requeued job {job} to resume", lambda: "restart 1" in _log(run_dir, job)
          and "[train] resumed from" in _log(run_dir, job).split("restart 1", 1)[1], 300)
    assert f"[train] resumed from {run_dir / 'checkpoints' / 'step_00000004'} at step 4" in \
        _log(run_dir, job).split("restart 1", 1)[1]
    cluster.run(["scancel", job])
    _poll(f"job {job} to end", lambda: (sacct(cluster, job) or [("", "", "")])[-1][1] in ("CANCELLED", "COMPLETED"),
          120)
