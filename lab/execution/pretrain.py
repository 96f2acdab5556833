"""The pretraining stage of a job: backbone files that are reproducible, content-addressed and shared.

A cell whose config has ``pretrain.steps > 0`` (and names no weights of its own) starts from a
backbone pretrained on :mod:`detector.pretrain`'s crop-classification task. What makes the file:

* the settings (``pretrain.*``, with ``pretrain.seed`` resolved: by default the cell's
  ``train.seed``, so a 3-seed table pretrains 3 files and its seed CIs include the pretraining);
* the body (backbone, width, norm);
* the data: the *train* splits of ``pretrain.datasets`` (the profile fixes them; empty = the cell's
  own dataset), so ``detlab train``, Table 1, Table 2 and a sweep of one profile share one file;
* the thread count (``pretrain.threads``), the pretraining code and the torch version.

The data enter the key by content: the digest of each dataset's train and val records
(:func:`detector.digest.records_digest`: class names, file names and sizes, boxes), so an edit to a
loader that does not change what it reads keeps every file, and one that does makes new ones.

All of it is the file's key (:func:`pretrain_key`). The file lands in
``<out>/pretrain/<key>/backbone-<sha256>.pt``, named by its own content hash, beside a
``manifest.json``; it is made under an exclusive lock on ``<out>/pretrain/<key>.lock``, so a
second job with the same key waits and reuses it, and it is verified against its hash whenever it
is reused. Cells get ``model.weights_backbone`` and ``model.weights_backbone_sha256``: the cell key
sees the file through its hash, and the loader refuses a file whose content changed.

Files to make run in parallel processes (``spawn``; as many as the usable CPUs hold at
``pretrain.threads`` each), each with its thread count and deterministic kernels fixed, so the
parallelism never changes a file. Each file made is one MLflow run in ``detlab-pretrain``.
Locks are ``flock``: they hold between processes of one host (the driver's), not across hosts.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.config import ConfigError, DataConfig, flatten, to_dict
from lab.settings.config import PretrainConfig, cell_key, file_sha256

if TYPE_CHECKING:
    from lab.plan.experiments import Cell

#: MLflow experiment of the pretraining runs.
EXPERIMENT = "detlab-pretrain"
MANIFEST = "manifest.json"
#: data keys that do not change which images and boxes a split has (augmentation, loading)
_DATA_KEYS_IGNORED = ("hflip_prob", "vflip_prob", "rot90_prob", "loader_workers")
#: the code whose change changes a pretrained file (its digest is part of the key); the data it
#: reads enter by content instead (records digests)
_CODE = ("detector/pretrain.py", "detector/backbones.py", "detector/repro.py")


@dataclass(frozen=True)
class Body:
    """What a pretrained file must fit: ``model.backbone``, ``model.backbone_width``, ``model.norm``."""

    backbone: str
    width: int
    norm: str


@dataclass(frozen=True)
class PretrainJob:
    """One backbone file: settings (``seed`` resolved to an int), body, the datasets whose train
    splits (crops) and val splits (held-out crops) it uses, as ``(tag, DataConfig)`` in tag order,
    and their content digests (``train:val`` per dataset, :func:`data_digests`). The key is
    computed once, when the job is made: the same job object always names the same file."""

    pcfg: PretrainConfig
    body: Body
    data: tuple[tuple[str, DataConfig], ...]
    digests: tuple[str, ...]
    key: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", pretrain_key(self.pcfg, self.body, [d for _, d in self.data], self.digests))

    @property
    def seed(self) -> int:
        assert self.pcfg.seed is not None
        return self.pcfg.seed


@dataclass(frozen=True)
class Pretrained:
    """A backbone file ready to load."""

    path: Path
    sha256: str
    key: str
    reused: bool


@lru_cache(maxsize=1)
def _code_digest() -> str:
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for rel in _CODE:
        p = root / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def pretrain_key(pcfg: PretrainConfig, body: Body, data: Sequence[DataConfig], digests: Sequence[str]) -> str:
    """12 hex digits of a sha256 over everything that determines the file: the settings (seed
    resolved), the body, the content-determining keys of each dataset section and the content
    digests of its splits, the pretraining code's digest (read once per process) and the torch version."""
    if pcfg.seed is None:
        raise ValueError("pretrain_key needs pretrain.seed resolved (PretrainConfig.seed_for)")
    sections = [{k: v for k, v in flatten(d).items() if k not in _DATA_KEYS_IGNORED} for d in data]
    blob = json.dumps({"pretrain": to_dict(pcfg), "body": vars(body), "data": sections, "digests": list(digests),
                       "code": _code_digest(), "torch": metadata.version("torch")}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def key_dir(out: Path, key: str) -> Path:
    return out / "pretrain" / key


def weights_name(sha256: str) -> str:
    """The file name of a pretrained body: its own content hash."""
    return f"backbone-{sha256}.pt"


@contextmanager
def _key_lock(out: Path, key: str, label: str) -> Iterator[None]:
    """Exclusive ``flock`` on ``<out>/pretrain/<key>.lock``; says so when another job holds it."""
    path = out / "pretrain" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"detlab: {label}: another job is pretraining key {key}; waiting for it", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def find_pretrained(out: Path, key: str) -> Pretrained | None:
    """The file recorded for ``key`` (verified against its hash), or None when none was made.

    Raises ValueError naming both hashes when the file's content is not what its manifest says.
    """
    d = key_dir(out, key)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    path = d / manifest["file"]
    if not path.is_file():
        return None
    actual = file_sha256(path)
    if actual != manifest["sha256"]:
        raise ValueError(f"pretrained backbone {path} has sha256 {actual}, but its manifest records "
                         f"{manifest['sha256']}: the file was changed; delete {d} to pretrain it again")
    return Pretrained(path, actual, key, reused=True)


def _job_label(job: PretrainJob) -> str:
    return f"pretrain {job.body.backbone}-w{job.body.width} seed {job.seed}"


def make_pretrained(job: PretrainJob, out: Path) -> dict[str, Any]:
    """Make (or, when another job made it meanwhile, reuse) ``job``'s file under its key's lock.

    Runs in a pretraining process: fixes its thread count and deterministic kernels first. Returns
    plain values for the parent: path, sha256, key, reused, and for a file made here its accuracy
    curve, wall time, class names and the machine's tags.
    """
    from detector.data import build_dataset
    from detector.pretrain import crop_source, pretrain_backbone
    from detector.repro import serialize, set_determinism
    from lab.records.provenance import machine_tags

    key, label = job.key, _job_label(job)
    with _key_lock(out, key, label):
        found = find_pretrained(out, key)
        if found is not None:
            return {"path": str(found.path), "sha256": found.sha256, "key": key, "reused": True}
        set_determinism(job.pcfg.threads, True)
        train_sources, val_sources, names = [], [], []
        for tag, data in job.data:
            ds = build_dataset(data, "train", train=False)
            train_sources.append(crop_source(ds, len(names)))
            val_sources.append(crop_source(build_dataset(data, "val", train=False), len(names)))
            names += [f"{tag}:{c}" for c in ds.class_names]
        p = job.pcfg
        t0 = time.time()

        def progress(step: int, cpu: float, loss: float, acc: float) -> None:
            eta = (time.time() - t0) / step * (p.steps - step)
            print(f"detlab: {label} [{key}] step {step}/{p.steps}: loss {loss:.3f}, held-out accuracy {acc:.1%} "
                  f"({p.val_crops} val crops), ETA {eta / 60:.1f} min", flush=True)

        result = pretrain_backbone(
            train_sources, num_classes=len(names) + 1, backbone=job.body.backbone, width=job.body.width,
            norm=job.body.norm, steps=p.steps, batch_size=p.batch_size, crop_size=p.crop_size, lr=p.lr,
            weight_decay=p.weight_decay, seed=job.seed, val_sources=val_sources, val_crops=p.val_crops,
            on_eval=progress)
        d = key_dir(out, key)
        d.mkdir(parents=True, exist_ok=True)
        blob = serialize(result.state_dict)
        sha = hashlib.sha256(blob).hexdigest()
        tmp = d / f".backbone-{os.getpid()}.tmp"
        tmp.write_bytes(blob)
        path = d / weights_name(sha)
        tmp.replace(path)  # atomic: the name is the content
        manifest = {"key": key, "sha256": sha, "file": path.name, "seed": job.seed, "body": vars(job.body),
                    "pretrain": to_dict(p), "datasets": [t for t, _ in job.data], "classes": names,
                    "curve": result.curve, "wall_s": time.time() - t0}
        tmp_manifest = d / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp_manifest.write_text(json.dumps(manifest, indent=1))
        tmp_manifest.replace(d / MANIFEST)  # written last: a manifest always names a complete file
    print(f"detlab: {label} done in {time.time() - t0:.0f}s -> {path}", flush=True)
    return {"path": str(path), "sha256": sha, "key": key, "reused": False, "curve": result.curve,
            "wall_s": time.time() - t0, "classes": names, "machine": machine_tags(p.threads)}


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _child_init() -> None:
    from lab.execution.workerenv import DETERMINISM_ENV

    for k, v in DETERMINISM_ENV.items():  # before the child imports torch (spawn: a fresh interpreter)
        os.environ.setdefault(k, v)


def ensure_pretrained(jobs: Sequence[PretrainJob], out: Path, tracking_uri: str | None) -> dict[str, Pretrained]:
    """``{key: Pretrained}`` for ``jobs``: files already made are verified and reused, the others are
    made in parallel processes (see the module docstring), each logged as an MLflow run."""
    unique = {j.key: j for j in jobs}
    done: dict[str, Pretrained] = {}
    todo: list[PretrainJob] = []
    for key, job in unique.items():
        found = find_pretrained(out, key)
        if found is not None:
            print(f"detlab: {_job_label(job)} reused: {found.path}", flush=True)
            done[key] = found
        else:
            todo.append(job)
    if not todo:
        return done
    threads = max(j.pcfg.threads for j in todo)
    parallel = max(1, min(len(todo), _usable_cpus() // threads))
    steps = sum(j.pcfg.steps for j in todo)
    print(f"detlab: pretraining {len(todo)} backbone file(s), {steps} steps in all, {parallel} at a time "
          f"({threads} thread(s) each)", flush=True)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: thread settings apply before torch loads
    with ProcessPoolExecutor(max_workers=parallel, mp_context=ctx, initializer=_child_init) as pool:
        futures = [(job, pool.submit(make_pretrained, job, out)) for job in todo]
        for job, fut in futures:
            res = fut.result()
            done[res["key"]] = Pretrained(Path(res["path"]), res["sha256"], res["key"], res["reused"])
            if not res["reused"] and tracking_uri:
                _log_run(tracking_uri, job, res)
    return done


def _log_run(uri: str, job: PretrainJob, res: dict[str, Any]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from lab.records import provenance, tracking

    exp_id = tracking.init_store(uri, EXPERIMENT)
    client = MlflowClient(uri)
    body, key = job.body, res["key"]
    run = client.create_run(exp_id, run_name=f"pretrain-{body.backbone}-w{body.width}-s{job.seed}-{key}",
                            tags={"detlab.pretrain_key": key, provenance.TAG_BACKBONE_SHA: res["sha256"],
                                  "detlab.seed": str(job.seed), **provenance.source_tags(), **res["machine"]})
    rid = run.info.run_id
    params = {**{f"pretrain.{k}": v for k, v in to_dict(job.pcfg).items()},
              "model.backbone": body.backbone, "model.backbone_width": body.width, "model.norm": body.norm,
              "pretrain.data": ",".join(t for t, _ in job.data), "pretrain.classes": ",".join(res["classes"])[:500]}
    ts = int(time.time() * 1000)
    metrics = [Metric(name, value, ts, step) for step, cpu, loss, acc in res["curve"]
               for name, value in (("pretrain_loss", loss), ("pretrain_accuracy", acc), ("pretrain_cpu_s", cpu))]
    client.log_batch(rid, metrics=metrics + [Metric("pretrain_wall_s", res["wall_s"], ts, 0)],
                     tags=[RunTag(tracking.TAG_WEIGHTS, res["path"])])
    tracking.log_params(client, rid, params)
    client.log_artifact(rid, res["path"], "weights")
    client.set_terminated(rid, "FINISHED")


_SPLIT_DIGESTS: dict[str, str] = {}


def _split_digest(data: DataConfig, split: str) -> str:
    """A split's records digest, once per process per (data section, split)."""
    from detector.data import build_dataset
    from detector.digest import records_digest

    memo = f"{split}:{data!r}"
    if memo not in _SPLIT_DIGESTS:
        ds = build_dataset(data, split, train=False)
        _SPLIT_DIGESTS[memo] = records_digest(ds.class_names, ds.records)
    return _SPLIT_DIGESTS[memo]


def data_digests(data: Sequence[DataConfig]) -> tuple[str, ...]:
    """``"<train digest>:<val digest>"`` (16 hex digits each) per dataset: what the crops are cut from."""
    return tuple(f"{_split_digest(d, 'train')[:16]}:{_split_digest(d, 'val')[:16]}" for d in data)


def pretrain_job(cfg: Any, own_tag: str, data_for: Callable[[str], DataConfig]) -> PretrainJob:
    """The file a cell's config asks for: ``pretrain.datasets`` (or the cell's own ``own_tag``) with
    ``data_for(tag)`` for the other datasets, and ``pretrain.seed`` resolved from ``train.seed``."""
    p = cfg.pretrain
    tags = sorted(p.datasets) if p.datasets else [own_tag]
    data = []
    for tag in tags:
        try:  # a listed dataset comes from the profile (the same section for every job of it)
            data.append((tag, data_for(tag) if p.datasets else cfg.data))
        except (KeyError, ConfigError) as e:
            raise ConfigError(f"pretrain.datasets names {tag!r}, which this profile cannot give: {e}") from None
    m = cfg.model
    return PretrainJob(dataclasses.replace(p, seed=p.seed_for(cfg.train.seed)), Body(m.backbone, m.backbone_width, m.norm),
                       tuple(data), data_digests([d for _, d in data]))


def needs_pretraining(cfg: Any) -> bool:
    """A cell pretrains when ``pretrain.steps > 0`` and it names no weights of its own."""
    return cfg.pretrain.steps > 0 and not (cfg.model.weights_backbone or cfg.model.weights)


def _jobs(cells: list[Cell], data_for: Callable[[str], DataConfig]) -> dict[str, PretrainJob]:
    """The pretraining file each cell that pretrains asks for, by cell name."""
    jobs: dict[str, PretrainJob] = {}
    for c in cells:
        if not needs_pretraining(c.cfg):
            continue
        if c.cfg.model.norm == "frozen_bn":
            raise ConfigError(f"{c.name}: pretrain needs a trainable norm (model.norm=bn or gn), not frozen_bn")
        jobs[c.name] = pretrain_job(c.cfg, c.dataset, data_for)
    return jobs


def _with_file(c: Cell, file: Pretrained) -> Cell:
    """``c`` starting from ``file``: its path and sha256 in the config, all stages trainable, key recomputed."""
    cfg = copy.deepcopy(c.cfg)
    cfg.model.weights_backbone = str(file.path)
    cfg.model.weights_backbone_sha256 = file.sha256
    cfg.model.trainable_backbone_layers = 5
    return dataclasses.replace(c, cfg=cfg, key=cell_key(cfg))


def attach_pretrained(cells: list[Cell], out: Path, tracking_uri: str | None,
                      data_for: Callable[[str], DataConfig]) -> list[Cell]:
    """``cells`` with ``model.weights_backbone`` (+ its sha256) set to their pretrained file, all stages
    trainable, keys recomputed; cells that name weights, or do not pretrain, are left as they are.

    ``data_for(tag)``: the data section of a profile dataset a cell's ``pretrain.datasets`` names.
    """
    jobs = _jobs(cells, data_for)
    made = ensure_pretrained(list(jobs.values()), out, tracking_uri) if jobs else {}
    return [_with_file(c, made[jobs[c.name].key]) if c.name in jobs else c for c in cells]


def attach_found(cells: list[Cell], out: Path,
                 data_for: Callable[[str], DataConfig]) -> tuple[list[Cell], set[str]]:
    """For a dry run: ``cells`` with the pretrained files already made under ``out`` (final keys), and
    the names of the cells whose file is still to be made (their key changes once it is). Trains and
    locks nothing."""
    jobs = _jobs(cells, data_for)
    found = {name: find_pretrained(out, job.key) for name, job in jobs.items()}
    shown = [_with_file(c, found[c.name]) if found.get(c.name) else c for c in cells]  # type: ignore[arg-type]
    return shown, {name for name, f in found.items() if f is None}


__all__ = ["Body", "PretrainConfig", "PretrainJob", "Pretrained", "attach_found", "attach_pretrained", "data_digests", "ensure_pretrained",
           "find_pretrained", "make_pretrained", "needs_pretraining", "pretrain_job", "pretrain_key", "weights_name"]
