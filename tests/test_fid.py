"""FID: statistics, the distance, sharded accumulation over 2 real ranks, the reference
cache, and the real Inception path with a tiny random-init network saved to tmp_path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from latentforge.eval import fid


def _features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Correlated, non-centred features (N, D): a random linear map of Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix) * scale + shift + 0.5


def _reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The pytorch-fid / TTUR formula: scipy.linalg.sqrtm, eps * I fallback, real part."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------------------
# Statistics and distance on random features.


def test_mean_cov_matches_numpy() -> None:
    x = _features(300, 16, seed=0)
    stats = fid.FeatureStats(16)
    for chunk in x.split(70):  # uneven batches
        stats.update(chunk.float())  # float32 in, float64 inside
    mu, sigma = stats.mean_cov()
    xf = x.float().double().numpy()
    assert stats.count == 300
    assert mu.dtype == sigma.dtype == torch.float64
    # fp64 sums of 300 rows in another order: 1e-12. The covariance from summed outer
    # products (minus n mu mu^T) loses digits to cancellation, numpy's does not: 1e-9.
    np.testing.assert_allclose(mu.numpy(), xf.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(xf, rowvar=False, ddof=1), rtol=1e-9, atol=1e-12)


def test_fid_of_a_set_with_itself_is_zero() -> None:
    stats = fid.FeatureStats(32)
    stats.update(_features(200, 32, seed=1))
    mu, sigma = stats.mean_cov()
    # fp64 trace(2 sigma - 2 sqrtm(sigma sigma)) of a well-conditioned 32x32 matrix: the
    # cancellation leaves ~1e-14 of the trace; 1e-9 allows any LAPACK.
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * float(sigma.trace())
    # Fewer samples than dimensions: a singular covariance, still ~0 and finite (the matrix
    # square root of a rank-4 matrix is ill-conditioned: 1e-5 of the trace).
    few = fid.FeatureStats(32)
    few.update(_features(5, 32, seed=2))
    mu, sigma = few.mean_cov()
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-5 * float(sigma.trace())


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.3, 1.0), (0.0, 2.5), (-1.0, 0.2)])
def test_fid_matches_scipy_reference(shift: float, scale: float) -> None:
    x = _features(400, 24, seed=3)
    y = _features(350, 24, seed=4, shift=shift, scale=scale)
    a, b = fid.FeatureStats(24), fid.FeatureStats(24)
    a.update(x)
    b.update(y)
    got = fid.fid_from_stats(a, b)
    want = _reference_fid(x.numpy(), y.numpy())
    assert want > 0.01  # two different sets
    # fp64 both, but another algorithm (scipy's Schur sqrtm on the product versus ours) and
    # another summation order: 1e-3 absolute on FIDs of 0.01-10 is far above fp64 rounding
    # and far below what a wrong term would cost.
    assert abs(got - want) < 1e-3, (got, want)
    # Symmetric in its arguments (the same fp64 ops on swapped inputs: ~1e-12 relative).
    assert abs(fid.fid_from_stats(b, a) - got) < 1e-9 * max(1.0, got)


def test_state_dict_roundtrip_and_merge_equal_a_single_pass() -> None:
    x = _features(90, 8, seed=5)
    whole = fid.FeatureStats(8)
    whole.update(x)
    a, b = fid.FeatureStats(8), fid.FeatureStats(8)
    a.update(x[:33])
    b.update(x[33:])
    merged = fid.FeatureStats.from_state_dict(a.state_dict()).merge(b)
    assert merged.count == whole.count == 90
    # The same fp64 sums, grouped 33 + 57 instead of 90: a few fp64 ulps.
    torch.testing.assert_close(merged.sum, whole.sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.outer, whole.outer, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_clear_errors() -> None:
    stats = fid.FeatureStats(8)
    with pytest.raises(ValueError, match="features"):
        stats.update(torch.zeros(4, 9))
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_cov()
    stats.update(torch.randn(3, 8))
    stats.all_reduce()  # one process: identity
    assert stats.count == 3
    with pytest.raises(RuntimeError, match="already reduced"):
        stats.all_reduce()
    with pytest.raises(ValueError, match="images_uint8"):
        fid.image_features(torch.nn.Linear(1, 1), torch.zeros(1, 3, 8, 8), 1)


# ---------------------------------------------------------------------------------------
# Two real ranks (gloo on loopback).

_RANK_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from latentforge import dist
    from latentforge.eval import fid

    feats_path, split, out_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    dist.init(timeout_s=60)
    r = dist.rank()
    feats = torch.load(feats_path)
    mine = feats[:split] if r == 0 else feats[split:]

    stats = fid.FeatureStats(feats.shape[1])
    for chunk in mine.split(5):
        stats.update(chunk)
    stats.all_reduce()

    calls = []
    def compute():
        calls.append(1)
        s = fid.FeatureStats(feats.shape[1])
        s.update(mine)
        return s.all_reduce()

    # A cache directory per rank: only rank 0 may read or write it, so rank 1 must get
    # its stats from rank 0 even though its own directory stays empty.
    cache = out_dir / f"cache_rank{r}"
    parts = {"dataset": "sharded-test", "resolution": 32, "num_images": feats.shape[0], "inception": "x"}
    a, hit_a = fid.reference_stats(cache, parts, compute)
    b, hit_b = fid.reference_stats(cache, parts, compute)
    torch.save({"stats": stats.state_dict(), "a": a.state_dict(), "b": b.state_dict(),
                "hit_a": hit_a, "hit_b": hit_b, "calls": len(calls), "world": dist.world_size()},
               out_dir / f"rank{r}.pt")
    dist.destroy()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_sharded_equals_single_pass_and_share_the_cache(tmp_path: Path) -> None:
    x = _features(20, 12, seed=6)
    torch.save(x, tmp_path / "feats.pt")
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    port = _free_port()
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "",
               "OMP_NUM_THREADS": "1"}
        # Uneven shards: rank 0 gets 7 images, rank 1 gets 13.
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "feats.pt"), "7",
                                       str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out

    single = fid.FeatureStats(12)
    single.update(x)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["world"] == 2
    for res in (r0, r1):
        for name in ("stats", "a", "b"):
            st = res[name]
            assert st["count"] == 20
            # fp64 sums over ranks (an all-reduce) versus one pass: a few fp64 ulps.
            torch.testing.assert_close(st["sum"], single.sum, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(st["outer"], single.outer, rtol=1e-12, atol=1e-12)
        assert (res["hit_a"], res["hit_b"]) == (False, True)
        assert res["calls"] == 1  # computed once (collectively), then served from the cache
    # Ranks hold bitwise identical statistics.
    assert torch.equal(r0["b"]["outer"], r1["b"]["outer"])
    mu, sigma = fid.FeatureStats.from_state_dict(r0["stats"]).mean_cov()
    mu1, sigma1 = single.mean_cov()
    # fp64 statistics equal to a few ulps (above): FID ~1e-12; 1e-9 allows any LAPACK.
    assert abs(fid.frechet_distance(mu, sigma, mu1, sigma1)) < 1e-9
    # Only rank 0 wrote.
    assert len(list((tmp_path / "cache_rank0").glob("fid_ref_*.pt"))) == 1
    assert not (tmp_path / "cache_rank1").exists()


# ---------------------------------------------------------------------------------------
# Reference cache (one process).


def test_reference_cache_hits_on_same_key_and_misses_on_any_change(tmp_path: Path) -> None:
    x = _features(10, 6, seed=7)
    calls = []

    def compute() -> fid.FeatureStats:
        calls.append(1)
        s = fid.FeatureStats(6)
        s.update(x)
        return s.all_reduce()

    base = {"dataset": "manifest-abc", "resolution": 64, "num_images": 10, "inception": "sha-1"}
    stats, hit = fid.reference_stats(tmp_path, base, compute)
    assert (hit, len(calls)) == (False, 1)
    again, hit = fid.reference_stats(tmp_path, dict(base), compute)
    assert (hit, len(calls)) == (True, 1)
    assert again.count == 10 and torch.equal(again.outer, stats.outer)

    changes = {"dataset": "manifest-abd", "resolution": 32, "num_images": 11, "inception": "sha-2"}
    for i, (k, v) in enumerate(changes.items()):
        _, hit = fid.reference_stats(tmp_path, {**base, k: v}, compute)
        assert (hit, len(calls)) == (False, 2 + i), k
    _, hit = fid.reference_stats(tmp_path, {**base, "crop": "center"}, compute)  # an extra part
    assert (hit, len(calls)) == (False, 6)

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len([f for f in files if f.endswith(".pt")]) == 6
    assert not [f for f in files if ".tmp" in f]  # atomic writes leave no temporaries
    key = fid.reference_key(base)
    sidecar = json.loads((tmp_path / f"fid_ref_{key}.json").read_text())
    assert sidecar["key_parts"]["dataset"] == "manifest-abc"
    assert sidecar["key_parts"]["fid_protocol"] == fid.FID_PROTOCOL
    assert sidecar["count"] == 10


def test_reference_cache_recomputes_an_unusable_file(tmp_path: Path) -> None:
    parts = {"dataset": "d", "resolution": 8, "num_images": 4, "inception": "s"}
    calls = []

    def compute() -> fid.FeatureStats:
        calls.append(1)
        s = fid.FeatureStats(3)
        s.update(torch.randn(4, 3))
        return s

    (tmp_path / f"fid_ref_{fid.reference_key(parts)}.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unusable"):
        _, hit = fid.reference_stats(tmp_path, parts, compute)
    assert (hit, len(calls)) == (False, 1)
    _, hit = fid.reference_stats(tmp_path, parts, compute)
    assert (hit, len(calls)) == (True, 1)


def test_reference_key_requires_the_identity_parts() -> None:
    with pytest.raises(ValueError, match="inception"):
        fid.reference_key({"dataset": "d", "resolution": 8, "num_images": 4})
    with pytest.raises(ValueError, match="key_parts.resolution"):
        fid.reference_key({"dataset": "d", "resolution": object(), "num_images": 4, "inception": "s"})


def test_weights_sha256_matches_hashlib_and_follows_changes(tmp_path: Path) -> None:
    import hashlib

    p = tmp_path / "w.bin"
    p.write_bytes(b"abc" * 1000)
    assert fid.weights_sha256(p) == hashlib.sha256(b"abc" * 1000).hexdigest()
    p.write_bytes(b"abcd" * 1000)  # different size: a new cache entry
    assert fid.weights_sha256(p) == hashlib.sha256(b"abcd" * 1000).hexdigest()


# ---------------------------------------------------------------------------------------
# The real network (random init; 299 px Inception on CPU, so only a handful of images).


def test_missing_inception_weights_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / fid.INCEPTION_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError) as err:
        fid.load_inception(missing, "cpu")
    msg = str(err.value)
    assert str(missing) in msg
    assert fid.INCEPTION_WEIGHTS_FILE in msg and fid.INCEPTION_CONFIG_KEY in msg


def test_wrong_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        fid.load_inception(bad, "cpu")


@pytest.fixture(scope="module")
def random_inception() -> torch.nn.Module:
    return fid.load_inception(None, "cpu", random_init_seed=0)


def test_random_inception_roundtrip_through_a_saved_file(random_inception: torch.nn.Module,
                                                         tmp_path: Path) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ext = random_inception
    assert ext.is_random and ext.metric_name == "eval/fid_randinit"
    path = tmp_path / "inception_random.pth"
    torch.save(ext.state_dict(), path)
    loaded = fid.load_inception(str(path), "cpu")
    assert type(loaded) is FeatureExtractorInceptionV3  # the library's own class, via its own weights path
    assert not loaded.is_random and loaded.metric_name == "eval/fid"
    assert loaded.weights_sha256 == fid.weights_sha256(path)

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    imgs[2:] //= 4  # two darker images, so the set has spread
    feats = fid.image_features(ext, imgs, batch_size=3)
    assert feats.shape == (4, 2048) and feats.dtype == torch.float64
    assert torch.isfinite(feats).all() and feats.abs().mean() > 1e-3  # random init keeps signal
    assert (feats[0] - feats[2]).abs().max() > 1e-4  # different images, different features
    # ~50 fp32 conv layers, batches of 4 instead of 3 (other kernel blocking): errors of a few
    # ulps per layer, ~1e-5 relative at the end; 1e-4 leaves room, atol covers features near 0.
    torch.testing.assert_close(fid.image_features(loaded, imgs, batch_size=4), feats, rtol=1e-4, atol=1e-6)

    stats = fid.FeatureStats()
    stats.update(feats)
    mu, sigma = stats.mean_cov()
    # 4 samples in 2048 dimensions: a rank-3 covariance, whose square root is ill-conditioned.
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-4 * float(sigma.trace())
    other = fid.FeatureStats()
    other.update(fid.image_features(ext, torch.full((3, 3, 64, 64), 200, dtype=torch.uint8)
                                    - torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1) * 50, 3))
    assert fid.fid_from_stats(stats, other) > 1e-3


def test_random_inception_is_a_pure_function_of_the_seed(random_inception: torch.nn.Module) -> None:
    again = fid.load_inception(None, "cpu", random_init_seed=0)
    assert again.weights_sha256 == random_inception.weights_sha256
    other = fid.load_inception(None, "cpu", random_init_seed=1)
    assert other.weights_sha256 != random_inception.weights_sha256
