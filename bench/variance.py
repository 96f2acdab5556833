"""Seed-to-seed spread of one table cell, measured: how much a row's metric moves between seeds.

For each seed of a profile's cell (Table 2 row x dataset, with ``--set`` overrides) this makes the
cell's pretrained backbone file(s) (:mod:`lab.execution.pretrain`, in parallel processes), then trains the
cell with the real Ray Train loop in local mode (``scaling.workers=0``: the loop runs in the
process, no cluster), ``--parallel`` cells at a time in their own processes, and prints per seed:
the headline metric, the pretrained file's held-out accuracy and the CPU seconds; then the mean,
the sample SD and the range over seeds, and the image-bootstrap SD of one seed's metric (the
part of the spread that only a larger val split can shrink).

``--pretrain-seed K`` shares one pretrained file (seed K) across the seeds: the spread is then
the training seed's alone, and against the default (a file per seed) it splits the variance into
pretraining file vs training seed.

Usage:
  python bench/variance.py --profile demo --dataset shapes --seeds 3 [--row baseline] [--set key=value ...]
      [--pretrain-seed 0] [--parallel 2] [--out results/variance] [--label NAME]
Each line of ``<out>/variance.jsonl`` is one seed's record (label, settings, metrics).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.config import to_dict  # noqa: E402
from lab.settings.config import cell_key, config_from_dict, file_sha256, user_overrides  # noqa: E402
from lab.plan.experiments import TABLE2_ROWS, load_profile, profile_data, table_cells  # noqa: E402
from lab.execution.pretrain import attach_pretrained  # noqa: E402
from lab.execution.workerenv import DETERMINISM_ENV  # noqa: E402


def _train(cfg_dict: dict[str, Any], name: str, run_name: str, storage: str) -> dict[str, Any]:
    """One cell in this (fresh) process: the Ray Train loop in local mode; final metrics and CPU time."""
    from lab.execution.train import fit_cell

    cfg = config_from_dict(cfg_dict)
    c0, w0 = time.process_time(), time.time()
    out = fit_cell(cfg, name=name, run_name=run_name, storage_path=storage)
    return {"metrics": out["metrics"], "cpu_s": time.process_time() - c0, "wall_s": time.time() - w0,
            "weights": out["weights"]}


def _image_bootstrap_sd(weights: str, cfg_dict: dict[str, Any], resamples: int = 1000) -> float:
    """SD (percent points) of the headline metric over image resamples of the val split, one run."""
    import torch

    from detector.data import build_dataset
    from detector.model import build_detector
    from lab.execution import evaluation
    from lab.tables import resampling
    from lab.tables.compare import matches_for
    from lab.records.weights import load_weights, resolve_num_classes

    cfg = config_from_dict(cfg_dict)
    val = build_dataset(cfg.data, "val", train=False)
    cfg = resolve_num_classes(cfg, val)
    model = build_detector(cfg)
    model.load_state_dict(load_weights(weights)["model"])
    preds = evaluation.predict(model, val, torch.device("cpu"), cfg.eval.batch_size)
    with tempfile.TemporaryDirectory() as d:  # the detections artifact a run logs, matched as compare does
        path = evaluation.write_detections(Path(d) / "detections.json", val, preds)
        m = matches_for(val, json.loads(path.read_text()))
    boot = resampling.resampled_metric(m, resampling.resample_counts(m.image_ids.size, resamples))
    return float(statistics.stdev(boot[boot == boot]))  # NaN resamples (no GT drawn) left out


def _with_backbone(cell: Any, path: Path) -> Any:
    """``cell`` starting from the pretrained body in ``path`` (all stages trainable, keyed by its hash)."""
    cfg = copy.deepcopy(cell.cfg)
    cfg.model.weights_backbone, cfg.model.weights_backbone_sha256 = str(path), file_sha256(path)
    cfg.model.trainable_backbone_layers = 5
    return dataclasses.replace(cell, cfg=cfg, key=cell_key(cfg))


def _init() -> None:
    for k, v in DETERMINISM_ENV.items():
        os.environ.setdefault(k, v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="demo")
    p.add_argument("--dataset", default="shapes")
    p.add_argument("--row", default="baseline", choices=list(TABLE2_ROWS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pretrain-seed", type=int, default=None, help="one shared pretrained file (this seed)")
    p.add_argument("--backbone-files", default=None, metavar="F0,F1,...",
                   help="start seed k from pretrained file Fk (e.g. files of another run) instead of pretraining")
    p.add_argument("--parallel", type=int, default=2, help="cells trained at a time (1 thread each)")
    p.add_argument("--out", type=Path, default=Path("results/variance"))
    p.add_argument("--label", default="")
    p.add_argument("--bootstrap", action="store_true", help="also the image-bootstrap SD of seed 0's metric")
    a = p.parse_args(argv)

    sets = list(a.set) + ([f"pretrain.seed={a.pretrain_seed}"] if a.pretrain_seed is not None else [])
    # local mode: one process per cell, no Ray cluster (one Train worker computes the same thing)
    user = user_overrides(None, ["scaling.workers=0", *sets])
    profile = load_profile(a.profile)
    cells = [c for c in table_cells(2, profile, a.seeds, user) if c.row == a.row and c.dataset == a.dataset]
    out = a.out.resolve()
    t0 = time.time()
    if a.backbone_files:
        files = a.backbone_files.split(",")
        if len(files) < len(cells):
            p.error(f"--backbone-files names {len(files)} files for {len(cells)} seeds")
        cells = [_with_backbone(c, Path(f).resolve()) for c, f in zip(cells, files)]
    cells = attach_pretrained(cells, out, None, lambda tag: profile_data(profile, tag, user))
    pretrain_wall = time.time() - t0
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=a.parallel, mp_context=ctx, initializer=_init) as pool:
        futures = {c.seed: pool.submit(_train, to_dict(c.cfg), c.name, c.run_name, str(out / "ray")) for c in cells}
        results = {s: f.result() for s, f in futures.items()}
    metric = "AP" if "AP" in results[cells[0].seed]["metrics"] else "mAP"
    label = a.label or " ".join(sets) or "default"
    print(f"\n# {a.profile}/{a.dataset}/{a.row}, {label}: {len(cells)} seeds "
          f"(pretraining {pretrain_wall:.0f}s wall, training {time.time() - t0 - pretrain_wall:.0f}s wall)")
    print(f"{'seed':>4} {metric:>6} {'AP50':>6} {'pretrain_acc':>12} {'cpu_s':>7}  weights_backbone")
    values = []
    with (out / "variance.jsonl").open("a") as log:
        for c in cells:
            r = results[c.seed]
            acc = float("nan")
            if c.cfg.model.weights_backbone:
                manifest_file = Path(c.cfg.model.weights_backbone).parent / "manifest.json"
                acc = json.loads(manifest_file.read_text())["curve"][-1][3] * 100
            values.append(r["metrics"][metric])
            print(f"{c.seed:>4} {r['metrics'][metric]:>6.2f} {r['metrics'].get('AP50', float('nan')):>6.2f} "
                  f"{acc:>12.1f} {r['cpu_s']:>7.0f}  {Path(c.cfg.model.weights_backbone or '-').name[:24]}")
            log.write(json.dumps({"label": label, "profile": a.profile, "dataset": a.dataset, "row": a.row,
                                  "seed": c.seed, "sets": sets, "metric": metric, "value": r["metrics"][metric],
                                  "metrics": r["metrics"], "pretrain_acc": acc, "cpu_s": r["cpu_s"]}) + "\n")
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    print(f"mean {statistics.fmean(values):.2f}  sd {sd:.2f}  range {max(values) - min(values):.2f} "
          f"({metric}, {len(values)} seeds)")
    if a.bootstrap:
        c = cells[0]
        print(f"image-bootstrap sd of seed {c.seed}'s {metric}: "
              f"{_image_bootstrap_sd(results[c.seed]['weights'], to_dict(c.cfg)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
