"""Evaluation: held-out denoising loss, a sample grid from fixed prompts, prompt adherence
on the synthetic shapes, FID and CLIP score. One `Evaluator` serves the periodic eval of
the training loop (`run`) and the stand-alone `latentforge eval` (`evaluate`, see
eval/standalone.py).

What one `evaluate(model, step, tracker, cfg_scale=s)` computes; every rank takes part:

    eval/loss_t{b}      held-out latents (this rank's share of the first eval.heldout_samples),
                        the loss at eval.heldout_buckets fixed timesteps; per-rank sums, one
                        all-reduce. Cheap; does not depend on guidance.
    grid                the fixed prompts (eval.prompts or the built-in shapes prompts) x
                        eval.images_per_prompt, with fixed noise per cell, dealt round-robin
                        over ranks; the few images are gathered to rank 0 -> samples/*.png.
    eval/shape_*        prompt adherence of the grid images (eval/adherence.py).
    eval/diversity_*    same-prompt against different-prompt distances in the grid
                        (eval/diversity.py; with eval.images_per_prompt >= 2).
    eval/fid            the FID set: the captions of the first eval.fid_num_images held-out
                        latents (their stored text embeddings), fixed noise per index,
                        dealt round-robin, sampled in batches of eval.fid_batch_size. Each
                        rank accumulates Inception statistics of its own images; one
                        all-reduce (eval/fid.py); images are never gathered. Reference: the
                        same held-out samples' posterior means decoded to pixels, so both
                        sides are at the training resolution and go through the identical
                        uint8 -> Inception path; cached on disk under a key of everything
                        that shaped them (dataset files, codec, count, resolution, Inception
                        weights, protocol) and reused across runs.
    eval/clip_score     CLIP score of (generated image, its prompt): the FID set when FID is
                        on (no extra sampling), else the grid. Per-rank sums, one all-reduce.

Without pretrained weights the same numbers are computed with seeded random networks and
logged as eval/fid_randinit and eval/clip_score_randinit, never under the real names
(README.md, "MLflow"). The full protocol (count, resolution, sampler, steps, CFG scale,
seed, weights hashes, reference key and cache hit) is written next to every evaluation as
`eval/protocol_step_XXXXXXXX[_cfgS].json` and logged as an MLflow artifact; its stable
parts also go to params `eval_protocol/*`.

Sampling uses a plain fp32 copy of the U-Net loaded with the EMA (or gathered raw)
weights, so it needs no collectives inside the forward pass, whatever the ZeRO stage. The
copy lives only for the duration of one periodic eval (an SD-2 U-Net is 3.5 GB in fp32:
kept between evals it would undo what ZeRO-3 saves). On a GPU the forward passes (sampling
and the held-out loss) run under torch.autocast in the training precision
(latentforge.dist.autocast); on a CPU in fp32, as before. The held-out loss runs in
batches of eval.heldout_batch_size.


A stop signal (SIGUSR2, SIGTERM, SIGINT: training/control.py) interrupts an evaluation at
the next batch boundary: before the held-out loss, before each batch of the FID reference
and of the FID set, before the grid. Every rank checks there (one tiny all-reduce; ranks
with fewer FID images still take part in every round), so all raise EvalInterrupted
together and the caller checkpoints (periodic) or closes its run (stand-alone).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge import dist
from latentforge.config import Config
from latentforge.data import latents as lat
from latentforge.data.buckets import sample_time_ids
from latentforge.data.buckets import time_ids as time_ids_of
from latentforge.data.loader import Finalize, finalize
from latentforge.data.sources import sources_of
from latentforge.eval.images import default_prompts, fid_noise, make_grid, noise_for, to_uint8_nchw
from latentforge.fileio import atomic_open, write_json
from latentforge.log import get_logger
from latentforge.training.control import check_stop
from latentforge.training.unet import add_lora, build_unet, unet_forward

log = get_logger("eval")


@dataclass
class FidSet:
    """This rank's share of the FID set: held-out samples i with i % world == rank."""

    total: int  # images in the whole set, all ranks
    indices: list[int]  # global index of each of this rank's samples
    captions: list[str]
    text: torch.Tensor  # (n, L, D) float32 stored caption embeddings
    pooled: torch.Tensor  # (n, P) float32
    means: list[torch.Tensor]  # n x (C, h, w) float32 unscaled posterior means (the reference images);
    #                            with buckets h, w vary from sample to sample
    time_ids: torch.Tensor  # (n, 6) float32 micro-conditioning: the sample's bucket, no crop
    dataset: dict[str, Any]  # what identifies the samples, for the reference-cache key

    def batches(self, bs: int) -> list[list[int]]:
        """This rank's samples in batches of up to `bs` of one latent shape, in order."""
        out: list[list[int]] = []
        for i, m in enumerate(self.means):
            if out and len(out[-1]) < bs and self.means[out[-1][0]].shape == m.shape:
                out[-1].append(i)
            else:
                out.append([i])
        return out


def _progress(what: str, done: int, total: int, t0: float, last: float) -> float:
    """A progress line of a long FID loop (rank 0's share) every 10 s and at its end.
    Returns when the last line was printed."""
    now = time.monotonic()
    if now - last <= 10 and done < total:
        return last
    rate = done / max(now - t0, 1e-9)
    log.info(f"{what}: rank 0 {done}/{total} images, {rate:.2f} images/s per rank, "
             f"ETA {(total - done) / max(rate, 1e-9) / 60:.1f} min")
    return now


class Evaluator:
    def __init__(self, cfg: Config, encoders: Any, shapes: dict[str, list[int]], heldout_parts: list[dict],
                 null_text: tuple[torch.Tensor, torch.Tensor], run_dir: Path, schedule: Any, *,
                 out_dir: Path | None = None):
        self.cfg = cfg
        self.encoders = encoders
        self.shapes = shapes
        self.run_dir = Path(run_dir)
        self.out_dir = Path(out_dir) if out_dir is not None else self.run_dir  # grids and protocols go here
        self.schedule = schedule
        self.heldout_parts = list(heldout_parts)
        # Held-out parts' files are relative to it (with several sources they are absolute);
        # every source's manifest has the same identity, so the first one's serves.
        self.latent_dir = sources_of(cfg)[0].latent_dir
        self.fid_skip = self._fid_skip_reason()  # None when FID runs
        self._check_settings()
        self.null_tokens, self.null_pooled = null_text
        self.prompts = default_prompts(cfg)
        emb = encoders.text.encode(self.prompts)
        self.prompt_tokens, self.prompt_pooled = emb.tokens.float().cpu(), emb.pooled.float().cpu()
        self.heldout = self._load_heldout(self.heldout_parts)  # None, or groups of one latent shape
        # Built on first use: Inception is ~100 MB and slow to build; the FID set and the
        # reference statistics are read or computed once per process.
        self._fid_set: FidSet | None = None
        self._inception: torch.nn.Module | None = None
        self._clip: Any = None
        self._reference: tuple[Any, dict[str, Any]] | None = None
        self._params_logged = False
        self._announced: set[str] = set()

    # ------------------------------------------------------------------------------
    # Setup.

    def _check_settings(self) -> None:
        """Bad eval settings and missing weight files fail now, at start-up, not at the
        first eval hours into training."""
        e = self.cfg.eval
        if e.fid_num_images < 0:
            raise ValueError(f"eval.fid_num_images: must be >= 0 (0 = no FID), got {e.fid_num_images}")
        if e.fid_batch_size <= 0:
            raise ValueError(f"eval.fid_batch_size: must be positive, got {e.fid_batch_size}")
        for s in e.cfg_sweep:
            if not (math.isfinite(s) and s >= 0):
                raise ValueError(f"eval.cfg_sweep: guidance scales must be finite and >= 0, got {s}")
        if self.fid_skip is None and e.inception_path and not Path(e.inception_path).is_file():
            from latentforge.eval import fid

            fid.load_inception(e.inception_path, "cpu")  # raises FileNotFoundError naming the path
        if e.clip_score and e.clip_pretrained:
            from latentforge.eval import clip_score as cs

            src = e.clip_pretrained
            if src.startswith(cs.LOCAL_DIR_PREFIX):
                cs._check_local_dir(src[len(cs.LOCAL_DIR_PREFIX):])
            elif not Path(src).is_file():
                raise FileNotFoundError(f"{cs.CLIP_CONFIG_KEY}: open_clip weights file not found: {src}")

    def _fid_skip_reason(self) -> str | None:
        if self.cfg.eval.fid_num_images == 0:
            return "eval.fid_num_images=0"
        if not self.heldout_parts:
            return "no held-out latents (data.heldout_shards=0, a single latent part, or no latent dataset)"
        if self.cfg.eval.fid_num_images == 1:
            return "eval.fid_num_images=1: a covariance needs at least 2 images"
        return None

    def _announce(self, what: str, msg: str) -> None:
        """Print a one-line note about metric `what` (a skip and its reason, or random
        weights) once per process, on rank 0."""
        if what not in self._announced:
            self._announced.add(what)
            log.info(msg)

    def _part_size(self, part: dict) -> tuple[int, int]:
        """The (height, width) a part's images were made at: its bucket, else data.resolution."""
        return tuple(part["size"]) if "size" in part else (self.cfg.data.resolution,) * 2  # type: ignore[return-value]

    def _load_heldout(self, parts: list[dict]) -> list[dict[str, torch.Tensor]] | None:
        """This rank's share of the first `eval.heldout_samples` held-out latents, grouped by
        latent shape (one group without buckets): [{"x0", "text", "pooled", "time_ids"}]."""
        if not parts or self.cfg.eval.heldout_samples <= 0:
            return None
        fin = Finalize(self.encoders.codec.scale, self.encoders.codec.shift, seed=self.cfg.eval.seed)
        groups: dict[tuple[int, ...], dict[str, list[torch.Tensor]]] = {}
        n = 0
        for pi, part in enumerate(parts):
            for idx, rec in enumerate(lat.read_part(self.latent_dir / part["file"])):
                if n >= self.cfg.eval.heldout_samples:
                    break
                if n % dist.world_size() == dist.rank():
                    g = groups.setdefault(tuple(rec.mean.shape), {"x0": [], "text": [], "pooled": [], "time_ids": []})
                    g["x0"].append(finalize(rec.mean, rec.std, fin, 0, pi, idx))
                    g["text"].append(torch.from_numpy(rec.text.astype(np.float32)))
                    g["pooled"].append(torch.from_numpy(rec.pooled.astype(np.float32)))
                    g["time_ids"].append(torch.tensor(sample_time_ids(rec.meta, self._part_size(part))))
                n += 1
        return [{k: torch.stack(v) for k, v in groups[shape].items()} for shape in sorted(groups)]

    def _load_fid_set(self) -> FidSet:
        """This rank's share of the first eval.fid_num_images held-out samples (file order)."""
        if self._fid_set is not None:
            return self._fid_set
        from latentforge.hashing import sha256_file

        want = self.cfg.eval.fid_num_images
        rank, world = dist.rank(), dist.world_size()
        latent_dir = self.latent_dir
        indices, captions, texts, pooled, means, time_ids = [], [], [], [], [], []
        used_parts: list[dict[str, Any]] = []
        n = 0
        for part in self.heldout_parts:
            if n >= want:
                break
            used_parts.append({"file": part["file"], "count": part["count"]})
            for rec in lat.read_part(latent_dir / part["file"]):
                if n >= want:
                    break
                if n % world == rank:
                    indices.append(n)
                    captions.append(rec.caption)
                    texts.append(torch.from_numpy(rec.text.astype(np.float32)))
                    pooled.append(torch.from_numpy(rec.pooled.astype(np.float32)))
                    means.append(torch.from_numpy(rec.mean.astype(np.float32)))
                    size = (rec.meta.get("target_height", self._part_size(part)[0]),
                            rec.meta.get("target_width", self._part_size(part)[1]))
                    time_ids.append(torch.tensor(time_ids_of(size, (0, 0), size)))
                n += 1
        if n < want:
            log.info(f"eval.fid_num_images={want} but only {n} held-out latents exist: FID uses {n} "
                     f"(the protocol records the count)")
        # The dataset identity: the encoders' identity hash and the bytes of every file the
        # samples came from. Hashed on rank 0 (cached per process) and broadcast, so every
        # rank uses the identical key.
        ident = None
        if dist.is_main():
            manifest = lat.load_manifest(latent_dir)
            ident = {"latent_identity_hash": manifest["identity_hash"],
                     "parts": [{**p, "sha256": sha256_file(latent_dir / p["file"])} for p in used_parts],
                     "samples": "first N held-out latents in file order; posterior mean decoded by the codec"}
        ident = dist.broadcast_object(ident)
        L, D = self.shapes["text"]
        (P,) = self.shapes["pooled"]
        self._fid_set = FidSet(
            total=n, indices=indices, captions=captions,
            text=torch.stack(texts) if texts else torch.zeros(0, L, D),
            pooled=torch.stack(pooled) if pooled else torch.zeros(0, P),
            means=means, time_ids=torch.stack(time_ids) if time_ids else torch.zeros(0, 6), dataset=ident)
        return self._fid_set

    def _inception_net(self) -> torch.nn.Module:
        if self._inception is None:
            from latentforge.eval import fid

            self._inception = fid.load_inception(self.cfg.eval.inception_path or None, dist.device())
            if self._inception.is_random:
                self._announce("eval/fid", f"{fid.INCEPTION_CONFIG_KEY} is empty: FID with a seeded random "
                                           f"Inception, logged as eval/fid_randinit")
        return self._inception

    def _clip_scorer(self) -> Any:
        if self._clip is None:
            from latentforge.eval import clip_score as cs

            self._clip = cs.load_clip_scorer(self.cfg.eval.clip_arch, self.cfg.eval.clip_pretrained or None,
                                             dist.device())
            if self._clip.is_random:
                self._announce("eval/clip_score", f"{cs.CLIP_CONFIG_KEY} is empty: CLIP score with a seeded "
                                                  f"random {self.cfg.eval.clip_arch} CLIP, logged as "
                                                  f"eval/clip_score_randinit")
        return self._clip

    def _eval_model(self, engine: Any, ema: Any) -> torch.nn.Module:
        """A plain fp32 U-Net on this rank's device with the weights to evaluate (built
        for one eval; the caller drops it)."""
        lora = bool(self.cfg.model.lora_rank)
        C, h, _ = self.shapes["latent"]
        model = build_unet(self.cfg.model, C, h, self.shapes["text"][-1], self.shapes["pooled"][-1])
        if lora:  # the same modules as the engine's: base layers and adapters
            add_lora(model, self.cfg.model)
        model.to(dist.device()).eval().requires_grad_(False)
        if ema is not None and self.cfg.eval.use_ema and not lora:
            ema.copy_to(model)
        else:  # LoRA: the frozen base from the engine, then its adapters' EMA over it
            with engine.full_parameters() as m, torch.no_grad():
                for (name, p), (name2, q) in zip(model.named_parameters(), m.named_parameters()):
                    p.copy_(q.detach().float())
            if ema is not None and self.cfg.eval.use_ema:
                ema.copy_to(model)
        return model

    def _forward(self, model: torch.nn.Module) -> Any:
        """model_fn(x, t, cond) of `model`, under autocast in the training precision on a GPU."""

        def model_fn(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
            with dist.autocast(self.cfg.train.precision):
                return unet_forward(model, x, t, cond).float()

        return model_fn

    # ------------------------------------------------------------------------------
    # Entry points.

    @torch.no_grad()
    def run(self, engine: Any, ema: Any, step: int, tracker: Any) -> dict[str, float]:
        """Periodic eval from the training loop: the weights to evaluate, then `evaluate`."""
        t0 = time.monotonic()
        model = self._eval_model(engine, ema)
        periodic = step < self.cfg.train.max_steps  # the loop's final eval runs at max_steps
        try:
            metrics = self.evaluate(model, step, tracker, weights="ema" if ema is not None and self.cfg.eval.use_ema
                                    else "raw", fid=not (periodic and self.cfg.eval.fid_final_only))
        finally:
            del model  # the fp32 copy goes now, not at the next eval
            if dist.device().type == "cuda":
                torch.cuda.empty_cache()  # and its memory back to the allocator's pool for training
        metrics["eval/time_s"] = time.monotonic() - t0
        log.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        return metrics

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int, tracker: Any, *, cfg_scale: float | None = None,
                 heldout: bool = True, suffix: str = "", weights: str = "", fid: bool = True) -> dict[str, float]:
        """All metrics of `model` (a plain U-Net on this rank's device) at guidance scale
        `cfg_scale` (default eval.cfg_scale). Collective: every rank calls it. Writes the
        grid and the protocol under out_dir (`suffix` tells sweep points apart) and logs
        them as artifacts; returns the metrics (the caller logs them). `fid=False` skips
        the FID set (a periodic eval under eval.fid_final_only)."""
        cfg_scale = self.cfg.eval.cfg_scale if cfg_scale is None else float(cfg_scale)
        model.eval()
        model_fn = self._forward(model)

        metrics: dict[str, float] = {}
        protocol: dict[str, Any] = {
            "step": step, "world_size": dist.world_size(), "weights": weights,
            "sampling": {"sampler": self.cfg.eval.sampler, "steps": self.cfg.eval.steps, "cfg_scale": cfg_scale,
                         "seed": self.cfg.eval.seed, "objective": self.cfg.diffusion.objective,
                         "prediction": self.cfg.diffusion.prediction},
        }
        if heldout:
            check_stop("held-out loss")
            metrics.update(self.heldout_metrics(model))
            protocol["heldout_loss"] = {"samples": self._heldout_total(), "buckets": self.cfg.eval.heldout_buckets}

        # FID and CLIP score on the FID set (CLIP falls back to the grid below).
        fid_skip = self.fid_skip if self.fid_skip is not None or fid else "eval.fid_final_only: a periodic eval"
        clip_on_grid = self.cfg.eval.clip_score and fid_skip is not None
        if fid_skip is None:
            fid_metrics, fid_protocol = self._fid_and_clip(model_fn, cfg_scale)
            metrics.update(fid_metrics)
            protocol.update(fid_protocol)
        else:
            self._announce(f"eval/fid {fid_skip}", f"eval/fid skipped: {fid_skip}")
            protocol["fid"] = {"skipped": fid_skip}
        if not self.cfg.eval.clip_score:
            self._announce("eval/clip_score", "eval/clip_score skipped: eval.clip_score=false")
            protocol["clip_score"] = {"skipped": "eval.clip_score=false"}

        # Sample grid (and CLIP score on it when there is no FID set), then adherence.
        check_stop("sample grid")
        grid_metrics, grid_protocol = self._grid(model_fn, step, tracker, cfg_scale, suffix, clip_on_grid)
        metrics.update(grid_metrics)
        protocol.update(grid_protocol)

        self._log_protocol(protocol, step, suffix, tracker)
        return metrics

    # ------------------------------------------------------------------------------
    # The pieces.

    def _heldout_total(self) -> int:
        n = 0 if self.heldout is None else sum(g["x0"].shape[0] for g in self.heldout)
        return int(dist.all_reduce_sum(torch.tensor([n], dtype=torch.float64, device=dist.device())).item())

    @torch.no_grad()
    def heldout_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """eval/loss_t{bucket} of `model` on the held-out latents: per-rank sums weighted by
        sample count, one all-reduce. Collective. Empty without held-out latents."""
        from latentforge.training.diffusion import heldout_loss

        if self.heldout is None:
            return {}
        model_fn = self._forward(model)
        device = dist.device()
        n = sum(grp["x0"].shape[0] for grp in self.heldout)
        g = torch.Generator().manual_seed(self.cfg.eval.seed + dist.rank())
        local: dict[str, float] = {}
        for grp in self.heldout:  # one latent shape each; the loss weighted by sample count
            cond = {k: grp[k].to(device) for k in ("text", "pooled", "time_ids")}
            part = heldout_loss(model_fn, grp["x0"].to(device), cond, self.cfg.diffusion, self.schedule,
                                self.cfg.eval.heldout_buckets, g, batch_size=self.cfg.eval.heldout_batch_size)
            for k, v in part.items():
                local[k] = local.get(k, 0.0) + v * grp["x0"].shape[0] / n
        keys = sorted(local) if local else None
        keys = dist.broadcast_object(keys, src=0) if dist.world_size() > 1 else keys
        out: dict[str, float] = {}
        if keys:
            vals = torch.tensor([local.get(k, 0.0) * n for k in keys] + [n], dtype=torch.float64, device=device)
            vals = dist.all_reduce_sum(vals)
            total = vals[-1].item()
            for k, v in zip(keys, vals[:-1].tolist()):
                out[f"eval/{k}"] = v / max(total, 1)
        return out

    def _sample(self, model_fn: Any, text: torch.Tensor, pooled: torch.Tensor, x_T: torch.Tensor,
                cfg_scale: float, time_ids: torch.Tensor) -> torch.Tensor:
        """Latents -> decoded images (N, 3, H, W) in [-1, 1] with classifier-free guidance.
        time_ids (N, 6): the micro-conditioning, the same for the unconditional half (as SD-XL)."""
        from latentforge.eval.sampling import sample

        device = dist.device()
        n = x_T.shape[0]
        cond = {"text": text.to(device), "pooled": pooled.to(device), "time_ids": time_ids.to(device)}
        uncond = {"text": self.null_tokens.expand(n, -1, -1).to(device),
                  "pooled": self.null_pooled.expand(n, -1).to(device), "time_ids": time_ids.to(device)}
        z = sample(model_fn, tuple(x_T.shape), cond, uncond, schedule=self.schedule,
                   diffusion_cfg=self.cfg.diffusion, sampler=self.cfg.eval.sampler, steps=self.cfg.eval.steps,
                   cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(self.cfg.eval.seed),
                   x_T=x_T.to(device))
        codec = self.encoders.codec
        return codec.decode(z.float() / codec.scale + codec.shift)

    def _reference_stats(self, fs: FidSet) -> tuple[Any, dict[str, Any]]:
        """Inception statistics of the FID set's real images, from the cache or computed
        (collectively) and cached. Returns (stats, protocol entry)."""
        if self._reference is not None:  # computed or loaded earlier in this process
            stats, entry = self._reference
            return stats, {**entry, "reused_in_process": True}
        from latentforge.eval import fid

        inception = self._inception_net()
        bs = self.cfg.eval.fid_batch_size
        C, h, w = self.shapes["latent"]
        resolution = h * self.encoders.codec.downsample
        cache_dir = Path(self.cfg.eval.fid_cache_dir) if self.cfg.eval.fid_cache_dir else \
            Path(self.cfg.run_root) / "fid_cache"
        key_parts = {"dataset": fs.dataset, "resolution": resolution, "num_images": fs.total,
                     "inception": inception.weights_sha256, "codec": self.encoders.codec.identity(),
                     "source": "heldout-latents/posterior-mean/codec-decode/uint8"}

        def compute() -> Any:
            log.info(f"FID reference statistics: {fs.total} held-out images at {resolution} px "
                     f"(computed once, cached in {cache_dir})")
            stats = fid.FeatureStats(device=dist.device())
            mine = fs.batches(bs)
            n_mine = len(fs.means)
            t0 = last = time.monotonic()
            for r in range(self._agreed_rounds(len(mine))):
                check_stop("FID reference")
                if r < len(mine):
                    idx = mine[r]
                    means = torch.stack([fs.means[i] for i in idx]).to(dist.device())  # (B, C, h, w), one shape
                    pix = self.encoders.codec.decode(means)  # (B, 3, H, W)
                    stats.update(fid.image_features(inception, to_uint8_nchw(pix), bs))
                    last = _progress("FID reference", idx[-1] + 1, n_mine, t0, last)
            return stats.all_reduce()

        stats, hit = fid.reference_stats(cache_dir, key_parts, compute)
        key = fid.reference_key(key_parts)
        entry = {"key": key, "hit": hit, "file": str(cache_dir / f"fid_ref_{key}.pt"), "count": stats.count,
                 "source": key_parts["source"], "dataset": fs.dataset}
        self._reference = (stats, entry)
        return self._reference

    def _fid_and_clip(self, model_fn: Any, cfg_scale: float) -> tuple[dict[str, float], dict[str, Any]]:
        """Generate this rank's share of the FID set batch by batch; accumulate Inception
        statistics and CLIP-score sums; one all-reduce each."""
        from latentforge.eval import clip_score as cs
        from latentforge.eval import fid

        fs = self._load_fid_set()
        inception = self._inception_net()
        ref, ref_entry = self._reference_stats(fs)  # first: a miss is computed collectively
        scorer = self._clip_scorer() if self.cfg.eval.clip_score else None
        bs = self.cfg.eval.fid_batch_size
        C, h, w = self.shapes["latent"]
        stats = fid.FeatureStats(device=dist.device())
        clip_sum, n_mine = 0.0, len(fs.means)
        t0 = last = time.monotonic()
        resolution = h * self.encoders.codec.downsample
        mine = fs.batches(bs)
        for r in range(self._agreed_rounds(len(mine))):
            check_stop("FID set")
            if r >= len(mine):  # this rank's share is done; it still meets the others at each boundary
                continue
            pos = mine[r]  # each batch at its own samples' latent shape
            x_T = torch.stack([fid_noise(self.cfg.eval.seed, fs.indices[i], tuple(fs.means[i].shape))
                               for i in pos])  # (B, C, h, w)
            sel = torch.tensor(pos)
            u8 = to_uint8_nchw(self._sample(model_fn, fs.text[sel], fs.pooled[sel], x_T, cfg_scale, fs.time_ids[sel]))
            resolution = u8.shape[-1]
            stats.update(fid.image_features(inception, u8, bs))  # (B, 2048)
            if scorer is not None:
                clip_sum += float(scorer.score(u8, [fs.captions[i] for i in pos]).double().sum())
            last = _progress(f"FID set (cfg {cfg_scale:g})", pos[-1] + 1, n_mine, t0, last)
        stats.all_reduce()
        value = fid.fid_from_stats(stats, ref)
        metrics = {inception.metric_name: value}
        protocol: dict[str, Any] = {"fid": {
            "metric": inception.metric_name, "value": value, "count": stats.count, "resolution": resolution,
            "prompts": f"captions of the first {fs.total} held-out latents (file order)",
            "noise": "fid_noise(eval.seed, index): per image, independent of the rank layout",
            "batch_size": bs, "fid_protocol": fid.FID_PROTOCOL, "inception": fid.inception_protocol(inception),
            "reference": ref_entry}}
        if scorer is not None:
            value = cs.mean_over_ranks(clip_sum, n_mine)
            metrics[scorer.metric_name] = value
            protocol["clip_score"] = {**scorer.protocol(), "value": value, "pairs": fs.total,
                                      "set": "FID set (generated image, its held-out caption)"}
        return metrics, protocol

    @staticmethod
    def _agreed_rounds(n: int) -> int:
        """The most batches any rank has of a FID loop whose batches each hold one latent
        shape (collective): every rank walks through as many batch boundaries."""
        return int(dist.all_reduce_max(torch.tensor([float(n)], device=dist.device())).item())

    def _grid(self, model_fn: Any, step: int, tracker: Any, cfg_scale: float, suffix: str,
              with_clip: bool) -> tuple[dict[str, float], dict[str, Any]]:
        """Sample grid: cells (prompt i, image j) dealt round-robin over ranks, gathered to
        rank 0 (a few small images) for the PNG and the adherence score."""
        from latentforge.eval import clip_score as cs

        per = self.cfg.eval.images_per_prompt
        cells = [(i, j) for i in range(len(self.prompts)) for j in range(per)]
        mine = cells[dist.rank()::dist.world_size()]
        shape, ids = self.grid_geometry()
        images: list[tuple[tuple[int, int], np.ndarray]] = []
        scorer = self._clip_scorer() if with_clip else None
        clip_sum = 0.0
        if mine:
            idx = torch.tensor([i for i, _ in mine])
            x_T = torch.stack([noise_for(self.cfg.eval.seed, i, j, shape) for i, j in mine])
            u8 = to_uint8_nchw(self._sample(model_fn, self.prompt_tokens[idx], self.prompt_pooled[idx], x_T,
                                            cfg_scale, torch.tensor([ids] * len(mine))))  # (n, 3, H, W)
            if scorer is not None:
                clip_sum = float(scorer.score(u8, [self.prompts[i] for i, _ in mine]).double().sum())
            images = list(zip(mine, u8.permute(0, 2, 3, 1).numpy()))
        metrics: dict[str, float] = {}
        protocol: dict[str, Any] = {"grid": {"prompts": self.prompts, "images_per_prompt": per, "time_ids": ids,
                                             "noise": "noise_for(eval.seed, prompt, image)"}}
        if scorer is not None:
            value = cs.mean_over_ranks(clip_sum, len(mine))
            metrics[scorer.metric_name] = value
            protocol["clip_score"] = {**scorer.protocol(), "value": value, "pairs": len(cells),
                                      "set": "sample grid (generated image, its fixed prompt)"}
        gathered = dist.all_gather_object(images)
        if dist.is_main():
            cells_img = dict(item for part in gathered for item in part)
            grid_images = np.stack([cells_img[c] for c in cells])
            grid = make_grid(grid_images, self.prompts, per)
            name = f"step_{step:08d}{suffix}.png"
            out = self.out_dir / "samples" / name
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(out) as f:
                grid.save(f, format="PNG")
            tracker.log_image(grid, f"samples/{name}")
            metrics.update(self._adherence(grid_images, [self.prompts[i] for i, _ in cells]))
            if per > 1:  # two samples of one prompt must differ (eval/diversity.py)
                from latentforge.eval.diversity import diversity

                d = diversity(grid_images, [i for i, _ in cells])
                metrics.update({f"eval/diversity_{k}": v for k, v in d.items()})
        # Rank 0 alone scored adherence; the others learn the numbers so every rank returns
        # the same metrics (the stand-alone sweep tabulates them on rank 0 only, but a
        # caller must not see rank-dependent keys).
        return dist.broadcast_object(metrics), protocol

    def grid_geometry(self) -> tuple[tuple[int, int, int], list[float]]:
        """(latent shape, micro-conditioning) of grid samples: eval.sample_size (default the
        dataset's nominal size) with the crop eval.sample_crop."""
        from latentforge.eval.sampling import sample_geometry

        C, h, w = self.shapes["latent"]
        d = self.encoders.codec.downsample
        size = tuple(self.cfg.eval.sample_size) if self.cfg.eval.sample_size[0] else (h * d, w * d)
        return sample_geometry(C, d, size, tuple(self.cfg.eval.sample_crop))

    def _adherence(self, images: np.ndarray, prompts: list[str]) -> dict[str, float]:
        """Prompt adherence on synthetic-shapes prompts (skipped if none parse)."""
        from latentforge.eval import adherence

        s = adherence.score(list(images), prompts)
        if not s.get("count", 0):
            return {}
        return {f"eval/shape_{k}" if k != "adherence" else "eval/shape_adherence": v
                for k, v in s.items() if k in ("adherence", "shape", "color", "size", "position", "background")}

    def _log_protocol(self, protocol: dict[str, Any], step: int, suffix: str, tracker: Any) -> None:
        """The protocol JSON next to the grids and as an artifact; its stable parts as params."""
        if not dist.is_main():
            return
        path = self.out_dir / "eval" / f"protocol_step_{step:08d}{suffix}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, protocol)
        tracker.log_artifact(path, "eval")
        if self._params_logged:
            return
        self._params_logged = True
        params: dict[str, Any] = {}
        if "fid" in protocol and "skipped" not in protocol["fid"]:
            f = protocol["fid"]
            params.update({"eval_protocol/fid_metric": f["metric"], "eval_protocol/fid_count": f["count"],
                           "eval_protocol/fid_resolution": f["resolution"],
                           "eval_protocol/fid_protocol": f["fid_protocol"],
                           "eval_protocol/inception_sha256": f["inception"]["weights_sha256"],
                           "eval_protocol/fid_reference_key": f["reference"]["key"]})
        if "clip_score" in protocol and "skipped" not in protocol["clip_score"]:
            c = protocol["clip_score"]
            params.update({"eval_protocol/clip_metric": c["metric"], "eval_protocol/clip_arch": c["arch"],
                           "eval_protocol/clip_sha256": c["weights_sha256"], "eval_protocol/clip_pairs": c["pairs"]})
        if params:
            tracker.log_params(params)
