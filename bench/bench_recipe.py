"""Training-step throughput of the CPU recipe: the demo's old model vs the recipe's, and NHWC.

Two ratios, each from steps that alternate between the two models in this process (machine noise
hits both alike), medians of ``--steps`` steps on the same batch of 160-px images:
* images/s of the recipe model (resnet10 at width 32, 64-channel FPN, 2-conv GN head, anchors
  16-256) over the model the demo used before (resnet18, 256-channel FPN, 4-conv GN head);
* step time of the recipe model with channels-last weights over contiguous ones
  (``train.channels_last``).
Usage: python bench/bench_recipe.py [--batch 8] [--steps 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_train_step import make_batch, step  # noqa: E402
from detector.config import DetectorConfig, apply_overrides  # noqa: E402
from detector.model import build_detector  # noqa: E402

OLD = {"model.backbone": "resnet18", "model.norm": "gn", "model.head_norm": "gn"}
RECIPE = {"model.backbone": "resnet10", "model.backbone_width": 32, "model.fpn_channels": 64, "model.head_convs": 2,
          "model.norm": "bn", "model.head_norm": "gn", "model.anchor_sizes": [16, 32, 64, 128, 256]}


def build(over: dict, size: int, channels_last: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    cfg = apply_overrides(DetectorConfig(), {"model.num_classes": 5, "model.min_size": size, "model.max_size": size, **over})
    model = build_detector(cfg).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def race(a, b, batch, steps: int) -> tuple[float, float]:
    """Median step seconds of ``a`` and ``b`` (each a (model, optimizer)), alternating which goes first."""
    for _ in range(2):
        step(*a, *batch), step(*b, *batch)
    ta, tb = [], []
    for i in range(steps):
        first, second = (a, b) if i % 2 else (b, a)
        t1, t2 = step(*first, *batch), step(*second, *batch)
        (ta, tb)[first is b].append(t1)
        (ta, tb)[second is b].append(t2)
    return statistics.median(ta), statistics.median(tb)


def step_parser() -> argparse.ArgumentParser:
    """Options of the train-step races (input size, batch, steps, torch threads)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    return ap


def main() -> None:
    args = step_parser().parse_args()
    torch.set_num_threads(args.threads)
    batch = make_batch(args.size, args.batch)
    old, new = race(build(OLD, args.size), build(RECIPE, args.size), batch, args.steps)
    print(f"{args.size}px batch {args.batch}, {args.threads} thread(s): old demo model {args.batch / old:.1f} img/s, "
          f"recipe model {args.batch / new:.1f} img/s: {old / new:.2f}x the throughput")
    plain, nhwc = race(build(RECIPE, args.size), build(RECIPE, args.size, channels_last=True), batch, args.steps)
    print(f"recipe model: contiguous {plain * 1e3:.0f} ms/step, channels_last {nhwc * 1e3:.0f} ms/step: "
          f"ratio {nhwc / plain:.2f}x")


if __name__ == "__main__":
    main()
