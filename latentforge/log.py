"""Logging: one format for every stage, rank 0 by default, third-party noise filtered.

    log = get_logger("train")         # the tag in brackets: "12:00:01 [train] step 50/2000 ..."
    log.info("...")                   # progress: rank 0 only, on stdout
    log.warning("...")                # any rank, on stderr, with "rank N" where N > 0

As DiT's `create_logger` does, ranks other than 0 are quiet below WARNING: N ranks do the
same work and would print it N times. A warning or error from any rank always shows,
tagged with its rank, so nothing that matters is hidden. `configure()` is called once by
every entry point (the CLI, a submitit job); before that, records go through Python's
last-resort handler as usual.

Third-party noise: DeepSpeed narrates at INFO through its own "DeepSpeed" logger and
handler (its "Setting accelerator to CPU" warning is avoided at the source: training/engine.py
names the accelerator through DS_ACCELERATOR before importing deepspeed), diffusers and open_clip warn about things that are
expected here (random weights on purpose, deprecations inside their own code). Their INFO
chatter is raised to WARNING, and a short list of known, harmless warning messages is
dropped; every other warning still shows.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
import warnings
from typing import Iterator

ROOT = "latentforge"
DATEFMT = "%H:%M:%S"
FORMAT = "%(asctime)s [%(tag)s] %(levelprefix)s%(message)s"

# Loggers of libraries that narrate at INFO; they keep their warnings.
_CHATTY = ("DeepSpeed", "deepspeed", "torch.distributed", "torch.distributed.elastic", "diffusers", "open_clip",
           "root", "urllib3", "alembic", "mlflow", "git", "matplotlib", "PIL", "filelock", "httpx")
# Warnings (Python warnings and third-party log records) that say nothing a user can act
# on in this pipeline: regexes on the message. Anything else still shows.
_HARMLESS = (
    r".*TypedStorage is deprecated.*",  # torch internals, raised from DeepSpeed and DataLoader code
    r".*torch\.cuda\.amp\..* is deprecated.*",  # DeepSpeed's own autocast calls
    r".*`torch\.distributed\.all_gather_into_tensor` is deprecated.*",  # called inside DeepSpeed's ZeRO
    r".*pkg_resources is deprecated.*",
    r".*No pretrained weights loaded for model.*",  # open_clip: random weights are chosen on purpose here
    r".*No CUDA runtime is found, using CUDA_HOME.*",  # torch's extension loader on a machine without a GPU
)
# Loggers that carry their own handlers (torch's "W1201 ..." format, DeepSpeed's).
_OWN_HANDLERS = ("torch.utils.cpp_extension", "DeepSpeed")
_configured = False


def get_logger(name: str) -> logging.Logger:
    """The logger of one component; `name` is its tag ("train", "precompute", "eval").
    Installs the format on the package's own logger on first use (the root logger and
    other libraries' loggers are left alone until an entry point calls `configure`)."""
    _install_handlers()
    return logging.getLogger(f"{ROOT}.{name}")


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)) or 0)


ALL_RANKS = {"all_ranks": True}  # log.info(msg, extra=ALL_RANKS): shown on every rank (job start-up lines)


class _Context(logging.Filter):
    """Drops sub-WARNING records of ranks > 0 (unless marked ALL_RANKS); adds the tag and
    level prefix the format uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = _rank()
        if rank != 0 and record.levelno < logging.WARNING and not getattr(record, "all_ranks", False):
            return False
        name = record.name
        tag = name[len(ROOT) + 1:] if name.startswith(ROOT + ".") else name.split(".")[0]
        record.tag = f"rank {rank}] [{tag}" if rank != 0 else tag
        record.levelprefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return True


class _StdStream(logging.StreamHandler):
    """A handler on sys.stdout or sys.stderr as they are at each record, not as they were
    when it was made (pytest and other tools swap them)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - StreamHandler.__init__ assigns it
        pass


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def _install_handlers() -> None:
    """INFO on stdout, WARNING and above on stderr, one format. Idempotent."""
    global _configured
    if _configured:
        return
    root = logging.getLogger(ROOT)
    root.setLevel(os.environ.get("LATENTFORGE_LOG_LEVEL", "INFO"))
    fmt = logging.Formatter(FORMAT, DATEFMT)
    out = _StdStream("stdout")
    out.addFilter(_Below(logging.WARNING))
    err = _StdStream("stderr")
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(fmt)
        h.addFilter(_Context())
        root.addHandler(h)
    root.propagate = False
    _configured = True


class _NotHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(re.match(p, msg, re.S) for p in _HARMLESS)


def configure() -> None:
    """What every entry point calls once: our format (LATENTFORGE_LOG_LEVEL=DEBUG shows
    more), third-party loggers at WARNING in the same format (LATENTFORGE_LOG_THIRD_PARTY=1
    keeps them as they are). A third-party warning is shown unless it is on the short
    list of known harmless ones."""
    _install_handlers()
    if os.environ.get("LATENTFORGE_LOG_THIRD_PARTY") == "1":
        return
    root = logging.getLogger()
    if not any(isinstance(h, _StdStream) for h in root.handlers):
        # With a handler on the root logger, a library's bare logging.warning() no longer
        # calls basicConfig (the "WARNING:root:..." lines) but comes out in our format.
        h = _StdStream("stderr")
        h.setLevel(logging.WARNING)
        h.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        h.addFilter(_Context())
        h.addFilter(_NotHarmless())
        root.addHandler(h)
    quiet_third_party()


def quiet_third_party() -> None:
    """Raise chatty libraries to WARNING and drop known-harmless warnings. Call again after
    importing a library that resets its own logger's level (DeepSpeed does, at import)."""
    if os.environ.get("LATENTFORGE_LOG_THIRD_PARTY") == "1":
        return
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in _OWN_HANDLERS:  # their records never reach the root logger's filter
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NotHarmless) for f in logger.filters):
            logger.addFilter(_NotHarmless())
    for pattern in _HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)


@contextlib.contextmanager
def quiet_prints(what: str) -> Iterator[None]:
    """Hold a library's own prints and progress bars (stdout and stderr) for the duration
    of a call; on an error they are logged, so nothing needed to debug it is lost."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    except BaseException:
        if out.getvalue().strip():
            get_logger("log").error(f"{what} printed before failing:\n{out.getvalue().rstrip()}")
        raise


class Progress:
    """Rate and ETA of a long job, for its progress lines.

        p = Progress(total=2000, start=step)
        p.update(step)            # -> "12.3 steps/s, ETA 4.1 min"
    """

    def __init__(self, total: int, start: int = 0, unit: str = "steps") -> None:
        self.total, self.start, self.unit = total, start, unit
        self.t0 = time.monotonic()

    def rate(self, done: int) -> float:
        return (done - self.start) / max(time.monotonic() - self.t0, 1e-9)

    def eta_s(self, done: int) -> float:
        r = self.rate(done)
        return (self.total - done) / r if r > 0 else float("nan")

    def describe(self, done: int) -> str:
        eta = self.eta_s(done)
        when = f"{eta / 60:.1f} min" if eta == eta else "?"
        return f"{self.rate(done):.2f} {self.unit}/s, ETA {when}"


class StartupClock:
    """Where a process's start-up went: phases from the process's own start (so the
    interpreter and the imports count) to its first useful work.

        clock = StartupClock()        # the first phase, "imports", ends now
        ...; clock.mark("engine")     # the phase since the previous mark
        clock.describe()              # "9.8 s from process start: imports 4.1 s, engine 2.1 s, ..."
    """

    def __init__(self) -> None:
        now = time.time()
        try:
            import psutil

            start = psutil.Process().create_time()
        except Exception:  # no psutil or no /proc: the phases start here
            start = now
        self.start = start
        self.phases: dict[str, float] = {"imports": now - start}
        self._last = now

    def mark(self, phase: str, split: tuple[str, float] | None = None) -> None:
        """End `phase` now. `split=(name, seconds)` moves that much of it into a phase of its own."""
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        if split is not None:
            self.phases[phase] -= split[1]
            self.phases[split[0]] = self.phases.get(split[0], 0.0) + split[1]
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self.start

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        return f"{self.total:.1f} s from process start: {parts}"
