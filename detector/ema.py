"""Exponential moving average of a model's weights, evaluated instead of the raw weights.

As YOLO's ``ModelEMA`` and mmdetection's ``ExpMomentumEMA``: after every optimizer step,
``ema = d * ema + (1 - d) * weights`` with ``d = decay * (1 - exp(-updates / warmup))``, so the
average follows the fast early changes and then smooths the step-to-step noise of the last
epochs (the noise that makes two seeds' final AP differ). Buffers (BN statistics) are copied.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """An averaged copy of ``model`` (unwrapped; eval mode, no gradients)."""

    def __init__(self, model: nn.Module, decay: float, warmup: int = 2000):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in (0, 1)")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        """``d`` of the next update: ``decay * (1 - exp(-updates / warmup))``."""
        return self.decay * (1.0 - math.exp(-self.updates / self.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights in (call after each optimizer step)."""
        self.updates += 1
        d = self.current_decay()
        src = model.state_dict()
        for name, ema_v in self.module.state_dict().items():
            v = src[name].detach()
            if ema_v.dtype.is_floating_point:
                ema_v.mul_(d).add_(v.to(ema_v.dtype), alpha=1.0 - d)
            else:  # integer buffers (num_batches_tracked): the latest value
                ema_v.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


__all__ = ["ModelEMA"]
