"""``detlab eval``: evaluate saved weights on any dataset and split, as its own MLflow run.

    detlab eval RUN_ID|RUN_NAME|model.pt|models:/NAME/VERSION|runs:/ID/model \\
        [--dataset coco --data-root /data/coco --split val2017] [--clb|--no-clb] [--set k=v]

The weights' own resolved config is the starting point (their data, model and NMS settings); the
options change the data and inference only. The evaluation is training's own
(:func:`lab.execution.train.evaluate_weights`: the same metrics, artifacts and provenance tags). The run goes to
experiment ``detlab-eval``, tagged with the source run (``detlab.source_run``) and the weights.
Every check (the source, the data files, the class count) runs before a run is opened.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from detector.config import ConfigError, flatten
from lab.records import tracking
from lab.settings.scrub import scrub_text

EXPERIMENT = "detlab-eval"
TAG_SOURCE_RUN = "detlab.source_run"
TAG_SOURCE = "detlab.eval_of"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lab.records.models import SOURCE_HELP

    p.add_argument("source", metavar="WEIGHTS", help=SOURCE_HELP)
    p.add_argument("--dataset", choices=("shapes", "trees", "coco", "voc"), default=None,
                   help="evaluate on this dataset instead of the one the weights were trained on "
                   "(its classes must match the model's)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="dataset root (= --set data.root=DIR)")
    p.add_argument("--split", default=None, metavar="NAME",
                   help="the split to evaluate (= --set data.val_split=NAME, e.g. val2017, test)")
    clb = p.add_mutually_exclusive_group()
    clb.add_argument("--clb", dest="clb", action="store_true", default=None, help="CL-B NMS on (= --set nms.clb=true)")
    clb.add_argument("--no-clb", dest="clb", action="store_false", help="CL-B NMS off (= --set nms.clb=false)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="data/nms/eval/model inference overrides, e.g. --set data.max_images=200 "
                   "--set model.score_thresh=0.05")
    p.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default: {EXPERIMENT})")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store: where the run id/name is looked up and the evaluation is logged "
                   "(default: $MLFLOW_TRACKING_URI, else sqlite under ./mlruns)")
    p.add_argument("--name", default=None, help="the evaluation run's name (default: eval-<source>)")


def overrides(args: argparse.Namespace) -> list[str]:
    """The options as ``--set`` overrides, the user's own ``--set`` last."""
    sets = []
    if args.dataset:
        sets.append(f"data.dataset={args.dataset}")
    if args.data_root:
        sets.append(f"data.root={args.data_root}")
    if args.split:
        sets.append(f"data.val_split={args.split}")
    if args.clb is not None:
        sets.append(f"nms.clb={str(args.clb).lower()}")
    return [*sets, *args.sets]


def run(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from detector.config import apply_overrides
    from lab.records import models, provenance
    from lab.settings.config import config_from_dict
    from lab.plan.datacheck import describe, validate_split
    from lab.execution.train import evaluate_weights

    try:
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
    except ValueError as e:
        raise ConfigError(f"--tracking-uri: {e}") from None
    src, payload = models.load_source(args.source, uri)
    cfg = config_from_dict(payload["config"])
    cfg = apply_overrides(cfg, overrides(args))
    cfg.model.weights = cfg.model.weights_backbone = None  # the state_dict has everything
    cfg.model.weights_backbone_sha256 = None
    cfg.validate()  # every value checked before a run is opened
    cfg.data.validate()
    val_set = validate_split(cfg.data, "val")  # bad files named before a run is opened
    names = list(payload["class_names"])
    if list(val_set.class_names) != names:
        raise ConfigError(f"{describe(cfg.data)} has classes {list(val_set.class_names)}, the weights {src.label!r} "
                          f"were trained on {names}: labels would not mean the same")
    name = args.name or run_name_for(src.label)
    exp = tracking.init_store(uri, args.experiment)
    client = MlflowClient(uri)
    tags = {TAG_SOURCE: src.label, tracking.TAG_WEIGHTS: src.path, tracking.TAG_KIND: "eval",
            tracking.TAG_DATASET: tracking.dataset_tag(cfg.data.dataset), **provenance.source_tags()}
    if src.run_id:
        tags[TAG_SOURCE_RUN] = src.run_id
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    tracking.log_params(client, run_id, flatten(cfg))
    tracking.log_dataset_inputs(client, run_id, cfg.data, ("val",))
    print(f"detlab eval: {src.label} on {describe(cfg.data)}, split {cfg.data.val_split!r} "
          f"({len(val_set)} images), nms.clb={cfg.nms.clb}; MLflow run {run_id} in {args.experiment}", flush=True)
    try:
        out = evaluate_weights(cfg, src.path, name=name, run_id=run_id, tracking_uri=uri)
    except BaseException as e:
        client.set_tag(run_id, "detlab.error", scrub_text(f"{type(e).__name__}: {e}")[-4000:])
        client.set_terminated(run_id, status="FAILED" if isinstance(e, Exception) else "KILLED")
        raise
    unsent = int(out["mlflow"]["unsent"])
    client.set_terminated(run_id, status="FAILED" if unsent else "FINISHED")
    print(format_metrics(out["metrics"]))
    if unsent:
        print(f"detlab eval: {unsent} MLflow write(s) could not be sent; the run is FAILED", file=sys.stderr)
        return 1
    print(f"run {run_id} ({args.experiment}) in {scrub_text(uri)}"
          + (f"; source run {src.run_id}" if src.run_id else ""))
    return 0


def run_name_for(source: str) -> str:
    """``eval-<what was evaluated>``: ``models:/shapes/3`` -> ``eval-shapes-v3``, ``runs:/<id>/model``
    -> ``eval-<id>``, ``.../<run>/model.pt`` -> ``eval-<run>``, a run name or id as it is."""
    text = source.rstrip("/")
    if text.startswith("models:/"):
        name, _, version = text.removeprefix("models:/").partition("/")
        text = f"{name}-v{version}" if version.isdigit() else f"{name}-{version}" if version else name
    elif text.startswith("runs:/"):
        text = text.removeprefix("runs:/").split("/")[0]
    elif "/" in text:
        path = Path(text.split("://")[-1])
        text = path.parent.name if path.name == "model.pt" and path.parent.name else path.name
    return f"eval-{re.sub(r'[^A-Za-z0-9_.@-]+', '-', text)}"[:200]


def format_metrics(metrics: dict[str, float]) -> str:
    """The metrics a researcher reads first, one per line, then the rest."""
    first = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "mAP") if k in metrics]
    rest = sorted(k for k in metrics if k not in first)
    return "\n".join(f"  {k:24} {metrics[k]:.4f}" for k in [*first, *rest])
