"""clb_nms vs torchvision.ops.batched_nms on 5000 clustered candidates over 80 classes.

Prints the ratio of median times measured in this process (goal: <= 1.5x). Two layouts: candidates
that keep their object's class (most of a RetinaNet's output), and 20 % of them relabelled to a
random class. Also printed: clb_nms against detlab's own greedy NMS (``greedy_nms``, which finds the
same leaders the same way, :func:`detector.nms.class_wise_nms`), i.e. what CL-B's clustering and
selection add on top of the NMS every detector runs. Usage: python bench/bench_nms.py [--threads 1] [--reps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.ops import batched_nms

from detector.nms import clb_nms, greedy_nms


def clustered_candidates(n: int, seed: int, num_classes: int = 80, objects: int = 60, relabel: float = 0.2):
    """``n`` boxes jittered around ``objects`` objects in an 800x800 image (x1, y1, x2, y2)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(objects, 2, generator=g) * 800
    sizes = torch.rand(objects, 2, generator=g) * 200 + 16
    obj_cls = torch.randint(0, num_classes, (objects,), generator=g)
    o = torch.randint(0, objects, (n,), generator=g)
    c = centres[o] + torch.randn(n, 2, generator=g) * sizes[o] * 0.08
    s = sizes[o] * (1 + 0.1 * torch.randn(n, 2, generator=g)).abs()
    boxes = torch.cat([c - s / 2, c + s / 2], 1)
    logits = torch.randn(n, generator=g) * 1.5 - 1.0
    rand_cls = torch.randint(0, num_classes, (n,), generator=g)
    labels = torch.where(torch.rand(n, generator=g) < relabel, rand_cls, obj_cls[o])
    return boxes, logits.sigmoid(), logits, labels


def paired_median_ms(*fns, reps: int) -> list[float]:
    """Median ms of each of ``fns`` called in turn (a, b, c, a, b, c, ...): this machine's speed
    drifts within seconds, and alternating call by call lets the drift hit all alike."""
    for f in fns:
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for f, ts in zip(fns, times):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e3 for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--n", type=int, default=5000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    worst = worst_own = 0.0
    for relabel in (0.0, 0.2):
        boxes, scores, logits, labels = clustered_candidates(args.n, seed=0, relabel=relabel)
        ref = batched_nms(boxes, scores, labels, 0.5)
        assert torch.equal(clb_nms(boxes, scores, logits, labels, 0.5, beta=0.0).keep, ref)
        assert torch.equal(greedy_nms(boxes, scores, labels, 0.5).keep, ref)
        a, g, b = paired_median_ms(lambda: batched_nms(boxes, scores, labels, 0.5),
                                   lambda: greedy_nms(boxes, scores, labels, 0.5),
                                   lambda: clb_nms(boxes, scores, logits, labels, 0.5, 1.0), reps=args.reps)
        worst, worst_own = max(worst, b / a), max(worst_own, b / g)
        print(f"relabel={relabel:.1f} n={args.n} kept={ref.numel()}: batched_nms {a:.2f} ms, greedy_nms {g:.2f} ms, "
              f"clb_nms {b:.2f} ms; clb/batched {b / a:.2f}x, clb/greedy {b / g:.2f}x, greedy/batched {g / a:.2f}x")
    print(f"clb_nms / batched_nms (worst layout): {worst:.2f}x (goal <= 1.5x)")
    print(f"clb_nms / greedy_nms, the same leader search (worst layout): {worst_own:.2f}x (what CL-B adds)")


if __name__ == "__main__":
    main()
