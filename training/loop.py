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
from latentforge.config import AbortError, Config
from latentforge.data import latents as lat
from latentforge.data.encoders import Encoders, build_encoders, expected_identity
from latentforge.data.loader import LatentLoader, split_parts
from latentforge.log import Progress, get_logger
from latentforge.training import checkpoint
from latentforge.training import engine as eng
from latentforge.training.control import SAVE, STOP, Watchdog
from latentforge.training.diffusion import Schedule, cfg_drop, loss_fn
from latentforge.training.ema import EMA
from latentforge.training.state import TrainState
from latentforge.training.tracking import Tracker, run_key_for
from latentforge.training.unet import build_unet, count_params, unet_forward

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
    shapes: dict[str, list[int]]  # {"latent": [C, h, w], "text": [L, D], "pooled": [P]}
    train_parts: list[dict]
    heldout_parts: list[dict]
    null_text: tuple[torch.Tensor, torch.Tensor]  # (L, D), (P,): the empty caption's embedding


def open_latents(cfg: Config, encoders: Encoders) -> LatentData:
    """The manifest, refused when its identity differs from the encoders' (one line). An
    "auto" encoder dtype accepts the one precompute recorded, on whatever device it ran."""
    directory = cfg.resolved_latent_dir
    manifest = lat.load_manifest(directory)
    lat.check_identity(manifest, expected_identity(encoders, cfg, manifest["identity"]),
                       str(directory / lat.MANIFEST))
    train_parts, heldout_parts = split_parts(manifest, cfg.data.heldout_shards)
    null_tokens, null_pooled = (torch.from_numpy(a) for a in lat.load_null_text(directory))
    return LatentData(directory, manifest["identity"], manifest["shapes"], train_parts, heldout_parts,
                      (null_tokens, null_pooled))


def build_loader(cfg: Config, latents: LatentData, codec: Any, position: dict | None,
                 micro_batch: int) -> LatentLoader:
    """This rank's loader over the training parts, from `position` (a resumed run's)."""
    return LatentLoader(latents.directory, latents.train_parts, micro_batch=micro_batch, seed=cfg.train.seed,
                        rank=dist.rank(), world_size=dist.world_size(), num_workers=cfg.data.num_workers,
                        prefetch_factor=cfg.data.prefetch_factor, scale=codec.scale, shift=codec.shift,
                        shapes=latents.shapes, position=position)


def build_model(cfg: Config, shapes: dict[str, list[int]]) -> torch.nn.Module:
    C, h, _ = shapes["latent"]
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    return build_unet(cfg.model, C, h, shapes["text"][-1], shapes["pooled"][-1])


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
    `note`: extra tags, such as a resume's fallback (`ResumePlan.fallback_tags`)."""
    tracker = Tracker(uri=cfg.resolved_tracking_uri, experiment=cfg.tracking.experiment,
                      run_name=cfg.tracking.run_name or run_dir.name, enabled=cfg.tracking.enabled and dist.is_main(),
                      system_metrics=cfg.tracking.system_metrics, max_buffer=cfg.tracking.max_buffer,
                      run_key=run_key_for(run_dir) if dist.is_main() else None)
    tracker.start(run_id=state.mlflow_run_id)
    if fresh:
        tracker.log_params(config_mod.flatten(cfg))
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "ds_config.json")
    tracker.set_tags({"world_size": str(dist.world_size()), "n_params": str(n_params),
                      "run_dir": str(run_dir.resolve()), **(note or {})})
    return tracker


# ---------------------------------------------------------------------------------------
# The optimizer step and the checkpoint decision.


@dataclass
class StepOutcome:
    loss: float  # mean loss over the micro-batches (0 when not finite)
    samples: float  # real samples this rank consumed (padding excluded)
    applied: bool  # the optimizer updated the weights
    skipped: bool  # a non-finite loss or gradient: the update was a no-op on every rank
    overflowed: bool  # fp16: DeepSpeed dropped the step while finding its loss scale
    wait_s: float  # time spent waiting for the loader


def optimizer_step(engine: eng.Engine, batches: Iterator[dict[str, Any]], cfg: Config, schedule: Schedule,
                   null_text: tuple[torch.Tensor, torch.Tensor], step: int, accum: int) -> StepOutcome:
    """Forward and backward over the micro-batches of one optimizer step, then the step.

    A non-finite loss on any rank in any micro-batch skips the whole step: the ranks agree
    once, before the boundary, and the optimizer update becomes a no-op (weights and Adam
    moments untouched). The backward passes still run, so DeepSpeed's accumulation and
    reduction stay in step on every rank; the gradients they leave are discarded at the
    boundary. DeepSpeed also drops a step by itself when the gradients are not finite
    (ZeRO's overflow check; under fp16 that is how the loss scale finds its level)."""
    device = dist.device()
    null_tokens, null_pooled = (t.to(device) for t in null_text)

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return unet_forward(engine, x.to(engine.dtype), t, {k: v.to(engine.dtype) for k, v in cond.items()})

    local_bad, skip, applied = False, False, False
    loss_sum, samples, wait = 0.0, 0.0, 0.0
    for micro in range(accum):
        t_wait = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t_wait
        gen = step_generator(cfg.train.seed, dist.rank(), step, micro)
        x0 = batch["latents"].to(device)  # (B, C, h, w)
        # Text arrives as fp16: move it first, so the fp32 promotion in cfg_drop happens on
        # the device and the host-to-device copy moves half the bytes.
        text, pooled, _ = cfg_drop(batch["text"].to(device), null_tokens, cfg.diffusion.cfg_dropout, gen,
                                   pooled=batch["pooled"].to(device), null_pooled=null_pooled)
        mask = batch["mask"].to(device)  # (B,) 0 for padding
        loss = loss_fn(model_fn, x0, {"text": text, "pooled": pooled}, cfg.diffusion, schedule, gen,
                       mask=mask)["loss"]
        finite = bool(torch.isfinite(loss))
        local_bad |= not finite
        skip = dist.any_rank(local_bad) if micro == accum - 1 else False
        engine.backward(loss)
        applied = engine.step(skip=skip)
        loss_sum += float(loss.detach()) / accum if finite else 0.0
        samples += float(mask.sum())
    fp16 = engine.dtype == torch.float16
    return StepOutcome(loss=loss_sum, samples=samples, applied=applied,
                       skipped=skip or (not applied and not fp16), overflowed=not skip and not applied and fp16,
                       wait_s=wait)


@dataclass
class CheckpointDecision:
    save: bool
    stop: bool  # a stop signal: save, then leave for the requeue
    asked: bool  # an on-demand save (SIGUSR1 or RUN_DIR/SAVE_NOW)


def checkpoint_due(cfg: Config, step: int, run_dir: Path, last_save: float) -> CheckpointDecision:
    """Whether to checkpoint after `step`: every N steps, every M minutes, on demand
    (SIGUSR1 or RUN_DIR/SAVE_NOW, which only rank 0 looks at), on a stop signal, or at the
    end. Collective: the flags are agreed on by all ranks (DeepSpeed's save is collective)."""
    flags = dist.all_reduce_max(torch.tensor(
        [float(STOP.signum is not None),
         float(cfg.train.ckpt_every_minutes > 0 and time.monotonic() - last_save > 60 * cfg.train.ckpt_every_minutes),
         float(SAVE.signum is not None or (dist.is_main() and (run_dir / checkpoint.SAVE_NOW).exists()))],
        device=dist.device()))
    stop, timed, asked = bool(flags[0] > 0), bool(flags[1] > 0), bool(flags[2] > 0)
    every = cfg.train.ckpt_every_steps > 0 and step % cfg.train.ckpt_every_steps == 0
    return CheckpointDecision(every or timed or stop or asked or step == cfg.train.max_steps, stop, asked)


class Meter:
    """The train/* metrics of one logging window; this rank's share until `reduce()`."""

    def __init__(self) -> None:
        self.loss, self.n_loss, self.samples, self.wait = 0.0, 0, 0.0, 0.0
        self.unsynced = 0.0  # samples not yet added to samples_seen (summed over ranks at log/checkpoint)
        self.t0 = time.perf_counter()

    def add(self, out: StepOutcome) -> None:
        if not out.skipped and not out.overflowed:
            self.loss += out.loss
            self.n_loss += 1
        self.samples += out.samples
        self.unsynced += out.samples
        self.wait += out.wait_s

    def sync_samples(self) -> int:
        """Samples every rank consumed since the last sync (collective)."""
        n = int(dist.all_reduce_sum(torch.tensor([self.unsynced], dtype=torch.float64, device=dist.device())).item())
        self.unsynced = 0.0
        return n

    def reduce(self) -> tuple[dict[str, float], int]:
        """(window metrics, samples since the last sync) over all ranks (collective); resets."""
        world = dist.world_size()
        s = dist.all_reduce_sum(torch.tensor([self.loss, self.samples, self.wait, self.unsynced],
                                             dtype=torch.float64, device=dist.device())).tolist()
        elapsed = time.perf_counter() - self.t0
        metrics = {
            # Mean over ranks and over the window's applied steps (skipped ones have no loss).
            "train/loss": s[0] / world / self.n_loss if self.n_loss else float("nan"),
            "train/samples_per_s": s[1] / elapsed,
            "train/data_wait_frac": s[2] / world / elapsed,
        }
        self.__init__()
        return metrics, int(s[3])


# ---------------------------------------------------------------------------------------
# The loop.


def train(cfg: Config, make_evaluator: MakeEvaluator | None = None) -> TrainResult:
    """Train (or resume) the run `cfg` names. Every rank calls it. `make_evaluator` builds
    the periodic evaluator (none: no eval)."""
    eng.init_distributed(cfg.train.collective_timeout_s)
    world = dist.world_size()
    STOP.install((signal.SIGUSR2, signal.SIGTERM))
    SAVE.install((signal.SIGUSR1,))
    run_dir = build_run_dir(cfg)
    micro_batch, accum = config_mod.batch_split(cfg, world)
    # Resume is the default whenever the run directory holds a checkpoint. A different
    # world size (or ZeRO stage) goes through a universal checkpoint, converted here once.
    resume = checkpoint.prepare_resume(run_dir, world, cfg.train.zero_stage, hashes=cfg.train.verify_checkpoints,
                                       timeout_s=cfg.train.collective_timeout_s)

    # Encoders: the manifest check needs their identity; eval needs the text encoder for
    # prompts and the codec to decode samples.
    encoders = build_encoders(cfg, dist.device())
    latents = open_latents(cfg, encoders)
    shapes = latents.shapes

    # Model, engine, EMA. Under ZeRO-3 each rank averages its own partition of the weights.
    unet = build_model(cfg, shapes)
    n_params = count_params(unet)
    engine = eng.build_engine(unet, cfg, run_dir, load_universal=bool(resume and resume.universal))
    ema = EMA(engine.ema_parameters(), cfg.ema, engine.ema_layout(), engine.gather_shard) if cfg.ema.enabled else None

    # Resume: weights, optimizer, EMA, step, data position, RNG, MLflow run id.
    state = restore(engine, ema, run_dir, resume, world, cfg)
    data = build_loader(cfg, latents, encoders.codec, state.loader, micro_batch)
    # What export and stand-alone eval need without the latent directory.
    state.shapes, state.identity = shapes, latents.identity
    state.null_text = {"tokens": latents.null_text[0], "pooled": latents.null_text[1]}
    state.scale, state.shift = encoders.codec.scale, encoders.codec.shift
    state.config_hash = config_mod.config_hash(cfg)
    tracker = build_tracker(cfg, run_dir, state, fresh=resume is None, n_params=n_params,
                            note=resume.fallback_tags() if resume else None)
    schedule = Schedule.from_config(cfg.diffusion)
    evaluator = make_evaluator(cfg, encoders, shapes, latents.heldout_parts, latents.null_text, run_dir,
                               schedule) if make_evaluator is not None else None

    log.info(f"{n_params / 1e6:.1f}M params, world {world}, micro-batch {micro_batch} x accum {accum}, "
             f"{data.steps_per_epoch // accum} steps/epoch, steps {state.step} -> {cfg.train.max_steps}, run {run_dir}")
    batches = iter(data)
    meter, progress = Meter(), Progress(cfg.train.max_steps, start=state.step)
    last_save, nonfinite_run, overflow_total = time.monotonic(), 0, 0
    metrics: dict[str, float] = {}
    preempted, status = False, "FAILED"
    watchdog = Watchdog(cfg.train.collective_timeout_s)
    compiling = cfg.train.compile  # the first step compiles the U-Net (minutes for a large one): no hang
    try:
        while state.step < cfg.train.max_steps:
            if compiling:
                watchdog.pause()
            else:
                watchdog.beat()
            engine.set_lr(eng.lr_at(cfg, state.step))
            out = optimizer_step(engine, batches, cfg, schedule, latents.null_text, state.step, accum)
            compiling = False
            meter.add(out)
            overflow_total += int(out.overflowed)

            # Count non-finite steps; abort after too many in a row.
            nonfinite_run = nonfinite_run + 1 if out.skipped else 0
            if out.skipped:
                state.nonfinite_total += 1
                log.info(f"step {state.step}: non-finite loss or gradients, step skipped ({nonfinite_run} in a row)")
                if nonfinite_run >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{nonfinite_run} consecutive non-finite losses at step {state.step} (train.max_nonfinite_steps="
                        f"{cfg.train.max_nonfinite_steps}); lower optim.lr or check the data")

            # Update EMA (only with weights an optimizer step produced).
            if ema is not None and out.applied:
                ema.update(engine.ema_parameters(), state.step)
            state.step += 1

            # Log.
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                metrics, synced = meter.reduce()
                state.samples_seen += synced
                metrics.update({"train/lr": eng.lr_at(cfg, state.step - 1), "train/grad_norm": engine.grad_norm(),
                                "train/epoch": float(data.epoch), "train/samples_seen": float(state.samples_seen),
                                "train/nonfinite_steps": float(state.nonfinite_total)})
                if engine.dtype == torch.float16:
                    metrics["train/overflow_steps"] = float(overflow_total)
                tracker.log_metrics(metrics, step=state.step)
                log.info(f"step {state.step}/{cfg.train.max_steps} loss {metrics['train/loss']:.4f} "
                         f"lr {metrics['train/lr']:.2e} {metrics['train/samples_per_s']:.1f} samples/s "
                         f"data-wait {100 * metrics['train/data_wait_frac']:.1f}% {progress.describe(state.step)}")

            # Checkpoint.
            decision = checkpoint_due(cfg, state.step, run_dir, last_save)
            if decision.save:
                state.samples_seen += meter.sync_samples()
                state.loader, state.ema, state.mlflow_run_id = (
                    data.state_dict(), ema.state_dict() if ema is not None else None, tracker.run_id)
                watchdog.beat()  # a save's own barriers are bounded by the same timeout
                checkpoint.save(engine, run_dir, state, cfg.train.keep_last)
                last_save = time.monotonic()
                if decision.asked:
                    SAVE.clear()
                    if dist.is_main():
                        (run_dir / checkpoint.SAVE_NOW).unlink(missing_ok=True)
                    log.info(f"on-demand checkpoint at step {state.step}")
            if decision.stop:
                preempted = True
                log.info(f"stop signal {STOP.signum}: checkpointed at step {state.step}, exiting for requeue")
                break

            # Evaluate.
            if (evaluator is not None and cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0
                    and state.step < cfg.train.max_steps):
                watchdog.pause()
                tracker.log_metrics(evaluator.run(engine, ema, state.step, tracker), step=state.step)

        watchdog.stop()
        if not preempted and evaluator is not None:
            tracker.log_metrics(evaluator.run(engine, ema, state.step, tracker), step=state.step)
        status = "KILLED" if preempted else "FINISHED"
    finally:
        # Shut the loader's DataLoader workers down now. On an error (a dead peer rank, a
        # non-finite abort) the traceback keeps this frame, and with it the iterator, alive
        # until interpreter exit, where multiprocessing would join workers that ignore
        # SIGTERM (data/loader.py) and wait forever.
        watchdog.stop()
        batches.close()
        tracker.finish(status)
    return TrainResult(step=state.step, samples_seen=state.samples_seen, run_dir=run_dir,
                       mlflow_run_id=tracker.run_id, preempted=preempted, last_metrics=metrics)
