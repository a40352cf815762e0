"""Control of a running training job: stop and save signals, and the progress watchdog.

Preemption: a signal only sets a flag; the loop agrees on it at step boundaries and all
ranks save together (DeepSpeed's save is collective: a rank-0-only save hangs).
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

    def install(self, signums: tuple[int, ...]) -> None:
        for s in signums:
            signal.signal(s, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def set(self, signum: int = signal.SIGUSR2) -> None:
        self.signum = signum

    def clear(self) -> None:
        self.signum = None


STOP = StopFlag()  # SIGUSR2 / SIGTERM: checkpoint, then exit for requeue
SAVE = StopFlag()  # SIGUSR1 (or touching RUN_DIR/SAVE_NOW): checkpoint, then go on


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


