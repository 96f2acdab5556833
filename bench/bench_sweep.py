"""Overhead of a Tune sweep over running the same trials by hand.

1. A smoke sweep of N trials (profile ``smoke``: local mode, each trial trains in its reused Tune
   process; ``--set scaling.workers=1`` for the cluster path, one Train worker per trial; ASHA's
   grace period = all epochs, so no trial is stopped early) through :func:`lab.sweep.run_sweep`; its
   wall time is the parent run's ``sweep_wall_s`` (Tuner.fit plus the driver's MLflow bookkeeping,
   without ``ray.init``).
2. The same N configs (read back from the trials' MLflow params) trained back to back with
   :func:`lab.execution.train.fit_cell`, one worker each, on the same Ray cluster; each one timed alone.
   Also, as a floor, each one in local mode inside this already-warm process (pure training and
   evaluation: no process to start, nothing to import).

*Ideal packing* = sum of the solo trial times / c, where c is the number of trials the cluster
holds at once (cluster CPUs / CPUs per trial): a scheduler with no gaps and no cost of its own.
The ratio printed is sweep wall / ideal packing (goal: <= 1.15). Trials that share 2 CPUs also slow
each other down, which this ratio counts as overhead too.

Usage: python bench/bench_sweep.py [--trials 4] [--keep DIR] [--set train.max_iters=40 --set data.num_train=80]
                                   [--set scaling.workers=1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow import MlflowClient  # noqa: E402

from lab import sweep  # noqa: E402
from lab.records import tracking  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--keep", type=Path, default=None, help="work dir to keep (default: a temp dir)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                    help="extra config override for every trial, e.g. train.max_iters=40 (longer trials)")
    a = ap.parse_args()
    root = a.keep or Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root.resolve() / 'mlflow.db'}"
    base_args = ["--profile", "smoke", "--dataset", "shapes", "--num-samples", str(a.trials), "--out",
                 str(root / "out"), "--set", f"data.root={root.resolve() / 'shapes'}",
                 *[x for kv in a.sets for x in ("--set", kv)]]
    plan = sweep.build_plan(sweep.build_parser().parse_args([*base_args, "--grace-period", "100"]))

    import ray

    sweep._init_ray(None)  # one cluster for both halves (run_sweep leaves a cluster it did not start)
    try:
        capacity = sweep.trial_capacity(ray.cluster_resources(), plan.cfg.scaling.resources())
        sweep._prepare_builtin_data(plan.cfg)
        t0 = time.time()
        rc = sweep.run_sweep(plan, uri)
        outer = time.time() - t0
        client = MlflowClient(uri)
        runs = tracking.search_all_runs(uri, plan.experiment)
        parent = next(r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "sweep")
        trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        wall = parent.data.metrics["sweep_wall_s"]

        from lab.settings.config import build_config
        from lab.execution.train import fit_cell
        from detector.config import overrides_to_dict

        solo: list[float] = []  # the reference: back to back, one Train worker each
        bare: list[float] = []  # the floor: the same loop in this (warm) process, nothing to start
        for i, run in enumerate(sorted(trials, key=lambda r: r.info.run_name)):
            values = {k: float(run.data.params[k]) for k in plan.space}
            cfg = build_config(plan.base, overrides_to_dict({**values, "scaling.workers": 1}), source="bench")
            t = time.time()
            fit_cell(cfg, name=f"solo{i}", run_name=f"solo{i}", storage_path=root / "solo")
            solo.append(time.time() - t)
            cfg = build_config(plan.base, overrides_to_dict({**values, "scaling.workers": 0}), source="bench")
            t = time.time()
            fit_cell(cfg, name=f"bare{i}", run_name=f"bare{i}", storage_path=root / "bare")
            bare.append(time.time() - t)
            print(f"trial {i}: one worker {solo[-1]:.1f}s, in this process {bare[-1]:.1f}s", flush=True)
    finally:
        ray.shutdown()
    ideal = sum(solo) / capacity
    floor = sum(bare) / capacity
    print(f"\nsweep rc {rc}: {len(trials)} trials, {capacity} at a time, scaling.workers="
          f"{plan.cfg.scaling.workers}; statuses "
          f"{sorted(r.info.status for r in client.search_runs([parent.info.experiment_id]) if r.info.run_id != parent.info.run_id)}")
    print(f"sweep wall (Tuner.fit + MLflow)   {wall:7.1f}s   (run_sweep call {outer:.1f}s)")
    print(f"back to back, one worker each     {sum(solo):7.1f}s   ({', '.join(f'{s:.1f}' for s in solo)})")
    print(f"ideal packing = sum / {capacity}          {ideal:7.1f}s")
    print(f"ratio sweep / ideal packing       {wall / ideal:7.2f}   (goal <= 1.15)")
    print(f"[floor] in-process, back to back  {sum(bare):7.1f}s   ({', '.join(f'{s:.1f}' for s in bare)}); "
          f"sweep / (sum / {capacity}) = {wall / floor:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
