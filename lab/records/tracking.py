"""MLflow tracking conventions shared by every detlab job: URIs, store setup, tags, run lookups.

Facts this module is built on (MLflow 3.17, see shared notes §5):

* The file store (``./mlruns``, ``file:``) is refused, so the local default is an **absolute**
  ``sqlite:///<base>/mlruns/mlflow.db``. Absolute because Ray Train workers ``chdir`` away from
  the driver's cwd, and a relative sqlite path would silently open a second, empty database there.
* Opening a *fresh* sqlite DB from several processes at once races in the alembic migrations, so
  the driver calls :func:`init_store` before any worker starts (it also takes a file lock).
* Multi-node runs need an ``http(s)://`` tracking server every node can reach; pass its URI to
  the workers through ``runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": ...}}``.
* MLflow 3 records an experiment's kind (GenAI or model training) in a tag: every experiment
  :func:`init_store` opens is tagged model training, with a one-line description. MLflow 3.17's
  own UI picks its view from the GenAI / Model training switch at its top left instead (kept per
  browser; ``#/experiments?workflowType=machine_learning`` opens the training view); the tag is for
  what reads it (MLflow's assistant, other MLflow UIs). :func:`log_dataset_inputs` fills the runs
  table's Dataset column.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NOTE

from lab.records.provenance import source_tags
from lab.settings.config import file_sha256  # memoised by path, size and mtime (COCO's train JSON is 450 MB)

if TYPE_CHECKING:
    from detector.config import DataConfig

TAG_TABLE = "detlab.table"
TAG_ROW = "detlab.row"
TAG_DATASET = "detlab.dataset"
TAG_SEED = "detlab.seed"
TAG_KEY = "detlab.key"
TAG_PROFILE = "detlab.profile"
TAG_KIND = "detlab.kind"
TAG_GIT = "detlab.git_commit"
#: where a run's final weights (``model.pt``, a path or storage URI) live: cells, trials, pretraining
TAG_WEIGHTS = "detlab.weights"
#: the MLflow logged model of a run (:mod:`lab.records.models`), or why it could not be logged; its registry version
TAG_MODEL_ID = "detlab.model_id"
TAG_MODEL_ERROR = "detlab.model_error"
TAG_REGISTERED = "detlab.registered_model"

#: values of ``detlab.kind``
KINDS = ("cell", "tables", "sweep", "trial")
#: the paper's tables
TABLES = (1, 2)
#: values of ``detlab.dataset`` (note ``voc07``, while ``DataConfig.dataset`` says ``voc``)
DATASETS = ("voc07", "coco", "trees", "shapes")
#: statuses a dangling RUNNING run may be closed with
TERMINAL_STATUSES = ("FAILED", "KILLED", "FINISHED")

#: MLflow 3's experiment-kind tag and its model-training value (the other is "genai_development").
#: Found in mlflow/assistant/skills/mlflow-onboarding/SKILL.md, mlflow/demo/generators/traces.py and
#: the UI bundle's ExperimentKind enum (mlflow/server/js/build/static/js/main.*.js); MLflow's Python
#: API has no constant for it.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: experiment names: ``detlab-sweep-<dataset tag>`` (lab.sweep), ``detlab-pretrain`` (lab.execution.pretrain)
SWEEP_EXPERIMENT_PREFIX = "detlab-sweep-"
PRETRAIN_EXPERIMENT = "detlab-pretrain"

_SQLITE_PREFIX = "sqlite:///"
# sqlite URIs that name no file: nothing to make absolute.
_SQLITE_MEMORY = ("sqlite://", "sqlite:///:memory:")


def quiet_mlflow() -> None:
    """Silence MLflow chatter that says nothing useful in batch jobs (env vars the user set win)."""
    # "🏃 View run ... at: http://..." after every run against a server.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # "Creating initial MLflow database tables..." / alembic "Context impl SQLiteImpl" on first open.
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # SQLAlchemy 2.1 deprecation of `noload` inside MLflow's own store: not ours to fix.
    warnings.filterwarnings("ignore", message=r".*noload.*")


quiet_mlflow()


def experiment_name(table: int | str) -> str:
    """MLflow experiment of the paper's Table ``table`` (1 or 2), or of a table spec by its name
    (``detlab-<name>``; :attr:`lab.plan.specs.TableSpec.experiment`)."""
    checked = _check_table(table)
    return f"detlab-table{checked}" if isinstance(checked, int) else f"detlab-{checked}"


def resolve_tracking_uri(uri: str | None = None, base_dir: Path | None = None) -> str:
    """Pick the tracking URI: ``uri`` (``--tracking-uri``) > env ``MLFLOW_TRACKING_URI`` > local sqlite.

    The default is ``sqlite:///<base_dir or cwd>/mlruns/mlflow.db``; relative sqlite paths are
    resolved against the same base. sqlite URIs always come back absolute and their directory
    exists. Server and database URIs (``http://``, ``postgresql://`` ...) pass through unchanged.
    The file store is refused by MLflow 3.17, so ``file:`` URIs and bare paths raise ``ValueError``
    unless ``MLFLOW_ALLOW_FILE_STORE=true`` (MLflow's own opt-out).
    """
    base = Path(base_dir).expanduser() if base_dir is not None else Path.cwd()
    base = base.resolve()
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not chosen:
        return _sqlite_uri(base / "mlruns" / "mlflow.db")
    if chosen in _SQLITE_MEMORY:
        return chosen
    if chosen.startswith(_SQLITE_PREFIX):
        return _sqlite_uri(base / chosen[len(_SQLITE_PREFIX):])  # an absolute path stays absolute
    scheme = urlparse(chosen).scheme
    if scheme in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise ValueError(
                f"tracking URI {chosen!r} is an MLflow file store, which MLflow 3.17 refuses; "
                f"use 'sqlite:////abs/path/mlflow.db' or an http(s):// tracking server"
            )
        path = urlparse(chosen).path if scheme == "file" else chosen
        return (base / Path(path).expanduser()).resolve().as_uri()
    if scheme == "sqlite":  # e.g. "sqlite:/x.db" (one slash): SQLAlchemy would misread it
        raise ValueError(f"tracking URI {chosen!r}: sqlite URIs look like 'sqlite:////abs/path/mlflow.db'")
    return chosen


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise ``ConfigError`` now if an http(s) tracking server does not answer.

    Without this, the first MLflow call retries with backoff for minutes (7 retries, factor 2)
    and the job fails long after it took the cluster. Other URIs (sqlite, postgresql) pass.
    """
    import requests

    from lab.settings.config import ConfigError
    from lab.settings.scrub import scrub_text  # the URL's password masked

    if urlparse(uri).scheme not in ("http", "https"):
        return
    url = uri.rstrip("/") + "/health"
    try:
        requests.get(url, timeout=timeout_s, verify=os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "") != "true")
    except requests.RequestException as e:
        reason = str(e.__context__ or e).splitlines()[0][:200]
        raise ConfigError(
            f"MLflow tracking server {scrub_text(uri)} is unreachable ({type(e).__name__}: {reason}); start it "
            f"(`detlab cluster up`, or `mlflow server --host 127.0.0.1 ...`) or pass --tracking-uri "
            f"sqlite:////abs/path/mlflow.db"
        ) from None


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log ``params`` as strings (``None`` as "None"), secrets masked (:mod:`lab.settings.scrub`), in
    batches of 100 (MLflow's limit per call)."""
    from mlflow.entities import Param

    from lab.settings.scrub import scrub_value

    items = [Param(k, "None" if v is None else str(scrub_value(k, v))) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def sqlite_path(uri: str) -> Path | None:
    """The database file of an absolute ``sqlite:///`` URI, else None (servers, in-memory)."""
    if not uri.startswith(_SQLITE_PREFIX) or uri in _SQLITE_MEMORY:
        return None
    return Path(uri[len(_SQLITE_PREFIX):])


def init_store(uri: str, experiment: str) -> str:
    """Create the store (sqlite: DB + migrations) and ``experiment`` if needed; return its id.

    Call it in the driver before any Ray worker opens the store. Idempotent and safe against
    concurrent callers on one machine (file lock). For sqlite the experiment's artifact location is
    ``<db dir>/artifacts/<experiment>`` (absolute); for servers the server decides (with
    ``--serve-artifacts`` that is ``mlflow-artifacts:/<id>``). A deleted experiment is restored.
    The experiment gets the model-training kind and :func:`experiment_description` unless it has a
    kind or a description already (one set in the UI stays).
    """
    if not experiment or not experiment.strip():
        raise ValueError(f"experiment name {experiment!r} is empty")
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        raise ValueError(f"tracking URI {uri!r} is relative; pass it through resolve_tracking_uri()")
    artifact_location = (db.parent / "artifacts" / experiment).as_uri() if db is not None else None
    tags = {TAG_EXPERIMENT_KIND: EXPERIMENT_KIND, MLFLOW_RUN_NOTE: experiment_description(experiment)}
    with _init_lock(db):
        client = MlflowClient(uri)  # inside the lock: opening the store runs the migrations
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                return client.create_experiment(experiment, artifact_location=artifact_location, tags=tags)
            except MlflowException:
                # Lost a race with another process (e.g. a server client): use theirs.
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        for key, value in tags.items():  # stores made before these tags existed
            if key not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id


def experiment_description(experiment: str) -> str:
    """The one line (about 100 characters: the UI shows one line) on an experiment's page, for each
    experiment detlab creates."""
    if experiment == experiment_name(1):
        return "Paper Table 1, RetinaNet vs ours, GFL vs GFL +DC +CL-B: a run per cell and seed, and tables runs."
    if experiment == experiment_name(2):
        return "Paper Table 2, RetinaNet then +IAC, +DC, +CL-B per dataset: a run per cell and seed, and tables runs."
    if experiment.startswith(SWEEP_EXPERIMENT_PREFIX):
        dataset = experiment.removeprefix(SWEEP_EXPERIMENT_PREFIX)
        return f"Ray Tune sweeps on {dataset}: a parent run per sweep, a child run per trial or post-hoc NMS grid point."
    if experiment.startswith("detlab-") and experiment not in (PRETRAIN_EXPERIMENT, "detlab-train", "detlab-eval"):
        return (f"Table spec {experiment.removeprefix('detlab-')}: a run per row, dataset and seed, and tables runs "
                "(detlab table --spec).")
    if experiment == PRETRAIN_EXPERIMENT:
        return "Backbone pretraining on object crops (the offline ImageNet stand-in): a run per body and settings."
    return "detlab train: one config per run, trained and evaluated as `detlab train` resolves it."


@contextmanager
def _init_lock(db: Path | None) -> Iterator[None]:
    """Serialise first-time sqlite initialisation (alembic migrations race, notes §5.6)."""
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f"{db.name}.init.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dataset_tag(dataset: str) -> str:
    """``detlab.dataset`` value for a ``DataConfig.dataset`` name (``voc`` → ``voc07``)."""
    tag = {"voc": "voc07"}.get(dataset, dataset)
    if tag not in DATASETS:
        raise ValueError(f"dataset {dataset!r} has no detlab.dataset tag; known: {DATASETS} (or 'voc')")
    return tag


def log_dataset_inputs(client: MlflowClient, run_id: str, data: DataConfig,
                       splits: Sequence[str] = ("train", "val")) -> None:
    """Log ``splits`` of ``data`` as the run's dataset inputs (the runs table's Dataset column).

    Each split is one input: name = the ``detlab.dataset`` tag, digest = 12 hex of a sha256 over
    what the split's content is determined by, source = where it comes from, and MLflow's context
    tag ``train`` or ``eval``. Logging the same input again is a no-op in MLflow (a reopened run).
    A split whose annotations cannot be read is left out with a warning: the run itself says why.
    """
    inputs: list[DatasetInput] = []
    for split in splits:
        try:
            source_type, source, digest = _split_source(data, split)
        except (OSError, ValueError) as e:  # DatasetError is a ValueError
            logging.getLogger(__name__).warning("run %s: no dataset input for the %s split: %s", run_id, split, e)
            continue
        dataset = Dataset(dataset_tag(data.dataset), digest, source_type, json.dumps(source, sort_keys=True))
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "train" if split == "train" else "eval")]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def _split_source(data: DataConfig, split: str) -> tuple[str, dict[str, Any], str]:
    """``(source_type, source, digest)`` of one split.

    The generated sets (``shapes``, ``trees``) are deterministic in their generator's settings, so
    those are the digest and the source (type ``code``); their files need not exist yet. ``coco``
    and ``voc`` are digested from their annotation files (type ``local``, the file or root as uri).
    """
    name = data.train_split if split == "train" else data.val_split
    settings: dict[str, Any] = {"split": name, "max_images": data.max_images}
    if data.dataset == "shapes":
        from detector.data.shapes import GENERATOR_VERSION

        settings.update(generator="detector.data.shapes", version=GENERATOR_VERSION, image_size=data.image_size,
                        num_images=data.num_train if split == "train" else data.num_val, seed=data.seed)
    elif data.dataset == "trees":
        from detector.data.trees import DEEPFOREST_SHA256, PREPARE_VERSION

        settings.update(generator="detector.data.trees", version=PREPARE_VERSION, wheel_sha256=DEEPFOREST_SHA256,
                        tile_size=data.tile_size)
    if "generator" in settings:
        return "code", {"tags": settings}, _sha12(json.dumps(settings, sort_keys=True).encode())
    from detector.data import dataset_root
    from detector.data.voc import voc_entries

    root = dataset_root(data)
    if data.dataset == "coco":  # the annotation file detector.data.build_dataset reads
        ann = data.train_ann if split == "train" else data.val_ann
        uri = root / ann if ann else root / "annotations" / f"instances_{name}.json"
        files = [uri]
    else:
        uri, files = root, [e.xml for e in voc_entries(root, name)[0]]
    parts = [json.dumps(settings, sort_keys=True), *(file_sha256(f) for f in files)]
    return "local", {"uri": str(uri)}, _sha12("\n".join(parts).encode())


def _sha12(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:12]


def run_tags(
    table: int | str,
    row: str | None,
    dataset: str | None,
    seed: int | None,
    key: str | None,
    profile: str | None,
    kind: str = "cell",
) -> dict[str, str]:
    """The ``detlab.*`` tags of a run, as strings, plus the git commit when known.

    ``kind="cell"`` (one seed of one table cell, what :mod:`lab.tables` aggregates) needs every
    field; other kinds (``sweep``, ``trial``, ``tables``) may leave fields None to omit them.
    ``dataset`` may be a ``DataConfig.dataset`` name (``voc`` is tagged ``voc07``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    fields = {"row": row, "dataset": dataset, "seed": seed, "key": key, "profile": profile}
    if kind == "cell":
        missing = [name for name, value in fields.items() if value is None or value == ""]
        if missing:
            raise ValueError(f"a cell run needs {', '.join(missing)} (got {fields})")
    if row is not None and (not row or row != row.strip() or " " in row):
        raise ValueError(f"row={row!r} must be a non-empty name without spaces (e.g. 'iac_dc')")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r} must be an int")
    tags = {TAG_TABLE: str(_check_table(table)), TAG_KIND: kind}
    if row is not None:
        tags[TAG_ROW] = row
    if dataset is not None:
        tags[TAG_DATASET] = dataset_tag(dataset)
    if seed is not None:
        tags[TAG_SEED] = str(seed)
    if key is not None:
        tags[TAG_KEY] = str(key)
    if profile is not None:
        tags[TAG_PROFILE] = str(profile)
    tags.update(source_tags())  # the commit (MLflow's own tag too), dirty flag, source digest
    return tags


def search_all_runs(
    uri: str, experiment: str, filter_string: str = "", order_by: list[str] | None = None
) -> list[Run]:
    """Every run of ``experiment`` matching ``filter_string`` (all pages); [] if it does not exist."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            [exp.experiment_id], filter_string=filter_string, order_by=order_by, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def tag_filter(tag: str, value: str) -> str:
    """``search_runs`` clause ``tags.`<tag>` = '<value>'`` (backticks: tag names contain dots)."""
    quote = "'" if "'" not in value else '"'
    if quote in value:
        raise ValueError(f"tag value {value!r} contains both quote characters; cannot search for it")
    return f"tags.`{tag}` = {quote}{value}{quote}"


def find_finished_run(uri: str, experiment: str, key: str) -> str | None:
    """Run id of the newest FINISHED run with ``detlab.key == key``, or None (lets jobs skip done cells)."""
    runs = search_all_runs(
        uri,
        experiment,
        f"{tag_filter(TAG_KEY, key)} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def close_dangling_runs(uri: str, experiment: str, status: str = "FAILED") -> int:
    """Mark every RUNNING run of ``experiment`` as ``status``; return how many.

    For drivers that crashed or Tune trials that were killed (their runs stay RUNNING, notes
    §2.4). It cannot tell a live run from a dead one: call it only when no job of this
    experiment is running.
    """
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"status={status!r} is not one of {TERMINAL_STATUSES}")
    client = MlflowClient(uri)
    runs = search_all_runs(uri, experiment, "attributes.status = 'RUNNING'")
    for run in runs:
        client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
    return len(runs)


#: a table spec's name (``detlab-<name>`` experiment, ``<name>.md`` files); ``table<N>`` is the paper's
SPEC_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
PAPER_TABLE_NAME = re.compile(r"table\d+")


def _check_table(table: int | str) -> int | str:
    """A paper table (1, 2) or a spec's name."""
    if isinstance(table, str) and SPEC_NAME.fullmatch(table) and not PAPER_TABLE_NAME.fullmatch(table):
        return table
    if isinstance(table, bool) or table not in TABLES:
        raise ValueError(f"table={table!r} is not one of {TABLES}, nor a table spec's name")
    return int(table)


def _sqlite_uri(path: Path) -> str:
    """Absolute ``sqlite:///`` URI for ``path``, creating its directory (SQLite will not)."""
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"{_SQLITE_PREFIX}{path}"
