"""The driver's environment variables that every detlab worker process gets.

Cell tasks, Tune trials and their Ray Train workers run in processes the raylet starts. On a local
cluster they inherit the driver's environment, but on an existing cluster (``ray job submit``, a
``--ray-address``) they get only the node's, so the variables below are passed in the
``runtime_env`` explicitly: tracking-server credentials, data and cache locations, the S3 store
(:data:`lab.storage.FORWARD_ENV`) and the fault-injection hooks of :mod:`lab.faults`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from lab.storage import FORWARD_ENV as STORAGE_ENV

#: forwarded when set in the driver's environment (values may be secrets: print them through lab.scrub).
FORWARD_ENV: tuple[str, ...] = (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "DETLAB_DATA", "TORCH_HOME",
    "DETLAB_FAULT", "DETLAB_FAULT_FILE", "DETLAB_SPOOL_DIR",
    *STORAGE_ENV,
)


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The :data:`FORWARD_ENV` variables set in ``environ`` (default: this process's environment)."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in FORWARD_ENV if k in env}
