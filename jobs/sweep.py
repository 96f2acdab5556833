"""Ray Tune sweep as a job (a thin entrypoint over `lab.sweep`, i.e. `detlab sweep`).

    python jobs/sweep.py --profile smoke --dataset shapes --num-samples 4
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sweep.py --profile smoke --dataset shapes --num-samples 32 --out /abs/results \
        --tracking-uri http://mlflow:5000

Under `ray job submit` the cwd is a temporary copy of the repo: give an absolute `--out` and a
tracking server (or an absolute sqlite URI on a shared disk). Options: `python jobs/sweep.py --help`.
"""

import sys
from pathlib import Path

# Run as a script, sys.path[0] is jobs/: put the repo root first so `lab` and `detector` import
# without an installed package (under `ray job submit` the working dir is on PYTHONPATH anyway).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from lab.sweep import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
