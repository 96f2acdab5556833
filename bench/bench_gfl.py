"""Training-step time of GFL against RetinaNet, same backbone, FPN, head depth and input size.

Steps alternate between the two detectors in this process (machine noise hits both alike); the
ratio is of medians over ``--steps`` steps on the same batch. GFL's paper reports about the same
speed as RetinaNet (its head has 1 anchor per location instead of 9 but adds the ATSS assignment
and the 4 x (reg_max + 1) distribution outputs).

Usage: python bench/bench_gfl.py [--size 160] [--batch 8] [--steps 12] [--threads 1] [--recipe|--r50]
  default: the CPU recipe's model (narrow ResNet-10, 64-ch FPN, 2-conv heads, 160 px);
  --r50: ResNet-50, 256-ch FPN, 4-conv heads (the paper's heads) at --size.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_recipe import RECIPE, build, race, step_parser  # noqa: E402
from bench.bench_train_step import make_batch  # noqa: E402

R50 = {"model.backbone": "resnet50", "model.norm": "frozen_bn", "model.head_norm": "gn"}


def main() -> None:
    ap = step_parser()
    ap.add_argument("--r50", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = R50 if args.r50 else RECIPE
    batch = make_batch(args.size, args.batch)
    retina, gfl = race(build({**base, "model.detector": "retinanet"}, args.size),
                       build({**base, "model.detector": "gfl"}, args.size), batch, args.steps)
    what = "R-50/256-ch/4-conv" if args.r50 else "CPU recipe (R-10 w32/64-ch/2-conv)"
    print(f"{what}, {args.size}px batch {args.batch}, {args.threads} thread(s): RetinaNet {retina * 1e3:.0f} ms/step, "
          f"GFL {gfl * 1e3:.0f} ms/step: GFL/RetinaNet step time {gfl / retina:.2f}x")


if __name__ == "__main__":
    main()
