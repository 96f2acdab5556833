"""Any table as a job: the paper's (``1``, ``2``) or a spec of your own (``--spec FILE.yaml``); a
thin entrypoint over `detlab table`.

    python jobs/table.py --spec docs/ablation-example.yaml --profile smoke
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/table.py --spec docs/ablation-example.yaml --profile demo --out /abs/results

Under `ray job submit` the cwd is a temporary copy of the repo: a spec path inside it travels with
the job; give an absolute `--out` and a tracking server. Options: `detlab table --help`.
"""

import sys
from pathlib import Path

# Run as a script, sys.path[0] is jobs/: put the repo root first so `lab` and `detector` import
# without an installed package (under `ray job submit` the working dir is on PYTHONPATH anyway).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from lab.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["table", *sys.argv[1:]]))
