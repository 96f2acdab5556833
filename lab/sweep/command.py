"""``detlab sweep`` (and ``python jobs/sweep.py``): its options and entry point.

Every bad option or space is a ``ConfigError`` (exit 2) raised before Ray starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from detector.config import ConfigError, to_dict
from lab.records import tracking
from lab.settings.joboptions import add_job_options
from lab.settings.scrub import scrub_mapping
from lab.sweep.plan import build_plan, with_pretrained_backbone
from lab.sweep.posthoc import add_posthoc_options, run_posthoc
from lab.sweep.space import space_text
from lab.sweep.tuner import run_sweep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="detlab sweep",
        description="Ray Tune sweep (ASHA) over IAC/DC/CL-B parameters, tracked in MLflow "
                    "(experiment detlab-sweep-<dataset>); writes <out>/best_<dataset>.yaml for --config.",
    )
    add_job_options(p, "trial", "results dir: best_<dataset>.yaml, sweeps/<name> (Tune + Train storage)")
    p.add_argument("--dataset", default=None, help="the profile's dataset entry (e.g. shapes, trees)")
    p.add_argument("--data-root", action="append", default=[], metavar="[TAG=]PATH", help="dataset root")
    p.add_argument("--num-samples", type=int, default=8, help="trials (default 8)")
    p.add_argument("--search", choices=("random", "optuna"), default="random",
                   help="random search (default) or Optuna TPE (needs the optuna package)")
    p.add_argument("--space", action="append", default=[], metavar="FILE|KEY=SPEC",
                   help="search space: a YAML file replacing the default (lab/sweep/spaces/default.yaml), or "
                        "KEY=SPEC, e.g. nms.beta='uniform(0, 2)', loss.eps='loguniform(1e-4, 1)', "
                        "nms.iou_threshold='choice(0.5, 0.6)', KEY=none drops it (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search algorithm (default 0)")
    p.add_argument("--metric", default=None,
                   help="what ASHA and the best trial compare (default: AP for COCO-format data, mAP for VOC-format); "
                        "any val metric (AP50, APs, ...) or a per-epoch training one (train_loss, ...)")
    p.add_argument("--mode", choices=("max", "min"), default=None,
                   help="maximise or minimise --metric (default: min for a loss, else max)")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped (default 1)")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA reduction factor (default 2)")
    p.add_argument("--resume", action="store_true", help="continue the sweep with the same options; finished trials are kept")
    add_posthoc_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``detlab sweep ...``; returns the exit code (2 for config errors, raised before Ray starts)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        try:
            uri = tracking.resolve_tracking_uri(args.tracking_uri)
        except ValueError as e:
            raise ConfigError(f"--tracking-uri: {e}") from None
        if args.posthoc:
            return run_posthoc(args, uri)
        plan = build_plan(args)
        if args.dry_run:
            print(f"sweep {plan.name} -> {plan.sweep_dir}\nmetric {plan.metric}, {plan.num_samples} trial(s), "
                  f"search {plan.search}\nspace:\n{space_text(plan.space)}base config:\n"
                  f"{yaml.safe_dump(scrub_mapping(to_dict(plan.cfg)), sort_keys=False)}")
            return 0
        from lab.plan.datacheck import validate_data  # the data opened here: a bad file never reaches Ray or MLflow

        validate_data(plan.cfg.data, plan.cfg.model.num_classes)
        return run_sweep(with_pretrained_backbone(plan, args, uri), uri, args.ray_address)
    except ConfigError as e:
        print(f"detlab sweep: config error: {e}", file=sys.stderr)
        return 2
