"""Samplers with classifier-free guidance.

`sample()` is the entry point. It draws the starting noise from a CPU generator, wraps
the network in classifier-free guidance and hands both to one of the samplers below.
Every sampler has the same signature,

    sampler(denoise, x_T, *, schedule, steps) -> x_0

where `denoise(x_t, t) -> model output` is the guided network in the schedule's
parameterisation (eps, v, sample, or flow velocity), `x_T` is unit Gaussian noise
(N, C, H, W) and the result is a sample of the data (N, C, H, W). All N prompts are
sampled together; the guided network makes one batched call of 2N per step.

Samplers by (objective, name):
    ddpm  ddim    DDIM, eta = 0 (Song et al. 2021), written out below, "trailing" timesteps
    ddpm  dpm++   DPM-Solver++(2M) (Lu et al. 2022) via diffusers DPMSolverMultistepScheduler
    ddpm  euler   Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1 without
                  churn) via diffusers EulerDiscreteScheduler
    flow  euler   Euler on the rectified-flow ODE from tau = 1 to tau = 0
    flow  ddim    the same integrator: for x_t = (1-tau) x0 + tau eps a DDIM step
                  (1-tau') x0_hat + tau' eps_hat equals x_t + (tau' - tau) * velocity
    flow  dpm++   DPM-Solver++(2M) with diffusers' flow sigmas (use_flow_sigmas)

diffusers schedulers are built from our Schedule's betas (`trained_betas`), never
downloaded. The timesteps the network sees always come from the same "trailing" spacing
(Lin et al. 2023, Table 2: the first step is at t = T-1, where a zero-terminal-SNR
schedule is pure noise; "leading" would start at T - T/steps and never see it).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from latentforge.config import DiffusionConfig
from latentforge.data.buckets import time_ids
from latentforge.training.diffusion import FLOW_TIME_SCALE, ModelFn, Schedule, pred_to_x0_eps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (N, C, H, W), t (N,)) -> output
Sampler = Callable[..., torch.Tensor]


# ---------------------------------------------------------------------------------------
# Classifier-free guidance.


def _expand(c: Any, n: int) -> Any:
    """Broadcast a conditioning tree (tensor, dict, tuple/list, None) to batch size n."""
    if c is None:
        return None
    if isinstance(c, dict):
        return {k: _expand(v, n) for k, v in c.items()}
    if isinstance(c, (tuple, list)):
        return type(c)(_expand(v, n) for v in c)
    if not isinstance(c, torch.Tensor):
        raise ValueError(f"cond: expected tensors (or a dict/tuple of them), got {type(c).__name__}")
    return c.expand(n, *c.shape[1:]) if c.shape[0] in (1, n) else c


def _batch(c: Any, n: int, name: str) -> Any:
    """`c` with leading dim n: (N, ...) kept, (1, ...) expanded; a tensor of one dim less
    than expected can't be told apart from a batch, so the caller passes (1, L, D) or (N, L, D)."""
    out = _expand(c, n)

    def check(v: Any) -> None:
        if isinstance(v, dict):
            for w in v.values():
                check(w)
        elif isinstance(v, (tuple, list)):
            for w in v:
                check(w)
        elif isinstance(v, torch.Tensor) and v.shape[0] != n:
            raise ValueError(f"{name}: leading dimension {v.shape[0]} is neither 1 nor the batch size {n}")

    check(out)
    return out


def _cat(a: Any, b: Any) -> Any:
    if a is None:
        return None
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(_cat(x, y) for x, y in zip(a, b))
    return torch.cat([a, b.to(device=a.device, dtype=a.dtype)])


def guided(model_fn: ModelFn, cond: Any, uncond: Any | None, cfg_scale: float) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6):
    out = out_uncond + s * (out_cond - out_uncond), from one batched model call of 2N
    ([cond; uncond] along the batch). Guiding the raw output is guiding eps, because every
    conversion in `pred_to_x0_eps` is affine in it. `uncond=None`: no guidance, N per call.
    `cond`/`uncond`: a tensor (N or 1, L, D), or a dict/tuple of such (e.g. tokens and pooled).
    """
    if uncond is None:
        if cfg_scale != 1.0:
            raise ValueError(f"eval.cfg_scale: guidance scale {cfg_scale} needs the empty-prompt "
                             "embedding (uncond); pass it or use cfg_scale = 1")

        def denoise_cond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model_fn(x, t, _batch(cond, x.shape[0], "cond"))

        return denoise_cond

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        c2 = _cat(_batch(cond, n, "cond"), _batch(uncond, n, "uncond"))
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), c2)  # (2N, C, H, W)
        out_c, out_u = out.float().chunk(2)
        return out_u + cfg_scale * (out_c - out_u)

    return denoise


# ---------------------------------------------------------------------------------------
# Timesteps.


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """t_i = round(T - i T / steps) - 1 for i = 0..steps-1, e.g. T = 1000, 4 steps:
    [999, 749, 499, 249] (Lin et al. 2023, Table 2, "trailing"). Rounded half to even, as
    numpy does in diffusers, so DDIM sees the same grid as the diffusers samplers."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"eval.steps: expected 1..{num_train_timesteps}, got {steps}")
    T = num_train_timesteps
    return [round(T - i * (T / steps)) - 1 for i in range(steps)]


# ---------------------------------------------------------------------------------------
# Samplers. One signature: (denoise, x_T, *, schedule, steps) -> x_0.


def sample_ddim(denoise: Denoiser, x: torch.Tensor, *, schedule: Schedule, steps: int) -> torch.Tensor:
    """DDIM with eta = 0 (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12).

    Notation (the paper's alpha_t is our ac_t):
        ac_t        alphas_cumprod[t]; ac_{-1} = 1 (the clean data) after the last step
        t, t_prev   this and the next (smaller) timestep of the trailing spacing
        x_t         the current sample, x_T ~ N(0, I)
        x0_hat      predicted clean sample          ("predicted x_0" in eq. 12)
        eps_hat     predicted noise                 (eps_theta in eq. 12)
    """
    if schedule.objective != "ddpm":
        raise ValueError("sample_ddim: objective 'flow' uses sample_flow_euler")
    n = x.shape[0]
    ts = trailing_timesteps(schedule.num_train_timesteps, steps)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        t_vec = torch.full((n,), t, dtype=torch.long)
        # 1. Run the (guided) network at (x_t, t).
        out = denoise(x, t_vec.to(x.device)).float()
        # 2. Convert its output to x0_hat and eps_hat (eps / v / sample parameterisation).
        x0_hat, eps_hat = pred_to_x0_eps(schedule.prediction, out, x, t_vec, schedule)
        # 3. "Direction pointing to x_t" with sigma_t = 0: the deterministic DDIM update
        #    x_{t_prev} = sqrt(ac_{t_prev}) x0_hat + sqrt(1 - ac_{t_prev}) eps_hat.
        ac_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        x = ac_prev**0.5 * x0_hat + (1 - ac_prev) ** 0.5 * eps_hat
    return x


def sample_flow_euler(denoise: Denoiser, x: torch.Tensor, *, schedule: Schedule, steps: int) -> torch.Tensor:
    """Euler integration of the rectified-flow ODE dx/dtau = u(x, tau) (Liu et al. 2022)
    from tau = 1 (noise) to tau = 0 (data) in `steps` equal steps; the network sees
    t = tau * 1000."""
    if schedule.objective != "flow":
        raise ValueError("sample_flow_euler: needs objective 'flow'")
    if steps < 1:
        raise ValueError(f"eval.steps: expected >= 1, got {steps}")
    n = x.shape[0]
    taus = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        t_vec = torch.full((n,), float(taus[i]) * FLOW_TIME_SCALE, dtype=torch.float32, device=x.device)
        u = denoise(x, t_vec).float()  # (N, C, H, W) velocity eps - x0
        x = x + float(taus[i + 1] - taus[i]) * u
    return x


def _run_diffusers(scheduler: Any, denoise: Denoiser, x: torch.Tensor, steps: int, schedule: Schedule,
                   x_scale: float) -> torch.Tensor:
    """Drive a diffusers scheduler: scale_model_input -> network -> step. The network's
    timestep comes from the scheduler's sigma for flow (so it is not truncated to int)
    and from scheduler.timesteps otherwise."""
    scheduler.set_timesteps(steps, device=x.device)
    n = x.shape[0]
    x = x * x_scale
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if schedule.objective == "flow":
            t_vec = torch.full((n,), float(scheduler.sigmas[i]) * FLOW_TIME_SCALE, dtype=torch.float32)
        else:
            t_vec = torch.full((n,), int(round(float(t))), dtype=torch.long)
        out = denoise(x_in, t_vec.to(x.device)).float()
        x = scheduler.step(out, t, x).prev_sample
    return x


_DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "sample": "sample"}


def _ddpm_scheduler_kwargs(schedule: Schedule) -> dict[str, Any]:
    # With zero terminal SNR our betas already end in 1; diffusers' own rescale is then the
    # identity, and it replaces ac[-1] = 0 with 2**-24 so the first sigma is finite.
    return dict(num_train_timesteps=schedule.num_train_timesteps,
                trained_betas=schedule.betas.to(torch.float32).numpy(),
                prediction_type=_DIFFUSERS_PREDICTION[schedule.prediction],
                timestep_spacing="trailing", rescale_betas_zero_snr=schedule.zero_terminal_snr)


def sample_dpmpp(denoise: Denoiser, x: torch.Tensor, *, schedule: Schedule, steps: int) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), deterministic, via
    diffusers. ddpm: our betas and prediction type; flow: diffusers' flow sigmas
    (tau from 1 - 1/1000 down to 0, data prediction x0 = x_t - tau u)."""
    from diffusers import DPMSolverMultistepScheduler

    common = dict(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, final_sigmas_type="zero")
    if schedule.objective == "flow":
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=int(FLOW_TIME_SCALE), use_flow_sigmas=True,
                                                flow_shift=1.0, prediction_type="flow_prediction", **common)
    else:
        scheduler = DPMSolverMultistepScheduler(**_ddpm_scheduler_kwargs(schedule), **common)
    # The scheduler works in x_t's own scale: unit-variance noise is the right start.
    return _run_diffusers(scheduler, denoise, x, steps, schedule, x_scale=1.0)


def sample_euler(denoise: Denoiser, x: torch.Tensor, *, schedule: Schedule, steps: int) -> torch.Tensor:
    """Euler on the probability-flow ODE in sigma = sqrt((1 - ac) / ac) (Karras et al. 2022,
    Alg. 1 with no churn), via diffusers EulerDiscreteScheduler; flow objective: the
    rectified-flow Euler integrator."""
    if schedule.objective == "flow":
        return sample_flow_euler(denoise, x, schedule=schedule, steps=steps)
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(**_ddpm_scheduler_kwargs(schedule))
    scheduler.set_timesteps(steps)
    # The scheduler's state is x_t / alpha (variance sigma^2 + 1 at the start). diffusers'
    # init_noise_sigma says sigma_max for "trailing"; sqrt(sigma_max^2 + 1) is exact.
    sigma_max = float(scheduler.sigmas[0])
    return _run_diffusers(scheduler, denoise, x, steps, schedule, x_scale=(sigma_max**2 + 1) ** 0.5)


def sample_blended(denoise: Denoiser, x: torch.Tensor, *, schedule: Schedule, steps: int, x0_known: torch.Tensor,
                   keep: torch.Tensor | None = None, strength: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Image-to-image and inpainting at sampling time, for any trained model: DDIM (ddpm) or
    rectified-flow Euler (flow), the updates of `sample_ddim` / `sample_flow_euler`, with

    strength    (SDEdit, Meng et al. 2022) the first (1 - strength) of the steps are skipped:
                sampling starts from x0_known noised to the first remaining time (x_T itself
                as the noise); strength 1 starts from x_T, pure noise.
    keep        (N, 1, H, W) in {0, 1}, 1 where x0_known is to be kept. After every update
                x_s = keep * q(x0_known, s) + (1 - keep) * x_s: the known region is replaced by
                x0_known noised to the step's time with fresh noise from `generator`
                ("Blended Latent Diffusion", Avrahami et al. 2023, Alg. 1; RePaint, Lugmayr
                et al. 2022, without resampling). The last step's time is the data itself, so
                the known region ends equal to x0_known.

    x: the noise x_T (N, C, H, W); x0_known (N or 1, C, H, W) in the model's latent space.
    With strength 1 and no keep mask this is exactly `sample_ddim` / `sample_flow_euler`."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"--strength: expected a number in (0, 1], got {strength}")
    n = x.shape[0]
    x0_known = x0_known.to(x).expand_as(x)
    used = max(1, round(steps * strength))
    flow = schedule.objective == "flow"
    if flow:
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()[steps - used:]  # tau, ends at 0
    else:
        grid = trailing_timesteps(schedule.num_train_timesteps, steps)[steps - used:] + [-1]  # t, ends at "data"

    def alpha_sigma(i: int) -> tuple[float, float]:  # of x at grid[i]
        if flow:
            return 1.0 - grid[i], grid[i]
        ac = float(schedule.alphas_cumprod[grid[i]]) if grid[i] >= 0 else 1.0
        return ac**0.5, (1 - ac) ** 0.5

    def noised(i: int, eps: torch.Tensor) -> torch.Tensor:  # q(x0_known, grid[i])
        a, s = alpha_sigma(i)
        return a * x0_known + s * eps

    if used < steps:
        x = noised(0, x)
    for i in range(used):
        # 1. The (guided) network at (x, grid[i]); flow: velocity, ddpm: its parameterisation.
        if flow:
            t_vec = torch.full((n,), grid[i] * FLOW_TIME_SCALE, dtype=torch.float32, device=x.device)
            x = x + (grid[i + 1] - grid[i]) * denoise(x, t_vec).float()
        else:
            t_vec = torch.full((n,), grid[i], dtype=torch.long)
            x0_hat, eps_hat = pred_to_x0_eps(schedule.prediction, denoise(x, t_vec.to(x.device)).float(), x,
                                             t_vec, schedule)
            a, s = alpha_sigma(i + 1)
            x = a * x0_hat + s * eps_hat  # the DDIM update (eta = 0)
        # 2. Blend: the known region at the new time.
        if keep is not None:
            eps = torch.randn(tuple(x.shape), generator=generator).to(x)
            x = keep * noised(i + 1, eps) + (1 - keep) * x
    return x


def _sampler(schedule: Schedule, name: str) -> Sampler:
    if name == "ddim":
        return sample_flow_euler if schedule.objective == "flow" else sample_ddim
    if name == "dpm++":
        return sample_dpmpp
    if name == "euler":
        return sample_euler
    raise ValueError(f"eval.sampler: expected ddim, dpm++ or euler, got {name!r}")


# ---------------------------------------------------------------------------------------
# Size and crop.


def sample_geometry(latent_channels: int, downsample: int, size: tuple[int, int],
                    crop_top_left: tuple[int, int] = (0, 0), key: str = "eval.sample_size"
                    ) -> tuple[tuple[int, int, int], list[float]]:
    """For images of `size` (height, width) pixels: the latent shape (C, h, w) to sample and
    SD-XL's micro-conditioning (original size = target size = `size`, the crop (0, 0) by
    default: "well-centred", Podell et al. 2023, sec. 2.2). A micro-conditioned U-Net takes
    the six numbers as cond["time_ids"]; any other ignores them."""
    H, W = size
    if H <= 0 or W <= 0 or H % downsample or W % downsample:
        raise ValueError(f"{key}: {H}x{W} is not a positive multiple of the codec's downsample factor "
                         f"{downsample}")
    return (latent_channels, H // downsample, W // downsample), time_ids(size, crop_top_left, size)


# ---------------------------------------------------------------------------------------
# Entry point.


@torch.no_grad()
def sample(model_fn: ModelFn, shape: tuple[int, ...], cond: Any, uncond: Any | None, *, schedule: Schedule,
           diffusion_cfg: DiffusionConfig, sampler: str, steps: int, cfg_scale: float,
           generator: torch.Generator, device: torch.device | str | None = None,
           x_T: torch.Tensor | None = None, x0_known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
           strength: float = 1.0) -> torch.Tensor:
    """Sample N = shape[0] latents, float32 (N, C, H, W), on `device` (default: cond's).

    model_fn(x_t (B, C, H, W), t (B,), cond (B, ...)) -> output (B, C, H, W), where t is
    long for ddpm and float in [0, 1000] for flow, and B is N or 2N (guided).
    cond: tokens (N or 1, L, D) for the prompts (or a dict/tuple of tensors);
    uncond: the same for the empty prompt, or None for no guidance (then cfg_scale must be 1).
    The starting noise x_T ~ N(0, I) is drawn from `generator` (CPU) and nothing else is
    random, so the same seed gives the same samples. A caller may pass its own `x_T`
    (shape `shape`, unit Gaussian; e.g. noise fixed per grid cell so a sample does not
    depend on which rank draws it); then `generator` is not used.
    `x0_known` (latents of an init image) with `strength` < 1 and/or a `keep` mask: image-to-
    image and inpainting (`sample_blended`; sampler ddim, or flow's euler); the blend's
    fresh noise then comes from `generator`.
    """
    if diffusion_cfg.objective != schedule.objective or diffusion_cfg.prediction != schedule.prediction:
        raise ValueError(f"schedule: built for objective={schedule.objective!r} prediction={schedule.prediction!r} "
                         f"but diffusion config says {diffusion_cfg.objective!r}/{diffusion_cfg.prediction!r}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("generator: expected a CPU torch.Generator")
    fn = _sampler(schedule, sampler)
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T: shape {tuple(x_T.shape)} does not match shape {tuple(shape)}")
        device = x_T.device if device is None else device
    if device is None:
        first = cond
        while isinstance(first, (dict, tuple, list)) and first:
            first = next(iter(first.values())) if isinstance(first, dict) else first[0]
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    if x_T is None:
        x_T = torch.randn(tuple(shape), generator=generator)  # (N, C, H, W)
    x_T = x_T.to(device=device, dtype=torch.float32)
    if x0_known is not None:
        if not (fn in (sample_ddim, sample_flow_euler) or (schedule.objective == "flow" and sampler == "euler")):
            raise ValueError(f"--sampler: image-to-image and inpainting run on DDIM (flow: Euler), not {sampler!r}")
        return sample_blended(guided(model_fn, cond, uncond, cfg_scale), x_T, schedule=schedule, steps=steps,
                              x0_known=x0_known, keep=keep, strength=strength, generator=generator)
    return fn(guided(model_fn, cond, uncond, cfg_scale), x_T, schedule=schedule, steps=steps)
