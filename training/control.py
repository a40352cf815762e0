"""Control of a running training job: stop and save signals, and the progress watchdog.

Preemption: a signal only sets a flag; the loop agrees on it at step boundaries and all
ranks save together (DeepSpeed's save is collective: a rank-0-only save hangs). An
evaluation (periodic, or stand-alone) looks at the flag at every batch boundary with
`check_stop` (one tiny all-reduce): when any rank has it, every rank raises EvalInterrupted
at the same boundary, well before SLURM's kill.

Ctrl-C (SIGINT) is a stop like SIGTERM: the terminal sends it to every process of the job
(latentforge/spawn.py does not forward it again), the ranks agree, save, close the MLflow
run as KILLED and exit with 130. A second Ctrl-C while they do that only says so.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from latentforge.log import get_logger

log = get_logger("train")



class StopFlag:
    """Set by a signal handler, read by the loop at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.repeated = False  # a second Ctrl-C arrived

    def install(self, signums: tuple[int, ...]) -> None:
        for s in signums:
            signal.signal(s, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            if not self.repeated:
                self.repeated = True
                log.warning("already stopping: the ranks save a checkpoint and close the MLflow run, then exit "
                            "(kill -9 abandons them)")
            return
        self.signum = signum

    def set(self, signum: int = signal.SIGUSR2) -> None:
        self.signum = signum

    def clear(self) -> None:
        self.signum = None


STOP = StopFlag()  # SIGUSR2 / SIGTERM / SIGINT: checkpoint, then exit (for requeue)
SAVE = StopFlag()  # SIGUSR1 (or touching RUN_DIR/SAVE_NOW): checkpoint, then go on
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a Ctrl-C'd command


class EvalInterrupted(Exception):
    """A stop signal reached a rank during an evaluation; every rank raises it at the same
    batch boundary (`check_stop`)."""


def check_stop(where: str = "") -> None:
    """At a batch boundary of an evaluation: raise EvalInterrupted on every rank if any
    rank got a stop signal. Collective: every rank must call it equally often."""
    from latentforge import dist

    if dist.any_rank(STOP.signum is not None):
        raise EvalInterrupted(f"stop signal during eval{f' ({where})' if where else ''}")


def exit_code_for_stop() -> int:
    """What a process that stopped on a signal returns: 130 after Ctrl-C, else the requeue code."""
    from latentforge.spawn import REQUEUE_EXIT_CODE

    return INTERRUPTED_EXIT_CODE if STOP.signum == signal.SIGINT else REQUEUE_EXIT_CODE


class Watchdog:
    """Ends this rank when the training loop makes no progress for train.collective_timeout_s.

    The process group's timeout bounds most collectives, but not all of them: under gloo,
    DeepSpeed's post-step parameter all-gather (all_gather_into_tensor) waits forever on a
    peer that hangs (SIGSTOP, a frozen node) while keeping its sockets open. Armed only in
    the step loop (steps are seconds long), paused during evaluation, which may take long."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.deadline: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="latentforge-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s

    def pause(self) -> None:
        self.deadline = None

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(5.0, self.timeout_s / 4)):
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                log.error(f"no training progress for {self.timeout_s:.0f}s "
                          f"(train.collective_timeout_s): another rank is dead or hung; exiting")
                os._exit(1)  # the main thread is stuck in a collective: no clean way out


