"""The pretraining stage of a table job: one backbone file per (body, settings), cached and tracked.

A profile with a ``pretrain:`` section (``steps > 0``) gets its backbone pretrained on
:mod:`detector.pretrain`'s crop-classification task over the *training* splits of the table's
datasets before any cell trains. The file lands in ``<out>/pretrain/<key>/backbone.pt`` (``--out``
is the directory every node reads, so a cluster's workers find it), keyed by everything that
determines it: the pretraining settings, the body (backbone, width, norm) and the datasets' data
sections. A second job with the same key reuses it. Each pretraining is its own MLflow run in the
experiment ``detlab-pretrain`` (params, the accuracy curve, the weights as an artifact).

Every cell of the table then starts from that file through ``model.weights_backbone`` with all
stages trainable, so the rows stay comparable. The cell key sees the file only through its
content hash (:func:`lab.config.cell_key`), never its path.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from detector.config import ConfigError, check_min, check_positive, flatten, to_dict
from lab.config import NON_SEMANTIC_KEYS, cell_key, file_sha256

if TYPE_CHECKING:
    from lab.experiments import Cell

#: MLflow experiment of the pretraining runs.
EXPERIMENT = "detlab-pretrain"
WEIGHTS_NAME = "backbone.pt"


@dataclass
class PretrainConfig:
    """A profile's ``pretrain:`` section; ``steps: 0`` (the default) means no pretraining."""

    steps: int = 0
    batch_size: int = 64
    #: side of the square crops, pixels.
    crop_size: int = 64
    lr: float = 0.002
    weight_decay: float = 0.05
    seed: int = 0

    def validate(self) -> None:
        check_min("pretrain.steps", self.steps)
        for key in ("batch_size", "crop_size", "lr"):
            check_positive(f"pretrain.{key}", getattr(self, key))
        check_min("pretrain.weight_decay", self.weight_decay)


@dataclass(frozen=True)
class Body:
    """What a pretrained file must fit: ``model.backbone``, ``model.backbone_width``, ``model.norm``."""

    backbone: str
    width: int
    norm: str


def pretrain_key(pcfg: PretrainConfig, body: Body, data_sections: Sequence[dict[str, Any]]) -> str:
    """12-hex-digit hash of everything that determines the pretrained weights."""
    blob = json.dumps({"pretrain": to_dict(pcfg), "body": vars(body), "data": list(data_sections)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def weights_path(out: Path, key: str) -> Path:
    return out / "pretrain" / key / WEIGHTS_NAME


def ensure_pretrained(
    pcfg: PretrainConfig, body: Body, data_cfgs: Sequence[Any], out: Path, tracking_uri: str | None,
    threads: int | None = None,
) -> Path:
    """The pretrained body's file for ``body`` on ``data_cfgs`` (``DataConfig`` of each dataset):
    reused when it exists, else trained here (in this process) and logged to MLflow."""
    import torch

    from detector.data import build_dataset
    from detector.pretrain import crop_source, pretrain_backbone

    sections = [{k: v for k, v in flatten(d).items() if f"data.{k}" not in NON_SEMANTIC_KEYS} for d in data_cfgs]
    key = pretrain_key(pcfg, body, sections)
    path = weights_path(out, key)
    if path.is_file():
        print(f"detlab: pretrained {body.backbone} (width {body.width}) reused: {path}", flush=True)
        return path
    sources, names = [], []
    for d in data_cfgs:
        ds = build_dataset(d, "train", train=False)
        sources.append(crop_source(ds, len(names)))
        names += [f"{d.dataset}:{c}" for c in ds.class_names]
    num_classes = len(names) + 1  # + background
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or min(os.cpu_count() or 1, 8))
    print(f"detlab: pretraining {body.backbone} (width {body.width}, {body.norm}) on crops of "
          f"{', '.join(d.dataset for d in data_cfgs)}: {num_classes} classes, {pcfg.steps} steps x {pcfg.batch_size}",
          flush=True)
    t0 = time.time()
    try:
        result = pretrain_backbone(
            sources, num_classes=num_classes, backbone=body.backbone, width=body.width, norm=body.norm,
            steps=pcfg.steps, batch_size=pcfg.batch_size, crop_size=pcfg.crop_size, lr=pcfg.lr,
            weight_decay=pcfg.weight_decay, seed=pcfg.seed,
            on_eval=lambda step, cpu, loss, acc: print(
                f"detlab: pretrain step {step}/{pcfg.steps}: loss {loss:.3f}, held-out accuracy {acc:.1%}", flush=True),
        )
    finally:
        torch.set_num_threads(old_threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(result.state_dict, tmp)
    tmp.replace(path)  # atomic: a concurrent job never reads half a file
    wall = time.time() - t0
    print(f"detlab: pretrained in {wall:.0f}s -> {path}", flush=True)
    if tracking_uri:
        _log_run(tracking_uri, key, pcfg, body, names, result.curve, path, wall)
    return path


def _log_run(uri: str, key: str, pcfg: PretrainConfig, body: Body, classes: list[str],
             curve: list[tuple[int, float, float, float]], path: Path, wall: float) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from lab import tracking

    exp_id = tracking.init_store(uri, EXPERIMENT)
    client = MlflowClient(uri)
    run = client.create_run(exp_id, run_name=f"pretrain-{body.backbone}-w{body.width}-{key}",
                            tags={"detlab.pretrain_key": key, "detlab.weights_sha256": file_sha256(path)})
    rid = run.info.run_id
    params = {**{f"pretrain.{k}": v for k, v in to_dict(pcfg).items()},
              "model.backbone": body.backbone, "model.backbone_width": body.width, "model.norm": body.norm,
              "pretrain.classes": ",".join(classes)[:500]}
    ts = int(time.time() * 1000)
    metrics = [Metric(name, value, ts, step) for step, cpu, loss, acc in curve
               for name, value in (("pretrain_loss", loss), ("pretrain_accuracy", acc), ("pretrain_cpu_s", cpu))]
    client.log_batch(rid, metrics=metrics + [Metric("pretrain_wall_s", wall, ts, 0)],
                     tags=[RunTag("detlab.weights", str(path))])
    tracking.log_params(client, rid, params)
    client.log_artifact(rid, str(path), "weights")
    client.set_terminated(rid, "FINISHED")


def attach_pretrained(cells: list[Cell], pcfg: PretrainConfig, out: Path, tracking_uri: str | None) -> list[Cell]:
    """``cells`` with ``model.weights_backbone`` set to their body's pretrained file (all stages
    trainable) and their keys recomputed; cells that already name weights are left as they are.

    One file per body (Table 1 compares backbones), pretrained on the train splits of all the
    datasets its cells use, in dataset-tag order.
    """
    groups: dict[Body, list[Cell]] = {}
    for c in cells:
        m = c.cfg.model
        if m.weights_backbone or m.weights:
            continue
        if m.norm == "frozen_bn":
            raise ConfigError(f"{c.name}: pretrain needs a trainable norm (model.norm=bn or gn), not frozen_bn")
        groups.setdefault(Body(m.backbone, m.backbone_width, m.norm), []).append(c)
    replaced: dict[str, Cell] = {}
    for body, group in groups.items():
        data: dict[str, Any] = {}
        for c in group:
            data.setdefault(c.dataset, c.cfg.data)
        path = ensure_pretrained(pcfg, body, [data[t] for t in sorted(data)], out, tracking_uri)
        for c in group:
            cfg = copy.deepcopy(c.cfg)
            cfg.model.weights_backbone = str(path)
            cfg.model.trainable_backbone_layers = 5
            replaced[c.name] = dataclasses.replace(c, cfg=cfg, key=cell_key(cfg))
    return [replaced.get(c.name, c) for c in cells]


__all__ = ["Body", "PretrainConfig", "attach_pretrained", "ensure_pretrained", "pretrain_key", "weights_path"]
