"""MLflow tracking that never stops training: the resilient client (buffer, retries, outages).

The MLflow protocol itself (finding or creating the run, standard tags, batched writes)
is `training/mlflow_store.py`; system metrics are `training/system_metrics.py`.

One `Tracker` per training run, created on every rank; only the one built with
`enabled=True` (rank 0) talks to MLflow, the others are no-ops that still validate their
input, so a bad metric name fails on every rank alike instead of leaving the other ranks
hanging in a collective.

How it stays out of the way of the training loop:

- Every call from the loop (`log_metrics`, `log_params`, `set_tags`, `log_artifact`,
  `log_image`) only validates and appends to an in-memory buffer under a lock. It never
  waits on the network and never raises because of MLflow.
- One daemon thread owns the `MlflowStore` and does all I/O: it opens the run, sends
  params and tags in batches of 100 and metrics in batches of 1000 (`log_batch`, MLflow's
  per-request limits), uploads artifacts and sets the terminal status.
- When the store is unreachable the thread prints one warning per outage, keeps the
  records (metrics in a bounded buffer: when full the oldest are dropped and counted), and
  retries with exponential backoff. When the store answers again everything is sent and
  one line says so. Metrics keep the timestamp of the `log_metrics` call.
- MLflow's own HTTP retries (7 retries with backoff, 120 s timeout: minutes per request)
  are turned down for this process through the environment variables mlflow reads on
  every request: `MLFLOW_HTTP_REQUEST_MAX_RETRIES` (0: this thread does the retrying) and
  `MLFLOW_HTTP_REQUEST_TIMEOUT`. Values the user exported are kept.

Run identity across requeues :

- `start(run_id=X)` reopens run X (status back to RUNNING); it never creates a run while
  X exists. If the store is down, `run_id` is X at once and the reopening happens when
  the store returns.
- `start()` with no id creates the run. If the store is down, the creation is queued with
  everything logged after it, and `run_id` stays None until the run exists (MLflow does
  not accept client-chosen run ids, so there is nothing honest to return earlier). The
  caller stores `tracker.run_id` in each checkpoint; a checkpoint written while it is
  still None stores None, and the next checkpoint stores the real id.
- That leaves two windows in which a second run could be created for the same training
  run: the job dies after the run was created but before a checkpoint stored its id, or
  `create_run` reached the server but its answer was lost. Pass `run_key` (see
  `run_key_for`, a random key kept in the run directory) to close both: before creating,
  the thread looks for a run of the experiment tagged `latentforge.run_key=<key>` and
  reopens it instead.
- A resumed id that the store does not know (the tracking URI changed between jobs) is
  not fatal: a warning, a new run tagged `previous_run_id`, and the new id goes into the
  next checkpoint.
"""

from __future__ import annotations

import collections
import operator
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

from latentforge.log import get_logger
from latentforge.training.mlflow_store import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
    MlflowStore,
    check_name,
    configure_env,
    first_line,
    is_permanent,
    run_key_for,
    truncate,
)
from latentforge.training.system_metrics import SystemSampler

log = get_logger("tracking")
__all__ = ["Tracker", "run_key_for", "TERMINAL_STATUSES"]

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


class Tracker:
    """Buffered, background MLflow logging for one training run.

    Args:
        uri: tracking URI: `sqlite:///abs/path/mlflow.db` (embedded default) or
            `http://host:port` (a server started with artifact serving); "" means
            $MLFLOW_TRACKING_URI.
        experiment: experiment name, created if missing.
        run_name: the MLflow run name given to a created run.
        enabled: False makes every method a validated no-op (ranks other than 0).
        artifact_location: artifact root for a newly created experiment. None: for a
            sqlite store `<db dir>/mlartifacts`; for a server, the server's default
            (proxied `mlflow-artifacts:/`, so no shared filesystem is needed).
        system_metrics: sample CPU, memory, disk, network (and GPU with nvidia-ml-py)
            into `system/*` metrics. Also off when MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
            is set to false.
        run_key: stable key of the training run (see `run_key_for`); prevents a second
            run when a creation's answer was lost or its id never reached a checkpoint.
        max_buffer: metric records kept while the store is unreachable; beyond it the
            oldest are dropped and counted in `dropped`.
        max_artifacts: pending artifact files kept (on local disk) while unreachable.
        flush_interval_s: how often the thread sends what has been buffered.
        request_timeout_s: MLFLOW_HTTP_REQUEST_TIMEOUT for this process unless exported;
            bounds how long one request to a silent server holds the thread.
        retry_initial_s, retry_max_s: exponential backoff between attempts during an outage.
        start_timeout_s: longest `start()` waits for the run to open (a fresh sqlite
            store runs its migrations first); it returns earlier when the first attempt
            fails.
        system_metrics_interval_s: seconds between system samples.
    """

    def __init__(self, uri: str, experiment: str, run_name: str = "", enabled: bool = True,
                 artifact_location: str | None = None, *, system_metrics: bool = True,
                 run_key: str | None = None, max_buffer: int = 100_000, max_artifacts: int = 1000,
                 flush_interval_s: float = 1.0, request_timeout_s: int | None = None,
                 retry_initial_s: float = 1.0, retry_max_s: float = 60.0,
                 start_timeout_s: float = 15.0, system_metrics_interval_s: float = 10.0) -> None:
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if enabled and not uri:
            raise ValueError("uri: empty tracking URI and MLFLOW_TRACKING_URI is not set")
        if not isinstance(experiment, str) or not experiment.strip():
            raise ValueError(f"experiment: expected a non-empty name, got {experiment!r}")
        for name, value in (("max_buffer", max_buffer), ("max_artifacts", max_artifacts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name, value in (("flush_interval_s", flush_interval_s), ("retry_initial_s", retry_initial_s),
                            ("retry_max_s", retry_max_s), ("start_timeout_s", start_timeout_s),
                            ("system_metrics_interval_s", system_metrics_interval_s)):
            if not value > 0:
                raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")
        if request_timeout_s is not None and (not isinstance(request_timeout_s, int) or request_timeout_s < 1):
            raise ValueError(f"request_timeout_s: expected a positive int (mlflow reads whole seconds), "
                             f"got {request_timeout_s!r}")
        if run_key is not None:
            check_name("run_key", run_key)

        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.enabled = bool(enabled)
        self.artifact_location = artifact_location
        env_sys = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower()
        self.system_metrics = bool(system_metrics) and env_sys not in ("false", "0", "no")
        self.run_key = run_key
        self.max_buffer = max_buffer
        self.max_artifacts = max_artifacts
        self.flush_interval_s = float(flush_interval_s)
        self.request_timeout_s = request_timeout_s
        self.retry_initial_s = float(retry_initial_s)
        self.retry_max_s = float(retry_max_s)
        self.start_timeout_s = float(start_timeout_s)
        self.system_metrics_interval_s = float(
            os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or system_metrics_interval_s)

        self._cv = threading.Condition()
        # Pending records. Everything below is guarded by self._cv.
        self._metrics: collections.deque[tuple[str, float, int, int]] = collections.deque()  # (key, value, ms, step)
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._artifacts: collections.deque[tuple[Path, str | None]] = collections.deque()  # (local path, dir)
        self._terminal: str | None = None
        self._in_flight = 0
        self._open_pending = False
        self._open_attempts = 0
        self._run_id: str | None = None
        self._resume_id: str | None = None
        self._started = False
        self._finished = False
        self._stop = False
        self._urgent = False
        self._next_try = 0.0
        self._backoff = self.retry_initial_s
        self._outage = False
        self._failed_attempts = 0
        self._dropped = 0
        self._dropped_artifacts = 0
        self._rejected = 0
        self._warned_full = False
        self._last_step = 0
        self._env: dict[str, str] = {}
        self._start_ms = 0
        self._thread: threading.Thread | None = None
        self._tmpdir: Path | None = None
        self._seq = 0
        # Worker-thread state.
        self._store = MlflowStore(uri, experiment, artifact_location)
        self._sampler = SystemSampler()
        self._warned_rejected: set[str] = set()
        self._next_sample = 0.0

    # ------------------------------------------------------------------------------
    # Public API: called from the training loop.

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while disabled or while the run's creation is queued."""
        with self._cv:
            return self._run_id

    @property
    def buffered(self) -> int:
        """Records (metrics, params, tags, artifacts) not yet accepted by the store."""
        with self._cv:
            return self._pending_locked()

    @property
    def dropped(self) -> int:
        """Metric records dropped because the buffer was full (oldest first)."""
        with self._cv:
            return self._dropped

    @property
    def failed_attempts(self) -> int:
        """How many times the background thread found the store unreachable."""
        with self._cv:
            return self._failed_attempts

    def start(self, run_id: str | None = None, wait: bool = True) -> str | None:
        """Open the run: reopen `run_id` if given, else create one. Returns the run id,
        or None if the store has not answered yet (the run is then created later).
        `wait=False` returns at once: the thread opens the run (importing mlflow, a fresh
        sqlite store's migrations) while the caller goes on; `run_key` keeps a resume
        whose checkpoint missed the id from creating a second run."""
        if run_id is not None and (not isinstance(run_id, str) or not re.match(r"^[a-zA-Z0-9][\w\-]{0,255}$", run_id)):
            raise ValueError(f"run_id: not an MLflow run id: {run_id!r}")
        if self._started:
            raise RuntimeError("Tracker.start() called twice")
        self._started = True
        if not self.enabled:
            return None
        configure_env(self.request_timeout_s)
        # Captured now: they describe this job, whenever the store gets to hear of it.
        self._start_ms = int(time.time() * 1000)
        from latentforge import dist

        self._env = {"world_size": str(dist.world_size()), "host": socket.gethostname()}
        if self.system_metrics:
            SystemSampler.prime()
            self._next_sample = time.monotonic() + self.system_metrics_interval_s
        with self._cv:
            self._resume_id = run_id
            self._run_id = run_id
            self._open_pending = True
        self._tmpdir = Path(tempfile.mkdtemp(prefix="latentforge-mlflow-"))
        self._thread = threading.Thread(target=self._worker, name="latentforge-mlflow", daemon=True)
        self._thread.start()
        import atexit

        atexit.register(self._atexit)
        if not wait:
            return run_id
        with self._cv:
            self._cv.wait_for(lambda: not self._open_pending or self._open_attempts > 0,
                              timeout=self.start_timeout_s)
            return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Queue params (values str()-ed, cut to 6000 characters with a marker).

        Params are immutable in MLflow: a param the run already has with the same value is
        skipped; a different value is not sent as a param but as the tag
        `param_changed/<key>`, with a warning.
        """
        items = {check_name("param key", k): truncate(str(v), MAX_PARAM_VAL_LENGTH) for k, v in params.items()}
        if not self._accepting():
            return
        with self._cv:
            self._params.update(items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue tags (values str()-ed, cut to 8000 characters). Tags may change later."""
        items = {check_name("tag key", k): truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}
        if not self._accepting():
            return
        with self._cv:
            self._tags.update(items)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue metrics at optimizer step `step`, timestamped now. Never blocks on I/O."""
        try:
            step = operator.index(step)
        except TypeError:
            raise ValueError(f"step: expected an int, got {step!r}") from None
        ms = int(time.time() * 1000)
        records = []
        for k, v in metrics.items():
            check_name("metric name", k)
            try:
                value = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"metric {k!r}: expected a number, got {v!r}") from None
            records.append((k, value, ms, step))
        if not self._accepting():
            return
        with self._cv:
            self._last_step = max(self._last_step, step)
            self._append_metrics_locked(records)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Queue a file or directory for upload under `artifact_path` (a folder in the
        run's artifacts). It is copied now, so later changes to it do not matter."""
        src = Path(path)
        if artifact_path is not None:
            check_name("artifact_path", artifact_path)
        if not self._accepting():
            return
        if not src.exists():  # only this rank looks, so a warning, not an error that splits the ranks
            log.warning(f"artifact {src} does not exist; not logged")
            return
        try:
            dst = self._new_tmp_dir() / src.name
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        except OSError as e:  # a full local disk costs the artifact, not the run
            log.warning(f"could not stage artifact {src}: {first_line(e)}")
            return
        self._queue_artifact(dst, artifact_path)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Queue a PIL image as the PNG artifact `artifact_file` ("samples/step_000100.png")."""
        check_name("artifact_file", artifact_file)
        if not artifact_file.lower().endswith(".png"):
            raise ValueError(f"artifact_file {artifact_file!r}: images are logged as PNG; name must end in .png")
        if not hasattr(image, "save"):
            raise ValueError(f"image: expected a PIL image, got {type(image).__name__}")
        if not self._accepting():
            return
        rel = PurePosixPath(artifact_file)
        try:
            # Encoded here (milliseconds for a sample grid) so the buffer holds files, not images.
            dst = self._new_tmp_dir() / rel.name
            image.save(dst, format="PNG")
        except OSError as e:
            log.warning(f"could not stage image {artifact_file}: {first_line(e)}")
            return
        parent = str(rel.parent)
        self._queue_artifact(dst, None if parent == "." else parent)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Send everything now; wait at most `timeout_s`. True if nothing is left pending."""
        if not self.enabled or not self._started:
            return True
        with self._cv:
            if self._finished:
                return self._drained_locked()
            self._urgent = True
            self._next_try = 0.0
            self._cv.notify_all()
            return self._cv.wait_for(self._drained_locked, timeout=timeout_s)

    def finish(self, status: str = "FINISHED", timeout_s: float = 30.0) -> bool:
        """Flush (bounded by `timeout_s`) and mark the run FINISHED, FAILED or KILLED
        (preempted; the requeued job reopens it as RUNNING). True if all was delivered."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status: expected one of {', '.join(TERMINAL_STATUSES)}, got {status!r}")
        if not self.enabled or not self._started or self._finished:
            return True
        with self._cv:
            self._terminal = status
        ok = self.flush(timeout_s)
        with self._cv:
            self._finished = True
            self._stop = True
            left, dropped = self._pending_locked(), self._dropped
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # mid-request it is a daemon; do not wait on it
        import atexit

        atexit.unregister(self._atexit)
        if not ok:
            what = "the run was never created" if self._run_id is None else f"status {status} not set"
            log.warning(f"gave up after {timeout_s:.0f}s: {left} records not delivered to {self.uri} ({what})")
        if dropped:
            log.warning(f"{dropped} metric records were dropped while {self.uri} was unreachable (buffer full)")
        if self._tmpdir is not None:  # undelivered artifacts die with the process anyway
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        return ok

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None or (issubclass(exc_type, SystemExit) and not getattr(exc, "code", 0)):
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    # ------------------------------------------------------------------------------
    # Buffer helpers (caller holds no lock unless the name ends in _locked).

    def _accepting(self) -> bool:
        if not self._started:  # on every rank alike, so a caller's bug cannot split the ranks
            raise RuntimeError("Tracker: call start() before logging")
        return self.enabled and not self._finished

    def _pending_locked(self) -> int:
        return len(self._metrics) + len(self._params) + len(self._tags) + len(self._artifacts) + self._in_flight

    def _drained_locked(self) -> bool:
        return not self._open_pending and self._pending_locked() == 0 and self._terminal is None

    def _has_work_locked(self) -> bool:
        return self._open_pending or self._pending_locked() > 0 or self._terminal is not None

    def _append_metrics_locked(self, records: list[tuple[str, float, int, int]], front: bool = False) -> None:
        if front:
            self._metrics.extendleft(reversed(records))
        else:
            self._metrics.extend(records)
        over = len(self._metrics) - self.max_buffer
        if over > 0:
            for _ in range(over):
                self._metrics.popleft()  # oldest first: the newest say most about the run now
            self._dropped += over
            if not self._warned_full:
                self._warned_full = True
                log.warning(f"metric buffer full ({self.max_buffer} records): dropping the oldest until "
                      f"{self.uri} answers; the count is reported at finish")
        if len(self._metrics) >= MAX_METRICS_PER_BATCH and not self._outage:
            self._cv.notify_all()  # a full batch is ready; no need to wait for the interval

    def _queue_artifact(self, path: Path, artifact_dir: str | None) -> None:
        with self._cv:
            self._artifacts.append((path, artifact_dir))
            while len(self._artifacts) > self.max_artifacts:
                old, _ = self._artifacts.popleft()
                shutil.rmtree(old.parent, ignore_errors=True)
                self._dropped_artifacts += 1
                if self._dropped_artifacts == 1:
                    log.warning(f"artifact queue full ({self.max_artifacts}): dropping the oldest")

    def _new_tmp_dir(self) -> Path:
        # One folder per artifact keeps its file name (MLflow uses it) without collisions.
        assert self._tmpdir is not None
        with self._cv:
            self._seq += 1
            d = self._tmpdir / f"{self._seq:08d}"
        d.mkdir(parents=True)
        return d

    def _atexit(self) -> None:
        # The process is exiting without finish() (an uncaught error in the caller): send
        # what we can, leave the status as is (RUNNING reads as "died").
        self.flush(timeout_s=5.0)

    # ------------------------------------------------------------------------------
    # The background thread.

    def _worker(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                now = time.monotonic()
                due = self._has_work_locked() and now >= self._next_try
            if self.system_metrics:
                self._sample_system()
            if due:
                self._attempt()
            with self._cv:
                if self._stop:
                    return
                if self._urgent:
                    self._urgent = False
                    continue
                now = time.monotonic()
                wait = self.flush_interval_s
                if self._outage:
                    wait = max(0.0, self._next_try - now)
                if self.system_metrics:
                    wait = min(wait, max(0.0, self._next_sample - now))
                self._cv.wait(timeout=wait)

    def _attempt(self) -> None:
        """One pass: open the run if needed, then send everything pending."""
        try:
            if self._open_pending:
                self._open()
                if self.system_metrics:
                    # One sample per job segment at once, queued before start() returns.
                    self._sample_system(force=True)
                with self._cv:
                    self._open_pending = False
                    self._open_attempts += 1
                    self._cv.notify_all()
            self._drain("params", MAX_PARAMS_TAGS_PER_BATCH, self._store.log_params)
            self._drain("tags", MAX_PARAMS_TAGS_PER_BATCH, self._store.log_tags)
            self._drain("metrics", MAX_METRICS_PER_BATCH, self._store.log_metrics)
            self._send_artifacts()
            with self._cv:
                terminal = self._terminal if self._pending_locked() == 0 else None
            if terminal is not None:
                self._store.set_terminated(self._run_id, terminal)
                with self._cv:
                    self._terminal = None
        except Exception as e:  # noqa: BLE001 - nothing from MLflow may reach the loop
            self._on_failure(e)
            return
        with self._cv:
            if self._outage:
                self._outage = False
                log.info(f"{self.uri} reachable again; buffered records sent")
            self._backoff = self.retry_initial_s
            self._next_try = time.monotonic() + self.flush_interval_s
            self._cv.notify_all()

    def _on_failure(self, exc: BaseException) -> None:
        with self._cv:
            self._failed_attempts += 1
            if self._open_pending:
                self._open_attempts += 1
            if not self._outage:
                self._outage = True
                try:
                    what = "refused a request" if is_permanent(exc) else "unreachable"
                except Exception:  # mlflow itself failed to import
                    what = "unusable"
                log.warning(f"MLflow at {self.uri} {what} ({first_line(exc)}); training goes on, "
                      f"metrics are buffered (up to {self.max_buffer}) and retried in the background")
            self._next_try = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.retry_max_s)
            self._cv.notify_all()

    def _open(self) -> None:
        """Find or create the run; set it RUNNING; queue the standard tags."""
        opened = self._store.open(self._resume_id, self.run_key, self.run_name, self._start_ms, self._env)
        with self._cv:
            self._run_id = opened.run_id
            self._tags = {**opened.tags, **self._tags}  # the caller's tags win over ours

    def _take(self, kind: str, n: int) -> list[Any]:
        with self._cv:
            if kind == "metrics":
                batch = [self._metrics.popleft() for _ in range(min(n, len(self._metrics)))]
            else:
                d = self._params if kind == "params" else self._tags
                keys = list(d)[:n]
                batch = [(k, d.pop(k)) for k in keys]
            self._in_flight += len(batch)
            return batch

    def _give_back(self, kind: str, batch: list[Any]) -> None:
        with self._cv:
            self._in_flight -= len(batch)
            if kind == "metrics":
                self._append_metrics_locked(batch, front=True)
            elif kind == "artifacts":
                self._artifacts.extendleft(reversed(batch))
            else:
                d = self._params if kind == "params" else self._tags
                # Keep a newer value the caller queued while this batch was in flight.
                merged = dict(batch)
                merged.update(d)
                d.clear()
                d.update(merged)

    def _done(self, n: int) -> None:
        with self._cv:
            self._in_flight -= n
            self._cv.notify_all()

    def _send(self, kind: str, batch: list[Any], send: Any) -> None:
        """Send one batch. A transient error puts the batch back and propagates (an
        outage). A permanent one (the store answered 4xx) is retried item by item, and only
        what the store rejects is dropped, with one warning per kind."""
        try:
            send(batch)
        except Exception as e:
            if not is_permanent(e):
                self._give_back(kind, batch)
                raise
            if len(batch) == 1 or kind == "metrics":  # metrics were validated; 4xx means the run is gone
                self._reject(kind, len(batch), e)
            else:
                if kind == "params":  # the store may know params we did not (a lost answer)
                    self._store.refresh_params(self._run_id)
                for i, item in enumerate(batch):
                    try:
                        send([item])
                    except Exception as e1:
                        if not is_permanent(e1):
                            self._give_back(kind, batch[i:])
                            raise
                        self._reject(kind, 1, e1)
                    self._done(1)
                return
        self._done(len(batch))

    def _reject(self, kind: str, n: int, exc: BaseException) -> None:
        with self._cv:
            self._rejected += n
            first = kind not in self._warned_rejected
            self._warned_rejected.add(kind)
        if first:
            log.warning(f"{self.uri} rejected {n} {kind} ({first_line(exc)}); dropped (warned once per kind)")

    def _drain(self, kind: str, batch_size: int, write: Callable[[str, list[Any]], None]) -> None:
        """Send everything pending of one kind (params, tags or metrics) in batches."""
        while batch := self._take(kind, batch_size):
            self._send(kind, batch, lambda b: write(self._run_id, b))

    def _send_artifacts(self) -> None:
        while True:
            with self._cv:
                if not self._artifacts:
                    return
                path, artifact_dir = self._artifacts.popleft()
                self._in_flight += 1
            if not path.exists():  # removed under us (tmp cleaner): nothing to send
                self._done(1)
                continue

            self._send("artifacts", [(path, artifact_dir)], lambda b: self._store.log_artifact(self._run_id, *b[0]))
            shutil.rmtree(path.parent, ignore_errors=True)

    # ------------------------------------------------------------------------------
    # System metrics (training/system_metrics.py), sampled by the background thread.

    def _sample_system(self, force: bool = False) -> None:
        """Called by the background thread only."""
        now = time.monotonic()
        if not force and now < self._next_sample:
            return
        try:
            values = self._sampler.sample()
        except Exception as e:  # noqa: BLE001 - a sampler failing must not stop logging
            log.warning(f"system metrics disabled: {first_line(e)}")
            self.system_metrics = False
            return
        self._next_sample = now + self.system_metrics_interval_s
        ms = int(time.time() * 1000)
        with self._cv:
            # Step = the latest optimizer step, so system and training curves share an axis.
            self._append_metrics_locked([(f"system/{k}", v, ms, self._last_step) for k, v in values.items()])
