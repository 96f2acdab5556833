"""A trained detector's files: the final ``model.pt`` (state_dict + resolved config + class names) and the
checkpoints' ``state.pt``, read back with ``weights_only=True``.

``model.pt`` is what CL-B cells, ``detlab eval/predict/export`` and logged models read; a path or a storage URI
(:mod:`lab.infra.storage`). No Ray and no MLflow here.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.config import to_dict
from lab.infra import storage
from lab.settings.config import LabConfig
from lab.settings.scrub import scrub_mapping

#: final weights of a cell, written beside its Ray checkpoints; CL-B cells and ``detlab predict`` read it.
WEIGHTS_FILE = "model.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def resolve_num_classes(cfg: LabConfig, dataset: Any) -> LabConfig:
    """``model.num_classes = 0`` means "take it from the dataset"; a mismatch is an error."""
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = int(dataset.num_classes)
    elif cfg.model.num_classes != dataset.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the dataset has {dataset.num_classes} classes")
    return cfg


def save_weights(path: str | Path, model: torch.nn.Module, cfg: LabConfig, class_names: list[str]) -> Path | str:
    """Self-contained final weights: state_dict + resolved config + class names (``detlab predict``).

    ``path`` is a local path or a storage URI (``s3://...``, see :mod:`lab.infra.storage`); returns the
    local ``Path``, or the URI for an object store. Either way a reader never sees half a file.
    """
    uri = storage.parse(path)
    # the config as logged: secrets masked (no key that a model reads back is secret-named)
    payload = {"model": unwrap(model).state_dict(), "config": scrub_mapping(to_dict(cfg)),
               "class_names": list(class_names)}
    if uri.remote:  # written locally, then uploaded: the node that trained keeps nothing others need
        with tempfile.TemporaryDirectory() as d:
            torch.save(payload, Path(d) / WEIGHTS_FILE)
            return storage.upload_file(Path(d) / WEIGHTS_FILE, str(uri))
    local = Path(uri.path)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_suffix(".tmp")
    try:
        torch.save(payload, tmp)
    except (OSError, RuntimeError) as e:  # a full disk surfaces from torch's zip writer as RuntimeError
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(local.parent).free
        raise OSError(errno.ENOSPC if free < 64 * 2**20 else errno.EIO,
                      f"writing the final weights {local} failed ({type(e).__name__}: {str(e).splitlines()[0]}; "
                      f"{free / 2**20:.0f} MiB free there); the last checkpoint is intact: free space and rerun "
                      f"the same command, which evaluates and writes them again") from e
    tmp.replace(local)  # atomic: a reader never sees half a file
    return local


def load_weights(path: str | Path) -> dict[str, Any]:
    """Read a ``model.pt`` written by :func:`save_weights`: a local path or a storage URI, fetched
    into the local cache (:func:`lab.infra.storage.download`).

    Unpickled with ``weights_only=True``: tensors and plain data only (the payload is a state_dict,
    the config as a plain dict and the class names). Where the path comes from (a run tag, a
    bucket) is not proof that we wrote the file, and a full unpickler runs whatever a file asks.
    """
    return _load_safely(storage.download(path), "weights file")


#: the numpy types in a checkpoint: ``np.random.get_state()`` is ("MT19937", uint32 array, int, int,
#: float). Allowed by name, while loading checkpoints only; every other type is refused (an object
#: array's dtype class is not in the list, so it cannot be rebuilt either).
_CHECKPOINT_GLOBALS: list[Any] = [np.dtype, np.ndarray, np._core.multiarray._reconstruct, np.dtypes.UInt32DType]


def load_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint's ``state.pt`` (model, optimizer, scheduler, scaler and EMA state, every
    rank's torch/numpy/Python RNG state, metrics) with ``weights_only=True`` and :data:`_CHECKPOINT_GLOBALS`."""
    with torch.serialization.safe_globals(_CHECKPOINT_GLOBALS):
        return _load_safely(Path(path), "checkpoint")


def _load_safely(path: Path, what: str) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; a file holding anything else is refused, named.

    Raises ``pickle.UnpicklingError`` (what torch raises) with the file and the refused type.
    """
    import pickle
    import re

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except EOFError:  # torch's unpickler on an empty file
        raise pickle.UnpicklingError(f"the {what} {path} is not a readable torch file (empty): truncated or not "
                                     f"ours") from None
    except pickle.UnpicklingError as e:
        # torch's message goes on to suggest allow-listing the type; what matters is which type it was
        text = str(e)
        found = re.search(r"(Unsupported global: GLOBAL \S+|Can only build .*?, but got .*?>|Trying to call reduce "
                          r"for unrecognized function \S+)", text)
        if found:
            raise pickle.UnpicklingError(f"refusing to load the {what} {path}: it holds more than tensors and plain "
                                         f"data ({found[1]}); detlab loads only the files it writes") from None
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        raise pickle.UnpicklingError(f"the {what} {path} is not a readable torch file ("
                                     f"{detail[0] if detail else type(e).__name__}): truncated or not ours") from None
    if not isinstance(payload, dict):
        raise ValueError(f"the {what} {path} holds a {type(payload).__name__}, not a dict")
    return payload
