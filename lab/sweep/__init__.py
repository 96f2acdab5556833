"""``detlab sweep``: Ray Tune sweeps over the paper's free parameters, tracked in MLflow.

    python jobs/sweep.py --profile smoke --dataset shapes --num-samples 4
    python jobs/sweep.py --profile smoke --dataset shapes --num-samples 4 --resume   # reruns nothing done
    python jobs/sweep.py --profile smoke --dataset shapes --posthoc results/.../model.pt   # nms grid, no training

Read it in this order, one module per step:

* :mod:`lab.sweep.space` — the search space: ``KEY=SPEC`` grammar, YAML files, validation (pure).
* :mod:`lab.sweep.plan` — options -> a validated :class:`SweepPlan` with a stable name (pure).
* :mod:`lab.sweep.trial` — the Tune trial: its MLflow child run and a Ray Train ``TorchTrainer``.
* :mod:`lab.sweep.tuner` — the driver: Ray, the Tuner (ASHA), the parent run, reconciling MLflow.
* :mod:`lab.sweep.reports` — rows, the best trial and its config file, CSV, plot, summary.
* :mod:`lab.sweep.posthoc` — ``--posthoc``: an ``nms.*`` grid over one trained model (no Ray).
* :mod:`lab.sweep.command` — the ``detlab sweep`` options and ``main``.

What runs where (shared notes §2):

* Each trial is a Tune *function trainable* that builds and fits a Ray Train ``TorchTrainer``
  over :func:`lab.execution.loop.train_loop_per_worker` (Train V2 cannot be handed to a Tuner).
  - With workers (``scaling.workers >= 1``) the trial process only waits on its worker group, so
    it reserves a custom resource (:data:`TRIAL_RESOURCE`), not a CPU; the workers hold the
    CPUs/GPUs. ``TuneReportCallback`` forwards rank 0's per-epoch report to Tune.
  - In local mode (``scaling.workers: 0``, the smoke profile) the loop runs in the trial process,
    which therefore reserves the worker's CPUs/GPUs and reports each epoch to Tune itself (Ray 2.60's
    local mode never calls Train callbacks). No controller or worker process starts, and trial
    processes are reused, so a short trial costs its training, not three Python start-ups.
  Concurrency is what the cluster's CPUs/GPUs hold, capped by ``--max-concurrent``. ``eval.every=1``:
  the val metric reaches ASHA every epoch, and ASHA stops the weak trials early.
* MLflow: the driver owns one parent run per sweep (``detlab.kind=sweep``); each trial opens its
  own child run (``mlflow.parentRunId``, ``detlab.kind=trial``) and rank 0 logs the epochs into it.
  A stopped trial either ends in the trial itself (local mode: KILLED) or has its process killed, so
  after ``fit()`` the driver closes every child still RUNNING: FINISHED if it trained all epochs,
  FAILED on error, else KILLED (ASHA).
* The sweep's Tune name is a hash of its options (never the time), so ``--resume`` finds it and
  ``Tuner.restore`` skips finished trials.

Every bad option or space is a ``ConfigError`` raised before ``ray.init``.
"""

from __future__ import annotations

# lab.execution's __init__ sets Ray Train's environment pins (V2, no print patch) before any of these
# modules imports Ray
from lab.execution.runner import quiet_ray_console

quiet_ray_console()

from lab.sweep.command import build_parser, main  # noqa: E402
from lab.sweep.plan import (  # noqa: E402
    METHOD,
    METRIC_BY_DATASET,
    SweepPlan,
    build_plan,
    experiment_name,
    sweep_name,
    with_pretrained_backbone,
)
from lab.sweep.posthoc import POSTHOC_PREFIX, posthoc_grid, resolve_weights, run_posthoc  # noqa: E402
from lab.sweep.reports import TrialRow, best_config, write_best  # noqa: E402
from lab.sweep.space import (  # noqa: E402
    DEFAULT_SPACE,
    Param,
    Space,
    load_space,
    parse_spec,
    resolve_sample,
    sample_space,
    space_text,
    validate_space,
)
from lab.sweep.trial import trial_fn  # noqa: E402
from lab.sweep.tuner import TRIAL_RESOURCE, run_sweep, trial_capacity  # noqa: E402

# bench/bench_sweep.py drives one Ray cluster for two sweeps through these two helpers.
from lab.sweep.tuner import _init_ray, _prepare_builtin_data  # noqa: E402,F401

__all__ = ["DEFAULT_SPACE", "METHOD", "METRIC_BY_DATASET", "POSTHOC_PREFIX", "Param", "Space", "SweepPlan",
           "TRIAL_RESOURCE", "TrialRow", "best_config", "build_parser", "build_plan", "experiment_name",
           "load_space", "main", "parse_spec", "posthoc_grid", "resolve_sample", "resolve_weights", "run_posthoc",
           "run_sweep", "sample_space", "space_text", "sweep_name", "trial_capacity", "trial_fn",
           "validate_space", "with_pretrained_backbone", "write_best"]
