"""``detlab``: the command line of the platform.

Subcommands::

    detlab table 1|2 [--profile smoke|demo|cpu|paper] [--seeds N] [--set k=v] ...   run a paper table
    detlab train [--config FILE] [--set k=v] ...      one config -> one run (experiment detlab-train)
    detlab tables --table 1|2 [--out DIR]             rebuild a table from MLflow (lab.tables)
    detlab compare A B [--metric AP]                  two runs (or A1,A2 B1,B2 per seed): Δ, two-level CI, MDE
    detlab sweep --dataset shapes --num-samples 32    Ray Tune sweep (lab.sweep)
    detlab data shapes|trees|coco|voc [--root DIR]    prepare/check a dataset, print a summary per split
    detlab predict IMAGE|DIR|GLOB... --weights SOURCE  boxes JSON + a drawn PNG per image
    detlab eval SOURCE [--dataset coco --data-root DIR --split val2017] [--clb]   evaluate, as its own run
    detlab export SOURCE --format onnx|torchscript|both [--check]                 ONNX / TorchScript

SOURCE (weights): a model.pt path or s3:// URI, an MLflow run id or name, models:/NAME/VERSION or
runs:/ID/model (lab.records.models).
    detlab ui [--port 5000]                           MLflow UI on 127.0.0.1 over the same store

Every config error (unknown key, bad value, missing data root) and every bad dataset file (each
dataset a job reads is opened in the driver: lab.plan.datacheck) is raised before Ray starts and before
any MLflow run is opened.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from detector.config import ConfigError
from lab.records import models, tracking
from lab.settings.config import PROFILES
from lab.plan.experiments import (
    TABLE1_DEFAULT_METHODS, TABLE1_METHODS, Cell, load_profile, profile_data, single_cell, table_cells,
)
from lab.settings.joboptions import add_job_options, settle_profile, user_layer
from lab.execution.pretrain import needs_pretraining
from lab.settings.scrub import scrub_text
from lab.plan.specs import TableSpec, choose


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``table`` and ``train``."""
    add_job_options(p, "cell", "results dir: tables, Ray checkpoints, weights")
    p.add_argument("--force", action="store_true",
                   help="rerun cells that already have a FINISHED run (a cell whose Ray checkpoint under --out is "
                   "complete is only re-evaluated; delete <out>/ray/<run> to retrain it)")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="register each finished cell's MLflow model as a new version of NAME in the model registry")
    p.add_argument("--no-log-models", dest="log_models", action="store_false",
                   help="do not log each finished cell's model as an MLflow logged model (saves a few seconds a cell; "
                   "the weights file under --storage is written either way)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detlab", description="detlab: run the paper's experiments on Ray Train + MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("table", help="train and evaluate Table 1 or 2 of the paper, or a table spec of your own "
                       "(detlab tables: rebuild from MLflow)")
    p.add_argument("table", type=int, choices=(1, 2), nargs="?", help="the paper's table (or --spec)")
    p.add_argument("--spec", type=Path, default=None, metavar="FILE.yaml",
                   help="a table of your own: rows as named override sets, and its profile, datasets and seeds "
                   "(see lab/plan/specs.py; the paper's tables are lab/plan/specs/table1.yaml and table2.yaml)")
    _add_run_options(p)
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the spec's, else the profile's)")
    p.add_argument("--data-root", action="append", default=[], metavar="[TAG=]PATH",
                   help="dataset root, for all datasets or one (voc07=/data/VOCdevkit); repeatable")
    p.add_argument("--rows", default=None, metavar="R1,R2",
                   help="rows to run, comma-separated (default: the spec's default rows; a row that evaluates "
                   "another's weights brings it); Table 1: " + ", ".join(TABLE1_METHODS) + " (default: "
                   + ",".join(TABLE1_DEFAULT_METHODS) + "), each on its block's backbones")

    p = sub.add_parser("train", help="train and evaluate one config (one MLflow run)")
    _add_run_options(p)
    p.add_argument("--dataset", default=None, help="the profile's dataset entry to start from (e.g. shapes, trees)")
    p.add_argument("--experiment", default="detlab-train", help="MLflow experiment (default: detlab-train)")

    sub.add_parser("tables", help="rebuild a table from the runs in MLflow, training nothing (see detlab tables --help)",
                   add_help=False)
    sub.add_parser("sweep", help="Ray Tune sweep over IAC/DC/CL-B parameters (see detlab sweep --help)", add_help=False)

    from lab.tables import compare

    p = sub.add_parser("compare", help="two runs, or runs per seed (A1,A2 B1,B2): metric, delta, two-level CI, P(B > A), MDE")
    compare.add_arguments(p)

    p = sub.add_parser("data", help="prepare (shapes, trees) or check (coco, voc) a dataset; print a summary per split")
    p.add_argument("name", choices=("shapes", "trees", "coco", "voc"))
    p.add_argument("--root", default=None, metavar="DIR", help="dataset root (= --set data.root=DIR; required for coco, voc)")
    p.add_argument("--profile", choices=PROFILES, default=None,
                   help="check exactly what this profile's cells will read (default: DataConfig defaults)")
    p.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE", dest="sets",
                   help="data/model override, e.g. --set data.num_train=500, --set data.val_split=val2017, "
                   "--set model.min_size=600")

    p = sub.add_parser("predict", help="detect objects in images with trained weights (a file, a run or an MLflow model)")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, directories (their " + ", ".join(IMAGE_SUFFIXES) + " files) or quoted globs")
    p.add_argument("--weights", required=True, help=models.SOURCE_HELP)
    p.add_argument("--tracking-uri", default=None,
                   help="the MLflow store a run id/name or models:/ URI is looked up in (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite under ./mlruns)")
    p.add_argument("--out", type=Path, default=Path("predictions"), help="output dir (default: predictions/)")
    p.add_argument("--score", type=float, default=0.3, help="minimum score written and drawn (default 0.3)")
    p.add_argument("--set", action="append", default=[], metavar="nms.KEY=VALUE", dest="sets",
                   help="inference overrides, e.g. --set nms.clb=true --set model.score_thresh=0.1")

    from lab.inference import evalcmd

    p = sub.add_parser("eval", help="evaluate saved weights (a run, a file or an MLflow model) on any dataset and "
                       "split, as an MLflow run of its own")
    evalcmd.add_arguments(p)
    # its own parser (lab.inference.export imports torch: ~3 s that tables, compare, ui and --help do not need)
    sub.add_parser("export", help="trained weights to ONNX and/or TorchScript (the dense graph; NMS outside; "
                   "see detlab export --help)", add_help=False)

    from lab.infra import cluster

    p = sub.add_parser("cluster", help="a local multi-node Ray cluster + MLflow server: up | down | status")
    cluster.add_arguments(p)

    p = sub.add_parser("ui", help="MLflow UI on 127.0.0.1 over the detlab store")
    p.add_argument("--tracking-uri", default=None,
                   help="the store to show (default: $MLFLOW_TRACKING_URI, else sqlite under ./mlruns, as the jobs use)")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:  # its own parser, owned by lab.sweep
        from lab import sweep

        return sweep.main(argv[1:])
    if argv[:1] == ["tables"]:  # its own parser, owned by lab.tables
        from lab import tables

        return tables.main(argv[1:])
    try:
        if argv[:1] == ["export"]:  # its own parser, owned by lab.inference.export; its ConfigError ends below
            from lab.inference import export

            return export.main(argv[1:])
        args = build_parser().parse_args(argv)
        return {"table": cmd_table, "train": cmd_train, "data": cmd_data, "predict": cmd_predict, "ui": cmd_ui,
                "compare": cmd_compare, "cluster": cmd_cluster, "eval": cmd_eval}[args.command](args)
    except ConfigError as e:
        print(f"detlab: config error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------


def cmd_table(args: argparse.Namespace) -> int:
    spec = choose(args.table, args.spec)
    if args.profile is None and spec.profile:  # the spec's own profile: no smoke warning
        args.profile = spec.profile
    profile = load_profile(settle_profile(args))
    methods = [m.strip() for m in args.rows.split(",") if m.strip()] if args.rows else None
    cells = table_cells(spec, profile, args.seeds, user_layer(args), args.data_root, methods)
    return _run(cells, args, spec.experiment, table=spec,
                data_for=lambda tag: profile_data(profile, tag, user_layer(args), args.data_root))


def _print_dry_run(cells: list[Cell], out: Path, data_for: Callable[[str], Any] | None) -> None:
    """Each cell's name and final key, then the resolved config: what the cells share once, and per
    cell the keys where they differ. A cell whose pretrained file is not made yet shows the key it has
    before the pretraining stage (the file's sha256 joins it once the file exists)."""
    from detector.config import flatten
    from lab.settings.scrub import scrub_mapping

    pending: set[str] = set()
    if data_for is not None and any(needs_pretraining(c.cfg) for c in cells):
        from lab.execution.pretrain import attach_found

        cells, pending = attach_found(cells, out, data_for)
    for c in cells:
        extra = f" (evaluates {c.reuse}'s weights)" if c.reuse else ""
        if c.name in pending:
            extra += " (before pretraining: its backbone file is not made yet)"
        print(f"{c.name:42} key {c.key}{extra}")
    flat = [scrub_mapping(flatten(c.cfg)) for c in cells]
    keys = list(flat[0])
    differ = [k for k in keys if any(f.get(k) != flat[0][k] for f in flat[1:])]
    print("\nconfig every cell shares:")
    for k in keys:
        if k not in differ:
            print(f"  {k}: {flat[0][k]!r}")
    if differ:
        print("\nwhere the cells differ:")
        for c, f in zip(cells, flat):
            print(f"  {c.name}: " + ", ".join(f"{k}={f.get(k)!r}" for k in differ))


def cmd_train(args: argparse.Namespace) -> int:
    profile = load_profile(settle_profile(args))
    if args.dataset and args.dataset not in profile.datasets:
        raise ConfigError(f"--dataset {args.dataset!r} is not in profile {profile.name!r} ({', '.join(profile.datasets)})")
    cell = single_cell(profile, user_layer(args), args.dataset)
    return _run([cell], args, args.experiment, table=None,
                data_for=lambda tag: profile_data(profile, tag, user_layer(args)))


def _run(cells: list[Cell], args: argparse.Namespace, experiment: str, table: TableSpec | None,
         data_for: Callable[[str], Any] | None = None) -> int:
    """Shared tail of ``table`` and ``train``: resolve where things go, pretrain, run, report."""
    out = args.out.expanduser().resolve()
    if args.storage:  # a bad URI (s3:// without a bucket) fails here, before Ray or MLflow
        from lab.infra import storage

        args.storage = str(storage.parse(args.storage))
    if args.dry_run:
        _print_dry_run(cells, out, data_for)
        return 0
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent} must be >= 1")
    from lab.plan.datacheck import validate_cells  # every dataset opened here: a bad file never reaches Ray or MLflow

    for line in validate_cells(cells):
        print(f"detlab: {line}", flush=True)
    try:
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
    except ValueError as e:
        raise ConfigError(f"--tracking-uri: {e}") from None
    _warn_if_ephemeral(out, uri)
    tracking.check_reachable(uri)  # before pretraining and before Ray: seconds, not minutes of retries
    if data_for is not None and any(needs_pretraining(c.cfg) for c in cells):
        from lab.execution.pretrain import attach_pretrained

        cells = attach_pretrained(cells, out, uri, data_for)
    from lab.execution import runner  # imports Ray: only once the config is known to be good

    print(f"detlab: {len(cells)} cell(s), profile {args.profile}, MLflow {scrub_text(uri)} "
          f"(experiment {experiment}), results {out}")
    t0 = time.time()
    opts = runner.RunOptions(tracking_uri=uri, experiment=experiment, out=out, force=args.force,
                             ray_address=args.ray_address, max_concurrent=args.max_concurrent,
                             storage_uri=args.storage, log_models=args.log_models, register=args.register)
    outcomes = runner.run_cells(cells, opts)
    print("\n" + runner.summarize(outcomes))
    print(f"wall time {time.time() - t0:.0f}s")
    if table is not None:
        from lab import tables

        try:
            paths = tables.write_tables(uri, table, out, profile=args.profile)
            print("\n" + paths["md"].read_text())
            if "claims_md" in paths:
                print(paths["claims_md"].read_text())
            print(f"tables written under {out} ({', '.join(p.name for p in paths.values())}); "
                  f"the runs in the MLflow UI: detlab ui --tracking-uri {scrub_text(uri)}")
            if args.profile == "smoke":
                print("(profile smoke: a pipeline check; these numbers mean nothing)")
        except Exception as e:  # noqa: BLE001 - the runs are safe in MLflow; `detlab tables` can redo this
            print(f"detlab: writing the tables failed ({type(e).__name__}: {e}); "
                  f"rerun `detlab tables {_tables_arg(table)} --tracking-uri {scrub_text(uri)}`", file=sys.stderr)
            return 1
    return 1 if any(o.status == "FAILED" for o in outcomes) else 0


def _tables_arg(spec: TableSpec) -> str:
    return f"--table {spec.paper_table}" if spec.paper_table else f"--spec {spec.path}"


def _warn_if_ephemeral(out: Path, uri: str) -> None:
    """Under ``ray job submit --working-dir`` the cwd is a temporary unpacked copy of the repo."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return
    cwd = Path.cwd()
    for what, path in (("--out", out), ("tracking store", tracking.sqlite_path(uri))):
        if path is not None and path.is_relative_to(cwd) and "runtime_resources" in str(cwd):
            print(f"detlab: warning: {what} {path} is inside the job's temporary working dir and will be "
                  f"deleted with it; pass an absolute --out / an http(s) --tracking-uri", file=sys.stderr)


def cmd_data(args: argparse.Namespace) -> int:
    """Prepare (shapes, trees) or open (coco, voc) both splits, as a job would, and summarise them."""
    from detector.anchors import anchor_fit, dataset_boxes, fit_anchor_sizes
    from detector.config import DetectorConfig, apply_overrides, overrides_to_dict
    from detector.data import build_dataset, dataset_root
    from lab.plan.datacheck import describe, split_summary, validate_data

    sets = [f"data.dataset={args.name}", *([f"data.root={args.root}"] if args.root else []), *args.sets]
    base = DetectorConfig()
    if args.profile:
        profile = load_profile(args.profile)
        tag = tracking.dataset_tag(args.name)
        if tag not in profile.datasets:
            raise ConfigError(f"profile {args.profile!r} has no {tag!r} dataset ({', '.join(profile.datasets)})")
        resolved = single_cell(profile, overrides_to_dict(sets), tag, check_required=False).cfg  # no training here
        base.data, base.model, base.assign = resolved.data, resolved.model, resolved.assign
    cfg = apply_overrides(base, sets)
    data, model = cfg.data, cfg.model
    data.validate()
    _, val_set = validate_data(data)  # a job driver's checks: errors name the file, field and value
    print(f"{describe(data)} (box sizes: raw = in the image's own pixels; model input = after the model's resize)")
    for split in ("train", "val"):
        ds = build_dataset(data, split, train=False) if split == "train" else val_set  # every image
        print(f"{args.name} {split} {getattr(data, split + '_split')!r}: {ds!r}")
        for line in split_summary(ds, model):
            print(line)
        if split == "train":
            boxes = dataset_boxes(ds.records, model.min_size, model.max_size)
            if any(len(b) for b, _, _ in boxes):
                print(f"  anchor fit at {model.min_size}-{model.max_size} px: "
                      f"{anchor_fit(boxes, model.anchor_sizes, cfg.assign.fg_threshold).summary()}")
                print(f"  best base size: {fit_anchor_sizes(boxes)[1].summary()}")
    print(f"{args.name} is under {dataset_root(data)}")
    return 0


#: what ``detlab predict`` takes from a directory (case-insensitive)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_paths(items: Sequence[str | Path]) -> list[Path]:
    """The images ``detlab predict`` reads: each item is a file, a directory (its images, sorted, not
    recursive) or a glob pattern (``'photos/*.jpg'``, quoted so the shell leaves it; image files
    only, by :data:`IMAGE_SUFFIXES`). An item that gives no image is an error naming it, before the
    weights are read."""
    import glob

    found: list[Path] = []
    empty: list[str] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_file():
            found.append(path)
            continue
        if path.is_dir():
            hits = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            why = f"a directory with no {'/'.join(IMAGE_SUFFIXES)} file"
        elif glob.has_magic(str(item)):
            hits = sorted(Path(p) for p in glob.glob(str(path))
                          if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES)
            why = "matches no image file"
        else:
            hits, why = [], "no such file"
        found.extend(hits)
        if not hits:
            empty.append(f"{item} ({why})")
    if empty:
        raise ConfigError(f"no image in: {'; '.join(empty)}")
    return found


def cmd_predict(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt
    import torch
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from lab.execution import evaluation

    images = image_paths(args.images)
    src, payload = models.load_source(args.weights, args.tracking_uri)
    model = models.rebuild(payload, args.sets).model
    names = payload["class_names"]
    args.out.mkdir(parents=True, exist_ok=True)
    for path in images:
        image = to_tensor(Image.open(path).convert("RGB"))
        with torch.no_grad():
            det = model([image])[0]
        keep = det["scores"] >= args.score
        boxes = [
            {"box_xyxy": [round(v, 2) for v in b], "score": round(s, 4), "label": names[l]}
            for b, s, l in zip(det["boxes"][keep].tolist(), det["scores"][keep].tolist(), det["labels"][keep].tolist())
        ]
        (args.out / f"{path.stem}.json").write_text(json.dumps({"image": str(path), "weights": src.label, "detections": boxes}, indent=1))
        fig = evaluation.draw_detections(image, det, names, args.score)
        fig.savefig(args.out / f"{path.stem}.png")
        plt.close(fig)
        print(f"{path}: {len(boxes)} detection(s) -> {args.out / path.stem}.json/.png")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lab.inference import evalcmd

    return evalcmd.run(args)


def cmd_cluster(args: argparse.Namespace) -> int:
    from lab.infra import cluster

    return cluster.main(args)


def cmd_compare(args: argparse.Namespace) -> int:
    from lab.tables import compare

    return compare.run(args)


def cmd_ui(args: argparse.Namespace) -> int:
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    if not uri.startswith("sqlite:"):
        print(f"the tracking store is a server: open {scrub_text(uri)}")
        return 0
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port)]
    # MLflow 3.17's UI opens experiments in its GenAI view whatever their kind tag; the query picks
    # the model-training view (the runs table with metrics and the Dataset column)
    print(f"MLflow UI on http://127.0.0.1:{args.port}/#/experiments?workflowType=machine_learning "
          f"(store {scrub_text(uri)}); Ctrl-C to stop", flush=True)
    # no job runner: it starts 7 huey consumers (~2 GiB) that a read-only UI does not need
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, cmd)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
