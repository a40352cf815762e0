"""Exponential moving average of the weights, kept in fp32.

decay_t = min(decay, 1 - (1 + t) ** -warmup_power) with t the number of updates since
`start_step` (the warmup of Tarvainen & Valpola 2017 / timm's ModelEmaV2 power form):
early on the EMA follows the raw weights closely, later it averages over ~1/(1-decay) steps.

What the EMA tracks is what the engine hands it (`Engine.ema_parameters()`): the full
parameters below ZeRO-3, and under ZeRO-3 this rank's flat partition of each parameter.
The average is elementwise, so an EMA of partitions is the partition of the EMA: ZeRO-3
needs no gather per step, and each rank holds 1/N of the EMA (its checkpoint file holds
that shard). Full EMA weights (eval, export) are gathered on demand (`full`, `copy_to`,
collective under ZeRO-3) or assembled from the checkpoint files (`assemble`).

A sharded layout is {"world_size": N, "rank": r, "numel": {name: n}, "shape": {name: [..]}}:
rank r's shard of a parameter is elements [r*P, (r+1)*P) of the flattened parameter
zero-padded to N*P, P = ceil(n / N) (DeepSpeed ZeRO-3's partitioning).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from latentforge.config import EMAConfig

Gather = Callable[[torch.Tensor], torch.Tensor]  # a rank's (P,) shard -> all ranks' shards, (N * P,)


class EMA:
    def __init__(self, params: dict[str, torch.Tensor], cfg: EMAConfig, layout: dict[str, Any] | None = None,
                 gather: Gather | None = None):
        """params: name -> this rank's tensor (full, or its flat ZeRO-3 partition when
        `layout` is given; then `gather` is the collective that reassembles a parameter)."""
        if layout is not None and gather is None:
            raise ValueError("a sharded EMA needs the gather collective")
        self.cfg = cfg
        self.layout = layout
        self._gather = gather
        self.shadow: dict[str, torch.Tensor] = {name: p.detach().float().clone() for name, p in params.items()}
        self._shadows = list(self.shadow.values())  # the same tensors, in one list for the fused update
        # Updates counted on the host, plus those whose weight was a device flag (added
        # there, so an update costs no host sync); `updates` sums the two.
        self._updates, self._updates_dev = 0, None

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
        srcs = [params[name].detach() for name in self.shadow]
        srcs = [p if p.dtype == s.dtype and p.device == s.device else p.to(s.device, s.dtype)
                for p, s in zip(srcs, self._shadows)]
        if applied is None:
            torch._foreach_lerp_(self._shadows, srcs, 1.0 - d)
            self._updates += 1
        else:
            weight = applied.to(self._shadows[0].device, torch.float32) * (1.0 - d)  # () on the device
            torch._foreach_lerp_(self._shadows, srcs, [weight] * len(srcs))
            self._updates_dev = applied.detach().clone() if self._updates_dev is None else self._updates_dev + applied
        return d

    # -- full weights -------------------------------------------------------------------

    def full_tensor(self, name: str) -> torch.Tensor:
        """The EMA of one parameter, whole. Collective when sharded: every rank calls it."""
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

    def load_full(self, full: dict[str, torch.Tensor], updates: int) -> None:
        """Load whole EMA weights (e.g. `assemble`d from another world size) into this
        rank's layout: its shards, or all of them."""
        missing = set(self.shadow) - set(full)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for name, s in self.shadow.items():
            s.copy_(shard_of(full[name], self.layout, name) if self.sharded else full[name])
        self.updates = int(updates)


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
