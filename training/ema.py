"""Exponential moving average of the weights, kept in fp32.

decay_t = min(decay, 1 - (1 + t) ** -warmup_power) with t the number of updates since
`start_step` (the warmup of Tarvainen & Valpola 2017 / timm's ModelEmaV2 power form):
early on the EMA follows the raw weights closely, later it averages over ~1/(1-decay) steps.

What the EMA tracks is what the engine hands it (`Engine.ema_parameters()`): the weights
the optimizer updates, in fp32. In fp32 training those are the parameters themselves:
whole below ZeRO-3, and under ZeRO-3 this rank's flat partition of each parameter. Under
bf16/fp16 they are the optimizer's fp32 master weights, never the rounded half-precision
module weights (whose rounding, ~0.4% near 1 for bf16, the average would keep):

- ZeRO-3: this rank's fp32 partition of each parameter (same layout as in fp32);
- ZeRO 1/2: the master is one flat fp32 partition per rank, cut across parameters; each
  parameter comes as a `Fragment` (the slice of it this rank holds, maybe none). Each rank
  updates the EMA where it holds the master; `sync` (one sum over ranks of the parts each
  rank owns) makes the EMA whole on every rank before it is read or saved;
- ZeRO 0: the fp32 master, whole on every rank.

The average is elementwise, so an EMA of partitions is the partition of the EMA: ZeRO-3
needs no gather per step, and each rank holds 1/N of the EMA (its checkpoint file holds
that shard). Full EMA weights (eval, export) are gathered on demand (`full`, `copy_to`,
collective under ZeRO-3 and for fragments) or assembled from the checkpoint files
(`assemble`).

A sharded layout is {"world_size": N, "rank": r, "numel": {name: n}, "shape": {name: [..]}}:
rank r's shard of a parameter is elements [r*P, (r+1)*P) of the flattened parameter
zero-padded to N*P, P = ceil(n / N) (DeepSpeed ZeRO-3's partitioning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from latentforge import dist
from latentforge.config import EMAConfig

Gather = Callable[[torch.Tensor], torch.Tensor]  # a rank's (P,) shard -> all ranks' shards, (N * P,)


@dataclass(frozen=True)
class Fragment:
    """The part of a parameter's fp32 master weights this rank holds under ZeRO 1/2:
    elements [start, start + values.numel()) of the flattened parameter of `shape`."""

    shape: tuple[int, ...]  # the whole parameter's shape
    start: int  # offset of `values` in the flattened parameter
    values: torch.Tensor  # (n,) fp32, a view into the optimizer's flat partition; n = 0 when none is here


class EMA:
    def __init__(self, params: dict[str, torch.Tensor | Fragment], cfg: EMAConfig,
                 layout: dict[str, Any] | None = None, gather: Gather | None = None):
        """params: name -> this rank's tensor (full, or its flat ZeRO-3 partition when
        `layout` is given; then `gather` is the collective that reassembles a parameter),
        or this rank's `Fragment` of each parameter (ZeRO 1/2 master weights). With
        fragments the constructor is collective: it assembles the whole initial weights."""
        if layout is not None and gather is None:
            raise ValueError("a sharded EMA needs the gather collective")
        self.cfg = cfg
        self.layout = layout
        self._gather = gather
        fragments = [isinstance(p, Fragment) for p in params.values()]
        if any(fragments) and not all(fragments):
            raise ValueError("EMA parameters: either every parameter is a Fragment or none is")
        if any(fragments) and layout is not None:
            raise ValueError("EMA parameters: fragments are parts of whole parameters; they take no shard layout")
        # Fragments: name -> (start, numel) of the part this rank updates; `sync` does the rest.
        self._owned: dict[str, tuple[int, int]] | None = None
        self._stale = False
        if any(fragments):
            self._owned = {n: (f.start, f.values.numel()) for n, f in params.items()}
            self.shadow = {n: torch.zeros(f.shape, dtype=torch.float32, device=dist.device())
                           for n, f in params.items()}
        else:
            self.shadow = {name: p.detach().float().clone() for name, p in params.items()}
        # What an update writes, as views of the shadow, in one list for the fused lerp: the
        # whole shadow; under ZeRO-3 the shard without its padding past the parameter's end
        # (the fp32 master partitions hold arbitrary bits there; it stays zero); with
        # fragments, the part this rank owns.
        self._names: list[str] = []
        self._targets: list[torch.Tensor] = []
        for name, s in self.shadow.items():
            if self._owned is not None:
                start, n = self._owned[name]
                target = s.view(-1)[start:start + n]
            elif layout is not None:
                n = self._valid_elements(name)
                s[n:] = 0
                target = s[:n]
            else:
                target = s
            if target.numel():
                self._names.append(name)
                self._targets.append(target)
        # Updates counted on the host, plus those whose weight was a device flag (added
        # there, so an update costs no host sync); `updates` sums the two.
        self._updates, self._updates_dev = 0, None
        if self._owned is not None:
            if self._targets:
                torch._foreach_copy_(self._targets, self._sources(params))
            self._stale = True
            self.sync()

    def _valid_elements(self, name: str) -> int:
        """Elements of this rank's shard of `name` that belong to the parameter (the rest is padding)."""
        n, world, rank = self.layout["numel"][name], self.layout["world_size"], self.layout["rank"]
        per = math.ceil(n / world)
        return max(0, min(per, n - rank * per))

    def _sources(self, params: dict[str, Any]) -> list[torch.Tensor]:
        """What each target averages in, from `params` (as in the constructor), on the
        target's device and dtype."""
        out = []
        for name, t in zip(self._names, self._targets):
            p = params[name]
            if isinstance(p, Fragment):
                if (p.start, p.values.numel()) != self._owned[name]:
                    raise ValueError(f"EMA parameter {name}: the optimizer's partition changed since the EMA was built")
                p = p.values
            elif t.numel() != p.numel():
                p = p.view(-1)[:t.numel()]  # a ZeRO-3 shard without its padding
            p = p.detach()
            out.append(p if p.dtype == t.dtype and p.device == t.device else p.to(t.device, t.dtype))
        return out

    @property
    def sharded(self) -> bool:
        return self.layout is not None

    @property
    def updates(self) -> int:
        """How many updates moved the average (reads a device counter: a host sync)."""
        return self._updates + (int(self._updates_dev.item()) if self._updates_dev is not None else 0)

    @updates.setter
    def updates(self, n: int) -> None:
        self._updates, self._updates_dev = int(n), None

    def decay_at(self, step: int) -> float:
        if step < self.cfg.start_step:
            return 0.0
        t = step - self.cfg.start_step
        if self.cfg.warmup_power <= 0:
            return self.cfg.decay
        return min(self.cfg.decay, 1.0 - (1.0 + t) ** -self.cfg.warmup_power)

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int, applied: torch.Tensor | None = None) -> float:
        """params: as in the constructor, after the optimizer step. One fused multi-tensor
        lerp over every tensor: s = d * s + (1 - d) * p. `applied`: a device scalar, 1.0 when
        the optimizer step was applied and 0.0 when it was dropped; the weight becomes
        (1 - d) * applied, so a dropped step leaves the average exactly as it was (lerp with
        weight 0), decided on the device without a host sync. Returns d."""
        d = self.decay_at(step)
        srcs = self._sources(params)
        if applied is None:
            if self._targets:
                torch._foreach_lerp_(self._targets, srcs, 1.0 - d)
            self._updates += 1
        else:
            if self._targets:
                weight = applied.to(self._targets[0].device, torch.float32) * (1.0 - d)  # () on the device
                torch._foreach_lerp_(self._targets, srcs, [weight] * len(srcs))
            self._updates_dev = applied.detach().clone() if self._updates_dev is None else self._updates_dev + applied
        self._stale = self._owned is not None  # every rank updates at the same steps: every rank syncs alike
        return d

    @torch.no_grad()
    def sync(self) -> None:
        """Make every rank's shadow whole after fragment updates: each rank keeps only the
        parts it owns (the others are stale) and one sum over ranks fills in the rest.
        Collective; a no-op without fragments or when nothing changed."""
        if self._owned is None or not self._stale:
            return
        for name, s in self.shadow.items():
            start, n = self._owned[name]
            flat = s.view(-1)
            mine = flat[start:start + n].clone()
            flat.zero_()
            flat[start:start + n] = mine
            dist.all_reduce_sum(flat)
        self._stale = False

    # -- full weights -------------------------------------------------------------------

    def full_tensor(self, name: str) -> torch.Tensor:
        """The EMA of one parameter, whole. Collective when sharded or made of fragments:
        every rank calls it."""
        self.sync()
        s = self.shadow[name]
        if not self.sharded:
            return s
        flat = self._gather(s)  # (N * P,)
        return flat[: self.layout["numel"][name]].view(self.layout["shape"][name])

    def full(self) -> dict[str, torch.Tensor]:
        """All EMA weights, whole (on CPU). Collective when sharded."""
        return {name: self.full_tensor(name).cpu() for name in self.shadow}

    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the EMA weights into a plain (non-DeepSpeed) module of the same architecture.
        Collective when sharded: one parameter gathered at a time."""
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name in self.shadow:
                    p.copy_(self.full_tensor(name).to(p.device, p.dtype))

    # -- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Collective with fragments (every rank calls it, as at a checkpoint)."""
        self.sync()
        return {"updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()},
                "layout": self.layout}

    def compatible(self, sd: dict[str, Any]) -> bool:
        """True if `sd` is this rank's state in this layout (same shards), so it loads as is."""
        return _same_layout(sd.get("layout"), self.layout) and set(sd["shadow"]) == set(self.shadow)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if not self.compatible(sd):
            missing = set(self.shadow) - set(sd["shadow"])
            raise ValueError(f"EMA state does not fit this layout (saved {_describe(sd.get('layout'))}, now "
                             f"{_describe(self.layout)}; {len(missing)} parameters missing): load it with load_full")
        for k, v in sd["shadow"].items():
            self.shadow[k].copy_(v)
        self.updates = int(sd["updates"])
        self._stale = False

    def load_full(self, full: dict[str, torch.Tensor], updates: int) -> None:
        """Load whole EMA weights (e.g. `assemble`d from another world size) into this
        rank's layout: its shards, or all of them."""
        missing = set(self.shadow) - set(full)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for name, s in self.shadow.items():
            s.copy_(shard_of(full[name], self.layout, name) if self.sharded else full[name])
        self.updates = int(updates)
        self._stale = False


def shard_of(full: torch.Tensor, layout: dict[str, Any], name: str) -> torch.Tensor:
    """Rank layout["rank"]'s flat shard of a whole parameter."""
    n, world, rank = layout["numel"][name], layout["world_size"], layout["rank"]
    per = math.ceil(n / world)
    flat = torch.zeros(per * world, dtype=torch.float32)
    flat[:n] = full.reshape(-1).float()
    return flat[rank * per:(rank + 1) * per]


def assemble(states: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Whole EMA weights from the EMA states of a checkpoint: one full state, or every
    rank's shard of a sharded one (in any order)."""
    if len(states) == 1 and states[0].get("layout") is None:
        return {k: v.float() for k, v in states[0]["shadow"].items()}
    by_rank = {int(st["layout"]["rank"]): st for st in states}
    world = int(states[0]["layout"]["world_size"])
    if sorted(by_rank) != list(range(world)):
        raise ValueError(f"EMA shards of ranks {sorted(by_rank)} cannot make a world of {world}")
    layout = by_rank[0]["layout"]
    out = {}
    for name in by_rank[0]["shadow"]:
        flat = torch.cat([by_rank[r]["shadow"][name].reshape(-1).float() for r in range(world)])
        out[name] = flat[: layout["numel"][name]].view(layout["shape"][name]).clone()
    return out


def _same_layout(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (a["world_size"], a["rank"], a["numel"]) == (b["world_size"], b["rank"], b["numel"])


def _describe(layout: dict[str, Any] | None) -> str:
    return "whole" if layout is None else f"rank {layout['rank']} of {layout['world_size']} shards"
