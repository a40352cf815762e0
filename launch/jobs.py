"""Job objects that submitit pickles, ships to every task and calls there: train, eval, precompute.

They are light on purpose: a job holds where its config comes from (preset, config file,
overrides, working directory) and nothing else. Torch, DeepSpeed and the model code are
imported inside `__call__`, on the compute node. A job re-resolves its config at start and
finds `RUN_DIR/checkpoints/latest` itself: nothing pickled at submit time is trusted for
resume, so a requeued job continues from whatever the last complete checkpoint is.

Preemption and time limits (docs/guarantees.md, 4). SLURM sends SIGUSR2 to every task
`signal_delay_s` before the time limit (submitit writes `#SBATCH --signal=USR2@N`, which
signals all job steps, not the batch shell), and on preemption where the site sends the
user signal. submitit's own handler (core/job_environment.py, SignalHandler) runs on global
rank 0 only: it calls `checkpoint()`, runs `scontrol requeue` and exits on the spot. Under
DeepSpeed that is wrong twice: the save is collective (a rank-0-only save hangs), and the
requeue kills the other ranks mid-save. So `TrainJob.__call__` replaces submitit's SIGUSR2
and SIGTERM handlers on every rank, before anything slow, with ones that only set the
training loop's STOP flag. The loop agrees on the flag at a step boundary, every rank saves,
`train()` returns `preempted=True`, and only then rank 0 requeues, with submitit's own
bookkeeping (the timeout countdown in the submitted pickle, its requeue; launch/submitit_compat.py):

- SIGUSR2 (pre-timeout or preemption warning): checkpoint, then requeue unless submitit's
  maximum number of timeouts (the profile's `max_num_timeout`) is used up; then the job
  fails and says why. A preemption that is not a timeout does not count (submitit's rule),
  and every stop finished at least one step (the loop looks at the flag after a step).
- SIGTERM only (scancel, or a SLURM preemption that requeues the job by itself): checkpoint
  and stop without requeueing; resubmitting the same command resumes.

`checkpoint()` itself only runs if SIGUSR2 lands in the few milliseconds between submitit's
handler installation and `__call__` taking over; it sets the flag and returns the job for
requeue (nothing has started, so there is nothing to save).

An error is never requeued: it ends the job with the traceback in submitit's result file
(`latentforge submit --wait` and `latentforge status` show it).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentforge.launch import submitit_compat
from latentforge.log import ALL_RANKS, get_logger
from latentforge.log import configure as configure_logging
from latentforge.spawn import REQUEUE_EXIT_CODE

log = get_logger("job")

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

# Signals that arrived before the training loop's STOP flag existed (torch not imported yet).
_EARLY: list[int] = []


def _early_handler(signum: int, frame: Any) -> None:
    _EARLY.append(signum)


def take_over_stop_signals() -> None:
    """From now on SIGUSR2/SIGTERM only record themselves, on this rank (replaces submitit's
    rank-0 requeue-and-exit handler and its SIGTERM bypass). Call first thing in a task."""
    for s in STOP_SIGNALS:
        signal.signal(s, _early_handler)


def hand_over_to(stop: Any) -> None:
    """Point the stop signals at the loop's flag (`training.loop.STOP`), carrying over any
    signal that arrived while torch was importing. Install first, then carry: a signal in
    between lands in `stop` directly."""
    stop.install(STOP_SIGNALS)
    if _EARLY and stop.signum is None:
        stop.set(_EARLY[-1])


class RequeueRefused(RuntimeError):
    """A preempted job that will not be requeued; the message says why."""


def requeue_job(job: Any, home: Path, done: str, walltime_s: float, hint: str) -> None:
    """Rank 0, after every rank stopped: submitit's requeue with its timeout countdown (what
    its SignalHandler.checkpoint_and_try_requeue does, after the save instead of in the
    signal handler; launch/submitit_compat.py). `done` says what was saved, `hint` what to do
    when refused. The submitted pickle is read only from the job's folder under `home`
    (records.trusted_pickle)."""
    import submitit

    from latentforge.launch.records import trusted_pickle

    jenv = submitit.JobEnvironment()
    paths = jenv.paths
    timeout_min, left = submitit_compat.submitted_timeout(trusted_pickle(paths.submitted_pickle, paths.folder, home))
    timed_out = submitit_compat.timed_out(walltime_s, timeout_min)
    countdown = left - int(timed_out)
    reason = requeue_refusal(countdown)
    if reason:
        raise RequeueRefused(f"job {jenv.job_id} not requeued: {reason}. {hint}")
    # The same job: it finds its state by itself.
    submitit_compat.rewrite_submission(paths.submitted_pickle, job, timeout_min, countdown)
    log.info(f"{'timed out' if timed_out else 'preempted'}: {done}; requeueing job {jenv.job_id} "
             f"({countdown} timeout(s) left)")
    submitit_compat.requeue(jenv, countdown)  # SLURM: scontrol requeue (kills this step); local: exit 144
    sys.exit(REQUEUE_EXIT_CODE)


def stopped_by(signums: set[int]) -> str:
    return ", ".join(signal.Signals(s).name for s in sorted(signums)) or "a stop signal"


def requeue_refusal(countdown: int) -> str:
    """Why a stopped job must not be requeued ("" = requeue it). `countdown`: timeouts left
    after this stop (submitit's countdown, minus one if this stop was a timeout)."""
    if countdown < 0:
        return ("it reached its time limit more times than the profile's max_num_timeout allows "
                "(raise it, or time_min, for a longer run)")
    return ""


@dataclass(frozen=True)
class ConfigSource:
    """Where a job's config comes from; resolved again in the task, never pickled resolved."""

    preset: str | None = None  # named preset (None = the file's, else tiny)
    config_file: str | None = None  # absolute path of the YAML/TOML config, if any
    overrides: tuple[str, ...] = ()  # section.field=value, applied last
    cwd: str = field(default_factory=os.getcwd)  # relative paths in the config resolve from here

    def resolve(self) -> Any:
        from latentforge.config import resolve

        return resolve(self.preset, self.config_file, list(self.overrides))

    def enter(self) -> None:
        """Change to the submitting directory (sbatch starts jobs there too; the local
        executor may not), so relative run_root/latent_dir mean the same as at submit."""
        if os.path.isdir(self.cwd):
            os.chdir(self.cwd)


def _latest_step(run_dir: Path) -> int:
    from latentforge.training import ckpt_layout

    tag = ckpt_layout.latest_tag(run_dir)
    return int(ckpt_layout.meta(run_dir, tag)["step"]) if tag else 0


@dataclass(frozen=True)
class TrainJob:
    """`latentforge train` as a submitit job: one call per rank."""

    source: ConfigSource
    run_dir: str  # the run directory as resolved at submit (for messages; the task resolves it again)

    def __call__(self) -> dict[str, Any]:
        t_start = time.time()
        take_over_stop_signals()  # before any slow import: a USR2 now is only recorded
        configure_logging()
        self.source.enter()
        from latentforge.env import apply, discover

        env = discover()
        apply(env)
        cfg = self.source.resolve()
        from latentforge import dist
        from latentforge.training import loop

        hand_over_to(loop.STOP)
        run_dir = cfg.resolved_run_dir
        before = _latest_step(run_dir)
        log.info(f"train rank {env.rank}/{env.world_size} ({env.source}, master {env.master_addr}:"
                 f"{env.master_port}), run {run_dir}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')}, "
                 f"resuming from step {before}", extra=ALL_RANKS)
        from latentforge.eval.evaluate import Evaluator

        result = loop.train(cfg, make_evaluator=Evaluator)
        out = {"rank": env.rank, "step": result.step, "run_dir": str(result.run_dir),
               "mlflow_run_id": result.mlflow_run_id, "preempted": result.preempted}
        if not result.preempted:
            dist.destroy()  # before submitit writes the result and the interpreter exits (dist.destroy)
            return out

        # Every rank saved at `result.step`. Which signals did the ranks see? (collective)
        signums = {s for s in dist.all_gather_object(loop.STOP.signum) if s is not None}
        dist.destroy()
        if env.rank != 0:
            # Rank 0 decides; no result file here, so a requeued job is not read as done.
            log.info(f"rank {env.rank}: checkpointed at step {result.step}; rank 0 decides the requeue",
                     extra=ALL_RANKS)
            sys.exit(REQUEUE_EXIT_CODE)
        if signal.SIGUSR2 not in signums:
            raise RequeueRefused(
                f"stopped by {stopped_by(signums)} at step {result.step} (checkpoint written in {run_dir}); SIGTERM comes from "
                f"scancel, or from a SLURM preemption that requeues the job by itself, so the job does not "
                f"requeue itself. Resubmit the same command to resume.")
        self._requeue(result.step, time.time() - t_start)
        raise AssertionError("unreachable: _requeue exits")  # pragma: no cover

    def _requeue(self, step: int, walltime_s: float) -> None:
        requeue_job(self, Path(self.run_dir), f"checkpointed at step {step}", walltime_s,
                    f"The checkpoint at step {step} is in {self.run_dir}; resubmit the same command to continue.")

    def checkpoint(self) -> Any:
        """submitit's hook (rank 0, inside its signal handler). Reached only if the signal
        beats `__call__`'s own handlers; then nothing has started: flag it, requeue as is."""
        _EARLY.append(signal.SIGUSR2)
        loop = sys.modules.get("latentforge.training.loop")
        if loop is not None:
            loop.STOP.set(signal.SIGUSR2)
        return submitit_compat.delayed(self)


@dataclass(frozen=True)
class EvalJob:
    """Stand-alone evaluation (`latentforge eval TARGET`) as a job. Like TrainJob it takes
    SIGUSR2/SIGTERM over on every rank: the eval stops at the next batch boundary on all
    ranks, marks its MLflow run KILLED, and rank 0 requeues the job on SIGUSR2 (within
    max_num_timeout); the requeued job starts the eval over (it writes nothing partial)."""

    source: ConfigSource
    target: str  # RUN_DIR or an export directory (absolute)

    def __call__(self) -> int:
        t_start = time.time()
        take_over_stop_signals()  # before any slow import: a USR2 now is only recorded
        configure_logging()
        self.source.enter()
        from latentforge.training.control import STOP  # late: torch

        hand_over_to(STOP)
        from latentforge.eval.standalone import main  # late: another module's heavy imports

        code = main(self.target, self.source.preset, self.source.config_file, list(self.source.overrides))
        if code == REQUEUE_EXIT_CODE:  # every rank stopped at the same batch boundary
            from latentforge.env import discover

            if discover().rank != 0:
                sys.exit(REQUEUE_EXIT_CODE)  # rank 0 decides, on the signal it saw
            if STOP.signum != signal.SIGUSR2:
                raise RequeueRefused(f"eval of {self.target} stopped by {stopped_by({STOP.signum} - {None})}; "
                                     f"resubmit the same command to run it")
            requeue_job(self, Path(self.target), "the eval stopped at a batch boundary (it starts over)",
                        time.time() - t_start, "Resubmit the same command to run the eval.")
        if code:
            raise RuntimeError(f"eval of {self.target} exited with code {code}; see this task's log")
        return code

    def checkpoint(self) -> Any:
        return submitit_compat.delayed(self)


@dataclass(frozen=True)
class PrecomputeJob:
    """One task of a precompute job array: `task_index` of `num_tasks` groups of raw shards.

    Precompute is idempotent per shard (a shard appears only when complete and done shards
    are skipped), so a timed-out or preempted task is simply requeued by submitit's handler
    and writes the shards that are still missing. The task that finds every shard done
    assembles the dataset manifest.
    """

    source: ConfigSource
    num_tasks: int

    def __call__(self, task_index: int) -> dict[str, Any]:
        configure_logging()
        self.source.enter()
        cfg = self.source.resolve()
        from latentforge.data import precompute

        summary = precompute.run(cfg, task_index=task_index, num_tasks=self.num_tasks)
        return {k: v for k, v in summary.items() if isinstance(v, (int, str))}

    def checkpoint(self, task_index: int) -> Any:
        return submitit_compat.delayed(self, task_index)
