"""eval/sampling.py with oracle models whose exact prediction is known in closed form.

Data N(mu, s0^2) per pixel (s0 = 0 is the single point mu). At noise level (a, s) with
x_t = a x0 + s eps, x_t ~ N(a mu, a^2 s0^2 + s^2), and the exact posterior means are
    E[eps | x_t] = s (x_t - a mu) / (a^2 s0^2 + s^2)
    E[x0  | x_t] = mu + a s0^2 (x_t - a mu) / (a^2 s0^2 + s^2).
The probability-flow ODE moves each point along the 1-D quantile map, so a starting noise
x_T lands exactly at mu + s0 (x_T - a_T mu) / sqrt(a_T^2 s0^2 + s_T^2): every sample has
its own exact answer, and the samplers must converge to it.
"""

from __future__ import annotations

import pytest
import torch

from latentforge.config import DiffusionConfig
from latentforge.eval import sampling as S
from latentforge.training import diffusion as D

SHAPE = (64, 2, 4, 4)  # (N, C, H, W)
SETUPS = {  # name -> DiffusionConfig kwargs
    "eps": dict(prediction="eps"),
    "v": dict(prediction="v"),
    "sample": dict(prediction="sample"),
    "v-zero-snr": dict(prediction="v", zero_terminal_snr=True),
    "flow": dict(objective="flow", prediction="v"),
}
SAMPLERS = ["ddim", "dpm++", "euler"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def setup(name: str) -> tuple[DiffusionConfig, D.Schedule]:
    cfg = DiffusionConfig(**SETUPS[name])
    return cfg, D.Schedule.from_config(cfg)


def gaussian_oracle(sch: D.Schedule, s0: float):
    """model_fn for data N(mu, s0^2), with mu = cond (N, 1, C) reshaped to (N, C, 1, 1):
    each prompt has its own data mean, so batching and guidance are visible."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        assert cond.shape[0] == x_t.shape[0] == t.shape[0]
        mu = cond[:, 0, :].reshape(-1, x_t.shape[1], 1, 1).double()
        x = x_t.double()
        a, s = D.coef(sch.alpha(t), x), D.coef(sch.sigma(t), x)
        var = a**2 * s0**2 + s**2
        eps = s * (x - a * mu) / var
        x0 = mu + a * s0**2 * (x - a * mu) / var
        if sch.objective == "flow":
            out = eps - x0
        else:
            out = {"eps": eps, "v": a * eps - s * x0, "sample": x0}[sch.prediction]
        return out.float()

    return model_fn


def prompts(n: int = SHAPE[0], seed: int = 1) -> torch.Tensor:
    """(N, L=1, D=C): per-prompt data means."""
    return torch.randn(n, 1, SHAPE[1], generator=gen(seed))


def run(name: str, sampler: str, s0: float, cond: torch.Tensor, steps: int, seed: int = 0,
        uncond: torch.Tensor | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
    cfg, sch = setup(name)
    return S.sample(gaussian_oracle(sch, s0), SHAPE, cond, uncond, schedule=sch, diffusion_cfg=cfg,
                    sampler=sampler, steps=steps, cfg_scale=cfg_scale, generator=gen(seed))


def exact_ode_image(name: str, mu: torch.Tensor, s0: float, seed: int = 0) -> torch.Tensor:
    _, sch = setup(name)
    x_T = torch.randn(SHAPE, generator=gen(seed)).double()  # the noise sample() draws first
    if sch.objective == "flow":
        a_T, s_T = 0.0, 1.0
    else:
        ac = float(sch.alphas_cumprod[-1])
        a_T, s_T = ac**0.5, (1 - ac) ** 0.5
    mu = mu[:, 0, :].reshape(-1, SHAPE[1], 1, 1).double()
    return (mu + s0 * (x_T - a_T * mu) / (a_T**2 * s0**2 + s_T**2) ** 0.5).float()


# --- (1) Oracle models land on the right answer ---------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", list(SETUPS))
def test_single_point_data_lands_on_the_point(name, sampler):
    mu = prompts()
    x = run(name, sampler, 0.0, mu, steps=10)
    assert x.shape == SHAPE and x.dtype == torch.float32
    target = mu[:, 0, :].reshape(-1, SHAPE[1], 1, 1).expand(SHAPE)
    # 10 fp32 steps whose final step divides by a small alpha (rounding grows ~1/alpha):
    # 1e-3 on unit-scale values, far from any wrong update.
    assert (x - target).abs().max().item() < 1e-3


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", list(SETUPS))
def test_gaussian_data_follows_the_exact_ode(name, sampler):
    s0 = 0.8
    mu = torch.full((SHAPE[0], 1, SHAPE[1]), 0.5)
    x = run(name, sampler, s0, mu, steps=100)
    exact = exact_ode_image(name, mu, s0)
    assert (x - exact).abs().mean().item() < 0.02  # first-order samplers: error ~ 1/steps
    # And the distribution: mean/std of 2048 values against the data's (0.5, 0.8). A schedule
    # without zero terminal SNR starts from N(0, 1) instead of N(a_T mu, ...), which biases
    # the mean by -s0 a_T mu (about 0.03 here, Lin et al. 2023); the exact image carries that.
    assert abs(x.mean().item() - exact.mean().item()) < 0.01
    assert abs(x.std().item() - s0) < 0.06
    if name in ("v-zero-snr", "flow"):
        assert abs(x.mean().item() - 0.5) < 0.06  # sampling error of the mean of 2048 draws ~0.018


@pytest.mark.parametrize("prediction", ["eps", "v", "sample"])
def test_ddim_matches_diffusers_ddim_scheduler(prediction):
    """Our DDIM against diffusers' DDIMScheduler (eta = 0, trailing, final alpha 1), with a
    network whose output is not an oracle (so errors in any conversion would show)."""
    from diffusers import DDIMScheduler

    cfg = DiffusionConfig(prediction=prediction)
    sch = D.Schedule.from_config(cfg)
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 2, 3, padding=1)

    def model_fn(x, t, cond):
        return 0.3 * net(x) + 0.5 * x * torch.cos(t.float() / 300).view(-1, 1, 1, 1)

    steps = 20  # divides T, where diffusers' prev_timestep (t - T // steps) is the trailing grid
    x_T = torch.randn(4, 2, 4, 4, generator=gen(3))
    with torch.no_grad():
        ours = S.sample_ddim(lambda x, t: model_fn(x, t, None), x_T.clone(), schedule=sch, steps=steps)
        ref = DDIMScheduler(num_train_timesteps=1000, trained_betas=sch.betas.numpy(),
                            prediction_type={"eps": "epsilon", "v": "v_prediction", "sample": "sample"}[prediction],
                            timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
        ref.set_timesteps(steps)
        assert ref.timesteps.tolist() == S.trailing_timesteps(1000, steps)
        x = x_T.clone()
        for t in ref.timesteps:
            x = ref.step(model_fn(x, t.repeat(4), None), t, x, eta=0.0).prev_sample
    # fp32, 20 steps of the same update in another arrangement (diffusers computes x0 first):
    # ~20 x a few ulps of unit-scale values, each step's error carried on: 1e-4.
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


def test_trailing_timesteps_match_diffusers():
    from diffusers import EulerDiscreteScheduler

    assert S.trailing_timesteps(1000, 4) == [999, 749, 499, 249]
    for steps in (1, 7, 16, 25, 50):
        ref = EulerDiscreteScheduler(timestep_spacing="trailing")
        ref.set_timesteps(steps)
        assert S.trailing_timesteps(1000, steps) == [int(t) for t in ref.timesteps], steps
    with pytest.raises(ValueError, match="eval.steps"):
        S.trailing_timesteps(1000, 0)


# --- (2) Classifier-free guidance -----------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", ["eps", "v-zero-snr", "flow"])
def test_cfg_scale_one_equals_conditional_only(name, sampler):
    cond, uncond = prompts(seed=1), torch.zeros(1, 1, SHAPE[1])
    guided = run(name, sampler, 0.5, cond, steps=8, uncond=uncond, cfg_scale=1.0)
    plain = run(name, sampler, 0.5, cond, steps=8, uncond=None)
    # Scale 1: u + 1 (c - u) = c up to rounding, and the network sees a batch of 2N instead of
    # N (other kernel blocking): 8 fp32 steps on unit-scale values, 1e-5; scale 3 moves ~1e-1.
    assert torch.allclose(guided, plain, atol=1e-5)
    away = run(name, sampler, 0.5, cond, steps=8, uncond=uncond, cfg_scale=3.0)
    assert not torch.allclose(away, plain, atol=1e-2)


def test_guided_prediction_follows_the_formula_in_one_batched_call():
    calls = []

    def model_fn(x, t, cond):
        calls.append((x.shape[0], t.clone(), cond["tokens"].clone(), cond["pooled"].clone()))
        # Output depends on everything the guidance must route: x, t and the conditioning.
        return x * 2 + t.float().view(-1, 1, 1, 1) + cond["tokens"].sum(dim=(1, 2)).view(-1, 1, 1, 1) \
            + cond["pooled"][:, :1].view(-1, 1, 1, 1)

    n = 3
    cond = {"tokens": torch.randn(n, 2, 4, generator=gen(1)), "pooled": torch.randn(n, 5, generator=gen(2))}
    uncond = {"tokens": torch.randn(1, 2, 4, generator=gen(3)), "pooled": torch.randn(1, 5, generator=gen(4))}
    x = torch.randn(n, 2, 4, 4, generator=gen(5))
    t = torch.tensor([10, 20, 30])
    out = S.guided(model_fn, cond, uncond, 4.0)(x, t)
    assert len(calls) == 1 and calls[0][0] == 2 * n
    assert torch.equal(calls[0][1], torch.cat([t, t]))
    assert torch.equal(calls[0][2][:n], cond["tokens"])
    assert torch.equal(calls[0][2][n:], uncond["tokens"].expand(n, -1, -1))
    assert torch.equal(calls[0][3][n:], uncond["pooled"].expand(n, -1))
    c = model_fn(x, t, cond)
    u = model_fn(x, t, {k: v.expand(n, *v.shape[1:]) for k, v in uncond.items()})
    # One fp32 network call in a batch of 2N versus two of N, then the same formula: 1e-5.
    assert torch.allclose(out, u + 4.0 * (c - u), atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", ["eps", "v", "sample", "flow"])
def test_guided_sampling_of_point_data_lands_on_the_extrapolated_point(name, sampler):
    """Every parameterisation is affine in the data point, so guiding two single-point
    oracles (x_c, x_u) with scale s is the oracle for x_u + s (x_c - x_u)."""
    cond, uncond = prompts(seed=1), prompts(n=1, seed=2)
    x = run(name, sampler, 0.0, cond, steps=10, uncond=uncond, cfg_scale=2.5)
    xc = cond[:, 0, :].reshape(-1, SHAPE[1], 1, 1)
    xu = uncond[:, 0, :].reshape(-1, SHAPE[1], 1, 1)
    assert (x - (xu + 2.5 * (xc - xu)).expand(SHAPE)).abs().max().item() < 1e-3  # as above


def test_guidance_without_uncond_and_unknown_sampler_are_clear_errors():
    cfg, sch = setup("eps")
    kw = dict(schedule=sch, diffusion_cfg=cfg, steps=2, generator=gen())
    with pytest.raises(ValueError, match="eval.cfg_scale"):
        S.sample(gaussian_oracle(sch, 0.5), SHAPE, prompts(), None, sampler="ddim", cfg_scale=3.0, **kw)
    with pytest.raises(ValueError, match="eval.sampler"):
        S.sample(gaussian_oracle(sch, 0.5), SHAPE, prompts(), None, sampler="heun", cfg_scale=1.0, **kw)
    with pytest.raises(ValueError, match="cond"):
        S.sample(gaussian_oracle(sch, 0.5), SHAPE, prompts(n=5), None, sampler="ddim", cfg_scale=1.0, **kw)


# --- (3) Determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", ["v", "flow"])
def test_same_seed_same_samples(name, sampler):
    cond, uncond = prompts(), torch.zeros(1, 1, SHAPE[1])
    a = run(name, sampler, 0.5, cond, steps=6, seed=7, uncond=uncond, cfg_scale=2.0)
    torch.manual_seed(999)  # the global RNG must not matter
    b = run(name, sampler, 0.5, cond, steps=6, seed=7, uncond=uncond, cfg_scale=2.0)
    c = run(name, sampler, 0.5, cond, steps=6, seed=8, uncond=uncond, cfg_scale=2.0)
    assert torch.equal(a, b)  # the same computation on the same machine: bitwise
    assert not torch.allclose(a, c, atol=1e-2)  # another seed: another sample


def test_given_x_T_replaces_the_generator_draw():
    cfg, sch = setup("v")
    cond = prompts()
    x_T = torch.randn(SHAPE, generator=gen(21))
    kw = dict(schedule=sch, diffusion_cfg=cfg, sampler="ddim", steps=6, cfg_scale=1.0)
    given = S.sample(gaussian_oracle(sch, 0.5), SHAPE, cond, None, generator=gen(0), x_T=x_T, **kw)
    drawn = S.sample(gaussian_oracle(sch, 0.5), SHAPE, cond, None, generator=gen(21), **kw)
    assert torch.equal(given, drawn)
    with pytest.raises(ValueError, match="x_T"):
        S.sample(gaussian_oracle(sch, 0.5), SHAPE, cond, None, generator=gen(0), x_T=x_T[:3], **kw)
