"""The training loop. Setup lives in small build_* helpers; `train()` reads top to bottom.

Every rank runs this. Randomness is a pure function of (seed, rank, step): the noise,
timesteps and caption dropout of step s on rank r come from a generator seeded with
(seed, r, s, micro-step), and the loader's order from (seed, epoch, dataset). With the
saved loader position, EMA, optimizer and weights, a resumed run continues bitwise.

The loop does not know how to evaluate: its caller hands it a factory
(`make_evaluator`, eval/evaluate.py's `Evaluator` in practice), so training sits below
eval in the layering.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from latentforge import config as config_mod
from latentforge import dist
from latentforge.config import AbortError, Config, ConfigError
from latentforge.data import latents as lat
from latentforge.data.encoders import Encoders, build_encoders
from latentforge.data.loader import LatentLoader
from latentforge.data.sources import open_dataset, training_set_id
from latentforge.log import Progress, StartupClock, get_logger
from latentforge.training import checkpoint, init_from
from latentforge.training import engine as eng
from latentforge.training.control import SAVE, STOP, STOP_SIGNALS, EvalInterrupted, Peers, Watchdog
from latentforge.training.diffusion import Schedule, cfg_drop, loss_fn
from latentforge.training.ema import EMA
from latentforge.training.state import TrainState
from latentforge.training.tracking import SPOOL_DIR, Tracker, run_key_for
from latentforge.training.unet import add_lora, build_unet, count_params, unet_forward

log = get_logger("train")


class NonFiniteLossError(AbortError):
    pass


class PeriodicEval(Protocol):
    """What the loop calls every eval.every_steps and at the end (collective)."""

    def run(self, engine: Any, ema: EMA | None, step: int, tracker: Tracker) -> dict[str, float]: ...


# make_evaluator(cfg, encoders, shapes, heldout_parts, (null tokens, null pooled), run_dir, schedule)
MakeEvaluator = Callable[..., PeriodicEval]


@dataclass
class TrainResult:
    step: int
    samples_seen: int
    run_dir: Path
    mlflow_run_id: str | None
    preempted: bool
    last_metrics: dict[str, float]


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, rank, step, micro, 0x7A1]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# ---------------------------------------------------------------------------------------
# Setup helpers.


def build_run_dir(cfg: Config) -> Path:
    run_dir = cfg.resolved_run_dir
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = run_dir / "config.yaml"
        if checkpoint.latest_tag(run_dir) and saved.exists():
            old = config_mod.load_resolved(saved)
            if config_mod.config_hash(old) != config_mod.config_hash(cfg):
                raise config_mod.ConfigError(
                    f"{run_dir}: holds a checkpoint of a run with a different model/codec/text/diffusion config; "
                    f"resume with the same settings or choose a new run_name")
        config_mod.save(cfg, saved)  # the resolved config, before step 0
    dist.barrier()
    return run_dir


@dataclass
class LatentData:
    """The latent dataset as the loop sees it: checked against the encoders, split."""

    directory: Path
    identity: dict[str, Any]  # what made the latents (the manifest's), with the dtypes precompute resolved
    shapes: dict[str, list[int]]  # {"latent": [C, h, w] (the nominal bucket's), "text": [L, D], "pooled": [P]}
    train_parts: list[dict]
    heldout_parts: list[dict]
    null_text: tuple[torch.Tensor, torch.Tensor]  # (L, D), (P,): the empty caption's embedding
    dataset: str  # identity of the training parts (sources.training_set_id), recorded in the loader position
    sources: list[dict[str, Any]]  # [{"name", "weight"}] (data/sources.py)
    buckets: list[dict[str, Any]]  # [{"size": [H, W], "latent": [C, h, w], "count"}]; [] = square only


def open_latents(cfg: Config, encoders: Encoders) -> LatentData:
    """Every source's manifest, refused when its identity differs from the encoders' (one
    line). An "auto" encoder dtype accepts the one precompute recorded, on whatever device it ran."""
    ds = open_dataset(cfg, encoders)
    null_tokens, null_pooled = (torch.from_numpy(a) for a in lat.load_null_text(ds.directory))
    return LatentData(ds.directory, ds.identity, ds.shapes, ds.train_parts, ds.heldout_parts,
                      (null_tokens, null_pooled), ds.dataset, ds.loader_sources(), ds.buckets)


def preflight(cfg: Config) -> None:
    """What can be refused before any rank starts (the launcher runs it, and every rank
    again): model.init_from and model.lora_rank against the latents (training/init_from.py),
    and a resume on another latent set than the checkpoint's. One ConfigError, a line per
    problem."""
    problems = []
    run_dir = cfg.resolved_run_dir
    tag = checkpoint.latest_tag(run_dir)
    try:
        if tag is None:  # a resumed run's own checkpoint wins: the source is not read again
            init_from.preflight(cfg)
    except ConfigError as e:
        problems.append(str(e))
    saved = checkpoint.meta(run_dir, tag).get("dataset") if tag else None
    now = training_set_id(cfg) if saved else None  # None: not precomputed (yet)
    if saved and now is not None and now != saved:
        where = "data.sources" if cfg.data.sources else "data.latent_dir"
        problems.append(f"{where}: {run_dir / checkpoint.CKPT / tag} was trained on latent set {saved}; "
                        f"{cfg.resolved_latent_dir} holds {now} (other parts, counts or contents). Resume on the "
                        f"same latents, or start a new run from this one (model.init_from={run_dir})")
    if problems:
        raise ConfigError("\n".join(problems))


def build_loader(cfg: Config, latents: LatentData, codec: Any, position: dict | None,
                 micro_batch: int) -> LatentLoader:
    """This rank's loader over the training parts, from `position` (a resumed run's)."""
    return LatentLoader(latents.directory, latents.train_parts, micro_batch=micro_batch, seed=cfg.train.seed,
                        rank=dist.rank(), world_size=dist.world_size(), num_workers=cfg.data.num_workers,
                        prefetch_factor=cfg.data.prefetch_factor, scale=codec.scale, shift=codec.shift,
                        shapes=latents.shapes, position=position, dataset=latents.dataset, sources=latents.sources,
                        epoch_samples=cfg.data.epoch_samples, caption_weights=cfg.data.caption_weights,
                        default_size=(cfg.data.resolution, cfg.data.resolution))


def build_model(cfg: Config, shapes: dict[str, list[int]], init: init_from.Prepared | None = None
                ) -> torch.nn.Module:
    """The U-Net: random (seeded), or holding the weights `init` names; then the LoRA
    adapters (model.lora_rank), which leave only themselves trainable."""
    C, h, _ = shapes["latent"]
    torch.manual_seed(cfg.train.seed)  # identical initial weights (and adapters) on every rank
    if init is None:
        unet = build_unet(cfg.model, C, h, shapes["text"][-1], shapes["pooled"][-1])
    else:
        unet = init_from.load_unet(cfg.model, shapes, init.unet_dir)
        log.info(f"step-0 weights from {init.source.describe()} (sha256 {init.weights_sha256[:12]})")
    if cfg.model.lora_rank:
        add_lora(unet, cfg.model)
    return unet


def restore(engine: eng.Engine, ema: EMA | None, run_dir: Path, plan: checkpoint.ResumePlan | None,
            world: int, cfg: Config) -> TrainState:
    """Weights, optimizer, EMA, RNG and the train state of the checkpoint `plan` names
    (collective); a fresh state when there is none."""
    if plan is None:
        return TrainState()
    state = checkpoint.load(engine, run_dir, plan)
    if ema is not None and state.ema:
        if ema.compatible(state.ema):  # this rank's own state
            ema.load_state_dict(state.ema)
        else:  # another world size or layout: whole from the checkpoint's files, then re-split
            ema.load_full(checkpoint.consolidated_ema(run_dir, plan.tag), state.ema["updates"])
    how = f" through its universal form ({plan.reason})" if plan.universal else ""
    skipped = f", skipping {len(plan.fallback)} damaged checkpoint(s)" if plan.fallback else ""
    log.info(f"resumed from {run_dir / checkpoint.CKPT / plan.tag}{how} at step {state.step}{skipped}")
    if plan.universal and dist.is_main():  # this run's later checkpoints are ordinary ones
        eng.write_ds_config(run_dir, eng.ds_config(cfg, world))
    return state


def build_tracker(cfg: Config, run_dir: Path, state: TrainState, fresh: bool, n_params: int,
                  note: dict[str, str] | None = None) -> Tracker:
    """Rank 0 owns the MLflow run; its id lives in the checkpoint (the others get a no-op).
    Records wait in RUN_DIR/tracking until the store has them; what an earlier job left
    there is delivered first (training/tracking.py). `note`: extra tags, such as a
    resume's fallback (`ResumePlan.fallback_tags`)."""
    main = dist.is_main()
    tracker = Tracker(uri=cfg.resolved_tracking_uri, experiment=cfg.tracking.experiment,
                      run_name=cfg.tracking.run_name or run_dir.name, enabled=cfg.tracking.enabled and main,
                      system_metrics=cfg.tracking.system_metrics, max_buffer=cfg.tracking.max_buffer,
                      run_key=run_key_for(run_dir) if main else None, spool_dir=run_dir / SPOOL_DIR if main else None)
    # The run opens in the tracker's thread, off the critical path of the start-up.
    tracker.start(run_id=state.mlflow_run_id, resume_step=None if fresh else state.step, wait=False)
    if fresh:
        tracker.log_params(config_mod.flatten(cfg))
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "ds_config.json")
    tracker.set_tags({"world_size": str(dist.world_size()), "n_params": str(n_params),
                      "run_dir": str(run_dir.resolve()), **(note or {})})
    return tracker


# ---------------------------------------------------------------------------------------
# The optimizer step and the checkpoint decision.
#
# In the steady state the host never waits for the device: the step's outcome (its loss,
# whether the update was applied) stays in device tensors, the EMA follows it there, and
# the Meter accumulates it there. The host reads them, and the ranks agree on the stop and
# save flags, only at sync points: log steps, checkpoint steps and a (re)start's first step
# (`sync_due`). A signal therefore takes effect within train.log_every steps.


@dataclass
class StepOutcome:
    loss: torch.Tensor  # () device: mean loss over the micro-batches (0 when not finite)
    samples: float  # real samples this rank consumed (padding excluded; counted on the host)
    applied: torch.Tensor  # () device: 1.0 when the optimizer updated the weights
    skipped: torch.Tensor  # () device: 1.0 when a non-finite loss or gradient dropped the step on every rank
    overflowed: torch.Tensor  # () device: 1.0 when fp16 dropped the step while finding its loss scale
    wait_s: float  # time spent waiting for the loader
    loss_rows: torch.Tensor  # () device: the loss summed over the real samples (padding rows add 0)
    by_source: torch.Tensor | None = None  # (S,) host float64: real samples per source, with `part_source`


def optimizer_step(engine: eng.Engine, batches: Iterator[dict[str, Any]], cfg: Config, schedule: Schedule,
                   null_text: tuple[torch.Tensor, torch.Tensor], step: int, accum: int,
                   part_source: torch.Tensor | None = None) -> StepOutcome:
    """Forward and backward over the micro-batches of one optimizer step, then the step.
    No host sync and no collective beyond DeepSpeed's own.

    A non-finite loss on any rank in any micro-batch drops the whole step, decided on the
    device: the loss that goes into backward is multiplied by NaN (by exactly 1 when it is
    finite), so every gradient of that rank is NaN, the gradient reduction carries NaN to
    every rank, and the engine's overflow check drops the step there (weights and Adam
    moments untouched; see Engine.step). The same check catches non-finite gradients of a
    finite loss."""
    device = dist.device()
    null_tokens, null_pooled = (t.to(device, non_blocking=True) for t in null_text)

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        # Size/crop numbers (up to thousands) stay f32: bf16 would round them.
        return unet_forward(engine, x.to(engine.dtype), t,
                            {k: v if k == "time_ids" else v.to(engine.dtype) for k, v in cond.items()})

    bad = torch.zeros((), dtype=torch.bool, device=device)
    loss_sum = torch.zeros((), device=device)
    loss_rows = torch.zeros((), device=device)
    by_source = None if part_source is None else torch.zeros(int(part_source.max()) + 1, dtype=torch.float64)
    applied = torch.zeros((), device=device)
    samples, wait = 0.0, 0.0
    for micro in range(accum):
        t_wait = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t_wait
        samples += float(batch["mask"].sum())  # host data, counted before it moves
        if by_source is not None:
            real = batch["mask"] > 0
            by_source += torch.bincount(part_source[batch["part"][real]], minlength=len(by_source)).double()
        gen = step_generator(cfg.train.seed, dist.rank(), step, micro)
        # Host-to-device copies are asynchronous (the loader pins its batches on CUDA).
        x0 = batch["latents"].to(device, non_blocking=True)  # (B, C, h, w)
        # Text arrives as fp16: move it first, so the fp32 promotion in cfg_drop happens on
        # the device and the host-to-device copy moves half the bytes.
        text, pooled, _ = cfg_drop(batch["text"].to(device, non_blocking=True), null_tokens,
                                   cfg.diffusion.cfg_dropout, gen, pooled=batch["pooled"].to(device, non_blocking=True),
                                   null_pooled=null_pooled)
        mask = batch["mask"].to(device, non_blocking=True)  # (B,) 0 for padding
        cond = {"text": text, "pooled": pooled, "time_ids": batch["time_ids"].to(device, non_blocking=True)}
        loss = loss_fn(model_fn, x0, cond, cfg.diffusion, schedule, gen, mask=mask)["loss"]
        finite = torch.isfinite(loss)  # () bool, on the device
        bad |= ~finite
        engine.backward(loss * torch.where(finite, 1.0, float("nan")))
        applied = engine.step()
        loss_sum += torch.where(finite, loss.detach(), 0.0) / accum
        loss_rows += torch.where(finite, loss.detach(), 0.0) * mask.shape[0]  # loss = sum over real rows / B
    dropped = applied == 0
    if engine.dtype == torch.float16:  # a dropped step without a bad loss is the loss scale's search
        skipped, overflowed = bad, dropped & ~bad
    else:
        skipped, overflowed = dropped, torch.zeros_like(dropped)
    return StepOutcome(loss=loss_sum, samples=samples, applied=applied, skipped=skipped.float(),
                       overflowed=overflowed.float(), wait_s=wait, loss_rows=loss_rows, by_source=by_source)


@dataclass
class CheckpointDecision:
    save: bool
    stop: bool  # a stop signal: save, then leave for the requeue
    asked: bool  # an on-demand save (SIGUSR1 or RUN_DIR/SAVE_NOW)


def control_flags(cfg: Config, run_dir: Path, last_save: float) -> list[float]:
    """This rank's [stop, timed save, asked save] as seen now: a stop signal, train.ckpt_every_minutes
    elapsed since `last_save`, an on-demand save (SIGUSR1, or RUN_DIR/SAVE_NOW, which only
    rank 0 looks at). The ranks agree on them at sync points (Meter.sync)."""
    return [float(STOP.signum is not None),
            float(cfg.train.ckpt_every_minutes > 0 and time.monotonic() - last_save > 60 * cfg.train.ckpt_every_minutes),
            float(SAVE.signum is not None or (dist.is_main() and (run_dir / checkpoint.SAVE_NOW).exists()))]


def checkpoint_due(cfg: Config, step: int, agreed: tuple[bool, bool, bool] | None) -> CheckpointDecision:
    """Whether to checkpoint after `step`: every N steps or at the end (the same on every
    rank without talking), and, at a sync point, on the flags every rank agreed on there
    (`agreed`: stop, timed, asked; None between sync points)."""
    stop, timed, asked = agreed or (False, False, False)
    every = cfg.train.ckpt_every_steps > 0 and step % cfg.train.ckpt_every_steps == 0
    return CheckpointDecision(every or timed or stop or asked or step == cfg.train.max_steps, stop, asked)


def sync_due(cfg: Config, step: int, first: bool) -> bool:
    """Whether `step` is a sync point: a log step, a checkpoint step, an eval step (an eval
    interrupted by a stop signal checkpoints there), or a (re)start's first step (a flag set
    while the run was loading takes effect at once)."""
    return (first or step % cfg.train.log_every == 0 or step == cfg.train.max_steps
            or (cfg.train.ckpt_every_steps > 0 and step % cfg.train.ckpt_every_steps == 0)
            or (cfg.eval.every_steps > 0 and step % cfg.eval.every_steps == 0))


@dataclass
class Tally:
    """What the ranks agreed on at a sync point (the same on every rank)."""

    samples: int  # real samples all ranks consumed since the last sync point
    skipped: int  # steps dropped for a non-finite loss or gradient since the last sync point
    last_skipped: int  # the latest such step (-1: none yet)
    run: int  # consecutive dropped steps ending at `last_skipped`
    abort_step: int  # the step at which train.max_nonfinite_steps in a row were reached (-1: not yet)
    overflows: int  # fp16 loss-scale overflows so far
    flags: tuple[bool, bool, bool]  # stop, timed save, asked save: raised on any rank
    metrics: dict[str, float]  # the train/* window metrics (empty unless the window was closed)
    by_source: list[int]  # `samples` per source (empty without data.sources)


def count_samples(state: TrainState, tally: Tally, names: list[str]) -> dict[str, float]:
    """Add the tally's samples to the state's counts; return train/samples_seen and, with
    named sources, train/samples_seen/<source> (the totals since the run began)."""
    state.samples_seen += tally.samples
    for name, n in zip(names, tally.by_source):
        state.samples_by_source[name] = state.samples_by_source.get(name, 0) + n
    return {"train/samples_seen": float(state.samples_seen),
            **{f"train/samples_seen/{k}": float(v) for k, v in state.samples_by_source.items()}}


class Meter:
    """The train/* metrics of one logging window and the step outcomes since the last sync
    point, accumulated on the device without a host sync; this rank's share until `sync()`."""

    def __init__(self, device: torch.device, max_nonfinite: int, num_sources: int = 0) -> None:
        self.device, self.max_nonfinite = device, max_nonfinite
        self.run = self._scalar(0)  # consecutive dropped steps, ending at the latest step
        self.last_skipped, self.last_run = self._scalar(-1), self._scalar(0)  # the latest dropped step, its run
        self.abort_step = self._scalar(-1)  # where max_nonfinite in a row were first reached
        self.overflows = self._scalar(0)  # fp16 loss-scale overflows so far
        self.skipped = self._scalar(0)  # dropped steps since the last sync point
        self.unsynced = 0.0  # samples not yet added to samples_seen
        self.by_source = torch.zeros(num_sources, dtype=torch.float64)  # unsynced too, per source (host)
        self._open_window()

    def _scalar(self, value: float) -> torch.Tensor:
        return torch.full((), float(value), dtype=torch.float64, device=self.device)

    def _open_window(self) -> None:
        # The loss summed over the real samples of the applied steps, and their number.
        self.loss, self.n_loss = self._scalar(0), self._scalar(0)
        self.samples, self.wait = 0.0, 0.0
        self.t0 = time.perf_counter()

    def add(self, out: StepOutcome, step: int) -> None:
        """Count one optimizer step (index `step`): device arithmetic only."""
        counted = 1 - out.skipped - out.overflowed  # 1.0 when the step's loss counts
        self.loss += out.loss_rows * counted
        self.n_loss += counted * out.samples
        self.skipped += out.skipped
        self.overflows += out.overflowed
        self.run = (self.run + 1) * out.skipped  # consecutive dropped steps, ending at this one
        hit = out.skipped > 0
        self.last_skipped = torch.where(hit, float(step), self.last_skipped)
        self.last_run = torch.where(hit, self.run, self.last_run)
        first_abort = (self.abort_step < 0) & (self.run >= self.max_nonfinite)
        self.abort_step = torch.where(first_abort, float(step), self.abort_step)
        self.samples += out.samples
        self.unsynced += out.samples
        self.wait += out.wait_s
        if out.by_source is not None:
            self.by_source += out.by_source

    def sync(self, flags: list[float], close_window: bool) -> Tally:
        """Agree with the other ranks (one all-reduce, one read back): sums since the last
        sync point, the stop/save flags, and with `close_window` the window's metrics
        (then a new window opens). Collective."""
        world = dist.world_size()
        host = torch.cat([torch.tensor([self.samples, self.wait, self.unsynced, *flags], dtype=torch.float64),
                          self.by_source])
        packed = torch.cat([torch.stack([self.loss, self.n_loss, self.skipped, self.last_skipped, self.last_run,
                                         self.abort_step, self.overflows]),
                            host.to(self.device, non_blocking=True)])
        s = dist.all_reduce_sum(packed).tolist()
        loss, n_loss, skipped, last_skipped, last_run, abort_step, overflows = s[:7]
        samples, wait, unsynced, stop, timed, asked = s[7:13]
        by_source = [int(round(v)) for v in s[13:]]

        def same(v: float) -> int:  # every rank held the same value
            return int(round(v / world))

        metrics: dict[str, float] = {}
        if close_window:
            elapsed = time.perf_counter() - self.t0
            metrics = {
                # Mean over the real samples of the window's applied steps (dropped ones have no
                # loss; padding rows of the bucket schedule are no samples, so they do not dilute it).
                "train/loss": loss / n_loss if n_loss else float("nan"),
                "train/samples_per_s": samples / elapsed,
                "train/data_wait_frac": wait / world / elapsed,
            }
            self._open_window()
        self.skipped.zero_()
        self.unsynced = 0.0
        self.by_source.zero_()
        return Tally(samples=int(round(unsynced)), skipped=same(skipped), last_skipped=same(last_skipped),
                     run=same(last_run), abort_step=same(abort_step), overflows=same(overflows),
                     flags=(stop > 0, timed > 0, asked > 0), metrics=metrics, by_source=by_source)


def save_checkpoint(engine: eng.Engine, run_dir: Path, state: TrainState, data: LatentLoader, ema: EMA | None,
                    tracker: Tracker, keep_last: int) -> None:
    """Checkpoint the run at `state.step` (collective; a sync point, so `state` is up to
    date), then make the tracking spool durable up to here: what was logged before a
    checkpoint survives a lost node."""
    state.loader, state.ema, state.mlflow_run_id = (
        data.state_dict(), ema.state_dict() if ema is not None else None, tracker.run_id)
    checkpoint.save(engine, run_dir, state, keep_last)
    tracker.sync()


def check_nonfinite(cfg: Config, tally: Tally) -> None:
    """Say which steps were dropped for a non-finite loss or gradient since the last sync
    point; NonFiniteLossError once train.max_nonfinite_steps were dropped in a row."""
    if tally.skipped:
        log.info(f"step {tally.last_skipped}: non-finite loss or gradients, step skipped ({tally.run} in a row)"
                 + (f"; {tally.skipped} skipped since the last report" if tally.skipped > 1 else ""))
    if tally.abort_step >= 0:
        n = cfg.train.max_nonfinite_steps
        raise NonFiniteLossError(f"{n} consecutive non-finite losses at step {tally.abort_step} "
                                 f"(train.max_nonfinite_steps={n}); lower optim.lr or check the data")


def log_window(cfg: Config, step: int, tally: Tally, seen: dict[str, float], engine: eng.Engine,
               data: LatentLoader, nonfinite_total: int, tracker: Tracker, progress: Progress) -> dict[str, float]:
    """At a log step: the window's train/* metrics to MLflow and one progress line."""
    metrics = {**tally.metrics, **seen, "train/lr": eng.lr_at(cfg, step - 1), "train/grad_norm": engine.grad_norm(),
               "train/epoch": float(data.epoch), "train/padding_frac": data.padding_fraction,
               "train/nonfinite_steps": float(nonfinite_total)}
    if engine.dtype == torch.float16:
        metrics["train/overflow_steps"] = float(tally.overflows)
    tracker.log_metrics(metrics, step=step)
    log.info(f"step {step}/{cfg.train.max_steps} loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.2e} "
             f"{metrics['train/samples_per_s']:.1f} samples/s data-wait {100 * metrics['train/data_wait_frac']:.1f}% "
             f"{progress.describe(step)}")
    return metrics


def record_run(state: TrainState, cfg: Config, latents: LatentData, encoders: Encoders, init: Any) -> None:
    """What export and stand-alone eval need without the latent directory, into the state
    every checkpoint carries."""
    state.shapes, state.identity, state.buckets = latents.shapes, latents.identity, latents.buckets
    state.null_text = {"tokens": latents.null_text[0], "pooled": latents.null_text[1]}
    state.scale, state.shift = encoders.codec.scale, encoders.codec.shift
    state.config_hash = config_mod.config_hash(cfg)
    if init is not None:
        state.init_from = init.record()


def evaluate(evaluator: Any, engine: eng.Engine, ema: EMA | None, step: int, tracker: Tracker) -> bool:
    """Run `evaluator` on the weights at `step` and log its metrics. False when a stop
    signal interrupted it (at a batch boundary, on every rank at once)."""
    try:
        tracker.log_metrics(evaluator.run(engine, ema, step, tracker), step=step)
        return True
    except EvalInterrupted:
        return False


def stop_message(step: int, during: str = "") -> str:
    if STOP.signum == signal.SIGINT:
        return f"interrupted (Ctrl-C){during}: checkpointed at step {step}, exiting"
    return f"stop signal {STOP.signum}{during}: checkpointed at step {step}, exiting for requeue"


# ---------------------------------------------------------------------------------------
# The loop.


def train(cfg: Config, make_evaluator: MakeEvaluator | None = None) -> TrainResult:
    """Train (or resume) the run `cfg` names. Every rank calls it. `make_evaluator` builds
    the periodic evaluator (none: no eval)."""
    clock = StartupClock()  # where the start-up goes; logged at the first step
    eng.init_distributed(cfg.train.collective_timeout_s)
    world = dist.world_size()
    peers = Peers.gather() if world > 1 else None  # who a lost rank was, for the error message
    if peers is not None:
        log.info(peers.layout())
    STOP.install(STOP_SIGNALS)
    SAVE.install((signal.SIGUSR1,))
    run_dir = build_run_dir(cfg)
    micro_batch, accum = config_mod.batch_split(cfg, world)
    # Resume is the default whenever the run directory holds a checkpoint. A different
    # world size (or ZeRO stage) goes through a universal checkpoint, converted here once.
    resume = checkpoint.prepare_resume(run_dir, world, cfg.train.zero_stage, hashes=cfg.train.verify_checkpoints,
                                       timeout_s=cfg.train.collective_timeout_s)
    clock.mark("process group")

    # Encoders: the manifest check needs their identity; eval needs the text encoder for
    # prompts and the codec to decode samples.
    encoders = build_encoders(cfg, dist.device())
    latents = open_latents(cfg, encoders)
    shapes = latents.shapes
    clock.mark("encoders")

    # Model, engine, EMA. Under ZeRO-3 each rank averages its own partition of the weights.
    # model.init_from gives the step-0 weights of a fresh run only: a checkpoint wins. The
    # EMA is made from the engine's weights below, so it starts from the loaded ones.
    preflight(cfg)
    init = init_from.prepare(cfg, run_dir) if cfg.model.init_from and resume is None else None
    unet = build_model(cfg, shapes, init)
    n_params = count_params(unet)
    engine = eng.build_engine(unet, cfg, run_dir, load_universal=bool(resume and resume.universal))
    ema = EMA(engine.ema_parameters(), cfg.ema, engine.ema_layout(), engine.gather_shard) if cfg.ema.enabled else None
    clock.mark("engine")

    # Resume: weights, optimizer, EMA, step, data position, RNG, MLflow run id.
    state = restore(engine, ema, run_dir, resume, world, cfg)
    clock.mark("checkpoint load")
    data = build_loader(cfg, latents, encoders.codec, state.loader, micro_batch)
    record_run(state, cfg, latents, encoders, init)
    # MLflow tags: a resume's fallback, or the step-0 source (path, weights hash, its MLflow
    # run, also as the parent run).
    note = {**(resume.fallback_tags() if resume else {}), **(init.tags() if init else {})}
    tracker = build_tracker(cfg, run_dir, state, fresh=resume is None, n_params=n_params, note=note)
    clock.mark("mlflow")
    schedule = Schedule.from_config(cfg.diffusion)
    evaluator = make_evaluator(cfg, encoders, shapes, latents.heldout_parts, latents.null_text, run_dir,
                               schedule) if make_evaluator is not None else None
    clock.mark("evaluator")

    log.info(f"{n_params / 1e6:.1f}M params, world {world}, micro-batch {micro_batch} x accum {accum}, "
             f"{data.steps_per_epoch // accum} steps/epoch, steps {state.step} -> {cfg.train.max_steps}, run {run_dir}")
    # Samples per source (train/samples_seen/<name>) when the run mixes named sources.
    names = [s["name"] for s in latents.sources] if cfg.data.sources else []
    part_source = torch.tensor(data.part_source) if names else None
    batches = iter(data)
    meter = Meter(dist.device(), cfg.train.max_nonfinite_steps, len(names))
    progress = Progress(cfg.train.max_steps, start=state.step)
    first_step, last_save, saved_step = state.step + 1, time.monotonic(), -1
    metrics: dict[str, float] = {}
    preempted, status = False, "FAILED"
    watchdog = Watchdog(cfg.train.collective_timeout_s, peers)
    compiling = cfg.train.compile  # the first step compiles the U-Net (minutes for a large one): no hang
    try:
        while state.step < cfg.train.max_steps:
            if compiling:
                watchdog.pause()
            else:
                watchdog.beat()
            engine.set_lr(eng.lr_at(cfg, state.step))
            out = optimizer_step(engine, batches, cfg, schedule, latents.null_text, state.step, accum, part_source)
            compiling = False
            meter.add(out, state.step)
            if state.step + 1 == first_step:  # split into the loader's first batch (its workers' start) and the rest
                clock.mark("first step", split=("loader workers", out.wait_s))

            # Update EMA (a dropped step gives it weight 0, decided on the device).
            if ema is not None:
                ema.update(engine.ema_parameters(), state.step, applied=out.applied)
            state.step += 1

            # Sync point: the host reads the step outcomes back, the ranks agree on the flags.
            agreed = None
            if sync_due(cfg, state.step, state.step == first_step):
                log_now = state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps
                tally = meter.sync(control_flags(cfg, run_dir, last_save), close_window=log_now)
                seen = count_samples(state, tally, names)
                state.nonfinite_total += tally.skipped
                agreed = tally.flags
                if state.step == first_step:
                    log.info(f"start-up: {clock.describe()}")
                check_nonfinite(cfg, tally)  # counts dropped steps; aborts after too many in a row
                if log_now:
                    metrics = log_window(cfg, state.step, tally, seen, engine, data, state.nonfinite_total, tracker,
                                         progress)

            # Checkpoint.
            decision = checkpoint_due(cfg, state.step, agreed)
            if decision.save:
                watchdog.beat()  # a save's own barriers are bounded by the same timeout
                save_checkpoint(engine, run_dir, state, data, ema, tracker, cfg.train.keep_last)
                last_save, saved_step = time.monotonic(), state.step
                if decision.asked:
                    SAVE.clear()
                    if dist.is_main():
                        (run_dir / checkpoint.SAVE_NOW).unlink(missing_ok=True)
                    log.info(f"on-demand checkpoint at step {state.step}")
            if decision.stop:
                preempted = True
                log.info(stop_message(state.step))
                break

            # Evaluate. A stop signal interrupts it at a batch boundary, on every rank at once:
            # checkpoint (unless this step just was), then leave like any stop.
            if (evaluator is not None and cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0
                    and state.step < cfg.train.max_steps):
                watchdog.pause()
                if not evaluate(evaluator, engine, ema, state.step, tracker):
                    watchdog.beat()
                    if saved_step != state.step:
                        save_checkpoint(engine, run_dir, state, data, ema, tracker, cfg.train.keep_last)
                    preempted = True
                    log.info(stop_message(state.step, " during eval"))
                    break

        watchdog.stop()
        # The last checkpoint is this step's: an interrupted final eval runs again after a requeue.
        if not preempted and evaluator is not None and not evaluate(evaluator, engine, ema, state.step, tracker):
            preempted = True
            log.info(stop_message(state.step, " during the final eval"))
        status = "KILLED" if preempted else "FINISHED"
    except Exception as e:
        lost = peers.explain(e) if peers is not None else None  # a failed collective: name the silent rank
        if lost is not None:
            raise lost from e
        raise
    finally:
        # Shut the loader's DataLoader workers down now. On an error (a dead peer rank, a
        # non-finite abort) the traceback keeps this frame, and with it the iterator, alive
        # until interpreter exit, where multiprocessing would join workers that ignore
        # SIGTERM (data/loader.py) and wait forever.
        watchdog.stop()
        batches.close()
        tracker.finish(status)
    engine.destroy()  # so dist.destroy frees the process groups (training/engine.py)
    return TrainResult(step=state.step, samples_seen=state.samples_seen, run_dir=run_dir,
                       mlflow_run_id=tracker.run_id, preempted=preempted, last_metrics=metrics)
