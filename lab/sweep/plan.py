"""Options -> a resolved :class:`SweepPlan` (pure: no Ray, no MLflow), and the names and tags that
identify a sweep and its runs.

The plan holds the base config layer every trial starts from (profile + the user's layers + the
full method), the validated space, the metric ASHA compares, and a stable name: a hash of the
options (never the time), so ``--resume`` finds the same sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detector.config import ConfigError, merge_dicts, overrides_to_dict, to_dict
from lab.records import tracking
from lab.records.tracking import TAG_WEIGHTS  # noqa: F401 - plan.TAG_WEIGHTS: where a trial's model.pt lives
from lab.settings.config import LabConfig, build_config
from lab.plan.experiments import data_root_overrides, load_profile, single_cell
from lab.settings.joboptions import settle_profile, user_layer
from lab.sweep.space import Space, load_space, space_text, validate_space

#: the sweep trains the full method unless --set/--config say otherwise.
METHOD = {"assign.iac": True, "loss.dc": True, "nms.clb": True}
#: validation metric by dataset format (COCO-format data: AP; VOC-format: mAP), percent, maximised.
METRIC_BY_DATASET = {"shapes": "AP", "coco": "AP", "trees": "mAP", "voc": "mAP"}
#: per-epoch training metrics a trial reports besides the val metrics (``--metric`` may name one).
TRAIN_METRICS = ("train_loss", "train_loss_cls", "train_loss_reg", "positives_per_image",
                 "iac_score_positives_per_image", "misalign_spearman", "misalign_pearson")

TAG_SWEEP = "detlab.sweep"  #: the sweep's stable name (parent and children)
TAG_TRIAL = "detlab.trial_id"
TAG_MODE = "detlab.sweep_mode"  #: "tune" or "posthoc"
TAG_PARENT = "mlflow.parentRunId"


@dataclass
class SweepPlan:
    """Everything the sweep needs, resolved and validated before Ray starts."""

    base: dict[str, Any]  #: nested config layer every trial starts from (profile + user + method)
    cfg: LabConfig  #: the base config resolved (for scaling, epochs, data)
    space: Space
    dataset: str  #: detlab.dataset tag
    profile: str
    metric: str  #: what ASHA and the best-trial choice compare (reported every epoch)
    mode: str  #: max | min
    name: str  #: stable sweep name (Tune experiment dir, detlab.sweep tag)
    experiment: str
    out: Path
    num_samples: int
    max_concurrent: int | None
    search: str
    seed: int
    grace_period: int
    reduction_factor: int
    resume: bool
    #: ``--storage`` (a path, shared:///mount or s3://bucket/prefix; see lab.infra.storage); None: ``out/sweeps``
    storage_uri: str | None = None

    @property
    def storage(self) -> str:
        """Tune's storage URI; the sweep lives in ``storage/name``."""
        from lab.infra import storage

        return str(storage.parse(self.storage_uri or self.out / "sweeps"))

    @property
    def sweep_dir(self) -> str:
        """The sweep's Tune experiment (a path or URI); its trials' Train runs are under ``train/``."""
        from lab.infra import storage

        return storage.join(self.storage, self.name)

    @property
    def best_path(self) -> Path:
        return self.out / f"best_{self.dataset}.yaml"


def experiment_name(dataset: str) -> str:
    """MLflow experiment of the sweeps on ``dataset`` (a detlab.dataset tag)."""
    return f"{tracking.SWEEP_EXPERIMENT_PREFIX}{tracking.dataset_tag(dataset)}"


def build_plan(args: argparse.Namespace) -> SweepPlan:
    """Options -> plan; every error names the option or key (no Ray, no MLflow)."""

    profile = load_profile(settle_profile(args))
    if args.dataset is not None and args.dataset not in profile.datasets:
        raise ConfigError(f"--dataset {args.dataset!r} is not in profile {profile.name!r} "
                          f"({', '.join(profile.datasets)})")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples {args.num_samples} must be >= 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent} must be >= 1")
    if args.grace_period < 1:
        raise ConfigError(f"--grace-period {args.grace_period} must be >= 1")
    if args.reduction_factor < 2:
        raise ConfigError(f"--reduction-factor {args.reduction_factor} must be >= 2")
    if args.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("--search optuna needs the 'optuna' package, which is not installed "
                          "(pip install optuna), or use --search random")
    tag = args.dataset or next(iter(profile.table2.datasets or profile.datasets), None)

    # the method below the user's layers; eval every epoch (ASHA compares trials per epoch)
    layer = merge_dicts(overrides_to_dict({**METHOD, "eval.every": 1}), user_layer(args))
    if args.data_root:
        layer = merge_dicts(layer, data_root_overrides(args.data_root, [tag] if tag else []).get(tag, {}))
    cell = single_cell(profile, layer, tag, row="sweep")
    cfg = cell.cfg
    if cfg.eval.every != 1:
        raise ConfigError(f"eval.every={cfg.eval.every}: a sweep evaluates every epoch (ASHA compares trials "
                          f"on the val metric per epoch); drop the override")
    # the layers single_cell merged, the detector's included (a GFL sweep gets the profile's GFL layer)
    base = profile.config
    for extra in (profile.datasets.get(cell.dataset, {}), profile.detectors.get(cfg.model.detector, {}), layer):
        base = merge_dicts(base, extra)

    space = load_space(args.space)
    validate_space(space, base)
    metric, mode = _metric_and_mode(args.metric, args.mode, cfg.data.dataset)
    name = sweep_name(cell.dataset, cell.key, space, args.search, args.num_samples, args.seed,
                      args.grace_period, args.reduction_factor, metric, mode)
    return SweepPlan(
        base=base, cfg=cfg, space=space, dataset=cell.dataset, profile=profile.name, metric=metric, mode=mode,
        name=name,
        experiment=experiment_name(cell.dataset), out=args.out.expanduser().resolve(),
        num_samples=args.num_samples, max_concurrent=args.max_concurrent, search=args.search, seed=args.seed,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor, resume=args.resume,
        storage_uri=_storage_option(args),
    )


def _storage_option(args: argparse.Namespace) -> str | None:
    """``--storage`` validated (an s3:// URI without a bucket is a ConfigError here, before Ray)."""
    from lab.infra import storage

    value = getattr(args, "storage", None)
    return str(storage.parse(value)) if value else None


def with_pretrained_backbone(plan: SweepPlan, args: argparse.Namespace, uri: str) -> SweepPlan:
    """Start every trial from the backbone file a table cell of the same profile, dataset and seed
    starts from (:mod:`lab.execution.pretrain`: same settings, same pretraining data, same key, one file), so
    a sweep's winner transfers to the tables. No-op when the config does not pretrain or names weights."""
    from lab.plan.experiments import profile_data
    from lab.execution.pretrain import ensure_pretrained, needs_pretraining, pretrain_job

    if not needs_pretraining(plan.cfg):
        return plan
    profile = load_profile(settle_profile(args))
    job = pretrain_job(plan.cfg, plan.dataset, lambda tag: profile_data(profile, tag, user_layer(args)))
    file = ensure_pretrained([job], plan.out, uri)[job.key]
    layer = {"model": {"weights_backbone": str(file.path), "weights_backbone_sha256": file.sha256,
                       "trainable_backbone_layers": 5}}
    return dataclasses.replace(plan, base=merge_dicts(plan.base, layer),
                               cfg=build_config(merge_dicts(to_dict(plan.cfg), layer), source="sweep base"))


def _metric_and_mode(metric: str | None, mode: str | None, dataset: str) -> tuple[str, str]:
    """``--metric`` (default: AP or mAP by the dataset's format) and ``--mode`` (default: min for a
    loss, else max); the metric must be one every epoch reports."""
    from lab.execution.evaluation import COCO_METRICS

    default = METRIC_BY_DATASET[dataset]
    metric = metric or default
    known = (*(COCO_METRICS if default == "AP" else ("mAP",)), *TRAIN_METRICS)
    if metric not in known:
        raise ConfigError(f"--metric {metric!r} is not reported every epoch for dataset {dataset!r}; "
                          f"one of {', '.join(known)}")
    return metric, mode or ("min" if "loss" in metric else "max")


def sweep_name(dataset: str, base_key: str, space: Space, search: str, num_samples: int, seed: int,
               grace: int, reduction: int, metric: str, mode: str) -> str:
    """``sweep-<dataset>-<hash>``: the same options always give the same name (``--resume`` finds it).

    Non-semantic options (--max-concurrent, --out, the tracking URI) are left out on purpose.
    """
    blob = json.dumps({"base": base_key, "space": space_text(space), "search": search, "n": num_samples,
                       "seed": seed, "grace": grace, "rf": reduction, "metric": metric, "mode": mode}, sort_keys=True)
    return f"sweep-{dataset}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
