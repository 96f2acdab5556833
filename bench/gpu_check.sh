#!/usr/bin/env bash
# GPU acceptance check of a detlab node (bench/gpu_check.py): five CHECK lines, <= 8 minutes on one GPU.
#
#   bash bench/gpu_check.sh                 # from anywhere; runs in the repo root
#   bash bench/gpu_check.sh --cpu-dry-run   # the code paths on CPU (no GPU needed)
#
# The Python that runs it, first that applies: $DETLAB_PYTHON; .venv (made by `make .venv/.installed`);
# a python3 that already imports detlab's dependencies (e.g. inside the detlab image,
# cluster/docker/Dockerfile); else .venv is created with the Makefile's rule (needs the package
# index, about 3 minutes, not counted in the 8). Exit status: the check's (0 pass, 1 fail, 2 no CUDA).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

py="${DETLAB_PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python && -f .venv/.installed ]]; then
    py=.venv/bin/python
  elif command -v python3 >/dev/null && python3 -c 'import lab.execution.train, ray, torch, torchvision' 2>/dev/null; then
    py=python3
  else
    echo "gpu_check: no .venv; creating it with 'make .venv/.installed' (pyproject.toml + constraints.txt)" >&2
    if ! make -s .venv/.installed; then
      echo "gpu_check: FAIL could not create .venv (the package index must be reachable); set DETLAB_PYTHON to a ready interpreter" >&2
      exit 1
    fi
    py=.venv/bin/python
  fi
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
fi
exec "$py" bench/gpu_check.py "$@"
