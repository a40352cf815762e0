"""submitit's private APIs, in one place, behind a version check (see latentforge/compat.py).

A train job checkpoints on every rank and only then requeues itself (launch/jobs.py), so it
does by hand what submitit's `SignalHandler.checkpoint_and_try_requeue` does inside its
signal handler: read the timeout countdown from the submitted pickle
(`DelayedSubmission._timeout_min`, `._timeout_countdown`), write the pickle the requeued job
will run (`DelayedSubmission.dump` through `core.utils.temporary_save_path`) and requeue
(`JobEnvironment._requeue`: `scontrol requeue` on SLURM, exit 144 for the local
controller). `timed_out` repeats submitit's rule for what counts as a timeout, and
`job_state` asks its sacct watcher for a state without the cache.

No torch here, and submitit is imported inside the functions: job pickles stay light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentforge.compat import check_tested

DIST = "submitit"
TESTED = ">=1.5.4,<1.6"  # requirements/lock.txt: 1.5.4
USES = ("private requeue bookkeeping (DelayedSubmission._timeout_min/_timeout_countdown, JobEnvironment._requeue, "
        "core.utils.temporary_save_path, the timeout rule of SignalHandler.has_timed_out)")


def check_version(version: str | None = None) -> str:
    """The installed submitit version if it is tested, else UntestedVersionError (one line)."""
    return check_tested(DIST, TESTED, USES, version)


def timed_out(walltime_s: float, timeout_min: float) -> bool:
    """submitit 1.5's rule (SignalHandler.has_timed_out): a signal counts as a timeout once
    the job ran min(80 % of its limit, limit - 10 min). So with a limit of 10 minutes or
    less every signal is a timeout and uses up one of `max_num_timeout`."""
    limit_s = timeout_min * 60
    return walltime_s >= min(0.8 * limit_s, limit_s - 600)


def delayed(fn: Any, *args: Any) -> Any:
    """`fn(*args)` as the submission a requeued job runs (what `checkpoint()` returns)."""
    from submitit.helpers import DelayedSubmission

    return DelayedSubmission(fn, *args)


def submitted_timeout(submitted_pickle: str | Path) -> tuple[float, int]:
    """(timeout_min, timeouts left) recorded in the job's submitted pickle."""
    check_version()
    from submitit.core import utils as su

    current = su.DelayedSubmission.load(submitted_pickle)
    return current._timeout_min, current._timeout_countdown


def rewrite_submission(submitted_pickle: str | Path, fn: Any, timeout_min: float, countdown: int) -> None:
    """Replace the submitted pickle with `fn()` and the given countdown, atomically (the
    controller may read it at any time): what the requeued job runs."""
    check_version()
    from submitit.core import utils as su

    nxt = su.DelayedSubmission(fn)
    nxt.set_timeout(timeout_min, countdown)
    with su.temporary_save_path(submitted_pickle) as tmp:
        nxt.dump(tmp)


def requeue(jenv: Any, countdown: int) -> None:
    """Requeue the current job (SLURM: `scontrol requeue`, which ends this step; local:
    exit 144, and the local controller restarts it)."""
    check_version()
    jenv._requeue(countdown)


def job_state(job: Any, force: bool) -> str:
    """A SLURM job's state from submitit's sacct watcher; `force` skips its cache."""
    check_version()
    return job.watcher.get_state(job.job_id, mode="force" if force else "cache")
