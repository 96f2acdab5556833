"""The cost of determinism: one training step of the demo recipe's model with
``torch.use_deterministic_algorithms(True)`` against without, and of the EMA update.

Both settings run in this process on one model, steps alternating between them so machine noise
hits both alike; prints the ratio of median step times (deterministic / not, and with the EMA
update / without).
Usage: python bench/bench_determinism.py [--profile demo] [--dataset shapes] [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_train_step import make_batch  # noqa: E402
from detector.ema import ModelEMA  # noqa: E402
from lab.plan.experiments import load_profile, table_cells  # noqa: E402
from lab.execution.schedule import build_optimizer, build_train_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--dataset", default="shapes")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cell = next(c for c in table_cells(2, load_profile(args.profile), 1) if c.dataset == args.dataset
                and c.row == "iac_dc")
    cfg = cell.cfg
    cfg.model.num_classes = 5
    cfg.model.weights_backbone = None
    model = build_train_model(cfg).train()
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    ema = ModelEMA(model, 0.9998)
    size = cfg.model.min_size
    images, targets = make_batch(size, cfg.train.batch_size)

    def step(deterministic: bool, with_ema: bool) -> float:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        t0 = time.perf_counter()
        losses = model(images, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        if with_ema:
            ema.update(model)
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up
        step(False, False)
    times: dict[tuple[bool, bool], list[float]] = {(d, e): [] for d in (False, True) for e in (False, True)}
    for _ in range(args.steps):
        for setting in times:
            times[setting].append(step(*setting))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.profile}/{args.dataset} model ({size} px, batch {cfg.train.batch_size}, {args.threads} thread(s)), "
          f"median of {args.steps} alternating steps:")
    print(f"  plain {med[(False, False)] * 1000:.0f} ms, deterministic {med[(True, False)] * 1000:.0f} ms: "
          f"ratio {med[(True, False)] / med[(False, False)]:.3f}x")
    print(f"  with EMA update {med[(False, True)] * 1000:.0f} ms: ratio {med[(False, True)] / med[(False, False)]:.3f}x; "
          f"deterministic + EMA {med[(True, True)] / med[(False, False)]:.3f}x")


if __name__ == "__main__":
    main()
