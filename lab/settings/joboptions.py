"""Options every detlab job takes (``detlab table``, ``detlab train``, ``detlab sweep``) and the
config layer they give: shared by :mod:`lab.cli` and :mod:`lab.sweep`, so neither imports the other."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from detector.config import merge_dicts, overrides_to_dict
from lab.settings.config import PROFILES, user_overrides


def add_job_options(p: argparse.ArgumentParser, unit: str, out_help: str) -> None:
    """Options every detlab job takes (``table``, ``train``, ``sweep``); ``unit`` names what one Ray
    Train run is there (cell, trial)."""
    p.add_argument("--profile", choices=PROFILES, default=None,
                   help="defaults to start from: smoke (a one-minute pipeline check, numbers meaningless), demo, "
                   "cpu or paper (default: smoke, with a warning)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML overrides (e.g. a sweep's best config); repeatable, later wins")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help=f"dotted config override for every {unit}, e.g. --set train.epochs=4 (repeatable, validated)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under ./mlruns)")
    p.add_argument("--out", type=Path, default=Path("results"), help=f"{out_help} (default: results/)")
    p.add_argument("--storage", default=None, metavar="URI",
                   help="where Ray Train/Tune state, checkpoints and final weights go; every node must reach it: "
                   "a local path (one host only), shared:///mount/path (a mount at the same path on every node) or "
                   "s3://bucket/prefix (AWS_ENDPOINT_URL and AWS_* credentials honoured and forwarded) "
                   "(default: <out>/ray, sweeps <out>/sweeps)")
    p.add_argument("--workers", type=int,
                   help=f"Ray Train workers per {unit}; 0 = local mode, the {unit}'s own process trains [scaling.workers]")
    p.add_argument("--gpus-per-worker", type=float, help="[scaling.gpus_per_worker]")
    p.add_argument("--cpus-per-worker", type=int, help="[scaling.cpus_per_worker]; also torch threads")
    p.add_argument("--max-failures", type=int, help="worker-group failures retried from a checkpoint [scaling.max_failures]")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to use, e.g. auto or 10.0.0.1:6379 (default: $RAY_ADDRESS, the submitted job's "
                   "cluster, else a private local one)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help=f"{unit}s at once (default: as many as the cluster's CPUs/GPUs hold); for autoscaling clusters")
    p.add_argument("--dry-run", action="store_true", help=f"print the resolved {unit}s or plan and exit (no Ray, no MLflow)")


SMOKE_WARNING = ("detlab: no --profile given: running profile smoke, a one-minute pipeline check whose numbers "
                 "mean nothing; give --profile demo, cpu or paper for results")


def settle_profile(args: argparse.Namespace) -> str:
    """``args.profile``, set to ``smoke`` with a warning on stderr when the user chose none: a table run
    at smoke looks like any other, and its numbers must never be mistaken for results."""
    if args.profile is None:
        print(SMOKE_WARNING, file=sys.stderr)
        args.profile = "smoke"
    return args.profile


def user_layer(args: argparse.Namespace) -> dict[str, Any]:
    """--config files, then --set, then the scaling shorthands (all validated here)."""
    layer = user_overrides(args.config, args.sets)
    short = {"scaling.workers": args.workers, "scaling.gpus_per_worker": args.gpus_per_worker,
             "scaling.cpus_per_worker": args.cpus_per_worker, "scaling.max_failures": args.max_failures}
    given = {k: v for k, v in short.items() if v is not None}
    return merge_dicts(layer, overrides_to_dict(given)) if given else layer
