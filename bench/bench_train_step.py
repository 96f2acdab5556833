"""One training step with IAC+DC vs the stock torchvision RetinaNet, same backbone and size.

Both models share weights; steps alternate between them so machine noise hits both alike; the
ratio of median step times is printed (goal: <= 1.10x).
Usage: python bench/bench_train_step.py [--backbone resnet18] [--size 256] [--steps 12]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torchvision.models.detection.retinanet import RetinaNet

from detector.config import DetectorConfig, apply_overrides
from detector.model import build_detector


def make_batch(size: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(6, 2, generator=g) * size * 0.6
        wh = torch.rand(6, 2, generator=g) * size * 0.35 + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 5, (6,), generator=g)})
    return images, targets


def step(model, opt, images, targets) -> float:
    t0 = time.perf_counter()
    losses = model(images, targets)
    opt.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = apply_overrides(
        DetectorConfig(),
        {"model.backbone": args.backbone, "model.num_classes": 5, "model.min_size": args.size,
         "model.max_size": args.size, "assign.iac": True, "loss.dc": True, "assign.score_threshold": 0.6},
    )
    ours = build_detector(cfg)
    stock = RetinaNet(copy.deepcopy(ours.backbone), 5, min_size=args.size, max_size=args.size,
                      anchor_generator=ours.anchor_generator, head=copy.deepcopy(ours.head))
    ours.train(), stock.train()
    opt_o = torch.optim.SGD(ours.parameters(), lr=1e-3, momentum=0.9)
    opt_s = torch.optim.SGD(stock.parameters(), lr=1e-3, momentum=0.9)
    images, targets = make_batch(args.size, args.batch)
    for _ in range(2):  # warm-up (allocator, lazy init)
        step(ours, opt_o, images, targets), step(stock, opt_s, images, targets)
    t_o, t_s = [], []
    for i in range(args.steps):
        if i % 2:
            t_o.append(step(ours, opt_o, images, targets)), t_s.append(step(stock, opt_s, images, targets))
        else:
            t_s.append(step(stock, opt_s, images, targets)), t_o.append(step(ours, opt_o, images, targets))
    a, b = statistics.median(t_s), statistics.median(t_o)
    print(f"{args.backbone} {args.size}px batch {args.batch}, {args.threads} thread(s): stock {a * 1e3:.0f} ms/step, "
          f"IAC+DC {b * 1e3:.0f} ms/step, ratio {b / a:.3f}x (goal <= 1.10x)")


if __name__ == "__main__":
    main()
