"""MLflow tracking that never stops training and never loses a record: the resilient client.

The MLflow protocol itself (finding or creating the run, standard tags, batched writes)
is `training/mlflow_store.py`; the on-disk spool is `training/spool.py`; system metrics
are `training/system_metrics.py`.

One `Tracker` per training run, created on every rank; only the one built with
`enabled=True` (rank 0) talks to MLflow, the others are no-ops that still validate their
input, so a bad metric name fails on every rank alike instead of leaving the other ranks
hanging in a collective.

How it stays out of the way of the training loop:

- Every call from the loop (`log_metrics`, `log_params`, `set_tags`, `log_artifact`,
  `log_image`) validates and appends the records to the spool (one write, flushed; an
  artifact is copied into the spool's folder). It never waits on the network and never
  raises because of MLflow.
- One daemon thread owns the `MlflowStore` and does all I/O: it opens the run, then
  delivers the spool in order, in units of one `log_batch` (up to 1000 metrics, 100 params
  and tags: MLflow's per-request limits), one artifact upload, one terminal status.
- When the store is unreachable the thread prints one warning per outage and retries
  with exponential backoff; the records wait in the spool. When the store answers again
  everything is sent and one line says so. Metrics keep the timestamp of the
  `log_metrics` call.
- MLflow's own HTTP retries (7 retries with backoff, 120 s timeout: minutes per request)
  are turned down for this process through the environment variables mlflow reads on
  every request: `MLFLOW_HTTP_REQUEST_MAX_RETRIES` (0: this thread does the retrying) and
  `MLFLOW_HTTP_REQUEST_TIMEOUT`. Values the user exported are kept.

No metric is ever lost (`spool_dir`, RUN_DIR/tracking for a training run):

- Every record is in the spool before it is sent; a cursor beside it says what the store
  acknowledged. Whatever a process could not deliver (the server down at exit, SIGKILL,
  preemption) stays there, and the next process that opens the run delivers it before
  its own records: the resumed job's Tracker on `start`, or `latentforge runs sync
  RUN_DIR` (`sync`). `finish` does not wait out an outage when the spool holds the rest.
- A record is sent once, except the one unit in flight when a process died (sent, but
  the acknowledgement never reached the cursor): the next process sends it again. That
  repeat is harmless on MLflow's SQL stores, a sqlite file or a server in front of one:
  SqlAlchemyStore keys a metric row by (run, key, timestamp, step, value, is_nan) and
  `_log_metrics` drops a point that is already there (mlflow/store/tracking/
  sqlalchemy_store.py, checked against mlflow 3.17.2; tests/test_tracking.py sends a
  batch twice to both and finds each point once); a param with the same value is
  accepted, a tag is overwritten with the same value, an artifact with the same file.
  A server on a file store (`--backend-store-uri ./mlruns`) appends instead and would show
  that unit's points twice.
- After a resume from step S, metric steps above S that an earlier process logged (and
  that may already be in the run) are the ones the resumed job recomputes. The earlier
  process's points win, so each step appears once: this process does not log a key at a
  step at or below the highest step an earlier process logged it at (`system/*` metrics,
  whose axis is time, excepted).

Run identity across requeues:

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
  reopens it instead. A spool needs a run key: it is how a later process tells the
  segments of its run from others'.
- A resumed id that the store does not know (the tracking URI changed between jobs) is
  not fatal: a warning, a new run tagged `previous_run_id`, and the new id goes into the
  next checkpoint.
"""

from __future__ import annotations

import operator
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from latentforge.log import get_logger
from latentforge.training import spool as spool_mod
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
    job_tags,
    run_key_for,
    slurm_job_id,
    truncate,
)
from latentforge.training.system_metrics import SystemSampler

log = get_logger("tracking")
__all__ = ["Tracker", "run_key_for", "TERMINAL_STATUSES", "sync", "SPOOL_DIR"]

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
SPOOL_DIR = spool_mod.SPOOL_DIR
LIMITS = spool_mod.Limits(metrics=MAX_METRICS_PER_BATCH, params_tags=MAX_PARAMS_TAGS_PER_BATCH)


class Tracker:
    """Spooled, background MLflow logging for one run.

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
        spool_dir: where records wait for the store (RUN_DIR/tracking); earlier processes'
            undelivered records there are delivered first. Needs `run_key`. None: in
            memory only, bounded by `max_buffer` and `max_artifacts`.
        max_buffer: records kept in memory while neither the store nor the spool takes
            them (no spool directory, or its disk is full); beyond it the oldest metrics are
            dropped and counted in `dropped`.
        max_artifacts: without a spool directory, pending artifact files kept.
        flush_interval_s: how often the thread sends what has been logged.
        request_timeout_s: MLFLOW_HTTP_REQUEST_TIMEOUT for this process unless exported;
            bounds how long one request to a silent server holds the thread.
        retry_initial_s, retry_max_s: exponential backoff between attempts during an outage.
        start_timeout_s: longest `start()` waits for the run to open (a fresh sqlite
            store runs its migrations first); it returns earlier when the first attempt
            fails.
        system_metrics_interval_s: seconds between system samples.
        replay_only: deliver what earlier processes left in `spool_dir`, log nothing of
            this process's own, and leave the run's status to the spooled records
            (`sync`).
    """

    def __init__(self, uri: str, experiment: str, run_name: str = "", enabled: bool = True,
                 artifact_location: str | None = None, *, system_metrics: bool = True,
                 run_key: str | None = None, spool_dir: str | os.PathLike | None = None,
                 max_buffer: int = 100_000, max_artifacts: int = 1000,
                 flush_interval_s: float = 1.0, request_timeout_s: int | None = None,
                 retry_initial_s: float = 1.0, retry_max_s: float = 60.0,
                 start_timeout_s: float = 15.0, system_metrics_interval_s: float = 10.0,
                 replay_only: bool = False) -> None:
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
        if spool_dir is not None and enabled and run_key is None:
            raise ValueError("spool_dir: a spool needs run_key (it tells this run's records from others')")

        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.enabled = bool(enabled)
        self.artifact_location = artifact_location
        env_sys = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower()
        self.system_metrics = bool(system_metrics) and env_sys not in ("false", "0", "no") and not replay_only
        self.run_key = run_key
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.max_buffer = max_buffer
        self.max_artifacts = max_artifacts
        self.flush_interval_s = float(flush_interval_s)
        self.request_timeout_s = request_timeout_s
        self.retry_initial_s = float(retry_initial_s)
        self.retry_max_s = float(retry_max_s)
        self.start_timeout_s = float(start_timeout_s)
        self.system_metrics_interval_s = float(
            os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or system_metrics_interval_s)
        self.replay_only = bool(replay_only)

        self._cv = threading.Condition()
        # Everything below is guarded by self._cv.
        self._spool: Any = None  # spool.DiskSpool or spool.MemorySpool, from start()
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
        self._rejected = 0
        self._last_step = 0
        self._suppress: dict[str, int] = {}  # key -> highest step an earlier process logged past the resume
        self._suppressed = 0
        self._delivered = 0
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
        """Records (metrics, params, tags, artifacts, status) not yet accepted by the store."""
        with self._cv:
            return self._spool.pending() if self._spool is not None else 0

    @property
    def dropped(self) -> int:
        """Metric records dropped because the in-memory buffer was full (oldest first)."""
        with self._cv:
            return self._spool.dropped["m"] if self._spool is not None else 0

    @property
    def failed_attempts(self) -> int:
        """How many times the background thread found the store unreachable."""
        with self._cv:
            return self._failed_attempts

    @property
    def delivered(self) -> int:
        """Records the store has acknowledged (or refused for good) in this process."""
        with self._cv:
            return self._delivered

    def start(self, run_id: str | None = None, resume_step: int | None = None, wait: bool = True) -> str | None:
        """Open the run: reopen `run_id` if given, else find it by the run key or create it.
        Returns the run id, or None if the store has not answered yet (the run is then
        created later). `resume_step`: the optimizer step this job resumes from (see the
        module docstring on steps logged twice). `wait=False` returns at once: the thread
        opens the run (importing mlflow, a fresh sqlite store's migrations) while the caller
        goes on; `run_key` keeps a resume whose checkpoint missed the id from creating a
        second run."""
        if run_id is not None and (not isinstance(run_id, str) or not re.match(r"^[a-zA-Z0-9][\w\-]{0,255}$", run_id)):
            raise ValueError(f"run_id: not an MLflow run id: {run_id!r}")
        if self._started:
            raise RuntimeError("Tracker.start() called twice")
        self._started = True
        if not self.enabled:
            return None
        configure_env(self.request_timeout_s)
        self._start_ms = int(time.time() * 1000)  # a run created later still starts now
        if self.spool_dir is not None:
            header = {"run_key": self.run_key, "uri": self.uri, "experiment": self.experiment,
                      "run_name": self.run_name, "start_ms": self._start_ms, "resume_id": run_id}
            self._spool = spool_mod.DiskSpool(self.spool_dir, header, replay_only=self.replay_only,
                                              resume_step=resume_step, limits=LIMITS, max_unwritten=self.max_buffer)
            self._announce_replay(self._spool.scan)
            self._suppress = dict(self._spool.scan.beyond)
        else:
            self._spool = spool_mod.MemorySpool(self.max_buffer, self.max_artifacts, LIMITS)
            self._tmpdir = Path(tempfile.mkdtemp(prefix="latentforge-mlflow-"))
        if not self.replay_only:
            # This job's standard tags, captured now: they describe this job, whenever the
            # store gets to hear of them.
            from latentforge import dist

            tags = {"world_size": str(dist.world_size()), "host": socket.gethostname(), **job_tags()}
            self._spool.append([{"k": "job", "tags": tags, "slurm_job_id": slurm_job_id()}])
        if self.system_metrics:
            SystemSampler.prime()
            self._next_sample = time.monotonic() + self.system_metrics_interval_s
        with self._cv:
            self._resume_id = run_id
            self._run_id = run_id
            self._open_pending = True
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
        if self._accepting():
            self._append([{"k": "p", "n": k, "v": v} for k, v in items.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue tags (values str()-ed, cut to 8000 characters). Tags may change later."""
        items = {check_name("tag key", k): truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}
        if self._accepting():
            self._append([{"k": "t", "n": k, "v": v} for k, v in items.items()])

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
            records.append({"k": "m", "n": k, "v": value, "t": ms, "s": step})
        if not self._accepting():
            return
        with self._cv:
            self._last_step = max(self._last_step, step)
            if self._suppress:
                kept = [r for r in records if step > self._suppress.get(r["n"], -1)]
                self._suppressed += len(records) - len(kept)
                records = kept
        self._append(records)

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
            dst = self._stage_dir() / src.name
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
            # Encoded here (milliseconds for a sample grid) so the spool holds files, not images.
            dst = self._stage_dir() / rel.name
            image.save(dst, format="PNG")
        except OSError as e:
            log.warning(f"could not stage image {artifact_file}: {first_line(e)}")
            return
        parent = str(rel.parent)
        self._queue_artifact(dst, None if parent == "." else parent)

    def sync(self) -> None:
        """Make the spool durable (fsync): call at a checkpoint. A no-op without a spool directory."""
        if self.enabled and self._started and not self._finished and self._spool is not None and self._spool.durable:
            with self._cv:
                self._spool.sync()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Send everything now; wait at most `timeout_s`. True if nothing is left pending."""
        return self._wait_delivered(timeout_s, give_up_on_failure=False)

    def finish(self, status: str | None = "FINISHED", timeout_s: float = 30.0) -> bool:
        """Mark the run FINISHED, FAILED or KILLED (preempted; the requeued job reopens it as
        RUNNING) and deliver what is pending, waiting at most `timeout_s`, and not at all
        beyond a failed attempt when the spool is on disk (the records wait there for the
        next process or `latentforge runs sync`). True if all was delivered. `status`
        None (replay only): no status of this process's own."""
        if status is not None and status not in TERMINAL_STATUSES:
            raise ValueError(f"status: expected one of {', '.join(TERMINAL_STATUSES)}, got {status!r}")
        if not self.enabled or not self._started or self._finished:
            return True
        if status is not None and not self.replay_only:
            self._append([{"k": "end", "v": status, "t": int(time.time() * 1000)}])
        durable = self._spool.durable
        ok = self._wait_delivered(timeout_s, give_up_on_failure=durable)
        with self._cv:
            self._finished = True
            self._stop = True
            dropped, suppressed = self._spool.dropped["m"], self._suppressed
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0 if durable else 1.0)  # mid-request it is a daemon; do not wait on it
        import atexit

        atexit.unregister(self._atexit)
        with self._cv:
            left = self._spool.close() if durable else self._spool.pending()
        if left and durable:
            log.warning(f"{left} records not delivered to {self.uri}; they wait in {self.spool_dir}, and the next "
                        f"job on this run or `latentforge runs sync {self.spool_dir.parent}` delivers them")
        elif not ok:
            what = "the run was never created" if self._run_id is None else f"status {status} not set"
            log.warning(f"gave up after {timeout_s:.0f}s: {left} records not delivered to {self.uri} ({what})")
        if dropped:
            log.warning(f"{dropped} metric records were dropped while {self.uri} was unreachable (buffer full)")
        if suppressed:
            log.info(f"{suppressed} metric records not logged: an earlier job had logged those keys at those steps "
                     f"(it ran past this job's checkpoint)")
        if self._tmpdir is not None:  # undelivered in-memory artifacts die with the process anyway
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        return left == 0

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

    def _append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        with self._cv:
            before = dict(self._spool.dropped)
            self._spool.append(records)
            if self._spool.dropped["m"] > before["m"] and "metrics-full" not in self._warned_rejected:
                self._warned_rejected.add("metrics-full")
                log.warning(f"metric buffer full ({self.max_buffer} records): dropping the oldest until "
                            f"{self.uri} answers; the count is reported at finish")
            if self._spool.dropped["a"] > before["a"] and "artifacts-full" not in self._warned_rejected:
                self._warned_rejected.add("artifacts-full")
                log.warning(f"artifact queue full ({self.max_artifacts}): dropping the oldest")
            if self._spool.pending() >= MAX_METRICS_PER_BATCH and not self._outage:
                self._cv.notify_all()  # a full batch is ready; no need to wait for the interval

    def _stage_dir(self) -> Path:
        """A new folder for one artifact (its file name is kept: MLflow uses it)."""
        with self._cv:
            if self._spool.durable:
                return self._spool.stage_dir()
            assert self._tmpdir is not None
            self._seq += 1
            d = self._tmpdir / f"{self._seq:08d}"
        d.mkdir(parents=True)
        return d

    def _queue_artifact(self, path: Path, artifact_dir: str | None) -> None:
        rel = self._spool.relative(path) if self._spool.durable else str(path)
        self._append([{"k": "a", "p": rel, "d": artifact_dir}])

    def _drained_locked(self) -> bool:
        return not self._open_pending and self._spool.pending() == 0

    def _wait_delivered(self, timeout_s: float, give_up_on_failure: bool) -> bool:
        if not self.enabled or not self._started:
            return True
        with self._cv:
            if self._finished:
                return self._drained_locked()
            failures = self._failed_attempts
            self._urgent = True
            self._next_try = 0.0
            self._cv.notify_all()
            return self._cv.wait_for(
                lambda: self._drained_locked() or (give_up_on_failure and self._failed_attempts > failures),
                timeout=timeout_s) and self._drained_locked()

    def _atexit(self) -> None:
        # The process is exiting without finish() (an uncaught error in the caller): send
        # what we can, leave the status as is (RUNNING reads as "died"). The spool keeps the rest.
        self._wait_delivered(5.0, give_up_on_failure=True)
        with self._cv:
            if self._spool is not None and self._spool.durable:
                self._spool.sync()

    def _announce_replay(self, scan: spool_mod.ReplayScan) -> None:
        if scan.records:
            log.info(f"{scan.records} records that earlier jobs could not deliver wait in {self.spool_dir}; "
                     f"delivering them first")
        if scan.busy:
            log.warning(f"{len(scan.busy)} spool segment(s) in {self.spool_dir} belong to a process that is still "
                        f"running ({scan.busy[0]}); left to it")
        if scan.foreign and not self.replay_only:
            log.info(f"{len(scan.foreign)} spool segment(s) of other runs wait in {self.spool_dir}; "
                     f"`latentforge runs sync` delivers them")

    # ------------------------------------------------------------------------------
    # The background thread.

    def _worker(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                now = time.monotonic()
                due = (self._open_pending or self._spool.pending() > 0) and now >= self._next_try
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
        """One pass: open the run if needed, then deliver the spool in order."""
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
            while True:
                with self._cv:
                    if self._stop:
                        return
                    unit = self._spool.peek()
                if not unit:
                    break
                self._deliver(unit)
                with self._cv:
                    self._spool.ack()
                    self._delivered += len(unit)
                    self._cv.notify_all()
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
                where = f"kept in {self.spool_dir}" if self._spool.durable else f"buffered (up to {self.max_buffer})"
                log.warning(f"MLflow at {self.uri} {what} ({first_line(exc)}); training goes on, "
                            f"records are {where} and retried in the background")
            self._next_try = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.retry_max_s)
            self._cv.notify_all()

    def _open(self) -> None:
        """Find or create the run; set it RUNNING (unless replaying only); tag it with the run key."""
        # Replaying only, the run is created (if it never was) with the start of the process that logged it.
        start_ms = self._spool.first_start_ms() if self.replay_only else self._start_ms
        opened = self._store.open(self._resume_id, self.run_key, self.run_name, start_ms,
                                  reopen=not self.replay_only)
        if opened.tags:
            self._store.log_tags(opened.run_id, list(opened.tags.items()))
        with self._cv:
            self._run_id = opened.run_id
            if self._spool.durable and not self.replay_only:
                self._spool.append([{"k": "run", "id": opened.run_id}])  # for `runs sync`

    def _deliver(self, unit: list[dict[str, Any]]) -> None:
        """Send one unit (see spool.take_unit). A transient error propagates (an outage: the
        unit is sent again later). A permanent one (the store answered 4xx) is retried piece
        by piece, and only what the store rejects is dropped, with one warning per kind."""
        run_id = self._run_id
        kind = unit[0]["k"]
        if kind == "a":
            rec = unit[0]
            path = self._spool.artifact_path(rec)
            if not path.exists():  # removed under us: nothing to send
                log.warning(f"staged artifact {path} is gone; not logged")
                return
            self._send_or_reject("artifacts", lambda: self._store.log_artifact(run_id, path, rec["d"]))
            if not self._spool.durable:
                shutil.rmtree(path.parent, ignore_errors=True)
        elif kind == "job":
            self._send_or_reject("tags", lambda: self._store.log_job(run_id, unit[0]))
        elif kind == "end":
            self._send_or_reject("status", lambda: self._store.set_terminated(run_id, unit[0]["v"], unit[0]["t"]))
        elif kind == "run":
            return
        else:
            metrics = [(r["n"], r["v"], r["t"], r["s"]) for r in unit if r["k"] == "m"]
            params = [(r["n"], r["v"]) for r in unit if r["k"] == "p"]
            tags = [(r["n"], r["v"]) for r in unit if r["k"] == "t"]
            try:
                self._store.log_batch(run_id, metrics, params, tags)
            except Exception as e:
                if not is_permanent(e):
                    raise
                if params:  # the store may know params we did not (a lost answer)
                    self._store.refresh_params(run_id)
                for p in params:
                    self._send_or_reject("params", lambda p=p: self._store.log_batch(run_id, [], [p], []))
                for t in tags:
                    self._send_or_reject("tags", lambda t=t: self._store.log_batch(run_id, [], [], [t]))
                if metrics:  # validated on the way in: a 4xx means the run itself is gone
                    self._send_or_reject("metrics", lambda: self._store.log_batch(run_id, metrics, [], []),
                                         n=len(metrics))

    def _send_or_reject(self, kind: str, send: Any, n: int = 1) -> None:
        try:
            send()
        except Exception as e:
            if not is_permanent(e):
                raise
            with self._cv:
                self._rejected += n
                first = kind not in self._warned_rejected
                self._warned_rejected.add(kind)
            if first:
                log.warning(f"{self.uri} rejected {n} {kind} ({first_line(e)}); dropped (warned once per kind)")

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
            step = self._last_step
        self._append([{"k": "m", "n": f"system/{k}", "v": v, "t": ms, "s": step} for k, v in values.items()])


# ---------------------------------------------------------------------------------------
# `latentforge runs sync RUN_DIR`.


@dataclass
class SyncResult:
    spool: Path
    run_key: str
    run_id: str | None
    delivered: int
    left: int
    notes: list[str] = field(default_factory=list)


def sync(directory: str | os.PathLike, uri: str | None = None, timeout_s: float = 120.0) -> list[SyncResult]:
    """Deliver what earlier processes left in DIRECTORY's spools (RUN_DIR/tracking and the
    stand-alone evals' RUN_DIR/eval/step_*/tracking) to the run each belongs to, through
    the tracking URI each recorded (or `uri`). Segments of a process that is still running
    are left to it. Returns one result per run key."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such run directory")
    out: list[SyncResult] = []
    for d in spool_mod.spool_dirs(directory):
        for key, header in spool_mod.run_keys(d).items():
            t = Tracker(uri=uri or header["uri"], experiment=header["experiment"],
                        run_name=header.get("run_name") or "", run_key=key, spool_dir=d,
                        system_metrics=False, replay_only=True, flush_interval_s=0.2, retry_initial_s=0.5,
                        retry_max_s=5.0, start_timeout_s=min(timeout_s, 60.0))
            notes = []
            run_id = t.start(run_id=spool_mod.last_run_id(d, key))
            scan = t._spool.scan
            if scan.busy:
                notes.append(f"{len(scan.busy)} segment(s) belong to a running process; left to it")
            t._wait_delivered(timeout_s, give_up_on_failure=False)
            left = t.buffered
            t.finish(None, timeout_s=1.0)
            out.append(SyncResult(d, key, t.run_id or run_id, t.delivered, left, notes))
    return out
