"""Exponential moving average of the weights, kept in fp32.

decay_t = min(decay, 1 - (1 + t) ** -warmup_power) with t the number of updates since
`start_step` (the warmup of Tarvainen & Valpola 2017 / timm's ModelEmaV2 power form):
early on the EMA follows the raw weights closely, later it averages over ~1/(1-decay) steps.

The caller passes full parameters: under ZeRO-3 it updates inside the engine's
`full_parameters()` context, which gathers them.
"""

from __future__ import annotations

from typing import Any

import torch

from latentforge.training.config import EMAConfig


class EMA:
    def __init__(self, module: torch.nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in module.named_parameters() if p.requires_grad
        }

    def decay_at(self, step: int) -> float:
        if step < self.cfg.start_step:
            return 0.0
        t = step - self.cfg.start_step
        if self.cfg.warmup_power <= 0:
            return self.cfg.decay
        return min(self.cfg.decay, 1.0 - (1.0 + t) ** -self.cfg.warmup_power)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> float:
        d = self.decay_at(step)
        for name, p in module.named_parameters():
            if name in self.shadow:
                s = self.shadow[name]
                s.lerp_(p.detach().to(s.device, torch.float32), 1.0 - d)  # s = d * s + (1 - d) * p
        self.updates += 1
        return d

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        missing = set(self.shadow) - set(sd["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for k, v in sd["shadow"].items():
            if k in self.shadow:
                self.shadow[k].copy_(v)
        self.updates = int(sd["updates"])

    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the EMA weights into a plain (non-DeepSpeed) module of the same architecture."""
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name in self.shadow:
                    p.copy_(self.shadow[name].to(p.device, p.dtype))
