"""The optimiser, the lr schedule and the RNG state of a training run (pure torch; one per worker).

The schedule is positioned by iteration, so a run resumed with another worker count (other iterations per epoch,
another linearly scaled lr) continues at the same point of it (:func:`reposition_schedule`).
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from detector.model import build_detector
from lab.settings.config import LabConfig

def lr_lambda(total_iters: int, warmup_iters: int, warmup_factor: float, steps: tuple[float, ...], gamma: float,
              schedule: str = "step"):
    """Multiplier of the base lr at iteration ``it``: linear warm-up, then step decay at ``steps`` x
    total (``schedule="step"``) or a cosine from 1 at the end of the warm-up to 0 at ``total_iters``."""
    milestones = [int(s * total_iters) for s in steps]

    def factor(it: int) -> float:
        warm = 1.0
        if it < warmup_iters:
            warm = warmup_factor + (1.0 - warmup_factor) * it / warmup_iters
        if schedule == "cosine":
            span = max(total_iters - warmup_iters, 1)
            return warm * 0.5 * (1.0 + math.cos(math.pi * min(max(it - warmup_iters, 0) / span, 1.0)))
        return warm * gamma ** sum(it >= m for m in milestones)

    return factor


def build_optimizer(params: list[torch.nn.Parameter], cfg: LabConfig) -> torch.optim.Optimizer:
    """``train.optimizer``: SGD with momentum (the paper's) or AdamW, at the linearly scaled lr."""
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def warmup_iters_for(cfg: LabConfig, total_iters: int) -> int:
    """``train.warmup_frac`` of the run when set, else ``train.warmup_iters``."""
    t = cfg.train
    return max(1, round(t.warmup_frac * total_iters)) if t.warmup_frac > 0 else t.warmup_iters


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: LabConfig, iters_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's lr schedule over ``train.epochs x iters_per_epoch`` iterations (see :func:`lr_lambda`)."""
    t = cfg.train
    total = t.epochs * iters_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total, warmup_iters_for(cfg, total), t.warmup_factor, t.lr_steps, t.lr_gamma, t.lr_schedule))


def build_train_model(cfg: LabConfig) -> torch.nn.Module:
    """The detector as it trains: channels-last weights with ``train.channels_last`` (the convs then
    run NHWC; bench/bench_recipe.py measures it on CPU)."""
    net = build_detector(cfg)
    return net.to(memory_format=torch.channels_last) if cfg.train.channels_last else net


def reposition_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                        lr: float, iteration: int) -> None:
    """Put a loaded optimizer + ``LambdaLR`` at ``iteration`` of a schedule whose base lr is ``lr``.

    Resuming with another worker count changes both the iterations per epoch and the linearly
    scaled lr, so the saved iteration count and base lr are wrong; the epoch is what carries over.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    scheduler.last_epoch = iteration
    for group, lam in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * lam(iteration)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def all_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's RNG state (gathered, so rank 0's checkpoint holds them all)."""
    mine = rng_state()
    if world_size == 1 or not dist.is_initialized():
        return [mine]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, mine)
    return out
