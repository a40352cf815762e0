"""torch's private APIs, in one place, behind a version check (see latentforge/compat.py).

`new_shared(shape, dtype)`: an uninitialised tensor whose storage is in shared memory from
the start, allocated the way DataLoader's own `default_collate` does it inside a worker
(`torch.utils.data._utils.collate`: `elem._typed_storage()._new_shared(numel, device=...)`).
A batch built in it crosses from a DataLoader worker to the main process without a copy;
`Tensor.share_memory_()` would copy a private tensor into a new segment instead.
"""

from __future__ import annotations

import math

import torch

from latentforge.compat import check_tested

DIST = "torch"
TESTED = ">=2.14,<2.15"  # the series of requirements/lock.txt's torch 2.14.1
USES = "private storage API (Tensor._typed_storage()._new_shared, as DataLoader's default_collate)"


def check_version(version: str | None = None) -> str:
    """The installed torch version if it is tested, else UntestedVersionError (one line)."""
    return check_tested(DIST, TESTED, USES, version)


def new_shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of `shape` and `dtype` in shared memory."""
    check_version()
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).resize_(*shape)
