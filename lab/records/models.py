"""Trained detectors as MLflow models, and where ``detlab eval/predict/export`` find their weights.

Every finished cell logs its model through MLflow's PyTorch flavour (an MLflow 3 *logged model*,
with a signature, its metrics linked), so it shows in the UI's model view and can be registered
(``--register NAME``). The logged model holds two things:

- ``data/model.pth``: MLflow's pickle of the whole module, for ``mlflow.pytorch.load_model``
  (unpickling runs code: load only models you trust; it needs detlab importable);
- ``extra_files/model.pt``: detlab's own weights file (state_dict, resolved config, class names),
  which detlab reads with ``weights_only=True`` (:func:`lab.records.weights.load_weights`): detlab never
  unpickles a module, wherever the URI points.

The Ray storage's ``model.pt`` stays where it is, for resuming and for CL-B cells.

A *weights source* (:func:`resolve`) is one of: a path or storage URI of a ``model.pt``; an MLflow
run id or run name (its ``detlab.weights`` file, else its logged model); ``models:/NAME/VERSION``,
``models:/NAME@ALIAS``, ``models:/<model id>`` or ``runs:/<run id>/model``.
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detector.config import ConfigError
from lab.settings.scrub import scrub_text
from lab.records.tracking import TAG_MODEL_ERROR, TAG_MODEL_ID, TAG_REGISTERED, TAG_WEIGHTS  # noqa: F401 - models.TAG_*

#: the logged model's name in a run (``runs:/<run id>/model``)
MODEL_NAME = "model"
#: where detlab's own weights file sits inside a logged model
WEIGHTS_IN_MODEL = "extra_files/model.pt"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Rebuilt:
    """A detector rebuilt from a weights payload, in eval mode, NMS configured."""

    model: Any  #: torch.nn.Module
    cfg: Any  #: lab.settings.config.LabConfig, with the overrides applied
    class_names: list[str]


def rebuild(payload: dict[str, Any], sets: Sequence[str] = ()) -> Rebuilt:
    """The model a ``model.pt`` payload describes, its config with ``sets`` (``nms.clb=true``,
    ``model.score_thresh=0.1``) applied; no pretrained file is read (the state_dict has everything)."""
    from detector.config import apply_overrides
    from detector.model import build_detector
    from lab.settings.config import config_from_dict

    cfg = config_from_dict(payload["config"])
    if sets:
        cfg = apply_overrides(cfg, list(sets))
    cfg.model.weights = cfg.model.weights_backbone = None
    model = build_detector(cfg)
    model.load_state_dict(payload["model"])
    model.configure_nms(cfg.nms)
    model.eval()
    return Rebuilt(model, cfg, list(payload["class_names"]))


# ---------------------------------------------------------------------------------------------
# Logging and registering


def signature() -> Any:
    """Input: a batch of RGB images, float32 in [0, 1], any size (the model resizes them). The
    output, a list of per-image dicts (boxes xyxy, scores, labels), has no MLflow tensor schema."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "images")]))


@dataclass
class Logged:
    """A cell's logged model: its id (``models:/<model_id>``) and, when registered, ``NAME/VERSION``."""

    model_id: str
    registered: str | None = None


def log_model(tracking_uri: str, run_id: str, weights: str | Path, step: int, register: str | None = None,
              nms: dict[str, Any] | None = None) -> Logged:
    """Log the weights file ``weights`` (path or storage URI) as run ``run_id``'s model, linking the
    metrics the run logged at ``step`` (its final evaluation) to it; register it as ``register``
    when given. The run must still be open (RUNNING).

    ``nms``: the ``nms`` section the run evaluated with, when it differs from the one the weights
    were trained with (a CL-B cell evaluates another cell's weights): the logged model and its
    ``model.pt`` then carry it, so that ``detlab eval models:/...`` evaluates what the run did."""
    import mlflow
    import mlflow.pytorch
    import torch
    import torchvision
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from lab.infra import storage
    from lab.records.weights import load_weights

    local = storage.download(str(weights))
    payload = load_weights(local)
    if nms is not None:
        payload["config"] = {**payload["config"], "nms": dict(nms)}
    built = rebuild(payload)
    with tempfile.TemporaryDirectory() as d, _use_tracking_uri(tracking_uri), _quiet_mlflow_model_io():
        # Created here, in the run's experiment: log_model alone files it under the active
        # experiment (Default, 0), where the UI's Models tab of the run's experiment never shows it.
        run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
        model = mlflow.initialize_logged_model(name=MODEL_NAME, source_run_id=run_id,
                                               experiment_id=run.info.experiment_id,
                                               params={k: str(v) for k, v in run.data.params.items()})
        named = Path(d) / "model.pt"  # extra_files keeps the base name
        if nms is None:
            named.write_bytes(Path(local).read_bytes())
        else:
            torch.save(payload, named)
        info = mlflow.pytorch.log_model(
            built.model, name=MODEL_NAME, run_id=run_id, model_id=model.model_id, step=step, signature=signature(),
            extra_files=[str(named)], serialization_format="pickle",  # pt2 would trace a fixed-size graph
            # given, not inferred: inference loads the model in a subprocess (seconds per cell)
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"torchvision=={torchvision.__version__.split('+')[0]}"],
            metadata={"detector": built.cfg.model.detector, "class_names": built.class_names},
            registered_model_name=register,
        )
    version = getattr(info, "registered_model_version", None)
    return Logged(info.model_id, f"{register}/{version}" if register and version is not None else None)


@contextmanager
def _quiet_mlflow_model_io() -> Iterator[None]:
    """No artifact progress bars and no pickle warning per cell in a job's log: the module docstring
    says what the pickle is and that detlab never loads it."""
    import logging
    import os

    logger = logging.getLogger("mlflow.pytorch")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


# ---------------------------------------------------------------------------------------------
# Finding weights


@dataclass
class WeightsSource:
    """Where a command's weights come from: a local or storage path of a ``model.pt``, and the
    MLflow run that made it (None for a bare file)."""

    path: str
    run_id: str | None
    label: str  #: what the user passed, for messages


def resolve(source: str, tracking_uri: str | None) -> WeightsSource:
    """A weights source (see the module docstring) as a ``model.pt`` path. Errors name the source."""
    from lab.infra import storage

    if source.startswith("runs:/"):
        return _from_model_uri(_runs_uri_as_model(source, tracking_uri), tracking_uri, label=source)
    if source.startswith("models:/"):
        return _from_model_uri(source, tracking_uri)
    if "://" in source or Path(source).expanduser().exists():
        storage.parse(source)  # an s3:// URI without a bucket is a config error
        if not storage.is_file(source):
            raise ConfigError(f"weights {source!r}: no such file")
        return WeightsSource(str(Path(source).expanduser()) if "://" not in source else source, None, source)
    from lab.records import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    db = tracking.sqlite_path(uri)
    if db is not None and not db.is_file():  # opening it would create an empty store
        raise ConfigError(f"weights {source!r}: no such file, and no MLflow store at {db} to look for a run of that "
                          f"id or name (--tracking-uri)")
    return _from_run(source, uri)


#: the help text of every command that takes a weights source
SOURCE_HELP = ("an MLflow run id or run name, a model.pt path or s3:// URI, models:/NAME/VERSION, models:/<model id> "
               "or runs:/<run id>/model")


def load_source(source: str, tracking_uri: str | None) -> tuple[WeightsSource, dict[str, Any]]:
    """:func:`resolve`, then the ``model.pt`` payload (read ``weights_only``) plus ``"sha256"`` of the
    file's bytes. ``ConfigError`` naming ``source`` when it is not a weights file training wrote."""
    import pickle

    from detector.digest import file_sha256
    from lab.infra import storage
    from lab.records.weights import load_weights

    src = resolve(source, tracking_uri)
    try:
        local = storage.download(src.path)
        payload = load_weights(local)
    except FileNotFoundError:
        raise ConfigError(f"weights {source!r}: no such file {src.path!r}") from None
    except (pickle.UnpicklingError, ValueError) as e:
        raise ConfigError(f"weights {source!r}: {e}") from None
    missing = [k for k in ("model", "config", "class_names") if k not in payload]
    if missing:
        raise ConfigError(f"weights {source!r} is not a model.pt written by training (no {', '.join(missing)})")
    return src, {**payload, "sha256": file_sha256(local)}


def _client(tracking_uri: str | None) -> Any:
    from mlflow import MlflowClient

    from lab.records import tracking

    return MlflowClient(tracking.resolve_tracking_uri(tracking_uri))


def _from_run(source: str, tracking_uri: str) -> WeightsSource:
    """A run id, or a run name (the latest FINISHED run of that name in any experiment, else the latest)."""
    from mlflow.exceptions import MlflowException

    from lab.infra import storage

    client = _client(tracking_uri)
    run = None
    if _RUN_ID.match(source):
        try:
            run = client.get_run(source)
        except MlflowException:
            run = None
    if run is None:
        exps = [e.experiment_id for e in client.search_experiments()]
        name = source.replace("'", "\\'")
        runs = client.search_runs(exps, f"attributes.run_name = '{name}'", order_by=["attributes.start_time DESC"],
                                  max_results=50) if exps else []
        if not runs:
            raise ConfigError(f"weights {source!r}: no such file, and no MLflow run of that id or name in "
                              f"{scrub_text(tracking_uri)}")
        finished = [r for r in runs if r.info.status == "FINISHED"]
        run = (finished or runs)[0]
        if len(runs) > 1:
            print(f"detlab: {len(runs)} runs are named {source!r}; using the latest"
                  f"{' FINISHED' if finished else ''} one, {run.info.run_id}")
    path = run.data.tags.get(TAG_WEIGHTS)
    if path and storage.is_file(path):
        return WeightsSource(path, run.info.run_id, source)
    model_id = run.data.tags.get(TAG_MODEL_ID)
    if model_id:
        found = _from_model_uri(f"models:/{model_id}", tracking_uri)
        return WeightsSource(found.path, run.info.run_id, source)
    raise ConfigError(f"run {run.info.run_id} ({source!r}) has no weights: its {TAG_WEIGHTS} tag is "
                      f"{path!r}{' (no such file)' if path else ''} and it logged no model")


def _runs_uri_as_model(uri: str, tracking_uri: str | None) -> str:
    """``runs:/<run id>/<name>`` as ``models:/<model id>``: MLflow 3 keeps a logged model's files with
    the model, not in the run's artifacts. A run with no logged model of that name keeps the URI."""
    from mlflow.exceptions import MlflowException

    run_id, _, name = uri.removeprefix("runs:/").partition("/")
    client = _client(tracking_uri)
    try:
        outputs = client.get_run(run_id).outputs
    except MlflowException:
        raise ConfigError(f"weights {uri!r}: no MLflow run {run_id!r}") from None
    for out in (outputs.model_outputs if outputs else []) or []:
        if client.get_logged_model(out.model_id).name == (name.strip("/") or MODEL_NAME):
            return f"models:/{out.model_id}"
    return uri


def _download_dir() -> Path:
    """A temp dir for one downloaded model, removed when this process exits: the command that asked for
    the weights reads them meanwhile (a model is ~130 MB at the demo's size, and undeleted ones piled up)."""
    dest = Path(tempfile.mkdtemp(prefix="detlab-model-"))
    atexit.register(shutil.rmtree, dest, ignore_errors=True)
    return dest


def _from_model_uri(uri: str, tracking_uri: str | None, label: str | None = None) -> WeightsSource:
    """``models:/...`` or ``runs:/...``: download the logged model and take its ``model.pt``."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from lab.records import tracking

    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    resolved = tracking.resolve_tracking_uri(tracking_uri)
    dest = _download_dir()
    try:
        with _use_tracking_uri(resolved):  # the registry follows the tracking URI only when it is set globally
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except MlflowException as e:
        raise ConfigError(f"weights {label or uri!r}: MLflow cannot find it in {scrub_text(resolved)} "
                          f"({str(e).splitlines()[0]})") from None
    weights = local / WEIGHTS_IN_MODEL
    if not weights.is_file():
        raise ConfigError(f"weights {label or uri!r}: the model has no {WEIGHTS_IN_MODEL} (not logged by detlab?)")
    run_id = None
    if (local / "MLmodel").is_file():
        run_id = Model.load(str(local / "MLmodel")).run_id
    return WeightsSource(str(weights), run_id, label or uri)
