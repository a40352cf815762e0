"""The training loop. Setup lives in small build_* helpers; `train()` reads top to bottom.

Every rank runs this. Randomness is a pure function of (seed, rank, step): the noise,
timesteps and caption dropout of step s on rank r come from a generator seeded with
(seed, r, s, micro-step), and the loader's order from (seed, epoch, dataset). With the
saved loader position, EMA, optimizer and weights, a resumed run continues bitwise.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.data import latents as lat
from latentforge.data.loader import LatentLoader, split_parts
from latentforge.training import checkpoint, dist
from latentforge.training import config as config_mod
from latentforge.training.config import Config
from latentforge.training.unet import build_unet, count_params, unet_forward


class NonFiniteLossError(config_mod.AbortError):
    pass


# ---------------------------------------------------------------------------------------
# Preemption: a signal only sets a flag; the loop agrees on it at step boundaries and all
# ranks save together (DeepSpeed's save is collective; DESIGN.md guarantee 4).


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
                print(f"[rank {dist.rank()}] error: no training progress for {self.timeout_s:.0f}s "
                      f"(train.collective_timeout_s): another rank is dead or hung; exiting", file=sys.stderr,
                      flush=True)
                os._exit(1)  # the main thread is stuck in a collective: no clean way out


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


def build_data(cfg: Config, encoders: Any, position: dict | None, micro_batch: int) -> tuple[LatentLoader, dict]:
    latent_dir = cfg.resolved_latent_dir
    manifest = lat.load_manifest(latent_dir)
    lat.check_identity(manifest, encoders.identity(cfg), str(latent_dir / lat.MANIFEST))
    train_parts, heldout_parts = split_parts(manifest, cfg.data.heldout_shards)
    codec = encoders.codec
    loader = LatentLoader(latent_dir, train_parts, micro_batch=micro_batch, seed=cfg.train.seed, rank=dist.rank(),
                          world_size=dist.world_size(), num_workers=cfg.data.num_workers,
                          prefetch_factor=cfg.data.prefetch_factor, scale=codec.scale, shift=codec.shift,
                          shapes=manifest["shapes"], position=position)
    return loader, {"manifest": manifest, "heldout_parts": heldout_parts}


def build_model(cfg: Config, shapes: dict[str, list[int]]) -> torch.nn.Module:
    C, h, _ = shapes["latent"]
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    return build_unet(cfg.model, C, h, shapes["text"][-1], shapes["pooled"][-1])


# ---------------------------------------------------------------------------------------
# The loop.


def train(cfg: Config) -> TrainResult:
    from latentforge.data.precompute import build_encoders
    from latentforge.eval.evaluate import Evaluator
    from latentforge.training import engine as eng
    from latentforge.training.diffusion import Schedule, cfg_drop, loss_fn
    from latentforge.training.ema import EMA
    from latentforge.training.tracking import Tracker, run_key_for

    eng.init_distributed(cfg.train.collective_timeout_s)
    rank, world, device = dist.rank(), dist.world_size(), dist.device()
    STOP.install((signal.SIGUSR2, signal.SIGTERM))
    SAVE.install((signal.SIGUSR1,))
    run_dir = build_run_dir(cfg)
    micro_batch, accum = eng.batch_split(cfg, world)
    # Resume is the default whenever the run directory holds a checkpoint. A different
    # world size (or ZeRO stage) goes through a universal checkpoint, converted here once.
    resume = checkpoint.prepare_resume(run_dir, world, cfg.train.zero_stage)

    # Encoders: the manifest check needs their identity; eval needs the text encoder for
    # prompts and the codec to decode samples.
    encoders = build_encoders(cfg, device)
    identity = encoders.identity(cfg)
    manifest = lat.load_manifest(cfg.resolved_latent_dir)
    shapes = manifest["shapes"]
    null_tokens, null_pooled = (torch.from_numpy(a) for a in lat.load_null_text(cfg.resolved_latent_dir))

    # Model, engine, EMA.
    unet = build_model(cfg, shapes)
    n_params = count_params(unet)
    engine = eng.build_engine(unet, cfg, run_dir, load_universal=bool(resume and resume.universal))
    # Under ZeRO-3 each rank averages its own partition of the weights (no gather per step).
    ema = EMA(engine.ema_parameters(), cfg.ema, engine.ema_layout(), engine.gather_shard) if cfg.ema.enabled else None

    # Resume: weights, optimizer, EMA, step, data position, RNG, MLflow run id.
    client: dict[str, Any] = {}
    tag = resume.tag if resume else None
    if resume:
        client = checkpoint.load(engine, run_dir, resume)
        if ema is not None and client.get("ema"):
            if ema.compatible(client["ema"]):  # this rank's own state
                ema.load_state_dict(client["ema"])
            else:  # another world size or layout: whole from the checkpoint's files, then re-split
                ema.load_full(checkpoint.consolidated_ema(run_dir, resume.tag), client["ema"]["updates"])
        how = f" through its universal form ({resume.reason})" if resume.universal else ""
        dist.print0(f"[train] resumed from {run_dir / checkpoint.CKPT / resume.tag}{how} at step {client['step']}")
        if resume.universal and dist.is_main():  # this run's later checkpoints are ordinary ones
            eng.write_ds_config(run_dir, eng.ds_config(cfg, world))
    step = int(client.get("step", 0))
    samples_seen = int(client.get("samples_seen", 0))
    nonfinite_total = int(client.get("nonfinite_total", 0))
    data, extra = build_data(cfg, encoders, client.get("loader"), micro_batch)

    # Tracking: rank 0 owns the MLflow run; its id lives in the checkpoint.
    tracker = Tracker(uri=cfg.resolved_tracking_uri, experiment=cfg.tracking.experiment,
                      run_name=cfg.tracking.run_name or run_dir.name, enabled=cfg.tracking.enabled and dist.is_main(),
                      system_metrics=cfg.tracking.system_metrics, max_buffer=cfg.tracking.max_buffer,
                      run_key=run_key_for(run_dir) if dist.is_main() else None)
    tracker.start(run_id=client.get("mlflow_run_id"))
    if not tag:
        tracker.log_params(config_mod.flatten(cfg))
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "ds_config.json")
    tracker.set_tags({"world_size": str(world), "n_params": str(n_params), "run_dir": str(run_dir.resolve())})

    schedule = Schedule.from_config(cfg.diffusion)
    evaluator = Evaluator(cfg, encoders, shapes, extra["heldout_parts"], (null_tokens, null_pooled), run_dir,
                          schedule)

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return unet_forward(engine, x.to(engine.dtype), t, {k: v.to(engine.dtype) for k, v in cond.items()})

    dist.print0(f"[train] {n_params / 1e6:.1f}M params, world {world}, micro-batch {micro_batch} x accum {accum}, "
                f"{data.steps_per_epoch // accum} steps/epoch, steps {step} -> {cfg.train.max_steps}, run {run_dir}")
    it = iter(data)
    last_ckpt_time = time.monotonic()
    window = {"loss": 0.0, "n": 0, "n_loss": 0, "wait": 0.0, "t0": time.perf_counter(), "samples": 0.0}
    overflow_total = 0  # fp16 steps DeepSpeed dropped while finding the loss scale
    metrics: dict[str, float] = {}
    nonfinite_run = 0
    unsynced = 0.0  # this rank's samples not yet added to samples_seen (all-reduced at log/checkpoint)
    preempted = False
    t_start, step_start = time.monotonic(), step
    status = "FAILED"
    watchdog = Watchdog(cfg.train.collective_timeout_s)
    try:
        while step < cfg.train.max_steps:
            watchdog.beat()
            engine.set_lr(eng.lr_at(cfg, step))

            # Forward and backward over the micro-batches of one optimizer step. A
            # non-finite loss on any rank in any micro-batch skips the whole step: the ranks
            # agree once, before the boundary, and the optimizer update becomes a no-op
            # (weights and Adam moments untouched). The backward passes still run, so
            # DeepSpeed's accumulation and reduction stay in step on every rank; the
            # gradients they leave are discarded at the boundary.
            local_bad = False
            step_loss = 0.0
            for micro in range(accum):
                t_wait = time.perf_counter()
                batch = next(it)
                window["wait"] += time.perf_counter() - t_wait
                gen = step_generator(cfg.train.seed, rank, step, micro)
                x0 = batch["latents"].to(device)  # (B, C, h, w)
                # Text arrives as fp16: move it first, so the fp32 promotion in cfg_drop
                # happens on the device and the host-to-device copy moves half the bytes.
                text, pooled, _ = cfg_drop(batch["text"].to(device), null_tokens.to(device),
                                           cfg.diffusion.cfg_dropout, gen, pooled=batch["pooled"].to(device),
                                           null_pooled=null_pooled.to(device))
                cond = {"text": text, "pooled": pooled}  # (B, L, D), (B, P)
                mask = batch["mask"].to(device)  # (B,) 0 for padding
                out = loss_fn(model_fn, x0, cond, cfg.diffusion, schedule, gen, mask=mask)
                loss = out["loss"]
                finite = bool(torch.isfinite(loss))
                local_bad |= not finite
                skip = dist.any_rank(local_bad) if micro == accum - 1 else False
                engine.backward(loss)
                applied = engine.step(skip=skip)
                step_loss += float(loss.detach()) / accum if finite else 0.0
                window["samples"] += float(mask.sum())
                unsynced += float(mask.sum())
            # DeepSpeed drops a step by itself when the gradients are not finite (ZeRO's
            # overflow check; under fp16 that is also how the loss scale finds its level).
            skipped = skip or (not applied and engine.dtype != torch.float16)
            overflowed = not skip and not applied and engine.dtype == torch.float16
            overflow_total += int(overflowed)
            if not skipped and not overflowed:
                window["loss"] += step_loss
                window["n_loss"] += 1

            # Count non-finite steps; abort after too many in a row.
            if skipped:
                nonfinite_total += 1
                nonfinite_run += 1
                dist.print0(f"[train] step {step}: non-finite loss or gradients, step skipped ({nonfinite_run} in a row)")
                if nonfinite_run >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{nonfinite_run} consecutive non-finite losses at step {step} (train.max_nonfinite_steps="
                        f"{cfg.train.max_nonfinite_steps}); lower optim.lr or check the data")
            else:
                nonfinite_run = 0

            # Update EMA (only with weights an optimizer step produced).
            if ema is not None and applied:
                ema.update(engine.ema_parameters(), step)
            step += 1
            window["n"] += 1

            # Log.
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                stats = dist.all_reduce_sum(torch.tensor([window["loss"], window["samples"], window["wait"],
                                                          unsynced], dtype=torch.float64, device=device))
                elapsed = time.perf_counter() - window["t0"]
                samples_seen += int(stats[3].item())
                unsynced = 0.0
                metrics = {
                    # Mean over ranks and over the window's applied steps (skipped ones have no loss).
                    "train/loss": stats[0].item() / world / window["n_loss"] if window["n_loss"] else float("nan"),
                    "train/lr": eng.lr_at(cfg, step - 1),
                    "train/grad_norm": engine.grad_norm(),
                    "train/samples_per_s": stats[1].item() / elapsed,
                    "train/data_wait_frac": stats[2].item() / world / elapsed,
                    "train/epoch": float(data.epoch),
                    "train/samples_seen": float(samples_seen),
                    "train/nonfinite_steps": float(nonfinite_total),
                }
                if engine.dtype == torch.float16:
                    metrics["train/overflow_steps"] = float(overflow_total)
                tracker.log_metrics(metrics, step=step)
                rate = (step - step_start) / max(time.monotonic() - t_start, 1e-9)
                eta = (cfg.train.max_steps - step) / rate if rate > 0 else float("nan")
                dist.print0(f"[train] step {step}/{cfg.train.max_steps} loss {metrics['train/loss']:.4f} "
                            f"lr {metrics['train/lr']:.2e} {metrics['train/samples_per_s']:.1f} samples/s "
                            f"data-wait {100 * metrics['train/data_wait_frac']:.1f}% ETA {eta / 60:.1f} min")
                window = {"loss": 0.0, "n": 0, "n_loss": 0, "wait": 0.0, "t0": time.perf_counter(), "samples": 0.0}

            # Checkpoint: every N steps, every M minutes, on demand (SIGUSR1 or RUN_DIR/SAVE_NOW,
            # which only rank 0 looks at), or on a preemption signal. The flags are agreed on
            # by all ranks (DeepSpeed's save is collective): one small all-reduce per step.
            flags = dist.all_reduce_max(torch.tensor(
                [float(STOP.signum is not None),
                 float(cfg.train.ckpt_every_minutes > 0
                       and time.monotonic() - last_ckpt_time > 60 * cfg.train.ckpt_every_minutes),
                 float(SAVE.signum is not None or (dist.is_main() and (run_dir / checkpoint.SAVE_NOW).exists()))],
                device=device))
            stop, timed, asked = bool(flags[0] > 0), bool(flags[1] > 0), bool(flags[2] > 0)
            every = cfg.train.ckpt_every_steps > 0 and step % cfg.train.ckpt_every_steps == 0
            if every or timed or stop or asked or step == cfg.train.max_steps:
                samples_seen += int(dist.all_reduce_sum(torch.tensor([unsynced], dtype=torch.float64,
                                                                     device=device)).item())
                unsynced = 0.0
                client_state = {
                    "step": step, "samples_seen": samples_seen, "loader": data.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None, "mlflow_run_id": tracker.run_id,
                    "config_hash": config_mod.config_hash(cfg), "nonfinite_total": nonfinite_total,
                    # What export and stand-alone eval need without the latent directory:
                    "shapes": shapes, "identity": identity, "scale": encoders.codec.scale,
                    "shift": encoders.codec.shift, "null_text": {"tokens": null_tokens, "pooled": null_pooled},
                }
                watchdog.beat()  # a save's own barriers are bounded by the same timeout
                checkpoint.save(engine, run_dir, step, client_state, cfg.train.keep_last)
                last_ckpt_time = time.monotonic()
                if asked:
                    SAVE.clear()
                    if dist.is_main():
                        (run_dir / checkpoint.SAVE_NOW).unlink(missing_ok=True)
                        print(f"[train] on-demand checkpoint at step {step}", flush=True)
            if stop:
                preempted = True
                dist.print0(f"[train] stop signal {STOP.signum}: checkpointed at step {step}, exiting for requeue")
                break

            # Evaluate.
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.train.max_steps:
                watchdog.pause()
                tracker.log_metrics(evaluator.run(engine, ema, step, tracker), step=step)

        watchdog.stop()
        if not preempted:
            tracker.log_metrics(evaluator.run(engine, ema, step, tracker), step=step)
        status = "KILLED" if preempted else "FINISHED"
    finally:
        # Shut the loader's DataLoader workers down now. On an error (a dead peer rank, a
        # non-finite abort) the traceback keeps this frame, and with it the iterator, alive
        # until interpreter exit, where multiprocessing would join workers that ignore
        # SIGTERM (data/loader.py) and wait forever.
        watchdog.stop()
        it.close()
        tracker.finish(status)
    return TrainResult(step=step, samples_seen=samples_seen, run_dir=run_dir, mlflow_run_id=tracker.run_id,
                       preempted=preempted, last_metrics=metrics)
