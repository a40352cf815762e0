"""Control of a running training job: stop and save signals, the progress watchdog, and
who a lost rank was.

Preemption: a signal only sets a flag; the loop agrees on it at step boundaries and all
ranks save together (DeepSpeed's save is collective: a rank-0-only save hangs). An
evaluation (periodic, or stand-alone) looks at the flag at every batch boundary with
`check_stop` (one tiny all-reduce): when any rank has it, every rank raises EvalInterrupted
at the same boundary, well before SLURM's kill.

Ctrl-C (SIGINT) is a stop like SIGTERM: the terminal sends it to every process of the job
(latentforge/spawn.py does not forward it again), the ranks agree, save, close the MLflow
run as KILLED and exit with 130. A second Ctrl-C while they do that only says so.

A lost node: a collective fails at once when a peer's sockets close (its processes were
killed) and hangs until the watchdog when they stay open (a frozen process, a node that
vanished from the network). Either way the surviving ranks say which rank stopped answering
and on which host (`Peers`), and exit.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch.distributed

from latentforge import dist
from latentforge.config import AbortError
from latentforge.env import route_to_job, spans_nodes
from latentforge.log import get_logger
from latentforge.spawn import REQUEUE_EXIT_CODE

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
    if dist.any_rank(STOP.signum is not None):
        raise EvalInterrupted(f"stop signal during eval{f' ({where})' if where else ''}")


def exit_code_for_stop() -> int:
    """What a process that stopped on a signal returns: 130 after Ctrl-C, else the requeue code."""
    return INTERRUPTED_EXIT_CODE if STOP.signum == signal.SIGINT else REQUEUE_EXIT_CODE


class Watchdog:
    """Ends this rank when the training loop makes no progress for train.collective_timeout_s.

    The process group's timeout bounds most collectives, but not all of them: under gloo,
    DeepSpeed's post-step parameter all-gather (all_gather_into_tensor) waits forever on a
    peer that hangs (SIGSTOP, a frozen node) while keeping its sockets open. Armed only in
    the step loop (steps are seconds long), paused during evaluation, which may take long."""

    def __init__(self, timeout_s: float, peers: Peers | None = None):
        self.timeout_s = timeout_s
        self.peers = peers  # to name the rank that stopped answering
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
                silent = self.peers.silent() if self.peers is not None else {}
                who = (self.peers.lost_message(silent) if silent else
                       "another rank is dead or hung" if self.peers is None else
                       "every other rank still answers, so a rank is stuck, not lost")
                log.error(f"no training progress for {self.timeout_s:.0f}s (train.collective_timeout_s): {who}; "
                          f"exiting")
                os._exit(1)  # the main thread is stuck in a collective: no clean way out


# ---------------------------------------------------------------------------------------
# Who a lost rank was.


class PeerLostError(AbortError):
    """A collective failed because another rank stopped answering; the message names it (the
    CLI prints it as one line; resubmitting resumes from the last checkpoint)."""


def start_responder(address: str) -> int:
    """A daemon thread that answers every TCP connection with b"ok" for as long as this
    process lives; returns its port (on every interface of `address`'s family)."""
    server = socket.create_server(("", 0), family=socket.AF_INET6 if ":" in address else socket.AF_INET)

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                conn.sendall(b"ok")
            except OSError:
                pass  # the prober gave up
            finally:
                conn.close()

    threading.Thread(target=answer, name="latentforge-peer-responder", daemon=True).start()
    return int(server.getsockname()[1])


def probe(address: str, port: int, timeout_s: float) -> str:
    """"" if the responder at (address, port) answers, else what went wrong, in words."""
    try:
        conn = socket.create_connection((address, port), timeout=timeout_s)
    except ConnectionRefusedError:
        return "connection refused: its process is gone"
    except OSError as e:  # timed out, no route, host unreachable
        return f"{e.strerror or e}: its node is down or off the network"
    with conn:
        try:
            if conn.recv(2) == b"ok":
                return ""
            return "connection closed without an answer: its process is exiting"
        except OSError:
            return "connected, no answer: its process is frozen or starved"


class Peers:
    """Where every rank runs, gathered once at start-up, and which ranks still answer.

    Each rank keeps a responder (`start_responder`): a thread on a TCP port of its own that
    answers every connection with b"ok". When a collective fails or the watchdog fires,
    `silent()` asks every other rank's responder, all at once, for a few seconds at most. A
    rank whose process is gone (refused), whose node is gone (unreachable, no answer) or
    whose process is frozen (the kernel accepts, nobody answers) is silent; a rank that only
    waits in the same broken collective answers, because the responder is a thread of its
    own. The job's node list (SLURM_JOB_NODELIST) goes into the message next to the hosts.
    """

    def __init__(self, rank: int, hosts: list[tuple[str, str, int]]):
        self.rank = rank
        self.hosts = hosts  # per rank: (host name, address the others reach it at, responder port)

    @classmethod
    def gather(cls) -> Peers:
        """Start this rank's responder and exchange (host, address, port) with every rank
        (collective)."""
        address = "127.0.0.1"
        if spans_nodes(os.environ):
            try:
                address = route_to_job(os.environ).local_ip
            except ValueError:  # GLOO_SOCKET_IFNAME was set by hand; the name is the next best thing
                address = socket.gethostname()
        host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        return cls(dist.rank(), dist.all_gather_object((host, address, start_responder(address))))

    def describe(self, rank: int) -> str:
        host, address, _ = self.hosts[rank]
        return f"rank {rank} on {host} ({address})"

    def layout(self, limit: int = 8) -> str:
        """The rank -> host map in one line (the first `limit` ranks)."""
        nodes = len({h for h, _, _ in self.hosts})
        shown = "; ".join(f"{r} {h} {a}" for r, (h, a, _) in enumerate(self.hosts[:limit]))
        more = f"; ... {len(self.hosts) - limit} more" if len(self.hosts) > limit else ""
        return f"{len(self.hosts)} ranks on {nodes} node(s): {shown}{more}"

    def silent(self, timeout_s: float = 3.0) -> dict[int, str]:
        """The other ranks that do not answer within `timeout_s`, with why."""
        others = [r for r in range(len(self.hosts)) if r != self.rank]
        if not others:
            return {}
        with ThreadPoolExecutor(max_workers=min(64, len(others))) as pool:
            why = list(pool.map(lambda r: probe(self.hosts[r][1], self.hosts[r][2], timeout_s), others))
        return {r: w for r, w in zip(others, why) if w}

    def lost_message(self, silent: dict[int, str]) -> str:
        """'lost contact with NODE: rank R on NODE (ADDR) stopped answering (why); ...'."""
        hosts = ", ".join(sorted({self.hosts[r][0] for r in silent}))
        ranks = "; ".join(f"{self.describe(r)} stopped answering ({w})" for r, w in list(silent.items())[:8])
        more = f"; {len(silent) - 8} more ranks" if len(silent) > 8 else ""
        nodes = os.environ.get("SLURM_JOB_NODELIST")
        job = f"; nodes of job {os.environ.get('SLURM_JOB_ID', '?')}: {nodes}" if nodes else ""
        return f"lost contact with {hosts}: {ranks}{more}{job}; {self.describe(self.rank)} gives up"

    def explain(self, error: BaseException) -> PeerLostError | None:
        """A PeerLostError naming the silent ranks if `error` is a failed collective and some
        rank stopped answering; None otherwise (the error is this rank's own)."""
        text = str(error)
        # gloo reports a dead peer as a RuntimeError from its transport ("... pair.cc ... Connection
        # reset by peer"); NCCL and the store raise torch's DistError family.
        collective = isinstance(error, getattr(torch.distributed, "DistError", ())) or (
            isinstance(error, RuntimeError) and any(w in text for w in ("gloo", "NCCL", "c10d", "Connection")))
        if not collective:
            return None
        silent = self.silent()
        if not silent:
            return None
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return PeerLostError(f"{self.lost_message(silent)}: {first[:300]}")
