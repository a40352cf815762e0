"""training/diffusion.py against closed forms. CPU, tiny tensors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from latentforge.config import ConfigError, DiffusionConfig
from latentforge.training import diffusion as D


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def schedule(**kw) -> tuple[DiffusionConfig, D.Schedule]:
    cfg = DiffusionConfig(**kw)
    return cfg, D.Schedule.from_config(cfg)


# --- Schedules ----------------------------------------------------------------------------


def test_linear_and_scaled_linear_closed_forms():
    b = D.make_betas("linear", 1000, 1e-4, 0.02)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    # Schedules are fp64 closed forms, a few ops deep: rel 1e-12 (and allclose's default
    # 1e-5/1e-8) leave room for libm rounding on any CPU and still catch a wrong formula.
    assert b[0].item() == pytest.approx(1e-4, rel=1e-12) and b[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert torch.allclose(b.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))

    b = D.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert b[0].item() == pytest.approx(0.00085, rel=1e-12) and b[-1].item() == pytest.approx(0.012, rel=1e-12)
    # sqrt(beta) is evenly spaced (SD's schedule), beta itself is not.
    step = (0.012**0.5 - 0.00085**0.5) / 999
    assert torch.allclose(b.sqrt().diff(), torch.full((999,), step, dtype=torch.float64))
    assert not torch.allclose(b.diff(), b.diff()[:1].expand(999))


def test_cosine_alpha_bar_formula():
    T, s = 1000, 0.008
    b = D.make_betas("cosine", T, 0.0, 0.0)  # beta_start/end unused by cosine
    ac = D.alphas_cumprod(b)
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    unclipped = b < 0.999
    assert unclipped[: T - 1].all() and not unclipped[-1]  # only the last beta hits the cap
    # A cumulative product over up to 1000 fp64 factors: ~1000 roundings of 1e-16 each.
    assert torch.allclose(ac[unclipped], expected[unclipped], rtol=1e-10, atol=1e-14)
    assert b.max().item() == pytest.approx(0.999)


def test_bad_schedule_inputs_name_the_field():
    with pytest.raises(ValueError, match="diffusion.schedule"):
        D.make_betas("quadratic", 10, 1e-4, 0.02)
    with pytest.raises(ValueError, match="diffusion.beta_start"):
        D.make_betas("linear", 10, 0.02, 1e-4)
    with pytest.raises(ValueError, match="diffusion.num_train_timesteps"):
        D.make_betas("linear", 0, 1e-4, 0.02)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_rescale(kind):
    b = D.make_betas(kind, 1000, 0.00085, 0.012)
    ac = D.alphas_cumprod(b)
    ac2 = D.alphas_cumprod(D.rescale_zero_terminal_snr(b))
    assert ac2[-1].item() == 0.0  # exactly pure noise at the last step
    assert ac2[0].item() == pytest.approx(ac[0].item(), rel=1e-12)
    assert (ac2.diff() < 0).all()  # still strictly decreasing
    # Algorithm 1's closed form: sqrt(ac) shifted by its last value, scaled to keep the first.
    # fp64 through a 1000-step cumulative product and a sqrt: 1e-12 absolute on values <= 1.
    a, a0, aT = ac.sqrt(), ac[0].sqrt(), ac[-1].sqrt()
    assert torch.allclose(ac2.sqrt(), (a - aT) * a0 / (a0 - aT), atol=1e-12)


def test_schedule_from_config_and_helpers():
    _, sch = schedule(schedule="scaled_linear", num_train_timesteps=1000)
    assert sch.alphas_cumprod.dtype == torch.float64 and sch.num_train_timesteps == 1000
    t = torch.tensor([0, 10, 999])
    ac = sch.alphas_cumprod[t]
    assert torch.allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(sch.snr(t), ac / (1 - ac))
    with pytest.raises(ValueError, match="integer"):
        sch.alpha(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="timesteps must lie"):
        sch.alpha(torch.tensor([1000]))
    _, zt = schedule(prediction="v", zero_terminal_snr=True)
    assert zt.snr(torch.tensor([999])).item() == 0.0


@pytest.mark.parametrize("kw, field", [
    (dict(objective="flow", prediction="eps"), "diffusion.prediction"),
    (dict(objective="flow", prediction="v", min_snr_gamma=5.0), "diffusion.min_snr_gamma"),
    (dict(objective="flow", prediction="v", zero_terminal_snr=True), "diffusion.zero_terminal_snr"),
    (dict(prediction="eps", zero_terminal_snr=True), "diffusion.zero_terminal_snr"),
    (dict(objective="edm"), "diffusion.objective"),
    (dict(min_snr_gamma=-1.0), "diffusion.min_snr_gamma"),
])
def test_unworkable_combinations_raise_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        D.Schedule.from_config(DiffusionConfig(**kw))


# --- Forward process, targets, conversions --------------------------------------------------


def test_add_noise_closed_form():
    _, sch = schedule()
    g = gen()
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = D.add_noise(x0, eps, t, sch)
    for i in range(3):
        ac = sch.alphas_cumprod[t[i]].item()
        # fp32 tensors, two multiplies and an add on unit-scale values: a few fp32 ulps (1e-7).
        assert torch.allclose(x_t[i], ac**0.5 * x0[i] + (1 - ac) ** 0.5 * eps[i], atol=1e-6)


@pytest.mark.parametrize("prediction, zero_terminal", [("eps", False), ("v", False), ("sample", False),
                                                        ("v", True), ("sample", True)])
def test_target_and_back_conversion_recover_x0_and_eps(prediction, zero_terminal):
    _, sch = schedule(prediction=prediction, zero_terminal_snr=zero_terminal)
    g = gen(1)
    x0 = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    x_t = D.add_noise(x0, eps, t, sch)
    out = D.target(prediction, x0, eps, t, sch)
    if prediction == "v":  # Salimans & Ho's v = alpha eps - sigma x0
        a, s = D.coef(sch.alpha(t), x0), D.coef(sch.sigma(t), x0)
        assert torch.allclose(out, a * eps - s * x0)
    x0_hat, eps_hat = D.pred_to_x0_eps(prediction, out, x_t, t, sch)
    # fp64 round trip; dividing by alpha (smallest at t=999, about 0.07) amplifies 1e-16
    # roundings to ~1e-14, far below 1e-8.
    assert torch.allclose(x0_hat, x0, atol=1e-8)
    assert torch.allclose(eps_hat, eps, atol=1e-8)


def test_flow_matching_interpolation_target_and_conversion():
    cfg, sch = schedule(objective="flow", prediction="v")
    g = gen(2)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    tau = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    t = tau * 1000  # the model's timestep input
    x_t = D.add_noise(x0, eps, t, sch)
    # fp64, one multiply-add: allclose's default (1e-5, 1e-8) is loose; the equalities are exact.
    assert torch.allclose(x_t, (1 - tau).view(-1, 1, 1, 1) * x0 + tau.view(-1, 1, 1, 1) * eps)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    u = D.target("v", x0, eps, t, sch)
    assert torch.equal(u, eps - x0)
    x0_hat, eps_hat = D.pred_to_x0_eps("v", u, x_t, t, sch)
    assert torch.allclose(x0_hat, x0) and torch.allclose(eps_hat, eps)
    assert torch.allclose(sch.snr(t[1:2]), torch.tensor([9.0], dtype=torch.float64))  # ((1-.25)/.25)^2


def test_flow_timesteps_are_logit_normal_scaled_to_1000():
    _, sch = schedule(objective="flow", prediction="v")
    t = D.sample_timesteps(20000, sch, gen(3))
    assert t.dtype == torch.float32 and (t > 0).all() and (t < 1000).all()
    u = torch.logit(t.double() / 1000)
    assert abs(u.mean().item()) < 0.03 and abs(u.std().item() - 1) < 0.03
    _, ddpm = schedule(num_train_timesteps=50)
    td = D.sample_timesteps(5000, ddpm, gen(3))
    assert td.dtype == torch.long and td.min() == 0 and td.max() == 49
    # diffusion.flow_logit_mean shifts u (towards noisier tau for a positive mean), and only u.
    _, shifted = schedule(objective="flow", prediction="v", flow_logit_mean=1.0)
    u1 = torch.logit(D.sample_timesteps(20000, shifted, gen(3)).double() / 1000)
    assert abs(u1.mean().item() - 1) < 0.03 and abs(u1.std().item() - 1) < 0.03
    for bad in ({"flow_logit_mean": 1.0}, {"objective": "flow", "prediction": "v", "flow_logit_mean": float("nan")}):
        with pytest.raises(ConfigError, match="diffusion.flow_logit_mean"):
            schedule(**bad)
    # diffusion.flow_logit_std scales u's spread (SD3's lognorm(m, s)) around the mean.
    _, wide = schedule(objective="flow", prediction="v", flow_logit_mean=0.5, flow_logit_std=1.5)
    u2 = torch.logit(D.sample_timesteps(20000, wide, gen(3)).double() / 1000)
    assert abs(u2.mean().item() - 0.5) < 0.05 and abs(u2.std().item() - 1.5) < 0.05
    for bad in ({"flow_logit_std": 2.0}, {"objective": "flow", "prediction": "v", "flow_logit_std": 0.0},
                {"objective": "flow", "prediction": "v", "flow_logit_std": float("inf")}):
        with pytest.raises(ConfigError, match="diffusion.flow_logit_std"):
            schedule(**bad)
    # diffusion.flow_tail_frac: that fraction of the draws uniform on [flow_tail_from, 1).
    # N(0, 1) puts 1.40% of tau above 0.9 (P(u > logit 0.9 = 2.197)); a 10% tail adds 10 points.
    _, tailed = schedule(objective="flow", prediction="v", flow_tail_frac=0.1, flow_tail_from=0.9)
    tt = D.sample_timesteps(40000, tailed, gen(3)).double() / 1000
    above = (tt >= 0.9).double().mean().item()
    expect = 0.1 + 0.9 * 0.0140
    assert abs(above - expect) < 4 * math.sqrt(expect * (1 - expect) / 40000)
    band = tt[tt >= 0.95]  # within [0.95, 1) the tail is flat: its mean is near 0.975
    assert abs(band.mean().item() - 0.975) < 0.005 and tt.max() < 1
    # Off (the default), the stream of draws is the plain logit-normal's, bit for bit.
    _, off = schedule(objective="flow", prediction="v", flow_tail_from=0.5)
    assert torch.equal(D.sample_timesteps(100, off, gen(3)), D.sample_timesteps(100, sch, gen(3)))
    for bad in ({"flow_tail_frac": 0.1}, {"objective": "flow", "prediction": "v", "flow_tail_frac": 1.0},
                {"objective": "flow", "prediction": "v", "flow_tail_frac": -0.1}):
        with pytest.raises(ConfigError, match="diffusion.flow_tail_frac"):
            schedule(**bad)
    with pytest.raises(ConfigError, match="diffusion.flow_tail_from"):
        schedule(objective="flow", prediction="v", flow_tail_frac=0.1, flow_tail_from=1.0)


# --- Min-SNR ------------------------------------------------------------------------------


def test_min_snr_weights_by_formula():
    snr = torch.tensor([0.1, 1.0, 5.0, 20.0], dtype=torch.float64)
    g = 5.0
    assert torch.allclose(D.min_snr_weight(snr, g, "eps"), torch.tensor([1, 1, 1, 5 / 20], dtype=torch.float64))
    assert torch.allclose(D.min_snr_weight(snr, g, "v"),
                          torch.tensor([0.1 / 1.1, 1 / 2, 5 / 6, 5 / 21], dtype=torch.float64))
    assert torch.allclose(D.min_snr_weight(snr, g, "sample"), torch.tensor([0.1, 1, 5, 5], dtype=torch.float64))
    for p in ("eps", "v", "sample"):
        assert torch.equal(D.min_snr_weight(snr, 0.0, p), torch.ones_like(snr))


def test_min_snr_at_zero_terminal_snr_is_finite_and_takes_the_limit():
    zero = torch.tensor([0.0, 1e-30], dtype=torch.float64)
    assert torch.equal(D.min_snr_weight(zero, 5.0, "eps"), torch.tensor([1.0, 1.0], dtype=torch.float64))
    w_v = D.min_snr_weight(zero, 5.0, "v")
    assert w_v[0].item() == 0.0 and torch.isfinite(w_v).all()
    assert D.min_snr_weight(zero, 5.0, "sample")[0].item() == 0.0


# --- Noise and caption dropout ------------------------------------------------------------


def test_offset_noise_statistics():
    n, c, h, w, k = 2000, 4, 8, 8, 0.5
    noise = D.offset_noise((n, c, h, w), k, gen(4))
    assert noise.shape == (n, c, h, w) and noise.dtype == torch.float32
    per_channel_mean = noise.mean(dim=(2, 3))  # (N, C): offset + mean of 64 unit normals
    # Sampling error, not rounding: a variance from 8000 draws has relative sd sqrt(2/8000)
    # = 1.6 %, so 5 % is 3 sd (the seed is fixed, so the draw is the same on every machine).
    assert per_channel_mean.var().item() == pytest.approx(k**2 + 1 / (h * w), rel=0.05)
    # Within a channel the offset cancels: the residual is unit white noise.
    resid = noise - per_channel_mean[..., None, None]
    # 512,000 draws: relative sd of the variance 0.2 %; 2 % is ten of them.
    assert resid.var().item() == pytest.approx(1 - 1 / (h * w), rel=0.02)
    assert torch.equal(D.offset_noise((2, 3, 4, 4), 0.0, gen(5)), torch.randn(2, 3, 4, 4, generator=gen(5)))
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        D.offset_noise((2, 3), 0.1, None)  # type: ignore[arg-type]


def test_cfg_drop_replaces_rows_with_null_and_follows_p():
    n, L, d = 4000, 3, 5
    cond = torch.randn(n, L, d, generator=gen(6))
    null = torch.full((L, d), 7.0)
    pooled, null_pooled = torch.randn(n, 2, generator=gen(7)), torch.full((2,), -3.0)
    tokens, pooled_out, dropped = D.cfg_drop(cond, null, 0.3, gen(8), pooled=pooled, null_pooled=null_pooled)
    assert dropped.dtype == torch.bool and dropped.shape == (n,)
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    assert (tokens[dropped] == 7.0).all() and torch.equal(tokens[~dropped], cond[~dropped])
    assert (pooled_out[dropped] == -3.0).all() and torch.equal(pooled_out[~dropped], pooled[~dropped])
    again, dropped2 = D.cfg_drop(cond, null, 0.3, gen(8))
    assert torch.equal(again, tokens) and torch.equal(dropped2, dropped)
    none, nothing = D.cfg_drop(cond, null, 0.0, gen(8))
    assert not nothing.any() and torch.equal(none, cond)
    with pytest.raises(ValueError, match="diffusion.cfg_dropout"):
        D.cfg_drop(cond, null, 1.0, gen(8))


# --- Losses -------------------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    """A real (tiny) network whose output depends on x, t and cond."""

    def __init__(self, c: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + (t.float() / 1000).view(-1, 1, 1, 1) + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def batch(n: int = 6, seed: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randn(n, 2, 4, 4, generator=g), torch.randn(n, 3, 5, generator=g)


@pytest.mark.parametrize("kw", [dict(), dict(prediction="v", min_snr_gamma=5.0, offset_noise=0.1),
                                dict(prediction="sample", min_snr_gamma=1.0),
                                dict(objective="flow", prediction="v", offset_noise=0.1)])
def test_loss_fn_matches_manual_recomputation(kw):
    cfg, sch = schedule(**kw)
    net = TinyNet()
    x0, cond = batch()
    out = D.loss_fn(net, x0, cond, cfg, sch, gen(10))
    # Redo every step by hand from the documented draw order: t, then the noise.
    g = gen(10)
    if cfg.objective == "flow":
        t = torch.sigmoid(torch.randn(6, generator=g)) * 1000
        tau = (t.double() / 1000).view(-1, 1, 1, 1)
        a, s = 1 - tau, tau
    else:
        t = torch.randint(0, 1000, (6,), generator=g)
        ac = sch.alphas_cumprod[t].view(-1, 1, 1, 1)
        a, s = ac.sqrt(), (1 - ac).sqrt()
    eps = torch.randn(6, 2, 4, 4, generator=g)
    if cfg.offset_noise:
        eps = eps + cfg.offset_noise * torch.randn(6, 2, 1, 1, generator=g)
    x_t = (a * x0 + s * eps).float()
    tgt = {"eps": eps, "v": a * eps - s * x0, "sample": x0}[cfg.prediction]
    if cfg.objective == "flow":
        tgt = eps - x0
    mse = ((net(x_t, t, cond).double() - tgt) ** 2).mean(dim=(1, 2, 3))
    snr = (a**2 / s**2).flatten()
    w = D.min_snr_weight(snr, cfg.min_snr_gamma, cfg.prediction) if cfg.objective == "ddpm" else 1.0
    assert torch.equal(out["t"], t)
    # The loss is reduced in fp32 over 32 elements, the reference in fp64: rtol 1e-5 is
    # ~100 fp32 ulps, room for any summation order.
    assert torch.allclose(out["mse"].double(), mse, rtol=1e-5)
    assert torch.allclose(out["per_sample"].double(), w * mse, rtol=1e-5)
    assert out["loss"].item() == pytest.approx((w * mse).mean().item(), rel=1e-5)
    out["loss"].backward()  # a real, differentiable loss
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0


def test_loss_fn_mask_semantics():
    cfg, sch = schedule(prediction="v", min_snr_gamma=5.0)
    net = TinyNet()
    x0, cond = batch()
    full = D.loss_fn(net, x0, cond, cfg, sch, gen(11))
    zero = D.loss_fn(net, x0, cond, cfg, sch, gen(11), mask=torch.zeros(6))
    assert zero["loss"].item() == 0.0
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    part = D.loss_fn(net, x0, cond, cfg, sch, gen(11), mask=mask)
    # Divided by N (6), not by mask.sum() (3): padded samples count as zeros. The same fp32
    # values summed in another order: rel 1e-6 is ~8 ulps; the wrong divisor is off by 2x.
    assert part["loss"].item() == pytest.approx((full["per_sample"] * mask).sum().item() / 6, rel=1e-6)
    assert part["loss"].item() != pytest.approx((full["per_sample"] * mask).sum().item() / 3, rel=1e-3)
    with pytest.raises(ValueError, match="mask"):
        D.loss_fn(net, x0, cond, cfg, sch, gen(11), mask=torch.ones(5))


def test_loss_fn_is_a_function_of_the_generator():
    cfg, sch = schedule(offset_noise=0.1)
    net = TinyNet()
    x0, cond = batch()
    a = D.loss_fn(net, x0, cond, cfg, sch, gen(12))
    torch.manual_seed(123)  # the global RNG must not matter
    b = D.loss_fn(net, x0, cond, cfg, sch, gen(12))
    c = D.loss_fn(net, x0, cond, cfg, sch, gen(13))
    assert torch.equal(a["t"], b["t"]) and torch.equal(a["per_sample"], b["per_sample"])
    assert not torch.equal(a["t"], c["t"])


def test_loss_fn_zero_terminal_snr_with_min_snr_is_finite():
    cfg, sch = schedule(prediction="v", zero_terminal_snr=True, min_snr_gamma=5.0)
    x0, cond = batch(n=2000)
    out = D.loss_fn(lambda x, t, c: torch.zeros_like(x), x0, cond, cfg, sch, gen(14))
    assert (out["t"] == 999).any()  # the SNR-0 step was drawn
    assert torch.isfinite(out["per_sample"]).all() and torch.isfinite(out["loss"])


def test_loss_fn_rejects_mismatched_schedule():
    _, sch = schedule(prediction="v")
    with pytest.raises(ValueError, match="schedule"):
        D.loss_fn(TinyNet(), *batch(), DiffusionConfig(prediction="eps"), sch, gen())


# --- Held-out loss ------------------------------------------------------------------------


def test_bucket_centres():
    _, sch = schedule()
    assert D.bucket_timesteps(4, sch) == [125, 375, 625, 875]
    assert D.bucket_timesteps(1, sch) == [500]
    _, fl = schedule(objective="flow", prediction="v")
    assert D.bucket_timesteps(4, fl) == [125, 375, 625, 875]
    with pytest.raises(ValueError, match="eval.heldout_buckets"):
        D.bucket_timesteps(0, sch)


@pytest.mark.parametrize("kw", [dict(), dict(prediction="v"), dict(objective="flow", prediction="v")])
def test_heldout_loss_oracle_is_zero_and_zero_model_gives_target_power(kw):
    cfg, sch = schedule(**kw)
    x_star = torch.randn(1, 2, 4, 4, generator=gen(15))
    x0 = x_star.expand(8, -1, -1, -1).contiguous()  # data is the single point x*

    def oracle(x_t, t, cond):  # the exact prediction for single-point data
        a, s = D.coef(sch.alpha(t), x_t), D.coef(sch.sigma(t), x_t)
        eps = (x_t - a * x_star) / s
        return D.target(sch.prediction, x_star.expand_as(x_t), eps, t, sch)

    res = D.heldout_loss(oracle, x0, None, cfg, sch, 4, gen(16))
    assert list(res) == ["loss_t125", "loss_t375", "loss_t625", "loss_t875"]
    assert all(v < 1e-9 for v in res.values()), res  # squared fp32 rounding of unit values: ~1e-14

    # A network that outputs 0 scores the mean square of the target at each bucket,
    # computed from the same (shared) noise draw.
    res0 = D.heldout_loss(lambda x, t, c: torch.zeros_like(x), x0, None, cfg, sch, 4, gen(16))
    eps = torch.randn(8, 2, 4, 4, generator=gen(16))
    for tb in (125, 375, 625, 875):
        t = torch.full((8,), tb, dtype=torch.long if cfg.objective == "ddpm" else torch.float32)
        expected = (D.target(sch.prediction, x0, eps, t, sch) ** 2).mean().item()
        # An fp32 mean of 256 squares, reduced in another order: rel 1e-5 (~100 ulps).
        assert res0[f"loss_t{tb}"] == pytest.approx(expected, rel=1e-5)


def test_schedule_is_a_plain_frozen_container():
    _, sch = schedule()
    assert not isinstance(sch, torch.nn.Module)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sch.prediction = "v"  # type: ignore[misc]
