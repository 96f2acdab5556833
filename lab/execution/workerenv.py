"""The driver's environment variables that every detlab worker process gets.

Cell tasks, Tune trials and their Ray Train workers run in processes the raylet starts. On a local
cluster they inherit the driver's environment, but on an existing cluster (``ray job submit``, a
``--ray-address``) they get only the node's, so the variables below are passed in the
``runtime_env`` explicitly: tracking-server credentials, data and cache locations, the S3 store
(:data:`lab.infra.storage.FORWARD_ENV`) and the fault-injection hooks of :mod:`lab.execution.faults`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from lab.infra.storage import FORWARD_ENV as STORAGE_ENV

#: forwarded when set in the driver's environment (values may be secrets: print them through lab.settings.scrub).
FORWARD_ENV: tuple[str, ...] = (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "DETLAB_DATA", "TORCH_HOME",
    "DETLAB_FAULT", "DETLAB_FAULT_FILE", "DETLAB_SPOOL_DIR",
    *STORAGE_ENV,
)


#: every process that trains: OpenMP/MKL keep the thread count they are given instead of changing it
#: on their own (read when torch loads them, so set in the worker's environment; detector.repro).
DETERMINISM_ENV = {"OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"}


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The :data:`FORWARD_ENV` variables set in ``environ`` (default: this process's environment),
    and :data:`DETERMINISM_ENV` (the driver's value where it sets one)."""
    env = os.environ if environ is None else environ
    return {**{k: env.get(k, v) for k, v in DETERMINISM_ENV.items()}, **{k: env[k] for k in FORWARD_ENV if k in env}}


def init_address(address: str | None) -> str | None:
    """What a driver passes to ``ray.init``: ``address`` or the one Ray finds itself (``RAY_ADDRESS``,
    inside ``ray job submit``), else ``"local"``, a private new cluster. Never None with nothing to
    find: ``ray.init(address=None)`` attaches to whatever cluster ``/tmp/ray/ray_current_cluster``
    names (another user's `ray start`, or a dead node a test left), and then refuses the local
    cluster's resources ("When connecting to an existing cluster, resources must not be provided")."""
    if address or os.environ.get("RAY_ADDRESS") or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return address
    return "local"

