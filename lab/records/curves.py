"""Learning curves from MLflow metric histories: one run's losses and val metric, and a table's
rows overlaid (mean over each row's seed runs, min-max band).

What training logs (``lab.execution.loop``): per epoch at step ``epoch + 1`` the ``train_loss``,
``train_loss_cls``, ``train_loss_reg`` averages and, after each evaluation, the val metric
(``AP`` for COCO-format data, ``mAP`` for VOC); every ``train.log_every`` iterations
``step_loss`` at step = global iteration. So ``step_``-prefixed keys count iterations and the
others epochs; the two are drawn against separate x axes, never mixed on one.

A run with no history (not started, crashed before its first epoch, or unknown) gives an empty
panel with a note: these pictures are made in reports after the fact and must not fail them.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

#: val metrics in order of preference for :func:`plot_run_curves` (COCO, then VOC)
VAL_METRICS = ("AP", "mAP")

#: key prefix of the metrics logged per iteration rather than per epoch
ITERATION_PREFIX = "step_"


def metric_series(client: MlflowClient, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one metric, sorted by step, both float ``[n]``.

    A step logged more than once (an epoch redone after a failure, a final evaluation logged
    again) keeps its latest value (by timestamp), the one that describes the saved weights. Empty
    arrays when the run or the key has no history, or the run does not exist.
    """
    try:
        history = client.get_metric_history(run_id, key)
    except MlflowException:
        history = []
    latest: dict[int, tuple[int, float]] = {}
    for m in history:
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, float(m.value))
    steps = sorted(latest)
    return np.asarray(steps, dtype=np.float64), np.asarray([latest[s][1] for s in steps], dtype=np.float64)


def _run_keys(client: MlflowClient, run_id: str) -> list[str]:
    """The metric keys a run has logged (sorted); none for an unknown run."""
    try:
        return sorted(client.get_run(run_id).data.metrics)
    except MlflowException:
        return []


def _note(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray")


def plot_run_curves(client: MlflowClient, run_id: str, title: str = "") -> plt.Figure:
    """Two panels for one run: every metric whose key contains "loss" (left; per-epoch keys vs
    epoch on the bottom axis, ``step_`` keys vs iteration on a top axis, drawn thin and light),
    and the val metric (right; the first of :data:`VAL_METRICS` the run has) vs epoch.
    One line per key with history; a panel without any gets a note instead."""
    keys = _run_keys(client, run_id)
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)

    loss_keys = [k for k in keys if "loss" in k]
    epoch_keys = [k for k in loss_keys if not k.startswith(ITERATION_PREFIX)]
    iter_keys = [k for k in loss_keys if k.startswith(ITERATION_PREFIX)]
    drawn = 0
    if iter_keys:
        # behind the per-epoch curves, against its own (iteration) axis on top
        ax_iter = ax_loss.twiny()
        for k in iter_keys:
            steps, values = metric_series(client, run_id, k)
            if steps.size:
                ax_iter.plot(steps, values, lw=0.6, alpha=0.45, color="gray", label=f"{k} (iteration)")
                drawn += 1
        ax_iter.set_xlabel("iteration", fontsize=8)
        ax_iter.tick_params(labelsize=7)
        ax_loss.set_zorder(ax_iter.get_zorder() + 1)  # epoch curves over the noisy per-iteration one
        ax_loss.patch.set_visible(False)
        if ax_iter.lines:
            ax_iter.legend(fontsize=7, loc="upper center")
    for i, k in enumerate(epoch_keys):
        steps, values = metric_series(client, run_id, k)
        if steps.size:
            ax_loss.plot(steps, values, marker="o", ms=3, lw=1.5, color=f"C{i}", label=k)
            drawn += 1
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training losses")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend(fontsize=7, loc="upper right")
    if not drawn:
        _note(ax_loss, "no loss history")

    val_key = next((k for k in VAL_METRICS if k in keys), None)
    steps, values = metric_series(client, run_id, val_key) if val_key else (np.zeros(0), np.zeros(0))
    if steps.size:
        ax_val.plot(steps, values, marker="o", ms=3, lw=1.5, color="C3", label=val_key)
        best = int(np.nanargmax(values)) if np.isfinite(values).any() else -1
        if best >= 0:
            ax_val.annotate(f"best {values[best]:.2f}", (steps[best], values[best]), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=7)
        ax_val.legend(fontsize=7, loc="lower right")
    else:
        _note(ax_val, "no val metric history (" + " / ".join(VAL_METRICS) + ")")
    ax_val.set(xlabel="epoch", ylabel=f"{val_key or 'AP'} (%)", title="validation")
    ax_val.grid(alpha=0.3)
    fig.suptitle(title or f"run {run_id}", fontsize=10)
    fig.tight_layout()
    return fig


def row_curve(client: MlflowClient, run_ids: list[str], metric: str) -> dict[str, Any]:
    """One table row's learning curve over its seed runs.

    Returns ``{"steps", "mean", "min", "max", "n"}``, float arrays ``[S]`` over the union of the
    runs' steps: at each step the mean/min/max over the runs that logged it and how many did
    (``n``), so a run that stopped early still counts where it has values. All empty when no run
    has history. NaN values (a diverged run) are left out of the statistics at their step.
    """
    series = [metric_series(client, rid, metric) for rid in run_ids]
    per_step: dict[float, list[float]] = {}
    for steps, values in series:
        for s, v in zip(steps.tolist(), values.tolist()):
            if not math.isnan(v):
                per_step.setdefault(s, []).append(v)
    steps = sorted(per_step)
    groups = [per_step[s] for s in steps]
    return {
        "steps": np.asarray(steps, dtype=np.float64),
        "mean": np.asarray([np.mean(g) for g in groups], dtype=np.float64),
        "min": np.asarray([min(g) for g in groups], dtype=np.float64),
        "max": np.asarray([max(g) for g in groups], dtype=np.float64),
        "n": np.asarray([len(g) for g in groups], dtype=np.float64),
    }


def plot_rows_curves(client: MlflowClient, runs: dict[str, list[str]], metric: str, title: str = "") -> plt.Figure:
    """The learning curves of a table's rows overlaid: ``runs`` maps a row's label to its (seed)
    run ids. One colour per row; the line is the mean over the row's runs at each step
    (:func:`row_curve`), with a light min-max band where more than one run has the step. A row
    without history gets no line and is named in a note."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    empty: list[str] = []
    for i, (label, run_ids) in enumerate(runs.items()):
        curve = row_curve(client, list(run_ids), metric)
        if not curve["steps"].size:
            empty.append(label)
            continue
        color = f"C{i % 10}"
        n_runs = int(curve["n"].max())
        ax.plot(curve["steps"], curve["mean"], lw=1.6, color=color, marker="o" if curve["steps"].size < 30 else None,
                ms=3, label=f"{label} (n={n_runs})")
        several = curve["n"] > 1
        if several.any():
            ax.fill_between(curve["steps"], curve["min"], curve["max"], where=several, color=color, alpha=0.15,
                            lw=0, interpolate=False)
    if empty:
        ax.text(0.01, 0.01, "no history: " + ", ".join(empty), transform=ax.transAxes, fontsize=7, color="gray",
                va="bottom")
    if not ax.lines:
        _note(ax, f"no run has a {metric!r} history")
    else:
        ax.legend(fontsize=7, loc="best")
    xlabel = "iteration" if metric.startswith(ITERATION_PREFIX) else "epoch"
    ax.set(xlabel=xlabel, ylabel=metric, title=title or f"{metric}: mean over seeds, band = min-max")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
