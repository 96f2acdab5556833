"""Experiment-level configuration: the detector config plus schedule, evaluation and scaling.

``LabConfig`` *is a* ``DetectorConfig`` (same ``model/assign/loss/nms/data`` sections, so
``detector.build_detector(cfg)`` accepts it) with three more sections:

* ``train``   — the optimiser and the 1x schedule (SGD, linear warm-up, x0.1 steps at 8/12, 11/12);
* ``eval``    — when and how the val split is evaluated;
* ``scaling`` — Ray Train workers / GPUs / CPUs and the failure budget.

Every key is addressable as ``section.key`` (``--set train.epochs=2``), and ``flatten`` gives
the same names as MLflow params. Profiles (``lab/settings/profiles/<name>.yaml``) hold the per-profile
defaults and the datasets/backbones the tables run over; see :mod:`lab.plan.experiments`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detector.digest import file_sha256 as detector_file_sha256
from detector.config import (
    ConfigError,
    DetectorConfig,
    apply_overrides,
    check_choice,
    check_min,
    check_positive,
    check_unit,
    flatten,
    from_dict,
    merge_dicts,
    read_yaml_mapping,
    overrides_to_dict,
    to_dict,
)

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
PROFILES = ("smoke", "demo", "cpu", "paper")


@dataclass
class TrainConfig:
    """Optimiser and schedule (the standard RetinaNet "1x" recipe, scaled to the epochs given)."""

    epochs: int = 12
    #: images per worker per step; the global batch is batch_size x max(workers, 1).
    batch_size: int = 2
    #: learning rate for a global batch of 16 (linear scaling rule: lr = base_lr x global_batch / 16).
    base_lr: float = 0.01
    #: "sgd" (momentum, the paper's) or "adamw" (betas (0.9, 0.999); converges faster from scratch).
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    #: linear warm-up from warmup_factor x lr to lr over the first warmup_iters iterations.
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    #: warm-up as a fraction of all iterations; when > 0 it replaces warmup_iters, so that a short
    #: run still spends most of its steps at full lr.
    warmup_frac: float = 0.0
    #: "step" (x lr_gamma at lr_steps, the 1x shape) or "cosine" (to 0 after the warm-up).
    lr_schedule: str = "step"
    #: step decay points as fractions of the total iterations (1x: epochs 8 and 11 of 12).
    lr_steps: tuple[float, ...] = (8 / 12, 11 / 12)
    lr_gamma: float = 0.1
    #: max gradient norm; 0 disables clipping.
    grad_clip: float = 0.0
    #: steps with a NaN/inf loss are skipped (counted as ``nonfinite_steps``); more than this many in
    #: a row abort the cell, naming the step and the loss terms. 0: abort at the first.
    max_nonfinite: int = 3
    #: keep conv weights (and so activations) channels-last (NHWC); see bench/bench_recipe.py.
    channels_last: bool = False
    #: mixed precision (torch.autocast + GradScaler); only takes effect on GPU workers.
    amp: bool = True
    #: cap on iterations per epoch (0 = the whole epoch); for smoke runs.
    max_iters: int = 0
    #: seed of the torch/numpy/python RNGs (per rank: seed + rank).
    seed: int = 0
    #: print a progress line every this many iterations (rank 0).
    log_every: int = 20
    #: MLflow system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) sampled every this
    #: many seconds by one worker per node, as ``system/...`` (``system/node<k>/...`` on several
    #: nodes); 0 = off.
    system_metrics_s: float = 10.0
    #: intra-op threads of each worker (``torch.set_num_threads``). A different count splits the
    #: reductions differently and so changes the float results: it is part of the cell key.
    #: 0 = ``scaling.cpus_per_worker`` (resolved by :func:`build_config`).
    threads: int = 0
    #: ``torch.use_deterministic_algorithms`` (warn-only on CUDA, where some detection ops have no
    #: deterministic kernel), ``cudnn.benchmark`` off; see bench/bench_determinism.py for its cost.
    deterministic: bool = True
    #: evaluate an exponential moving average of the weights (YOLO / mmdetection's EMAHook):
    #: decay ``ema_decay * (1 - exp(-updates / ema_warmup))``; 0 = off (evaluate the raw weights).
    ema_decay: float = 0.0
    ema_warmup: int = 2000

    def validate(self) -> None:
        for key in ("epochs", "batch_size", "base_lr", "log_every"):
            check_positive(f"train.{key}", getattr(self, key))
        for key in ("warmup_iters", "max_iters", "weight_decay", "grad_clip", "system_metrics_s", "max_nonfinite",
                    "threads"):
            check_min(f"train.{key}", getattr(self, key))
        check_positive("train.ema_warmup", self.ema_warmup)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay} must be in [0, 1) (0 = no EMA)")
        for key in ("momentum", "warmup_factor", "lr_gamma", "warmup_frac"):
            check_unit(f"train.{key}", getattr(self, key))
        check_choice("train.lr_schedule", self.lr_schedule, ("step", "cosine"))
        check_choice("train.optimizer", self.optimizer, ("sgd", "adamw"))
        if any(not 0.0 < s <= 1.0 for s in self.lr_steps) or list(self.lr_steps) != sorted(self.lr_steps):
            raise ConfigError(f"train.lr_steps={self.lr_steps} must be increasing fractions in (0, 1]")


@dataclass
class EvalConfig:
    """Evaluation on the val split (always after the last epoch)."""

    #: also evaluate every this many epochs (0 = only at the end).
    every: int = 0
    batch_size: int = 4
    #: images drawn with their detections into the sample picture artifact.
    num_samples: int = 4
    #: score threshold for the drawn detections (not for the metrics).
    draw_score: float = 0.3
    #: COCO test-dev image-info JSON (e.g. image_info_test-dev2017.json); when set, rank 0 also
    #: writes a results JSON for the evaluation server (images under data.root/test_dev_split).
    test_dev_ann: str | None = None
    test_dev_split: str = "test2017"
    #: VOC07 11-point AP with exact k/10 recall thresholds; default False = the devkit's
    #: np.arange(0, 1.1, 0.1) (0.30000000000000004, ...), as in published VOC numbers.
    voc07_exact_thresholds: bool = False

    def validate(self) -> None:
        check_min("eval.every", self.every)
        check_positive("eval.batch_size", self.batch_size)
        check_min("eval.num_samples", self.num_samples)
        check_unit("eval.draw_score", self.draw_score)
        if self.test_dev_ann is not None and not Path(self.test_dev_ann).is_file():
            raise ConfigError(f"eval.test_dev_ann={self.test_dev_ann!r}: no such file")


@dataclass
class ScalingOptions:
    """How one cell is placed on the Ray cluster (``ray.train.ScalingConfig``)."""

    #: Ray Train workers; 0 = Ray Train local mode (the loop runs in the cell's own process,
    #: no worker group: seconds instead of ~30 s of start-up, used by the smoke profile).
    workers: int = 1
    gpus_per_worker: float = 0.0
    #: CPUs reserved per worker; also torch.set_num_threads in the worker.
    cpus_per_worker: int = 1
    #: worker-group failures retried from the last checkpoint (ray.train.FailureConfig).
    max_failures: int = 0

    def validate(self) -> None:
        check_min("scaling.workers", self.workers)
        check_min("scaling.gpus_per_worker", self.gpus_per_worker)
        check_positive("scaling.cpus_per_worker", self.cpus_per_worker)
        check_min("scaling.max_failures", self.max_failures, -1, note=" (-1 = unlimited)")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def world_size(self) -> int:
        return max(self.workers, 1)

    def resources(self) -> dict[str, float]:
        """Cluster resources one cell occupies while it trains."""
        n = self.world_size
        res = {"CPU": float(n * self.cpus_per_worker)}
        if self.gpus_per_worker:
            res["GPU"] = n * self.gpus_per_worker
        return res


@dataclass
class PretrainConfig:
    """Backbone pretraining on object-crop classification (:mod:`lab.execution.pretrain`), the offline stand-in
    for ImageNet; ``steps: 0`` (the default) means none.

    The file a cell starts from is determined by these settings, the body (backbone, width, norm),
    the pretraining data and the code and torch version, and the cell key sees it through its
    sha256 only (``pretrain.*`` are left out of :func:`cell_key`).
    """

    steps: int = 0
    batch_size: int = 64
    #: side of the square crops, pixels.
    crop_size: int = 64
    lr: float = 0.002
    weight_decay: float = 0.05
    #: None: the cell's ``train.seed``, so every seed of a table pretrains its own file and the
    #: seed CIs include the pretraining; an int: that seed for every cell (one shared file).
    seed: int | None = None
    #: dataset tags (of the profile's ``datasets:``) whose *train* splits give the crops; () = the
    #: cell's own dataset. Fixed by the profile, never by the datasets a job happens to run.
    datasets: tuple[str, ...] = ()
    #: intra-op threads of the pretraining process (a different count gives a different file).
    threads: int = 1
    #: held-out crops, cut from the *val* splits of the same datasets, for the accuracy curve.
    val_crops: int = 2000

    def validate(self) -> None:
        check_min("pretrain.steps", self.steps)
        for key in ("batch_size", "crop_size", "lr", "threads", "val_crops"):
            check_positive(f"pretrain.{key}", getattr(self, key))
        check_min("pretrain.weight_decay", self.weight_decay)
        if self.seed is not None:
            check_min("pretrain.seed", self.seed)

    def seed_for(self, train_seed: int) -> int:
        """The pretraining seed of a cell whose ``train.seed`` is ``train_seed``."""
        return train_seed if self.seed is None else self.seed


@dataclass
class LabConfig(DetectorConfig):
    """A fully resolved experiment: detector sections plus train / eval / scaling."""

    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingOptions = field(default_factory=ScalingOptions)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    @property
    def threads(self) -> int:
        """Intra-op threads per worker: ``train.threads``, else ``scaling.cpus_per_worker``."""
        return self.train.threads or self.scaling.cpus_per_worker

    @property
    def global_batch(self) -> int:
        return self.train.batch_size * self.scaling.world_size

    @property
    def lr(self) -> float:
        """Linear scaling rule: base_lr (for 16 images) x global_batch / 16."""
        return self.train.base_lr * self.global_batch / 16


#: keys that change how a cell runs but not what it computes; left out of ``cell_key`` so that
#: e.g. resubmitting with more CPUs or retries still finds (and resumes) the same cell.
NON_SEMANTIC_KEYS = frozenset(
    {"scaling.cpus_per_worker", "scaling.max_failures", "train.max_nonfinite", "train.log_every", "train.system_metrics_s", "data.loader_workers",
     "eval.batch_size", "eval.num_samples", "eval.draw_score"}
)


#: weight files enter a cell's key by their content, not their path (a pretrained backbone cached
#: under another --out, or the same ImageNet file on another machine, is the same cell).
WEIGHT_KEYS = ("model.weights_backbone", "model.weights")


def cell_key(cfg: LabConfig) -> str:
    """Stable 12-hex-digit hash of the resolved config (the ``detlab.key`` tag, the Ray run name).

    Weight files count by content: the declared ``model.weights_backbone_sha256`` when set, else the
    file's sha256. ``pretrain.*`` do not count: the pretrained file they make enters through its
    sha256. The thread count counts as resolved (:attr:`LabConfig.threads`), since it changes the
    float results.
    """
    items = {k: v for k, v in flatten(cfg).items() if k not in NON_SEMANTIC_KEYS and not k.startswith("pretrain.")}
    items["train.threads"] = cfg.threads
    declared = items.pop("model.weights_backbone_sha256", None)
    for k in WEIGHT_KEYS:
        if k == "model.weights_backbone" and items.get(k) and declared:
            items[k] = "sha256:" + declared
        elif items.get(k) and Path(items[k]).is_file():
            items[k] = "sha256:" + file_sha256(items[k])
    blob = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (memoised by path, size and mtime: cell keys ask for it often)."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_CACHE:
        _SHA_CACHE[memo] = detector_file_sha256(p)
    return _SHA_CACHE[memo]


def build_config(*layers: dict[str, Any], source: str = "config") -> LabConfig:
    """Merge nested-dict layers (later wins) onto the defaults, type-check and validate."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge_dicts(merged, layer or {})
    try:
        cfg = from_dict(LabConfig, merged)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    cfg.train.threads = cfg.threads  # explicit in the logged params, not "0"
    return cfg


def user_overrides(config_files: list[str] | None = None, sets: list[str] | None = None) -> dict[str, Any]:
    """``--config FILE`` (in order) then ``--set key=value`` as one nested override dict.

    Keys are checked against ``LabConfig`` here, so a typo fails before anything runs.
    """
    out: dict[str, Any] = {}
    for path in config_files or []:
        data = read_yaml_mapping(path)
        try:
            from_dict(LabConfig, data)  # unknown keys / wrong types, naming the file
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        out = merge_dicts(out, data)
    if sets:
        nested = overrides_to_dict(list(sets))
        try:
            from_dict(LabConfig, nested)
        except ConfigError as e:
            raise ConfigError(f"--set: {e}") from None
        out = merge_dicts(out, nested)
    return out


def config_from_dict(data: dict[str, Any]) -> LabConfig:
    """Inverse of ``to_dict`` for a resolved config shipped to a worker."""
    return from_dict(LabConfig, data)


def dump_config(cfg: LabConfig, scrub: bool = False) -> str:
    """Resolved config as YAML; ``scrub``: secrets masked (:mod:`lab.settings.scrub`), for what is logged
    (the ``config/resolved.yaml`` artifact), not for files the config is read back from."""
    data = to_dict(cfg)
    if scrub:
        from lab.settings.scrub import scrub_mapping

        data = scrub_mapping(data)
    return yaml.safe_dump(data, sort_keys=False)


__all__ = [
    "ConfigError",
    "EvalConfig",
    "LabConfig",
    "PROFILES",
    "PretrainConfig",
    "ScalingOptions",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "cell_key",
    "config_from_dict",
    "dump_config",
    "user_overrides",
]
