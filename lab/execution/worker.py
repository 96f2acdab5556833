"""What each Train worker runs beside the loop itself: the progress line, the non-finite-loss guard, the
single-process loader (local mode), MLflow's system-metrics sampler and Ray Train's log level."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lab.settings.config import LabConfig

if TYPE_CHECKING:
    from lab.execution.loop import LoopArgs

class Progress:
    """One line every ``every`` steps: epoch, step, loss, lr, images/s, ETA (rank 0 prints)."""

    def __init__(self, name: str, epochs: int, iters_per_epoch: int, start_epoch: int, every: int, enabled: bool):
        self.name, self.epochs, self.iters, self.every, self.enabled = name, epochs, iters_per_epoch, every, enabled
        self.remaining_total = (epochs - start_epoch) * iters_per_epoch
        self.done = 0
        self.t0 = time.perf_counter()

    def step(self, epoch: int, it: int, loss: float, parts: dict[str, float], lr: float, img_per_s: float) -> None:
        self.done += 1
        if not self.enabled or (it + 1) % self.every and it + 1 != self.iters:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * max(self.remaining_total - self.done, 0)
        detail = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
        print(
            f"[{self.name}] epoch {epoch + 1}/{self.epochs} step {it + 1}/{self.iters} "
            f"loss {loss:.4f} ({detail}) lr {lr:.3g} {img_per_s:.1f} img/s ETA {hms(eta)}",
            flush=True,
        )


def hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def start_system_metrics(cfg: LabConfig, args: LoopArgs, node: str | None) -> Any:
    """MLflow's system-metrics sampler on this worker's machine, logging into the cell's run (or None).

    ``resume_logging``: a resumed run continues its ``system/...`` steps instead of restarting at 0.
    """
    if not (cfg.train.system_metrics_s > 0 and args.run_id and args.tracking_uri):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop INFO lines
    monitor = SystemMetricsMonitor(args.run_id, sampling_interval=cfg.train.system_metrics_s, node_id=node,
                                   resume_logging=True, tracking_uri=args.tracking_uri)
    monitor.start()
    return monitor


def quiet_ray_train_logs() -> None:
    """Drop Ray Train's per-report INFO lines ("Reporting training result ...") on every rank.

    Ray 2.60 names that logger by file path (``getLogger(__file__)``), so ``LoggingConfig``'s
    level filter, which only matches ``ray.train.*`` names, misses it.
    """
    for name in list(logging.root.manager.loggerDict):
        if "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


class NonFiniteGuard:
    """Skip optimizer steps whose loss is NaN/inf; abort after ``limit`` in a row.

    A single bad batch (an extreme box, an lr spike) should cost one step, not a cell that ran for
    days; a run that keeps producing them has diverged and is stopped with the step and the loss
    terms named. Under DDP every rank must skip the same step (else the gradient all-reduce
    deadlocks), so the verdict is all-reduced. ``inject``: global steps (1-based) whose loss is made
    NaN, for the fault tests.
    """

    def __init__(self, limit: int, inject: frozenset[int] = frozenset()):
        self.limit, self.inject = limit, inject
        self.total = 0
        self.in_a_row = 0

    def check(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], step: int, epoch: int, it: int,
              world: int) -> tuple[torch.Tensor, bool]:
        """(loss, ok): ``ok`` False means skip this step on every rank."""
        if step in self.inject:
            loss = loss * float("nan")
        ok = bool(torch.isfinite(loss.detach()))
        if world > 1 and dist.is_initialized():
            flag = torch.tensor([1.0 if ok else 0.0], device=loss.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item() > 0)
        if ok:
            self.in_a_row = 0
            return loss, True
        self.total += 1
        self.in_a_row += 1
        terms = {k: float(v) for k, v in parts.items()}
        if self.in_a_row > self.limit:
            raise FloatingPointError(
                f"non-finite loss {float(loss)} at epoch {epoch + 1} step {it + 1} (global step {step}), "
                f"{self.in_a_row} step(s) in a row (train.max_nonfinite={self.limit}); loss terms {terms}; "
                f"try a lower train.base_lr or train.grad_clip > 0")
        print(f"[detlab] skipped step {step} (epoch {epoch + 1} step {it + 1}): non-finite loss {float(loss)}, "
              f"terms {terms} ({self.in_a_row} in a row, {self.total} in all)", flush=True)
        return loss, False


class DeviceLoader:
    """What ``prepare_data_loader`` does for one process: yields batches moved to ``device``."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.device.type == "cpu":
            yield from self.loader
            return
        for images, targets in self.loader:
            yield ([im.to(self.device, non_blocking=True) for im in images],
                   [{k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                    for t in targets])
