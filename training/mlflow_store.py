"""The MLflow side of tracking: names MLflow accepts, the run of a training run (found by
its run key, reopened or created), the standard tags, and batched writes within MLflow's
per-request limits.

Everything here talks to MLflow synchronously and may raise; `training/tracking.py` calls
it from its background thread and decides what an error means (`is_permanent`). The
run-key lookup is also what `latentforge status` uses to find a run's metrics without
loading a checkpoint.
"""

from __future__ import annotations

import getpass
import importlib.metadata
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from latentforge.fileio import atomic_write
from latentforge.log import get_logger, quiet_third_party
from latentforge.outputs import sqlite_path

log = get_logger("tracking")

# MLflow's limits (mlflow/utils/validation.py, checked against mlflow 3.17.2).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
TRUNCATION_MARKER = "...[truncated]"

RUN_KEY_TAG = "latentforge.run_key"
VERSION_PACKAGES = ("torch", "deepspeed", "diffusers", "open_clip_torch", "mlflow", "latentforge")

# mlflow's rule for param, metric and tag names on POSIX (validate_param_and_metric_name).
_NAME_RE = re.compile(r"^[/\w.\- :]+$")


def check_name(kind: str, name: Any) -> str:
    """Reject names MLflow would reject, at call time and on every rank."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind}: expected a non-empty string, got {name!r}")
    if len(name) > MAX_KEY_LENGTH:
        raise ValueError(f"{kind} {name[:40]!r}...: longer than MLflow's {MAX_KEY_LENGTH} characters")
    if not _NAME_RE.match(name):
        raise ValueError(f"{kind} {name!r}: MLflow names may only contain letters, digits, "
                         "'_', '-', '.', ' ', ':' and '/'")
    norm = str(PurePosixPath(name))
    if norm != name or name.startswith(("/", "..")) or name == ".":
        raise ValueError(f"{kind} {name!r}: must be a normalised relative path ('a/b', not 'a//b' or 'a/')")
    return name


def truncate(value: str, limit: int) -> str:
    """`value` cut to `limit` characters, ending in TRUNCATION_MARKER when cut."""
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def run_key_for(run_dir: str | os.PathLike) -> str:
    """The stable key of the training run in `run_dir` (created on first use).

    A random hex string kept in `run_dir/mlflow_run_key`: the same for every requeue of a
    run directory, new for a fresh one. Call it on rank 0 only.
    """
    p = Path(run_dir) / "mlflow_run_key"
    if p.is_file():
        key = p.read_text().strip()
        if key:
            return key
    p.parent.mkdir(parents=True, exist_ok=True)
    key = uuid.uuid4().hex
    atomic_write(p, key + "\n")
    return key


def configure_env(request_timeout_s: int | None = None, default_timeout_s: int = 10) -> None:
    """Turn MLflow's HTTP retries (7 retries with backoff, 120 s timeout: minutes per
    request) down for this process; mlflow reads these on every request
    (mlflow/utils/rest_utils.py). Values the user exported are kept, unless
    `request_timeout_s` is given explicitly."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our thread retries, with backoff
    if request_timeout_s is not None:
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(request_timeout_s)
    else:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(default_timeout_s))
    # Clusters are offline: no usage pings from a training job unless asked for.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def make_client(uri: str) -> Any:
    """An MlflowClient for `uri` (a sqlite store's folder is created first)."""
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient

    quiet_third_party()  # mlflow sets its own loggers to INFO when imported
    return MlflowClient(tracking_uri=uri)


def is_permanent(exc: BaseException) -> bool:
    """True for errors that retrying cannot fix: the store answered 4xx (bad value,
    unknown run). Connection errors, timeouts and 5xx are transient."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        try:
            code = int(exc.get_http_status_code())
        except Exception:
            return False
        return 400 <= code < 500 and code not in (408, 429)
    return False


def is_not_found(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def find_run_by_key(client: Any, experiment_id: str, run_key: str) -> Any | None:
    """The first run of the experiment tagged with `run_key`, or None."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                               max_results=1, order_by=["attributes.start_time ASC"])
    return found[0] if found else None


def git_state(repo: Path | None = None, timeout_s: float = 5.0) -> tuple[str, str]:
    """(commit, dirty) of the git checkout this package lives in; ("unknown", "unknown")
    when there is none (installed wheel, no git binary, git too slow)."""
    repo = repo or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=timeout_s, check=True).stdout.strip()

    try:
        # A wheel in a virtualenv inside some other checkout would report that checkout.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != repo.resolve():
            return "unknown", "unknown"
        commit = git("rev-parse", "HEAD")
        dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"


def package_versions() -> dict[str, str]:
    """`versions.<dist>` tags from installed metadata, without importing the packages."""
    out = {}
    for name in VERSION_PACKAGES:
        try:
            out[f"versions.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[f"versions.{name}"] = "absent"
    return out


def slurm_job_id() -> str | None:
    """This job's id as SLURM prints it: `ARRAYJOB_TASK` for array tasks."""
    array_id, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task:
        return f"{array_id}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def job_tags() -> dict[str, str]:
    """This process's standard tags, captured when it starts (a spooled record may reach
    the store from another process): SLURM restarts, git state, package versions, user,
    entry point. Its SLURM job id travels beside them (`MlflowStore.log_job`)."""
    tags: dict[str, str] = {}
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    if restarts:
        tags["slurm_restart_count"] = restarts
    tags["git_commit"], tags["git_dirty"] = git_state()
    tags.update(package_versions())
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:
        pass
    tags["mlflow.source.name"] = truncate(sys.argv[0] if sys.argv and sys.argv[0] else "python", MAX_TAG_VAL_LENGTH)
    return tags


@dataclass
class OpenedRun:
    run_id: str
    tags: dict[str, str]  # tags the opening adds (run key, previous_run_id)
    params: dict[str, str] = field(default_factory=dict)  # params the run already has


class MlflowStore:
    """One experiment in one tracking store. Not thread-safe: one thread uses it."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self._client: Any = None
        self.logged_params: dict[str, str] = {}
        self._warned_changed: set[str] = set()

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.uri)
        return self._client

    def experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            location = self.artifact_location
            db = sqlite_path(self.uri)
            if location is None and db is not None:
                # A SQL store has no artifact root of its own; without this MLflow uses ./mlruns.
                location = (db.resolve().parent / "mlartifacts").as_uri()
            try:
                return client.create_experiment(self.experiment, artifact_location=location)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another run created it meanwhile
                    raise
                exp = client.get_experiment_by_name(self.experiment)
        if exp.lifecycle_stage == "deleted":
            log.warning(f"experiment {self.experiment!r} was deleted; restoring it")
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def open(self, resume_id: str | None, run_key: str | None, run_name: str, start_ms: int,
             reopen: bool = True) -> OpenedRun:
        """Find or create the run: `resume_id` if the store knows it, else the run tagged
        with `run_key`, else a new one. Sets a found run RUNNING when `reopen` (a job that
        continues it; not `runs sync`, which only delivers what others logged)."""
        client = self.client
        exp_id = self.experiment_id()
        run = None
        extra: dict[str, str] = {}
        if resume_id is not None:
            try:
                run = client.get_run(resume_id)
            except Exception as e:
                if not is_not_found(e):
                    raise
                log.warning(f"run {resume_id} is not in {self.uri}; starting a new run (tagged previous_run_id)")
                extra["previous_run_id"] = resume_id
        if run is None and run_key is not None:
            run = find_run_by_key(client, exp_id, run_key)
        if run is None:
            tags = {RUN_KEY_TAG: run_key} if run_key else None
            run = client.create_run(exp_id, start_time=start_ms, tags=tags, run_name=run_name or None)
        else:
            if run.info.lifecycle_stage == "deleted":
                client.restore_run(run.info.run_id)
            if reopen:
                client.update_run(run.info.run_id, status="RUNNING")
        tags = dict(extra)
        if run_key and run.data.tags.get(RUN_KEY_TAG) != run_key:
            tags[RUN_KEY_TAG] = run_key
        self.logged_params = dict(run.data.params)
        return OpenedRun(run.info.run_id, tags, dict(run.data.params))

    def log_job(self, run_id: str, job: Mapping[str, Any]) -> None:
        """A job's standard tags (a spooled `job` record: `job_tags()` of that process), its
        SLURM job id appended to the run's `slurm_job_ids`."""
        tags = dict(job["tags"])
        jid = job.get("slurm_job_id")
        if jid:
            ids = [j for j in self.client.get_run(run_id).data.tags.get("slurm_job_ids", "").split(",") if j]
            if jid not in ids:
                ids.append(jid)
            tags["slurm_job_ids"] = truncate(",".join(ids), MAX_TAG_VAL_LENGTH)
        self.log_tags(run_id, list(tags.items()))

    # -- writes (each may raise; see is_permanent) ----------------------------------------

    def log_batch(self, run_id: str, metrics: list[tuple[str, float, int, int]], params: list[tuple[str, str]],
                  tags: list[tuple[str, str]]) -> None:
        """One request: metrics as (key, value, timestamp ms, step), params and tags as (key,
        value), within MLflow's per-request limits (the caller's). Params are immutable in
        MLflow: one the run has with the same value is skipped; a different value is sent as
        the tag `param_changed/<key>`, with a warning. Resending a batch whose answer was lost
        is harmless on a SQL store: it keeps one row per identical (key, value, timestamp,
        step), the same value of a param is accepted, a tag is overwritten."""
        from mlflow.entities import Metric, RunTag

        new, changed = self._params_to_send(params)
        all_tags = [RunTag(k, v) for k, v in tags] + changed
        if metrics or new or all_tags:
            self.client.log_batch(run_id, metrics=[Metric(k, v, ms, s) for k, v, ms, s in metrics], params=new,
                                  tags=all_tags)
        self.logged_params.update({p.key: p.value for p in new})

    def _params_to_send(self, batch: list[tuple[str, str]]) -> tuple[list[Any], list[Any]]:
        """(new Params, RunTags for changed values)."""
        from mlflow.entities import Param, RunTag

        new, changed = [], []
        for k, v in batch:
            old = self.logged_params.get(k)
            if old is None:
                new.append(Param(k, v))
            elif old != v:
                if k not in self._warned_changed:
                    self._warned_changed.add(k)
                    log.warning(f"param {k!r} was logged as {old!r}, now {v!r} (a resume with a changed "
                                f"config?); MLflow params are immutable: logged as tag param_changed/{k}")
                changed.append(RunTag(truncate(f"param_changed/{k}", MAX_KEY_LENGTH), truncate(v, MAX_TAG_VAL_LENGTH)))
        return new, changed

    def refresh_params(self, run_id: str) -> None:
        """Learn the params the store has (an answer lost in flight may have logged some)."""
        self.logged_params.update(self.client.get_run(run_id).data.params)

    def log_tags(self, run_id: str, batch: list[tuple[str, str]]) -> None:
        from mlflow.entities import RunTag

        for i in range(0, len(batch), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in batch[i:i + MAX_PARAMS_TAGS_PER_BATCH]])

    def log_artifact(self, run_id: str, path: Path, artifact_dir: str | None) -> None:
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path=artifact_dir and f"{artifact_dir}/{path.name}"
                                      or path.name)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path=artifact_dir)

    def set_terminated(self, run_id: str, status: str, end_ms: int | None = None) -> None:
        """FINISHED, FAILED or KILLED, with the time the process ended (also when delivered later)."""
        self.client.set_terminated(run_id, status=status, end_time=end_ms)
