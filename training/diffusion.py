"""The diffusion objective: noise schedules, forward process, targets, loss weighting.

Pure functions and one frozen container (`Schedule`). No module state, no devices picked
here, no torch.distributed: every random number comes from an explicit CPU
`torch.Generator` and is then moved to the data's device, so training randomness is a
pure function of (seed, rank, step) and does not depend on the accelerator's RNG.

Notation (Kingma et al. 2021 "Variational Diffusion Models"; Salimans & Ho 2022):

    x0      clean latents                                  (N, C, H, W)
    eps     standard Gaussian noise                        (N, C, H, W)
    t       the model's timestep input                     (N,)
              ddpm: long in [0, T)       (an index into the schedule)
              flow: float in [0, 1000]   (= tau * 1000, so the same time embedding works)
    ac_t    alphas_cumprod[t] (ddpm only), "alpha-bar" in Ho et al. 2020
    alpha   signal scale:  ddpm sqrt(ac_t);   flow 1 - tau
    sigma   noise scale:   ddpm sqrt(1-ac_t); flow tau
    x_t     alpha * x0 + sigma * eps                       (N, C, H, W)
    snr     alpha**2 / sigma**2

Objectives:
    ddpm  discrete variance-preserving diffusion; the network predicts eps, v or x0
          ("sample"). v = alpha * eps - sigma * x0 (Salimans & Ho 2022, section 4).
    flow  rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): x_t = (1-tau) x0 + tau eps,
          tau ~ logit-normal(diffusion.flow_logit_mean, diffusion.flow_logit_std) (a fraction
          diffusion.flow_tail_frac of it uniform on [flow_tail_from, 1)), and the network predicts the velocity
          dx_t/dtau = eps - x0. Config names that with `prediction = "v"`; eps/sample
          prediction, Min-SNR weighting and zero-terminal-SNR are ddpm-only and refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from latentforge.config import ConfigError, DiffusionConfig, validate_diffusion

# Rectified-flow time tau in [0, 1] enters the network as tau * FLOW_TIME_SCALE, the
# range of the discrete timesteps the U-Net time embedding was designed for.
FLOW_TIME_SCALE = 1000.0

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


# ---------------------------------------------------------------------------------------
# Beta schedules.


def make_betas(kind: str, num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Per-step noise variances beta_t, (T,) float64.

    linear         linspace(beta_start, beta_end) (Ho et al. 2020).
    scaled_linear  linspace(sqrt(beta_start), sqrt(beta_end)) ** 2 (Stable Diffusion / LDM).
    cosine         Nichol & Dhariwal 2021, eq. 17 ("squaredcos_cap_v2"): ac(t) follows
                   cos((t/T + s) / (1 + s) * pi/2)**2 with s = 0.008, betas capped at 0.999.
                   beta_start and beta_end are not used.
    """
    if num_timesteps < 1:
        raise ConfigError(f"diffusion.num_train_timesteps: must be >= 1, got {num_timesteps}")
    if kind in ("linear", "scaled_linear"):
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ConfigError(f"diffusion.beta_start/beta_end: need 0 < beta_start <= beta_end < 1, "
                              f"got {beta_start}, {beta_end}")
        if kind == "linear":
            return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008

        def alpha_bar(u: torch.Tensor) -> torch.Tensor:
            return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        i = torch.arange(num_timesteps, dtype=torch.float64)
        betas = 1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps)
        return betas.clamp(max=0.999)
    raise ConfigError(f"diffusion.schedule: expected linear, scaled_linear or cosine, got {kind!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1: shift and scale sqrt(ac) so that ac[-1] = 0 (pure noise at the last step)
    while ac[0] is unchanged. Returns float64 betas, (T,); the last beta becomes 1."""
    betas = betas.to(torch.float64)
    ab_sqrt = torch.cumprod(1 - betas, 0).sqrt()  # (T,)
    a0, a_last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - a_last) * (a0 / (a0 - a_last))  # ab_sqrt[-1] = 0, ab_sqrt[0] = a0
    ab = ab_sqrt**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])  # undo the cumprod
    return 1 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ac_t = prod_{s <= t} (1 - beta_s), (T,) float64."""
    return torch.cumprod(1 - betas.to(torch.float64), 0)


# ---------------------------------------------------------------------------------------
# The schedule container.


@dataclass(frozen=True, eq=False)
class Schedule:
    """Everything the objective and the samplers need to know about the noise process.

    A plain container: tensors live on the CPU in float64; `alpha`, `sigma` and `snr`
    return float64 CPU tensors of shape (N,) and `coef` moves them next to the data.
    For objective "flow" `betas`/`alphas_cumprod` are still filled from the config's
    beta schedule but nothing uses them.
    """

    objective: str  # "ddpm" or "flow"
    prediction: str  # "eps", "v" or "sample" (flow: "v" = the velocity eps - x0)
    betas: torch.Tensor  # (T,) float64
    alphas_cumprod: torch.Tensor  # (T,) float64
    zero_terminal_snr: bool = False  # betas were rescaled with rescale_zero_terminal_snr
    flow_logit_mean: float = 0.0  # flow: mean of the logit-normal training timesteps
    flow_logit_std: float = 1.0  # flow: their standard deviation (in logit space)
    flow_tail_frac: float = 0.0  # flow: the fraction of training timesteps drawn uniform on [flow_tail_from, 1)
    flow_tail_from: float = 0.9  # flow: where that high-noise band starts

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "Schedule":
        """Build and validate. Combinations that cannot work raise ConfigError naming the field."""
        validate_diffusion(cfg)
        betas = make_betas(cfg.schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
        if cfg.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(objective=cfg.objective, prediction=cfg.prediction, betas=betas,
                   alphas_cumprod=alphas_cumprod(betas), zero_terminal_snr=cfg.zero_terminal_snr,
                   flow_logit_mean=cfg.flow_logit_mean, flow_logit_std=cfg.flow_logit_std,
                   flow_tail_frac=cfg.flow_tail_frac, flow_tail_from=cfg.flow_tail_from)

    # The model's timestep input -> schedule quantities. All (N,) float64 on the CPU.

    def _index(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            raise ValueError(f"objective 'ddpm' takes integer timesteps, got dtype {t.dtype}")
        t = t.cpu()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}), "
                             f"got [{int(t.min())}, {int(t.max())}]")
        return t

    def tau(self, t: torch.Tensor) -> torch.Tensor:
        """Flow time tau = t / 1000 in [0, 1]; (N,) float64."""
        if self.objective != "flow":
            raise ValueError("tau() is defined for objective 'flow' only")
        return t.detach().cpu().to(torch.float64) / FLOW_TIME_SCALE

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Signal scale of x_t: sqrt(ac_t) (ddpm) or 1 - tau (flow); (N,) float64."""
        if self.objective == "flow":
            return 1 - self.tau(t)
        return self.alphas_cumprod[self._index(t)].sqrt()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise scale of x_t: sqrt(1 - ac_t) (ddpm) or tau (flow); (N,) float64.
        (Not the k-diffusion/EDM sigma, which is sigma / alpha.)"""
        if self.objective == "flow":
            return self.tau(t)
        return (1 - self.alphas_cumprod[self._index(t)]).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """alpha**2 / sigma**2; (N,) float64. 0 at a zero-terminal-SNR last step."""
        if self.objective == "flow":
            tau = self.tau(t)
            return ((1 - tau) / tau) ** 2
        ac = self.alphas_cumprod[self._index(t)]
        return ac / (1 - ac)


def coef(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) per-sample coefficients -> (N, 1, 1, ...) in `like`'s dtype and device. The copy to
    the device is asynchronous: the training step must not wait for the device."""
    return c.to(dtype=like.dtype).to(like.device, non_blocking=True).reshape(-1, *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------------------------------
# Forward process, targets and conversions.


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t eps: sqrt(ac_t) x0 + sqrt(1-ac_t) eps for ddpm,
    (1 - tau) x0 + tau eps for flow. Shapes (N, ...) -> (N, ...)."""
    return coef(schedule.alpha(t), x0) * x0 + coef(schedule.sigma(t), x0) * eps


def target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
           schedule: Schedule) -> torch.Tensor:
    """What the network is trained to output at (x_t, t). (N, ...)

    ddpm: eps -> eps; v -> alpha eps - sigma x0 (Salimans & Ho 2022, eq. 9's v);
    sample -> x0. flow: the velocity eps - x0 (Liu et al. 2022, eq. 1).
    """
    if schedule.objective == "flow":
        if prediction != "v":
            raise ValueError(f"prediction: objective 'flow' predicts the velocity ('v'), got {prediction!r}")
        return eps - x0
    if prediction == "eps":
        return eps
    if prediction == "v":
        return coef(schedule.alpha(t), x0) * eps - coef(schedule.sigma(t), x0) * x0
    if prediction == "sample":
        return x0
    raise ValueError(f"prediction: expected eps, v or sample, got {prediction!r}")


def pred_to_x0_eps(prediction: str, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat), each like x_t, from the network's output at (x_t, t).

    Every branch is affine in `model_out`, which is why classifier-free guidance can be
    applied to the raw output of any parameterisation and equal guidance on eps.
    """
    if schedule.objective == "flow":
        if prediction != "v":
            raise ValueError(f"prediction: objective 'flow' predicts the velocity ('v'), got {prediction!r}")
        tau = coef(schedule.tau(t), x_t)
        # x_t = (1-tau) x0 + tau eps and u = eps - x0  =>  x0 = x_t - tau u, eps = x_t + (1-tau) u.
        return x_t - tau * model_out, x_t + (1 - tau) * model_out
    a, s = coef(schedule.alpha(t), x_t), coef(schedule.sigma(t), x_t)
    if prediction == "eps":
        # Undefined where a = 0 (zero terminal SNR); Schedule.from_config refuses that pairing.
        return (x_t - s * model_out) / a, model_out
    if prediction == "v":
        # Variance preserving (a^2 + s^2 = 1): x0 = a x_t - s v, eps = s x_t + a v.
        return a * x_t - s * model_out, s * x_t + a * model_out
    if prediction == "sample":
        return model_out, (x_t - a * model_out) / s  # s > 0 for every ddpm step (beta_0 > 0)
    raise ValueError(f"prediction: expected eps, v or sample, got {prediction!r}")


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy", eq. 6 and section 3.4), (N,) like `snr`.

    The x0-space weight min(snr, gamma) rewritten for the loss on each target:
    eps: min(snr, gamma) / snr;  v: min(snr, gamma) / (snr + 1);  sample: min(snr, gamma).
    gamma = 0 turns weighting off (ones). At snr = 0 (a zero-terminal-SNR last step) each
    formula takes its limit snr -> 0+: eps 1, v 0, sample 0, never NaN/inf.
    """
    if gamma < 0:
        raise ValueError(f"diffusion.min_snr_gamma: must be >= 0, got {gamma}")
    if gamma == 0:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)  # min(snr, gamma)
    if prediction == "eps":
        # min(snr, gamma)/snr = 1 for 0 < snr <= gamma; the where keeps snr = 0 at its limit 1.
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "sample":
        return clipped
    raise ValueError(f"prediction: expected eps, v or sample, got {prediction!r}")


# ---------------------------------------------------------------------------------------
# Random draws (CPU generator only).


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("generator: expected a CPU torch.Generator (random numbers are drawn on the CPU "
                         "and moved to the data's device so results do not depend on the device)")


def offset_noise(shape: tuple[int, ...] | torch.Size, strength: float, generator: torch.Generator) -> torch.Tensor:
    """eps + strength * per-(N, C) constant noise (Guttenberg 2023, "Diffusion with Offset
    Noise"), float32 on the CPU, of `shape` (N, C, ...). The per-channel offset lets the
    model learn to shift an image's mean brightness. strength = 0 draws only eps, so the
    random stream equals plain Gaussian noise."""
    _check_generator(generator)
    if strength < 0:
        raise ValueError(f"diffusion.offset_noise: must be >= 0, got {strength}")
    shape = tuple(shape)
    eps = torch.randn(shape, generator=generator)  # (N, C, H, W)
    if strength > 0:
        eps = eps + strength * torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=generator)  # (N, C, 1, 1)
    return eps


def sample_timesteps(n: int, schedule: Schedule, generator: torch.Generator) -> torch.Tensor:
    """Training timesteps, (n,) on the CPU: ddpm uniform long in [0, T); flow
    tau = sigmoid(u), u ~ N(flow_logit_mean, flow_logit_std^2) (logit-normal, SD3 section 3.1), returned as
    tau * 1000 float32. With flow_tail_frac > 0, that fraction of the draws (each draw
    independently) is instead uniform on [flow_tail_from, 1): the high-noise band the
    logit-normal leaves almost untrained (N(0, 1): 1.4% of draws above 0.9), where the
    sampler's first steps settle what the whole image shares, such as its background."""
    _check_generator(generator)
    if schedule.objective == "flow":
        u = torch.randn(n, generator=generator)
        if schedule.flow_logit_std != 1.0:  # (the default keeps the stream of u exactly)
            u = u * schedule.flow_logit_std
        tau = torch.sigmoid(u + schedule.flow_logit_mean)
        if schedule.flow_tail_frac > 0:  # (off, nothing more is drawn: the stream stays the logit-normal's)
            pick, r = torch.rand(2, n, generator=generator)
            tail = schedule.flow_tail_from + (1.0 - schedule.flow_tail_from) * r
            tau = torch.where(pick < schedule.flow_tail_frac, tail, tau)
        return tau * FLOW_TIME_SCALE
    return torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator)


def where_dropped(dropped: torch.Tensor, x: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """Rows of `x` (N, ...) where `dropped` (N,) bool is set, replaced by `null` (...)."""
    null = null.to(dtype=x.dtype, device=x.device, non_blocking=True)
    if null.dim() == x.dim() - 1:
        null = null.unsqueeze(0)
    m = dropped.to(x.device, non_blocking=True).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.where(m, null, x)


def cfg_drop(cond_tokens: torch.Tensor, null_tokens: torch.Tensor, p: float, generator: torch.Generator,
             pooled: torch.Tensor | None = None, null_pooled: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, ...]:
    """Caption dropout for classifier-free guidance (Ho & Salimans 2022, section 3.2).

    cond_tokens (N, L, D), null_tokens (L, D) or (1, L, D): the empty caption's precomputed
    embedding. Each row is replaced by the null embedding with probability p.
    Returns (tokens (N, L, D), dropped (N,) bool), or with `pooled` (N, D') and
    `null_pooled` (D') also given, (tokens, pooled, dropped) with the same rows dropped:
    the mask always comes last.
    Always draws N uniforms, so the random stream does not depend on p. Use
    `where_dropped` for anything else that must follow (e.g. a token mask).
    """
    _check_generator(generator)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"diffusion.cfg_dropout: expected a probability in [0, 1), got {p}")
    if null_tokens.shape[-2:] != cond_tokens.shape[-2:]:
        raise ValueError(f"null_tokens: shape {tuple(null_tokens.shape)} does not match cond_tokens "
                         f"{tuple(cond_tokens.shape)} in (L, D)")
    n = cond_tokens.shape[0]
    dropped = torch.rand(n, generator=generator) < p  # (N,) bool, CPU
    tokens = where_dropped(dropped, cond_tokens, null_tokens)
    dropped = dropped.to(cond_tokens.device, non_blocking=True)
    if pooled is None:
        return tokens, dropped
    if null_pooled is None:
        raise ValueError("null_pooled: needed when pooled is given (the empty caption's pooled embedding)")
    return tokens, where_dropped(dropped, pooled, null_pooled), dropped


# ---------------------------------------------------------------------------------------
# Losses.


def _check_cfg(cfg: DiffusionConfig, schedule: Schedule) -> None:
    if cfg.objective != schedule.objective or cfg.prediction != schedule.prediction:
        raise ValueError(f"schedule: built for objective={schedule.objective!r} prediction={schedule.prediction!r} "
                         f"but diffusion config says {cfg.objective!r}/{cfg.prediction!r}")


def loss_fn(model_fn: ModelFn, x0: torch.Tensor, cond: Any, cfg: DiffusionConfig, schedule: Schedule,
            generator: torch.Generator, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The training loss for one (micro-)batch.

    model_fn(x_t (N, C, H, W), t (N,), cond) -> prediction (N, C, H, W).
    Draws, in this order from `generator` on the CPU: t (N,), then the noise (with offset
    noise if configured). Returns
      loss        scalar, sum(w * mask * mse) / N: padded samples count as zeros, not as
                  absent, so a fully masked batch gives exactly 0 and per-rank losses of
                  equal N average consistently;
      per_sample  (N,) float32, w * mse (Min-SNR weight w, ones when off), before masking;
      mse         (N,) float32, unweighted mean over C, H, W of (prediction - target)^2;
      t           (N,) the timesteps given to model_fn (long for ddpm, float for flow).
    """
    _check_cfg(cfg, schedule)
    n = x0.shape[0]
    t = sample_timesteps(n, schedule, generator)  # (N,) CPU
    eps = offset_noise(x0.shape, cfg.offset_noise, generator).to(device=x0.device, dtype=x0.dtype, non_blocking=True)
    x_t = add_noise(x0, eps, t, schedule)  # (N, C, H, W)
    t_dev = t.to(x0.device, non_blocking=True)
    out = model_fn(x_t, t_dev, cond)
    if out.shape != x0.shape:
        raise ValueError(f"model_fn: returned shape {tuple(out.shape)}, expected {tuple(x0.shape)}")
    tgt = target(schedule.prediction, x0.float(), eps.float(), t, schedule)
    mse = ((out.float() - tgt) ** 2).flatten(1).mean(1)  # (N,)
    if schedule.objective == "ddpm":
        w = min_snr_weight(schedule.snr(t), cfg.min_snr_gamma, schedule.prediction)
        per_sample = mse * w.to(dtype=mse.dtype).to(mse.device, non_blocking=True)
    else:
        per_sample = mse
    if mask is None:
        loss = per_sample.sum() / n
    else:
        if mask.shape != (n,):
            raise ValueError(f"mask: expected shape ({n},), got {tuple(mask.shape)}")
        loss = (per_sample * mask.to(device=per_sample.device, dtype=per_sample.dtype)).sum() / n
    return {"loss": loss, "per_sample": per_sample, "mse": mse, "t": t_dev}


def bucket_timesteps(buckets: int, schedule: Schedule) -> list[int]:
    """Centres of `buckets` equal timestep ranges, as the model's timestep: for T = 1000 and
    4 buckets, [125, 375, 625, 875]. Flow uses the same numbers on its 0..1000 time axis."""
    total = schedule.num_train_timesteps if schedule.objective == "ddpm" else int(FLOW_TIME_SCALE)
    if not 1 <= buckets <= total:
        raise ValueError(f"eval.heldout_buckets: expected 1..{total}, got {buckets}")
    return [(total * (2 * i + 1)) // (2 * buckets) for i in range(buckets)]


@torch.no_grad()
def heldout_loss(model_fn: ModelFn, x0: torch.Tensor, cond: Any, cfg: DiffusionConfig, schedule: Schedule,
                 buckets: int, generator: torch.Generator, batch_size: int | None = None) -> dict[str, float]:
    """Unweighted denoising loss (MSE to the prediction target, mean over samples and
    C, H, W) at fixed timestep buckets, for `eval/loss_t{bucket}`.

    One noise draw (plain N(0, I): the forward process the sampler inverts, without the
    offset-noise training trick) is shared by all buckets, so the buckets differ only in t.
    The model sees at most `batch_size` samples per call (None: all at once); the noise is
    drawn for all samples first, so the result does not depend on the batch size (up to
    fp32 summation order). `cond`: a dict of (N, ...) tensors, cut like x0 (anything else is
    passed as it is).
    Returns {"loss_t125": ..., "loss_t375": ..., ...} keyed by the model's timestep.
    """
    _check_cfg(cfg, schedule)
    _check_generator(generator)
    n = x0.shape[0]
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"eval.heldout_batch_size: must be >= 1, got {batch_size}")
    bs = n if batch_size is None else batch_size
    eps = torch.randn(tuple(x0.shape), generator=generator).to(device=x0.device, dtype=x0.dtype)
    out: dict[str, float] = {}
    for tb in bucket_timesteps(buckets, schedule):
        if schedule.objective == "flow":
            t = torch.full((n,), float(tb), dtype=torch.float32)
        else:
            t = torch.full((n,), tb, dtype=torch.long)
        sq_sum = 0.0  # sum of squared errors over samples and elements, in float64
        for i in range(0, n, bs):
            x0_b, eps_b, t_b = x0[i:i + bs], eps[i:i + bs], t[i:i + bs]
            x_t = add_noise(x0_b, eps_b, t_b, schedule)
            cond_b = {k: v[i:i + bs] for k, v in cond.items()} if isinstance(cond, dict) else cond
            pred = model_fn(x_t, t_b.to(x0.device), cond_b)
            tgt = target(schedule.prediction, x0_b.float(), eps_b.float(), t_b, schedule)
            sq_sum += float(((pred.float() - tgt) ** 2).sum(dtype=torch.float64))
        out[f"loss_t{tb}"] = sq_sum / max(1, x0.numel())
    return out
