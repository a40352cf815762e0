"""Version checks for the adapters around other libraries' private APIs.

latentforge reaches into a few APIs that their libraries do not promise to keep: submitit's
requeue bookkeeping, open_clip's checkpoint finder and text-tower internals, MLflow's
system-metrics samplers and torch's shared-memory storages. Each library's uses live in one
small adapter (`launch/submitit_compat.py`, `data/open_clip_compat.py`,
`training/mlflow_compat.py`, `latentforge/torch_compat.py`), and each adapter first checks
the installed version against the series the suite ran with (requirements/lock.txt pins the
exact versions). Any other version fails with one line that names the library, its
version, the tested series and what to do; `LATENTFORGE_ALLOW_UNTESTED=1` turns the refusal
into a warning, to try a new release. DeepSpeed's adapter, `training/deepspeed_compat.py`,
has its own check and switch (`LATENTFORGE_ALLOW_UNTESTED_DEEPSPEED=1`).
"""

from __future__ import annotations

import functools
import os
from importlib import metadata

from latentforge.log import get_logger

log = get_logger("compat")

ALLOW_ENV = "LATENTFORGE_ALLOW_UNTESTED"  # "1": warn about an untested version instead of refusing it


class UntestedVersionError(RuntimeError):
    """An installed library outside the series whose private APIs were tested. One line."""


@functools.lru_cache(maxsize=None)
def installed_version(dist: str) -> str:
    """The installed version of distribution `dist` ("" if it is not installed)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


_WARNED: set[tuple[str, str]] = set()


def check_tested(dist: str, tested: str, uses: str, version: str | None = None) -> str:
    """`dist`'s installed version (or `version`) if it is in `tested`, a PEP 440 specifier
    such as ">=1.5.4,<1.6"; otherwise UntestedVersionError naming `uses`, the private API
    relied on. A local label (torch's "+cu124") does not matter."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    v = installed_version(dist) if version is None else version
    try:
        ok = bool(v) and SpecifierSet(tested).contains(Version(v), prereleases=True)
    except InvalidVersion:
        ok = False
    if ok:
        return v
    found = f"{dist} {v}" if v else f"{dist} (not installed)"
    msg = (f"{found} is not a version latentforge was tested with ({dist}{tested}; requirements/lock.txt pins the "
           f"tested set), and latentforge uses its {uses}: install a tested version, or set {ALLOW_ENV}=1 to try "
           f"this one")
    if os.environ.get(ALLOW_ENV) == "1" and v:
        if (dist, v) not in _WARNED:
            _WARNED.add((dist, v))
            log.warning(msg.split(": install")[0] + f"; trying it anyway ({ALLOW_ENV}=1)")
        return v
    raise UntestedVersionError(msg)
