"""Input coercion shared by the evaluators (:mod:`detector.evaluate`, :mod:`detector.voc_eval`,
:mod:`detector.confusion`): tensors or arrays in, validated numpy out, with errors that name the
field. torch is not imported (duck typing)."""

from __future__ import annotations

from typing import Any

import numpy as np

#: Recall points of the PR curves (COCO's 101 thresholds 0.00, 0.01, ..., 1.00).
RECALL_POINTS: np.ndarray = np.linspace(0.0, 1.0, 101)


def _to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Tensor (any device) / array / list -> numpy array, without importing torch."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def _to_int(x: Any, what: str) -> int:
    """Python int from int / numpy scalar / 0-d or 1-element tensor; clear error otherwise."""
    if hasattr(x, "item") and not isinstance(x, (int, np.integer)):
        x = x.item()
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        if isinstance(x, (float, np.floating)) and float(x).is_integer():
            return int(x)
        raise TypeError(f"{what} must be an integer, got {x!r} ({type(x).__name__})")
    return int(x)


def _as_boxes(x: Any, what: str) -> np.ndarray:
    """Validate an ``[N, 4]`` box array (float64); an empty input gives shape ``(0, 4)``."""
    arr = _to_numpy(x, np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what}: boxes must have shape [N, 4] (x1, y1, x2, y2), got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: boxes contain NaN or inf")
    return arr


def _as_vector(x: Any, n: int, dtype: Any, what: str) -> np.ndarray:
    """Validate a length-``n`` vector (scores, labels, difficult flags)."""
    arr = _to_numpy(x)
    if arr.size == 0 and n == 0:
        return np.zeros((0,), dtype=dtype)
    if arr.shape != (n,):
        raise ValueError(f"{what}: expected shape [{n}] to match the boxes, got shape {tuple(arr.shape)}")
    return arr.astype(dtype, copy=False)


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """print_function for faster-coco-eval (its default logs at WARNING level)."""


