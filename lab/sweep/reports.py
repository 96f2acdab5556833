"""What a finished sweep reports: one :class:`TrialRow` per trial, the best trial and its config
file (``<out>/best_<dataset>.yaml``, readable by ``--config``), the parent run's counts, CSV and
metric-vs-parameter plot, and the console summary."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from detector.config import flatten, overrides_to_dict
from lab.settings.config import build_config
from lab.sweep.plan import METHOD, SweepPlan


@dataclass
class TrialRow:
    """One trial as the driver sees it after ``fit()`` (the CSV row, the plot point)."""

    trial_id: str
    run_id: str | None
    status: str  #: FINISHED | KILLED | FAILED
    epochs: int
    metric: float  #: last reported value (nan if none)
    values: dict[str, Any]  #: resolved searched keys
    error: str = ""


def best_trial(rows: list[TrialRow], mode: str = "max") -> TrialRow | None:
    """Best trial by metric, preferring trials that trained every epoch (ASHA's stopped ones did not)."""
    scored = [r for r in rows if not math.isnan(r.metric)]
    finished = [r for r in scored if r.status == "FINISHED"]
    pool = finished or scored
    pick = min if mode == "min" else max
    return pick(pool, key=lambda r: r.metric) if pool else None


def best_config(plan: SweepPlan, best: TrialRow) -> dict[str, Any]:
    """Nested overrides for ``--config``: the method switches and the winner's searched values."""
    resolved = build_config(plan.base, overrides_to_dict(best.values), source="best trial")
    flat = flatten(resolved)
    keys = list(METHOD) + sorted(best.values)
    return overrides_to_dict({k: flat[k] for k in keys})


def write_best(plan: SweepPlan, best: TrialRow) -> Path:
    """``<out>/best_<dataset>.yaml``, readable by ``--config FILE`` of the table jobs."""
    plan.out.mkdir(parents=True, exist_ok=True)
    head = (f"# best of sweep {plan.name} (profile {plan.profile}, dataset {plan.dataset}): trial {best.trial_id}, "
            f"{plan.metric} {best.metric:.3f} after {best.epochs} epoch(s)\n"
            f"# use: python jobs/table2.py --config {plan.best_path}\n")
    plan.best_path.write_text(head + yaml.safe_dump(best_config(plan, best), sort_keys=True))
    return plan.best_path


def log_parent_run(client: Any, parent_id: str, plan: SweepPlan, rows: list[TrialRow], best: TrialRow | None,
                wall: float) -> None:
    """Parent run: counts, the best trial, the trials CSV and the metric-vs-parameter plot."""
    counts = {s: sum(r.status == s for r in rows) for s in ("FINISHED", "KILLED", "FAILED")}
    metrics = {"num_trials": len(rows), **{f"num_{k.lower()}": v for k, v in counts.items()}, "sweep_wall_s": wall}
    if best is not None:
        metrics[f"best_{plan.metric}"] = best.metric
        client.set_tag(parent_id, "detlab.best_trial", best.trial_id)
        if best.run_id:
            client.set_tag(parent_id, "detlab.best_run", best.run_id)
        client.log_dict(parent_id, best_config(plan, best), "best/best_config.yaml")
    for k, v in metrics.items():
        client.log_metric(parent_id, k, float(v))
    client.log_text(parent_id, rows_csv(rows, plan), "sweep/trials.csv")
    if rows:
        fig = plot_rows(rows, plan.metric, list(plan.space))
        client.log_figure(parent_id, fig, f"sweep/{plan.metric}_vs_params.png")
        import matplotlib.pyplot as plt

        plt.close(fig)


def rows_csv(rows: list[TrialRow], plan: SweepPlan) -> str:
    buf = io.StringIO()
    keys = list(plan.space)
    w = csv.writer(buf)
    w.writerow(["trial_id", "run_id", "status", "epochs", plan.metric, *keys, "error"])
    for r in rows:
        w.writerow([r.trial_id, r.run_id or "", r.status, r.epochs, "" if math.isnan(r.metric) else f"{r.metric:.4f}",
                    *(r.values.get(k, "") for k in keys), r.error])
    return buf.getvalue()


def plot_rows(rows: list[TrialRow], metric: str, keys: list[str]) -> Any:
    """One scatter per searched key: metric vs value, coloured by status (matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(keys), 4) or 1
    nrows = math.ceil(max(len(keys), 1) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    colours = {"FINISHED": "tab:blue", "KILLED": "tab:orange", "FAILED": "tab:red"}
    for ax, key in zip(axes.flat, keys):
        for status, colour in colours.items():
            pts = [(r.values[key], r.metric) for r in rows
                   if r.status == status and key in r.values and not math.isnan(r.metric)]
            if pts:
                ax.scatter(*zip(*pts), c=colour, s=18, label=status.lower())
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if key == "loss.eps":
            ax.set_xscale("log")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(f"{metric} vs searched parameters ({len(rows)} trials; orange: stopped by ASHA)", fontsize=9)
    fig.tight_layout()
    return fig


def summarize(rows: list[TrialRow], metric: str) -> str:
    lines = [f"{'trial':14} {'status':9} {'epochs':>6} {metric:>8}  values"]
    for r in rows:
        vals = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                         for k, v in r.values.items())
        shown = "-" if math.isnan(r.metric) else f"{r.metric:.2f}"
        lines.append(f"{r.trial_id:14} {r.status:9} {r.epochs:>6} {shown:>8}  {vals}{'  ' + r.error if r.error else ''}")
    return "\n".join(lines)
