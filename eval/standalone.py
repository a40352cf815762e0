"""`latentforge eval RUN_DIR|EXPORT`: stand-alone evaluation with a CFG sweep, in MLflow.

TARGET is either

- an export (`latentforge export`): latentforge.json, unet[_ema]/, config.yaml and
  null_text.npz; the U-Net loads with diffusers' from_pretrained, or
- a run directory: config.yaml and checkpoints/; the latest complete checkpoint's weights
  are consolidated in this process (any ZeRO stage, no DeepSpeed engine), the EMA
  weights laid over them when eval.use_ema and the run kept an EMA.

Config: the target's config.yaml, then `--config FILE`, then `section.field=value`
overrides. eval.*, tracking.*, paths and nproc may change; a change to the model, codec,
text or diffusion sections is refused (the weights were trained with them). When
run_root is not given, it is taken from where the run directory is (RUN_ROOT/RUN_NAME),
so a run evaluated from another working directory still finds its latents, FID cache and
MLflow store.

Ranks: with nproc > 1 and no launcher, local ranks are started (latentforge/spawn.py); under
SLURM, submitit or torchrun the ranks come from the environment (latentforge/env.py). A
process group (gloo or NCCL, through latentforge/dist.py) is joined only when the world has
more than one rank; eval needs no DeepSpeed. A requeued eval job simply starts over.

What it does: the held-out denoising loss once (it does not depend on guidance), then for
every CFG scale in sorted({eval.cfg_scale} | set(eval.cfg_sweep)) the sample grid, shape
adherence, FID and CLIP score exactly as the periodic eval computes them
(eval/evaluate.py), FID reference statistics shared through their cache.

MLflow: a new run nested under the training run (tag `mlflow.parentRunId` = the
checkpoint's or export's mlflow_run_id, also kept as `training_run_id`), in the same
experiment. Not the training run itself, because

- the training run may still be RUNNING in another job: reopening it from here and
  finishing it would flip its status, and two jobs would write to one run;
- a sweep logs several guidance scales at the same step; in the training run they would
  interleave with the periodic eval's history of eval/fid.

The child run logs, at step = the checkpoint's optimizer step: eval/* at eval.cfg_scale
(the names periodic eval uses, so runs compare), `eval_sweep/cfg_{s}/*` for every scale,
eval/loss_t*, and artifacts eval/sweep.json, eval/fid_vs_clip.png (the FID-versus-CLIP
curve), the grids and the protocol files. Without a stored parent id (an old checkpoint)
it is a top-level run. Files also land in TARGET/eval/step_XXXXXXXX/. A summary table is
printed at the end. Records wait in TARGET/eval/step_XXXXXXXX/tracking until MLflow has
them: `latentforge runs sync` delivers what an unreachable store did not take.

Signals: SIGUSR2, SIGTERM and Ctrl-C stop the eval at the next batch boundary on every rank
(training/control.py); the MLflow run is marked KILLED and the process exits with the
requeue code (3), or 130 after Ctrl-C. Under submitit a SIGUSR2 then requeues the job
(launch/jobs.py), which starts the eval over.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from latentforge import config as config_mod
from latentforge import dist
from latentforge.config import Config, ConfigError
from latentforge.fileio import atomic_open, write_json
from latentforge.log import get_logger
from latentforge.training.control import STOP, STOP_SIGNALS, EvalInterrupted, check_stop, exit_code_for_stop

log = get_logger("eval")

MODEL_SECTIONS = ("codec", "text", "model", "diffusion")  # what the weights were trained with


@dataclass
class Target:
    kind: str  # "export" or "run"
    path: Path  # what the user named
    config_path: Path  # the config.yaml the run was trained with
    run_dir: Path | None  # the training run directory, if known and present


@dataclass
class Loaded:
    """A model to evaluate and what eval needs besides it."""

    model: torch.nn.Module  # a plain UNet2DConditionModel in eval mode on this rank's device
    step: int  # the optimizer step of the weights
    weights: str  # "ema" or "raw"
    shapes: dict[str, list[int]]
    null_text: tuple[torch.Tensor, torch.Tensor]  # (L, D), (P,) float32
    identity: dict[str, Any]  # {"text": ..., "codec": ...} the encoders the run trained with
    mlflow_run_id: str | None  # the training run's MLflow run
    source: str  # the checkpoint or export directory


@dataclass
class SweepResult:
    target: str
    step: int
    rows: list[dict[str, float]]  # per CFG scale: {"cfg_scale": s, "eval/...": value}
    heldout: dict[str, float]
    fid_metric: str | None
    clip_metric: str | None
    run_id: str | None  # the eval's MLflow run
    parent_run_id: str | None
    out_dir: Path
    plot: Path | None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Target and config.


def inspect_target(target: str | Path) -> Target:
    from latentforge.training.export import META

    path = Path(target)
    if (path / META).is_file():
        meta = json.loads((path / META).read_text())
        run_dir = Path(meta["run_dir"]) if meta.get("run_dir") and Path(meta["run_dir"]).is_dir() else None
        return Target("export", path, path / "config.yaml", run_dir)
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return Target("run", path, path / "config.yaml", path)
    raise FileNotFoundError(f"{path}: neither an export (no {META}) nor a run directory (config.yaml and "
                            f"checkpoints/); `latentforge eval` takes RUN_DIR or EXPORT")


def resolve_eval_config(target: Target, preset: str | None = None, config_file: str | None = None,
                        overrides: Sequence[str] = ()) -> Config:
    """The target's config, then `config_file`, then overrides; the model sections must not change."""
    base = config_mod.load_file(target.config_path)
    trained_preset = base.get("preset", "tiny")
    data = copy.deepcopy(base)
    user = config_mod.merge(config_mod.load_file(config_file) if config_file else {},
                            config_mod.overrides_dict(overrides))
    for name in (preset, user.pop("preset", None)):  # --preset, or preset in the file or overrides
        if name and name != trained_preset:
            raise ConfigError(f"preset: {target.path} was trained from preset {trained_preset!r}; eval takes the "
                              f"model from the target, so preset {name!r} cannot apply (override eval.* keys "
                              f"instead)")
    cfg = config_mod.from_dict(config_mod.merge(data, user))
    config_mod.validate(cfg)
    trained = config_mod.from_dict(base)
    if config_mod.config_hash(cfg, MODEL_SECTIONS) != config_mod.config_hash(trained, MODEL_SECTIONS):
        changed = sorted(s for s in MODEL_SECTIONS if s in user)
        raise ConfigError(f"{', '.join(changed) or 'model'}: eval cannot change the {'/'.join(MODEL_SECTIONS)} "
                          f"sections (the weights were trained with them); override eval.*, tracking.*, paths "
                          f"or nproc")
    # The run directory is RUN_ROOT/RUN_NAME: where it is now tells where the latents, the
    # FID cache and the MLflow store are, also when eval runs from another directory.
    rd = target.run_dir
    if ("run_root" not in user and not cfg.run_dir and rd is not None and rd.name == cfg.run_name
            and cfg.resolved_run_dir.resolve() != rd.resolve()):
        cfg.run_root = str(rd.resolve().parent)
    return cfg


# ---------------------------------------------------------------------------------------
# Weights.


def load_model(target: Target, cfg: Config, device: torch.device) -> Loaded:
    if target.kind == "export":
        return _load_export(target, cfg, device)
    return _load_run(target, cfg, device)


def _load_export(target: Target, cfg: Config, device: torch.device) -> Loaded:
    import numpy as np

    from latentforge.training.export import load_export

    unet, _, meta = load_export(target.path, use_ema=cfg.eval.use_ema, device=device)
    with np.load(target.path / "null_text.npz") as z:
        null = (torch.from_numpy(z["tokens"]).float(), torch.from_numpy(z["pooled"]).float())
    return Loaded(model=unet.float().eval().requires_grad_(False), step=int(meta.get("step") or 0),
                  weights="ema" if cfg.eval.use_ema and meta["ema"] else "raw", shapes=meta["shapes"],
                  null_text=null,
                  identity={"text": meta["text_encoder"].get("identity"), "codec": meta["codec"].get("identity")},
                  mlflow_run_id=meta.get("mlflow_run_id"), source=str(target.path))


def _load_run(target: Target, cfg: Config, device: torch.device) -> Loaded:
    from latentforge.training import checkpoint
    from latentforge.training.state import overlay_ema
    from latentforge.training.unet import unet_from_weights

    tag = checkpoint.latest_tag(target.path)
    if tag is None:
        raise FileNotFoundError(f"{checkpoint.ckpt_dir(target.path)}: no complete checkpoint to evaluate")
    where = checkpoint.ckpt_dir(target.path) / tag
    weights, state = checkpoint.consolidated_weights(target.path, tag)  # checked against COMPLETE first
    if not state.shapes or not state.identity or state.null_text is None:
        raise ValueError(f"{where}: checkpoint lacks its shapes, identity or null text (written by an older "
                         f"latentforge); export it or evaluate a newer checkpoint")
    unet = unet_from_weights(cfg.model, state.shapes, weights, f"{where} (config {target.config_path})")
    use_ema = cfg.eval.use_ema and bool(state.ema)
    if use_ema:
        overlay_ema(unet, state.ema["shadow"])
    return Loaded(model=unet.to(device).float().eval().requires_grad_(False), step=state.step,
                  weights="ema" if use_ema else "raw", shapes=state.shapes, null_text=state.null_embeddings(),
                  identity={"text": state.identity.get("text"), "codec": state.identity.get("codec")},
                  mlflow_run_id=state.mlflow_run_id, source=str(where))


def _check_encoders(loaded: Loaded, encoders: Any, cfg: Config) -> None:
    """The text encoder and codec built from the config must be the ones the run trained
    with: other prompt embeddings or another decoder make every number meaningless. An
    "auto" dtype accepts the one the training data recorded (another device's choice)."""
    from latentforge.data.encoders import expected_identity

    now = expected_identity(encoders, cfg, loaded.identity)
    diffs = [f"{k}: trained with {loaded.identity[k]!r}, config gives {now[k]!r}"
             for k in ("text", "codec") if loaded.identity.get(k) is not None and loaded.identity[k] != now[k]]
    if diffs:
        raise ValueError(f"{loaded.source}: the encoders differ from training ({'; '.join(diffs)})")


def _heldout_parts(cfg: Config, encoders: Any) -> tuple[list[dict], str | None]:
    """The held-out latent parts, or ([], why not) when the latent dataset is not here."""
    from latentforge.data import latents as lat
    from latentforge.data.sources import open_dataset, sources_of

    missing = [s.latent_dir for s in sources_of(cfg) if not (s.latent_dir / lat.MANIFEST).is_file()]
    if missing:
        return [], (f"no latent dataset at {missing[0]} (set data.latent_dir): no held-out loss, no FID")
    return open_dataset(cfg, encoders).heldout_parts, None


# ---------------------------------------------------------------------------------------
# The sweep.


def sweep_scales(cfg: Config) -> list[float]:
    return sorted({float(cfg.eval.cfg_scale), *(float(s) for s in cfg.eval.cfg_sweep)})


def _scale_name(s: float) -> str:
    return f"cfg_{s:g}"


def evaluate_target(target: Target, cfg: Config) -> SweepResult:
    """Load, evaluate at every CFG scale, log to MLflow. Collective: every rank calls it."""
    from latentforge.data.encoders import build_encoders
    from latentforge.eval.evaluate import Evaluator
    from latentforge.training.diffusion import Schedule
    from latentforge.training.tracking import SPOOL_DIR, Tracker

    device = dist.device()
    t_start = time.monotonic()
    loaded = load_model(target, cfg, device)
    encoders = build_encoders(cfg, device)
    _check_encoders(loaded, encoders, cfg)
    heldout_parts, note = _heldout_parts(cfg, encoders)
    notes = [note] if note else []
    if note:
        log.info(note)
    out_dir = target.path / "eval" / f"step_{loaded.step:08d}"
    evaluator = Evaluator(cfg, encoders, loaded.shapes, heldout_parts, loaded.null_text,
                          target.run_dir or target.path, Schedule.from_config(cfg.diffusion), out_dir=out_dir)

    base_name = cfg.tracking.run_name or (target.run_dir.name if target.run_dir else target.path.name)
    main_rank = dist.is_main()
    tracker = Tracker(uri=cfg.resolved_tracking_uri, experiment=cfg.tracking.experiment,
                      run_name=f"{base_name}-eval-step{loaded.step}",
                      enabled=cfg.tracking.enabled and main_rank, system_metrics=cfg.tracking.system_metrics,
                      max_buffer=cfg.tracking.max_buffer, run_key=uuid.uuid4().hex if main_rank else None,
                      spool_dir=out_dir / SPOOL_DIR if main_rank else None)  # a new run per eval
    tracker.start()
    tags = {"latentforge.kind": "eval", "eval_target": str(target.path.resolve()), "eval_target_kind": target.kind,
            "eval_source": loaded.source, "eval_step": str(loaded.step), "eval_weights": loaded.weights,
            "world_size": str(dist.world_size())}
    if loaded.mlflow_run_id:
        tags.update({"mlflow.parentRunId": loaded.mlflow_run_id, "training_run_id": loaded.mlflow_run_id})
    tracker.set_tags(tags)
    tracker.log_params(config_mod.flatten(cfg))

    scales = sweep_scales(cfg)
    log.info(f"{target.path} ({target.kind}, step {loaded.step}, {loaded.weights} weights), "
             f"{dist.world_size()} rank(s), CFG scales {', '.join(f'{s:g}' for s in scales)}")
    rows: list[dict[str, float]] = []
    heldout: dict[str, float] = {}
    plot: Path | None = None
    fid_metric = clip_metric = None
    status = "FAILED"
    try:
        check_stop("held-out loss")
        heldout = evaluator.heldout_metrics(loaded.model)
        tracker.log_metrics(heldout, step=loaded.step)
        for s in scales:
            t0 = time.monotonic()
            m = evaluator.evaluate(loaded.model, loaded.step, tracker, cfg_scale=s, heldout=False,
                                   suffix=f"_{_scale_name(s)}", weights=loaded.weights)
            m["eval/time_s"] = time.monotonic() - t0
            rows.append({"cfg_scale": s, **m})
            tracker.log_metrics({f"eval_sweep/{_scale_name(s)}/{k.split('/', 1)[1]}": v for k, v in m.items()},
                                step=loaded.step)
            if s == cfg.eval.cfg_scale:
                tracker.log_metrics(m, step=loaded.step)  # the names periodic eval uses
            log.info(f"cfg {s:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(m.items())))
        fid_metric = next((k for k in ("eval/fid", "eval/fid_randinit") if rows and k in rows[0]), None)
        clip_metric = next((k for k in ("eval/clip_score", "eval/clip_score_randinit") if rows and k in rows[0]),
                           None)
        if dist.is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
            if fid_metric and clip_metric:
                plot = plot_fid_vs_clip(rows, fid_metric, clip_metric, out_dir / "fid_vs_clip.png",
                                        title=f"{base_name} step {loaded.step} ({loaded.weights} weights)")
                tracker.log_artifact(plot, "eval")
            else:
                why = "FID is off" if not fid_metric else "CLIP score is off"
                notes.append(f"no FID-versus-CLIP plot: {why}")
            summary = {"target": str(target.path.resolve()), "kind": target.kind, "source": loaded.source,
                       "step": loaded.step, "weights": loaded.weights, "world_size": dist.world_size(),
                       "rows": rows, "heldout": heldout, "fid_metric": fid_metric, "clip_metric": clip_metric,
                       "mlflow_run_id": tracker.run_id, "training_run_id": loaded.mlflow_run_id, "notes": notes}
            write_json(out_dir / "sweep.json", summary)
            tracker.log_artifact(out_dir / "sweep.json", "eval")
        status = "FINISHED"
    except EvalInterrupted:
        status = "KILLED"
        log.info(f"{'interrupted (Ctrl-C)' if STOP.signum == signal.SIGINT else f'stop signal {STOP.signum}'}: "
                 f"eval of {target.path} stopped at a batch boundary after {time.monotonic() - t_start:.1f}s; "
                 f"run it again to redo it")
        raise
    finally:
        tracker.finish(status)
    log.info(f"done in {time.monotonic() - t_start:.1f}s")
    return SweepResult(target=str(target.path), step=loaded.step, rows=rows, heldout=heldout, fid_metric=fid_metric,
                       clip_metric=clip_metric, run_id=tracker.run_id,
                       parent_run_id=loaded.mlflow_run_id, out_dir=out_dir, plot=plot, notes=notes)


def plot_fid_vs_clip(rows: list[dict[str, float]], fid_metric: str, clip_metric: str, path: Path,
                     title: str = "") -> Path:
    """FID (y, lower is better) against CLIP score (x, higher is better), one point per
    CFG scale, joined in scale order: the usual guidance trade-off curve."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    xs = [r[clip_metric] for r in rows]
    ys = [r[fid_metric] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    try:
        ax.plot(xs, ys, "o-", color="tab:blue")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(f"cfg {r['cfg_scale']:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(f"{clip_metric} (higher is better)")
        ax.set_ylabel(f"{fid_metric} (lower is better)")
        if "randinit" in fid_metric or "randinit" in clip_metric:
            title = f"{title}\nrandomly initialised networks: not comparable to published numbers".strip()
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return path


def format_table(result: SweepResult) -> str:
    """The summary printed at the end: one row per CFG scale."""
    cols = [c for c in (result.fid_metric, result.clip_metric, "eval/shape_adherence", "eval/time_s")
            if c and any(c in r for r in result.rows)]
    names = ["cfg"] + [c.split("/", 1)[1] for c in cols]
    width = [max(8, len(n)) for n in names]
    lines = ["  ".join(n.rjust(w) for n, w in zip(names, width))]
    for r in result.rows:
        cells = [f"{r['cfg_scale']:g}"] + [f"{r[c]:.4f}" if c in r and math.isfinite(r[c]) else "-" for c in cols]
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, width)))
    if result.heldout:
        lines.append("held-out loss: " + ", ".join(f"{k.split('/', 1)[1]} {v:.4f}"
                                                  for k, v in sorted(result.heldout.items())))
    lines += [f"note: {n}" for n in result.notes]
    lines.append(f"files: {result.out_dir}")
    if result.run_id:
        parent = f", nested under training run {result.parent_run_id}" if result.parent_run_id else ""
        lines.append(f"MLflow run: {result.run_id}{parent}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Entry point.


def main(target: str, preset: str | None = None, config_file: str | None = None,
         overrides: Sequence[str] = ()) -> int:
    """`latentforge eval TARGET [--config FILE] [--preset P] [k=v ...]`; returns the exit code."""
    tgt = inspect_target(target)
    cfg = resolve_eval_config(tgt, preset, config_file, overrides)
    from latentforge import spawn

    # Under submitit the job's tasks are the ranks (launch/jobs.py EvalJob calls this in
    # every task); spawning nproc local ranks from each task would run the eval twice over.
    if spawn.should_spawn(cfg.nproc) and not os.environ.get("SUBMITIT_EXECUTOR"):
        argv = ["eval", str(tgt.path)] + (["--config", config_file] if config_file else []) + \
               (["--preset", preset] if preset else []) + list(overrides) + [f"nproc={cfg.nproc}"]
        return spawn.spawn(argv, cfg.nproc)
    from latentforge.env import apply, discover

    env = discover()
    joined = env.world_size > 1
    STOP.install(STOP_SIGNALS)  # a stop interrupts the eval at the next batch boundary
    if joined:  # one process needs no process group (and leaves os.environ alone)
        apply(env)
        dist.init(cfg.train.collective_timeout_s)
    try:
        result = evaluate_target(tgt, cfg)
        if dist.is_main():
            print(format_table(result), flush=True)
    except EvalInterrupted:
        return exit_code_for_stop()
    finally:
        if joined:
            dist.destroy()
    return 0
