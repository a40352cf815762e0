"""`latentforge status RUN_DIR`: job states, step, last metrics and log tail of a run.

It reads RUN_DIR/jobs.jsonl, asks sacct (squeue where accounting is missing) for the
states, the checkpoint's COMPLETE record for the step, MLflow (found through the run key in
RUN_DIR/mlflow_run_key, without loading a checkpoint) for the last metrics, and prints the
tail of the newest log. RUN_ROOT/precompute_jobs shows array tasks and shard progress.
No torch here: status answers at once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from latentforge.launch import records as jobrec


def _last_match(path: Path, pattern: str, max_bytes: int = 1_000_000) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    hits = [ln.strip() for ln in text.splitlines() if pattern in ln]
    return hits[-1] if hits else None


def _step_line(run_dir: Path) -> str:
    """The step of the newest complete checkpoint (its COMPLETE record: a few bytes)."""
    from latentforge.training import ckpt_layout

    tag = ckpt_layout.latest_tag(run_dir)
    if not tag:
        return "no checkpoint yet"
    try:
        meta = ckpt_layout.meta(run_dir, tag)
    except (OSError, json.JSONDecodeError):
        return f"checkpoint {tag} (COMPLETE unreadable)"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.get("time", 0)))
    return f"step {meta.get('step')} (checkpoint {tag}, world size {meta.get('world_size')}, written {when})"


def _mlflow_lines(run_dir: Path) -> list[str]:
    """Last metrics of the run's MLflow run, found by the run key the tracker keeps in the
    run directory (no checkpoint is loaded). Never hangs on a dead server: no retries,
    short timeouts."""
    key_file = run_dir / "mlflow_run_key"
    cfg_file = run_dir / "config.yaml"
    if not key_file.is_file() or not cfg_file.is_file():
        return ["  (no MLflow run yet: the run has not started tracking)"]
    try:
        from latentforge.config import load_resolved

        cfg = load_resolved(cfg_file)
        if not cfg.tracking.enabled:
            return ["  (tracking.enabled is false)"]
        from latentforge.training import mlflow_store

        uri = cfg.resolved_tracking_uri
        mlflow_store.configure_env(default_timeout_s=5)
        client = mlflow_store.make_client(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            return [f"  (experiment {cfg.tracking.experiment!r} not in {uri})"]
        key = key_file.read_text().strip()
        run = mlflow_store.find_run_by_key(client, exp.experiment_id, key)
        if run is None:
            return [f"  (no run with run key {key} in {uri} yet)"]
        lines = [f"  run {run.info.run_id} ({run.info.status}) in {uri}, experiment {cfg.tracking.experiment!r}"]
        metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("train/", "eval/"))}
        step = ""
        if "train/loss" in metrics:
            hist = client.get_metric_history(run.info.run_id, "train/loss")
            step = f" at step {max(m.step for m in hist)}" if hist else ""
        if metrics:
            lines.append(f"  last metrics{step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
        return lines
    except Exception as e:  # status must answer even when the store is unreachable
        return [f"  (MLflow unavailable: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"]


def _job_lines(records: list[dict[str, Any]], home: Path, limit: int = 10) -> list[str]:
    states, note = jobrec.job_states(records[-limit:], home)
    lines = []
    for r in records[-limit:]:
        ids = r.get("job_ids") or [str(r["job_id"])]
        if len(ids) > 8:  # a big array: one line of counts per state, failed tasks named
            by_state: dict[str, list[str]] = {}
            for jid in ids:
                by_state.setdefault(jobrec.state_of(states, jid)["state"], []).append(jid)
            counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_state.items()))
            bad = [j for k, v in by_state.items() if k not in jobrec.ACTIVE_STATES | {"COMPLETED"} for j in v]
            lines.append(f"  {r['job_id']:<12} {r['kind']:<10} array of {len(ids)}: {counts}"
                         f"{'; not completed: ' + ', '.join(bad[:10]) if bad else ''}"
                         f"  (submitted {r.get('time', '?')}, {r.get('cluster')})")
            continue
        for jid in ids:
            s = jobrec.state_of(states, jid)
            extra = []
            if s.get("attempts", 0) > 1:
                extra.append(f"{s['attempts'] - 1} requeue(s)")
            if s.get("elapsed"):
                extra.append(f"elapsed {s['elapsed']}")
            if s.get("exit_code") and s["state"] not in jobrec.ACTIVE_STATES:
                extra.append(f"exit {s['exit_code']}")
            if s.get("note"):
                extra.append(s["note"])
            lines.append(f"  {jid:<12} {r['kind']:<10} {s['state']:<12} {', '.join(extra)}"
                         f"  (submitted {r.get('time', '?')}, {r.get('cluster')})")
    if note:
        lines.append(f"  ({note})")
    return lines


def _precompute_status(folder: Path, records: list[dict[str, Any]]) -> list[str]:
    from latentforge.data import latents as lat

    rec = records[-1]
    work = jobrec.precompute_work(rec)
    lines = [f"latent directory {', '.join(str(d) for d, _ in work)}"]
    try:
        groups = jobrec.task_work(work, int(rec["num_tasks"]))
    except (OSError, ValueError) as e:
        return lines + [f"  (cannot list the raw shards: {e})"]
    done = [sum(lat.shard_manifest_path(d, n).exists() for d, n in g) for g in groups]
    total = sum(len(g) for g in groups)
    lines.append(f"  raw shards done: {sum(done)}/{total}; tasks finished: "
                 f"{sum(d == len(g) for d, g in zip(done, groups))}/{len(groups)}")
    unfinished = [i for i, (d, g) in enumerate(zip(done, groups)) if d < len(g)]
    if unfinished:
        lines.append(f"  unfinished tasks: {', '.join(map(str, unfinished))}")
    assembled = sum((d / lat.MANIFEST).exists() for d, _ in work)
    lines.append(f"  dataset manifest: {'assembled' if assembled == len(work) else 'not assembled yet'}"
                 + (f" ({assembled}/{len(work)} sources)" if len(work) > 1 else ""))
    return lines


def status(run_dir: str | os.PathLike) -> str:
    """`latentforge status RUN_DIR`: job states, step, last metrics, log tail. Also takes
    RUN_ROOT/precompute_jobs (array task states and shard progress)."""
    d = Path(run_dir).resolve()
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such run directory")
    records = jobrec.read_records(d / jobrec.JOBS_FILE)
    out = [f"run directory {d}"]
    if records:
        out.append("jobs (newest last):")
        out += _job_lines(records, d)
    else:
        out.append(f"jobs: none recorded in {d / jobrec.JOBS_FILE} (submitted without `latentforge submit`?)")
    if records and all(r.get("kind") == "precompute" for r in records):
        out += _precompute_status(d, records)
    else:
        out.append(f"step: {_step_line(d)}")
        out.append("MLflow:")
        out += _mlflow_lines(d)
    if records:
        last = records[-1]
        logs = [Path(f) / f"{Path(f).name}_0_log.out" for f in last.get("folders", [])] or [Path(last["stdout"])]
        log = max((p for p in logs if p.exists()), key=lambda p: p.stat().st_mtime, default=logs[0])
        progress = _last_match(log, "[train] step ") or _last_match(log, "[precompute]")
        if progress:
            out.append(f"last progress line: {progress}")
        out.append(f"log tail ({log}):")
        out.append(jobrec.tail_lines(log, 12))
        err = log.with_name(log.name[:-len(".out")] + ".err") if log.name.endswith(".out") else None
        if err is not None and err.exists() and err.stat().st_size:
            out.append(f"stderr tail ({err}):")
            out.append(jobrec.tail_lines(err, 6))
    return "\n".join(out)
