"""Typed configuration for the detector: dataclasses, YAML loading, ``section.key`` flattening.

The config is deliberately plain: nested dataclasses, no registries. ``flatten`` produces the
``section.key`` names used as MLflow params and Ray Tune search-space keys, and ``apply_overrides``
takes the same names (``--set assign.alpha=0.3``), so the three views always agree.

Every reading of the paper that the paper leaves open is a key here (see the docstrings of
``detector.assign``, ``detector.losses`` and ``detector.nms`` for what each one means).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

#: basic-block bodies: the ones whose width ``model.backbone_width`` can set.
BASIC_BACKBONES = ("resnet10", "resnet18", "resnet34")
BACKBONES = (
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
    "resnext101_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)


#: ``model.detector`` values: the paper's RetinaNet, GFL (its best Table 1 row), and two
#: torchvision detectors for retrained comparison rows (plain NMS, no paper components).
DETECTORS = ("retinanet", "gfl", "fcos", "faster_rcnn")

#: ``model.anchor_sizes`` when it is left empty, per detector (P3..P7, strides 8..128): GFL's
#: published single square anchor of 8 x stride (mmdet ``octave_base_scale=8``); every other
#: detector RetinaNet's 4 x stride (with its 3 octave scales x 3 ratios; FCOS has no anchors).
DEFAULT_ANCHOR_SIZES: dict[str, tuple[int, ...]] = {"gfl": (64, 128, 256, 512, 1024)}
RETINANET_ANCHOR_SIZES: tuple[int, ...] = (32, 64, 128, 256, 512)


def default_anchor_sizes(detector: str) -> tuple[int, ...]:
    """The anchor base sizes (P3..P7, pixels) ``detector`` gets when ``model.anchor_sizes`` is empty."""
    return DEFAULT_ANCHOR_SIZES.get(detector, RETINANET_ANCHOR_SIZES)


class ConfigError(ValueError):
    """A config value is invalid; the message names the key (``section.key``) and the value."""


@dataclass
class ModelConfig:
    """Detector architecture and inference settings (RetinaNet's unless a key says otherwise)."""

    #: which detector: "retinanet" (detector.model), "gfl" (detector.gfl: ATSS + QFL/DFL/GIoU),
    #: "fcos" or "faster_rcnn" (torchvision's, detector.tv_detectors; no IAC/DC/CL-B).
    detector: str = "retinanet"
    backbone: str = "resnet50"
    #: ResNet stages (2..5 = c2..c5) whose 3x3 convs are DCNv2 (detector.dcn); () = none.
    dcn_stages: tuple[int, ...] = ()
    #: DCN kind: true = DCNv2 (modulated: offsets and a mask); false = DCNv1 (offsets only), which
    #: is what GFL's published X-101-32x4d-DCN config uses (mmcv "DCN" in c4-c5).
    dcn_mask: bool = True
    #: number of foreground classes; 0 means "take it from the dataset".
    num_classes: int = 0
    #: first-stage channels of a basic-block body (resnet10/18/34; stages double it). 64 is
    #: torchvision's; narrower bodies are what train from scratch in CPU minutes.
    backbone_width: int = 64
    #: FPN and head channels (256 in RetinaNet).
    fpn_channels: int = 256
    #: 3x3 convs in each head tower before the predictor (4 in RetinaNet).
    head_convs: int = 4
    #: local path to a backbone state_dict (e.g. ImageNet weights), or None for random init.
    weights_backbone: str | None = None
    #: expected sha256 (64 hex digits) of ``weights_backbone``, checked when it is loaded: a file
    #: replaced under a cell that was keyed on the old one is an error, not a silent change.
    weights_backbone_sha256: str | None = None
    #: local path to a whole-detector state_dict (``model.state_dict()``), or None.
    weights: str | None = None
    #: how many of the ResNet stages (counted from the top) are trained when weights_backbone is set.
    trainable_backbone_layers: int = 3
    #: backbone normalisation: "frozen_bn" (standard with pretrained weights), "bn" or "gn"
    #: (trainable; needed when training from scratch).
    norm: str = "bn"
    #: head normalisation: "none" (RetinaNet v1) or "gn" (GroupNorm in the conv towers).
    head_norm: str = "none"
    #: input resize (GeneralizedRCNNTransform): shorter side / cap on the longer side.
    min_size: int = 800
    max_size: int = 1333
    #: multi-scale training: shorter sides drawn uniformly per batch in training; () = min_size
    #: only. Evaluation always uses min_size.
    train_min_sizes: tuple[int, ...] = ()
    #: base anchor size of P3..P7 in pixels; RetinaNet gives each 3 octave scales and 3 aspect ratios.
    #: Empty (``[]``, or not set) = the detector's default (:func:`default_anchor_sizes`: GFL 8 x
    #: stride, the others 4 x stride), filled in when the config is built: a built config always
    #: names its sizes (so switching ``model.detector`` on a built config keeps the old ones).
    anchor_sizes: tuple[int, ...] = ()
    #: regression loss: "l1" (RetinaNet v1), "smooth_l1", "giou".
    reg_loss: str = "l1"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    #: GFL (model.detector=gfl): bins of the box distribution (0..reg_max, in strides), ATSS
    #: candidates per level, QFL's beta, and the loss weights of QFL, DFL, GIoU (GFL's 1, 0.25, 2).
    #: GFL uses one square anchor per location of side anchor_sizes[level] (GFL: 8 x stride).
    gfl_reg_max: int = 16
    gfl_atss_topk: int = 9
    gfl_qfl_beta: float = 2.0
    gfl_loss_weights: tuple[float, ...] = (1.0, 0.25, 2.0)
    #: inference: candidates below this score are dropped before NMS.
    score_thresh: float = 0.05
    topk_candidates: int = 1000
    detections_per_img: int = 100

    def __post_init__(self) -> None:
        if not self.anchor_sizes:  # the per-detector default, resolved here so params and cell keys show it
            self.anchor_sizes = default_anchor_sizes(self.detector)

    def validate(self) -> None:
        check_choice("model.detector", self.detector, DETECTORS)
        if self.backbone not in BACKBONES:
            raise ConfigError(f"model.backbone={self.backbone!r} is not one of {BACKBONES}")
        check_choice("model.norm", self.norm, ("frozen_bn", "bn", "gn"))
        check_choice("model.head_norm", self.head_norm, ("none", "gn"))
        check_choice("model.reg_loss", self.reg_loss, ("l1", "smooth_l1", "giou"))
        check_min("model.num_classes", self.num_classes)
        check_positive("model.backbone_width", self.backbone_width)
        check_positive("model.fpn_channels", self.fpn_channels)
        if not 0 <= self.head_convs <= 4:
            raise ConfigError(f"model.head_convs={self.head_convs} must be in [0, 4] (RetinaNet's tower has 4)")
        if self.backbone_width != 64 and self.backbone not in BASIC_BACKBONES:
            raise ConfigError(
                f"model.backbone_width={self.backbone_width} needs a basic-block backbone "
                f"{BASIC_BACKBONES}, not model.backbone={self.backbone!r}"
            )
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise ConfigError(f"model.trainable_backbone_layers={self.trainable_backbone_layers} must be in [0, 5]")
        if self.min_size <= 0 or self.max_size < self.min_size:
            raise ConfigError(f"model.min_size={self.min_size}, model.max_size={self.max_size}: need 0 < min_size <= max_size")
        for stage in self.dcn_stages:
            if stage not in (2, 3, 4, 5):
                raise ConfigError(f"model.dcn_stages={list(self.dcn_stages)}: stages are 2..5 (c2..c5)")
        for size in self.train_min_sizes:
            if not 0 < size <= self.max_size:
                raise ConfigError(f"model.train_min_sizes={list(self.train_min_sizes)}: each must be in (0, model.max_size={self.max_size}]")
        check_positive("model.gfl_reg_max", self.gfl_reg_max)
        check_positive("model.gfl_atss_topk", self.gfl_atss_topk)
        check_min("model.gfl_qfl_beta", self.gfl_qfl_beta)
        if len(self.gfl_loss_weights) != 3 or min(self.gfl_loss_weights) < 0:
            raise ConfigError(f"model.gfl_loss_weights={list(self.gfl_loss_weights)} must be 3 weights >= 0 (QFL, DFL, GIoU)")
        if len(self.anchor_sizes) != 5:
            raise ConfigError(f"model.anchor_sizes={self.anchor_sizes} must give 5 sizes (P3..P7)")
        sha = self.weights_backbone_sha256
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
            raise ConfigError(f"model.weights_backbone_sha256={sha!r} must be 64 lowercase hex digits")
        for key in ("weights_backbone", "weights"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"model.{key}={path!r}: no such file")
        check_unit("model.focal_alpha", self.focal_alpha)
        check_unit("model.score_thresh", self.score_thresh)


@dataclass
class AssignConfig:
    """Anchor assignment: torchvision's Matcher, or IAC (eq. 4-5) when ``iac`` is true."""

    iac: bool = False
    #: eq. 4 weight of the classification probability against intersection-over-min-area.
    alpha: float = 0.5
    fg_threshold: float = 0.5
    bg_threshold: float = 0.4
    #: eq. 5 score threshold; > 1 disables the score rule (then IAC is torchvision's Matcher).
    #: With ``iac`` and the rule on it must exceed both ``1 - alpha`` (else every anchor inside a
    #: GT, inter/min-area = 1, is positive whatever its probability, from step 0) and ``alpha``
    #: (else an anchor with no overlap at all turns positive once its probability reaches
    #: ``score_threshold / alpha``): :meth:`validate` rejects both. The rule starts to fire on
    #: anchors inside a GT at probability ``(score_threshold - (1 - alpha)) / alpha``.
    score_threshold: float = 0.7
    allow_low_quality_matches: bool = True
    #: training iterations before IAC is switched on (plain IoU matching until then).
    warmup_iters: int = 0

    def validate(self) -> None:
        check_unit("assign.alpha", self.alpha)
        check_unit("assign.fg_threshold", self.fg_threshold)
        check_unit("assign.bg_threshold", self.bg_threshold)
        if self.bg_threshold > self.fg_threshold:
            raise ConfigError(
                f"assign.bg_threshold={self.bg_threshold} must be <= assign.fg_threshold={self.fg_threshold}"
            )
        check_min("assign.score_threshold", self.score_threshold, note=" (> 1 disables the score rule)")
        check_min("assign.warmup_iters", self.warmup_iters)
        if self.iac and self.score_threshold <= 1.0:
            self._check_score_rule()

    def _check_score_rule(self) -> None:
        """Reject the two degenerate (alpha, score_threshold) regions of eq. 4-5 (IAC on, rule on).

        ``s = alpha * p + (1 - alpha) * iom`` with ``p, iom`` in [0, 1]:

        * ``score_threshold <= 1 - alpha``: ``iom = 1`` gives ``s >= score_threshold`` for any
          ``p``: every anchor inside a GT is positive from step 0 (measured: 1546 score positives
          per image against 90 IoU positives at alpha 0.2, score_threshold 0.6);
        * ``score_threshold <= alpha``: ``iom = 0`` with ``p >= score_threshold / alpha`` gives a
          positive with no overlap at all (alpha 0.8, score_threshold 0.55, p 0.7 made all 4842
          anchors of an image positive).
        """
        tau, alpha = self.score_threshold, self.alpha
        fix = "raise assign.score_threshold above max(assign.alpha, 1 - assign.alpha), or > 1 to disable the score rule"
        if tau <= 1.0 - alpha:
            raise ConfigError(
                f"assign.score_threshold={tau:g} <= 1 - assign.alpha = {1.0 - alpha:g} (assign.alpha={alpha:g}): "
                f"with assign.iac=true every anchor inside a GT is positive whatever its probability; {fix}"
            )
        if tau <= alpha:
            raise ConfigError(
                f"assign.score_threshold={tau:g} <= assign.alpha={alpha:g}: with assign.iac=true an anchor that "
                f"does not overlap any GT becomes positive once its probability reaches "
                f"{tau / alpha if alpha > 0 else float('inf'):.3g}; {fix}"
            )


@dataclass
class LossConfig:
    """Dynamic Coefficient loss (eq. 1-3) switches."""

    dc: bool = False
    #: eq. 1 epsilon; lambda lies in (0.5, 2] for any eps >= 0, so eps only guards the edge.
    eps: float = 1e-6
    #: eq. 2 normalisation set: "batch" (all positives of the batch, the default: the focal-loss
    #: normaliser is per batch in mmdet/detectron2 and per-image sets are tiny on small objects)
    #: or "image".
    scope: str = "batch"

    def validate(self) -> None:
        check_min("loss.eps", self.eps)
        check_choice("loss.scope", self.scope, ("batch", "image"))


#: ``nms.clb_score`` values (see ``NmsConfig``).
CLB_SCORES = ("own", "cluster_max")


@dataclass
class NmsConfig:
    """Post-processing NMS: class-wise greedy NMS, or CL-B NMS (eq. 6-7) when ``clb`` is true."""

    clb: bool = False
    iou_threshold: float = 0.5
    #: eq. 7 weight of the centre-distance term: s = score + beta * dis.
    beta: float = 1.0
    #: CL-B only: the score a kept box reports (what AP ranks by). "own": its own probability
    #: (our reading of eq. 7, where s only selects); "cluster_max": the highest probability in its
    #: eq. 6 cluster (what IoU-Net's IoU-guided NMS reports). See ``detector.nms.clb_nms``.
    clb_score: str = "own"

    def validate(self) -> None:
        check_unit("nms.iou_threshold", self.iou_threshold)
        check_min("nms.beta", self.beta)
        check_choice("nms.clb_score", self.clb_score, CLB_SCORES)


@dataclass
class DataConfig:
    """Which dataset, where, and the training-time augmentation."""

    #: "shapes" (generated, COCO format), "trees" (DeepForest, VOC format), "coco", "voc".
    dataset: str = "shapes"
    #: dataset root; None means the built-in cache directory for shapes/trees.
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    #: COCO-format only: annotation JSON paths relative to root (None: the dataset's default).
    train_ann: str | None = None
    val_ann: str | None = None
    hflip_prob: float = 0.5
    #: vertical flip and 90-degree turn probabilities: for imagery with no "up" (trees).
    vflip_prob: float = 0.0
    rot90_prob: float = 0.0
    #: shapes generator: images per split and image side.
    num_train: int = 200
    num_val: int = 50
    image_size: int = 256
    #: trees: tile size in pixels.
    tile_size: int = 400
    #: DataLoader workers per training worker.
    loader_workers: int = 0
    #: cap on images per split (0 = all); handy for smoke runs on real datasets.
    max_images: int = 0
    seed: int = 0
    #: voc: the XML coordinates are the devkit's 1-based pixel indices (x1 = xmin - 1). labelme, CVAT
    #: and most other tools write 0-based continuous coordinates: set false to read them unchanged.
    #: Ignored by the other datasets (so one --set serves a table with VOC and COCO cells).
    voc_one_based: bool = True
    #: COCO format: evaluate with area = w*h instead of the JSON's ``area`` (which COCOeval sizes
    #: APs/APm/APl by). For files whose area is wrong (e.g. the whole image's) or absent; with real
    #: segmentation areas the size metrics are then no longer comparable to published ones.
    coco_recompute_area: bool = False

    def validate(self) -> None:
        check_choice("data.dataset", self.dataset, ("shapes", "trees", "coco", "voc"))
        if self.dataset in ("coco", "voc") and not self.root:
            raise ConfigError(f"data.root is required for data.dataset={self.dataset!r}")
        if self.root and self.dataset in ("coco", "voc") and not Path(self.root).exists():
            raise ConfigError(f"data.root={self.root!r}: no such directory")
        for key in ("hflip_prob", "vflip_prob", "rot90_prob"):
            check_unit(f"data.{key}", getattr(self, key))
        for key in ("num_train", "num_val", "image_size", "tile_size"):
            check_positive(f"data.{key}", getattr(self, key))
        for key in ("max_images", "loader_workers"):
            check_min(f"data.{key}", getattr(self, key))


@dataclass
class DetectorConfig:
    """Everything ``detector`` needs: model, assignment, loss, NMS, data."""

    model: ModelConfig = field(default_factory=ModelConfig)
    assign: AssignConfig = field(default_factory=AssignConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    nms: NmsConfig = field(default_factory=NmsConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> "DetectorConfig":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        self._check_components()
        return self

    def _check_components(self) -> None:
        """The paper's components exist only where they are defined: IAC on RetinaNet's IoU
        matcher; DC and CL-B on RetinaNet and GFL (torchvision's FCOS / Faster R-CNN are stock)."""
        det = self.model.detector
        if self.assign.iac and det != "retinanet":
            raise ConfigError(f"assign.iac=true needs model.detector='retinanet' (IAC replaces its IoU matcher; "
                              f"GFL assigns by ATSS), not {det!r}")
        for key, on in (("loss.dc", self.loss.dc), ("nms.clb", self.nms.clb)):
            if on and det not in ("retinanet", "gfl"):
                raise ConfigError(f"{key}=true needs model.detector 'retinanet' or 'gfl', not {det!r}")


# --------------------------------------------------------------------------------------------
# Generic helpers: they work on any (nested) dataclass, so lab's experiment config reuses them.

T = TypeVar("T")


def check_choice(key: str, value: Any, options: tuple) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``value`` is one of ``options``."""
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {options}")


def check_unit(key: str, value: float) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``0 <= value <= 1``."""
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{key}={value} must be in [0, 1]")


def check_min(key: str, value: float, minimum: float = 0, note: str = "") -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``value >= minimum``."""
    if value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}{note}")


def check_positive(key: str, value: float) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``value > 0``."""
    if value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` for every leaf; these are the MLflow param names."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, name + "."))
        else:
            out[name] = list(v) if isinstance(v, tuple) else v
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the declared field type, with an error naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(key, non_none[0], value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return tuple(_coerce(key, args[0], v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}={value!r} must be a boolean")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(float(value)) if tp is int else tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be {tp.__name__}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise, naming them."""
    data = dict(data or {})
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + u for u in unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping, got {value!r}")
            kwargs[name] = from_dict(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(key, tp, value)
    return cls(**kwargs)


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``"assign.alpha=0.3"`` -> ``("assign.alpha", 0.3)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-6" as a string
            value = float(value)
        except ValueError:
            pass
    return key, value


def overrides_to_dict(items: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Dotted overrides -> nested dict."""
    pairs = items.items() if isinstance(items, dict) else (parse_override(i) for i in items)
    nested: dict[str, Any] = {}
    for key, value in pairs:
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def apply_overrides(cfg: T, items: dict[str, Any] | list[str]) -> T:
    """A copy of ``cfg`` with dotted overrides applied and type-checked."""
    return from_dict(type(cfg), merge_dicts(to_dict(cfg), overrides_to_dict(items)))


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file that must hold a mapping; errors name ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping at the top level")
    return data


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Load a dataclass from a YAML file; errors name the file."""
    data = read_yaml_mapping(path)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
