"""Time-to-accuracy: AP (or mAP) reached against CPU-seconds of training, for one profile cell.

Trains one cell of a profile in this process (no Ray: the same dataset, model, optimiser,
schedule and evaluation code that a Ray Train worker runs) and evaluates on the val split at
fractions of the run, printing one line per point: CPU-seconds of training (process time, so a
busy machine does not inflate it), images seen, and the metrics. This is how the profiles'
recipes were chosen; see the closing note of "Detectors that learn".

Usage:
  python bench/time_to_accuracy.py --profile demo --dataset shapes [--row baseline] [--points 4]
      [--set train.epochs=8 ...] [--threads 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from detector.data import build_dataset, collate_fn  # noqa: E402
from lab.execution import evaluation  # noqa: E402
from lab.settings.config import user_overrides  # noqa: E402
from lab.plan.experiments import TABLE1_METHODS, TABLE2_ROWS, load_profile, split_table1_row, table_cells  # noqa: E402
from detector.repro import seed_everything  # noqa: E402
from lab.execution.schedule import build_optimizer, build_scheduler, build_train_model  # noqa: E402
from lab.records.weights import resolve_num_classes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="demo")
    p.add_argument("--dataset", default="shapes")
    p.add_argument("--table", type=int, default=2, choices=(1, 2))
    p.add_argument("--row", default="baseline",
                   help=f"Table 2: one of {', '.join(TABLE2_ROWS)}; Table 1: <method>_<backbone>, e.g. gfl_resnet10")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--points", type=int, default=4, help="evaluations, evenly spaced over the run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    profile = load_profile(a.profile)
    methods = None
    if a.table == 1:
        split = split_table1_row(a.row)
        if split is None:
            p.error(f"--row {a.row!r} is not <method>_<backbone> (methods: {', '.join(TABLE1_METHODS)})")
        methods = [split[0]]
    cells = table_cells(a.table, profile, seeds=a.seed + 1, user=user_overrides(None, a.set), methods=methods)
    cell = next((c for c in cells if c.row == a.row and c.seed == a.seed and c.dataset == a.dataset), None)
    if cell is None:
        p.error(f"no cell {a.row!r} on {a.dataset!r} in table {a.table} of profile {a.profile!r}: "
                f"{sorted({c.row for c in cells})}")
    cfg = cell.cfg
    seed_everything(cfg.train.seed)
    train_set = build_dataset(cfg.data, "train", train=True)
    val_set = build_dataset(cfg.data, "val", train=False)
    cfg = resolve_num_classes(cfg, train_set)
    loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate_fn,
                        num_workers=cfg.data.loader_workers, persistent_workers=cfg.data.loader_workers > 0)
    iters = len(loader) if not cfg.train.max_iters else min(len(loader), cfg.train.max_iters)
    total = cfg.train.epochs * iters
    model = build_train_model(cfg)
    optimizer = build_optimizer([q for q in model.parameters() if q.requires_grad], cfg)
    sched = build_scheduler(optimizer, cfg, iters)
    t = cfg.train
    marks = {round(total * (k + 1) / a.points) for k in range(a.points)}
    metric = "AP" if val_set.format == "coco" else "mAP"
    print(f"# {a.profile}/{a.dataset}/{a.row} seed {a.seed}: {len(train_set)} train / {len(val_set)} val images, "
          f"{total} iterations x batch {t.batch_size}, {sum(q.numel() for q in model.parameters()) / 1e6:.2f} M params, "
          f"{a.threads} thread(s)", flush=True)
    print(f"{'iter':>6} {'cpu_s':>8} {'wall_s':>8} {'images':>7} {'loss':>7} {metric:>6} {'AP50':>6} "
          f"{'APs':>6} {'APm':>6} {'APl':>6} {'pos/img':>7} {'iac/img':>7}", flush=True)
    cpu = wall = 0.0
    step = images = 0
    loss_sum, loss_n, pos_sum, iac_sum = 0.0, 0, 0.0, 0.0
    model.train()
    while step < total:
        for it, (imgs, targets) in enumerate(loader):
            if it >= iters or step >= total:
                break
            c0, w0 = time.process_time(), time.perf_counter()
            parts = model(imgs, targets)
            loss = sum(parts.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            sched.step()
            cpu += time.process_time() - c0
            wall += time.perf_counter() - w0
            step += 1
            images += len(imgs)
            loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
            pos_sum += model.assign_stats.get("positives_per_image", 0.0)  # torchvision detectors: none
            iac_sum += model.assign_stats.get("iac_score_positives_per_image", 0.0)
            if step in marks:
                m = evaluation.evaluate(model, val_set, torch.device("cpu"), cfg.eval.batch_size).metrics
                model.train()
                print(f"{step:>6} {cpu:>8.1f} {wall:>8.1f} {images:>7} {loss_sum / loss_n:>7.3f} "
                      f"{m[metric]:>6.1f} " + " ".join(f"{m.get(k, float('nan')):>6.1f}" for k in ("AP50", "APs", "APm", "APl"))
                      + f" {pos_sum / loss_n:>7.1f} {iac_sum / loss_n:>7.2f}", flush=True)
                loss_sum, loss_n, pos_sum, iac_sum = 0.0, 0, 0.0, 0.0
    return 0


if __name__ == "__main__":
    sys.exit(main())
