"""Benchmark: coco_evaluate(fast=True) (faster-coco-eval) against fast=False (pycocotools).

Synthetic, seeded: 500 images x 100 detections, 80 classes, ~7 GT per image (some crowd), both
backends in the same process on the same inputs. Prints the speed ratio (goal >= 5x) and asserts
that all 12 stats are identical. Run: ``.venv/bin/python bench/bench_eval.py``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from detector.evaluate import COCO_STAT_NAMES, coco_evaluate


def synthetic_coco(n_images: int, dets_per_image: int, n_classes: int, seed: int) -> tuple[dict, list[dict]]:
    """GT dict and COCO result dicts; detections are jittered GT copies plus random boxes (xywh, pixels)."""
    rng = np.random.default_rng(seed)
    cat_ids = list(range(1, n_classes + 1))
    images, anns, dets = [], [], []
    for img_id in range(1, n_images + 1):
        images.append({"id": img_id, "width": 640, "height": 480})
        n_gt = int(rng.integers(1, 14))
        sides = np.exp(rng.uniform(np.log(8), np.log(300), n_gt))  # spans small/medium/large
        img_gt = []
        for s in sides:
            w, h = float(s), float(s * rng.uniform(0.5, 1.5))
            x, y = float(rng.uniform(0, max(640 - w, 1))), float(rng.uniform(0, max(480 - h, 1)))
            cat = int(rng.choice(cat_ids))
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.02)})
            img_gt.append((x, y, w, h, cat))
        for k in range(dets_per_image):
            if k < 3 * len(img_gt) and rng.random() < 0.7:
                x, y, w, h, cat = img_gt[k % len(img_gt)]
                j = rng.normal(0, 0.1, 4) * max(w, h)
                box = [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)]
            else:
                cat = int(rng.choice(cat_ids))
                box = [float(rng.uniform(0, 600)), float(rng.uniform(0, 440)),
                       float(rng.uniform(4, 200)), float(rng.uniform(4, 200))]
            dets.append({"image_id": img_id, "category_id": cat, "bbox": [float(v) for v in box],
                         "score": float(rng.random())})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids]}
    return gt, dets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--dets", type=int, default=100)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    gt, dets = synthetic_coco(args.images, args.dets, args.classes, args.seed)
    print(f"{args.images} images, {len(gt['annotations'])} GT, {len(dets)} detections, {args.classes} classes")

    timings, stats = {}, {}
    for name, fast in (("faster-coco-eval", True), ("pycocotools", False)):
        t0 = time.perf_counter()
        stats[name] = coco_evaluate(gt, dets, fast=fast)  # whole call: GT index, loadRes, eval
        timings[name] = time.perf_counter() - t0
        print(f"{name:>17}: {timings[name]:7.2f} s   AP {stats[name]['AP']:.3f}  AP50 {stats[name]['AP50']:.3f}")

    a, b = stats["faster-coco-eval"], stats["pycocotools"]
    diff = [k for k in COCO_STAT_NAMES if not (a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])))]
    assert not diff, f"stats differ: {[(k, a[k], b[k]) for k in diff]}"
    ratio = timings["pycocotools"] / timings["faster-coco-eval"]
    print(f"all 12 stats identical; speed-up {ratio:.1f}x ({'meets' if ratio >= 5 else 'BELOW'} the 5x goal)")


if __name__ == "__main__":
    main()
