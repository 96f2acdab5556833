"""cluster/*.yaml: the `ray up` config against Ray's own schema, the KubeRay RayJob's shape.

Offline only: nothing here launches a cluster (see cluster/README.md for what is unverified).
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster" / "aws-gpu.yaml"
RAYJOB = ROOT / "cluster" / "kuberay-rayjob.yaml"

# KubeRay v1.7.0 CRD field names (notes §4.2). The CRD does not reject unknown keys (the API
# server prunes them silently), so a typo would be lost without this check.
RAYJOB_SPEC_KEYS = {
    "entrypoint", "runtimeEnvYAML", "submissionMode", "entrypointNumCpus", "entrypointNumGpus",
    "entrypointResources", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
    "preRunningDeadlineSeconds", "backoffLimit", "suspend", "clusterSelector", "submitterPodTemplate",
    "submitterConfig", "deletionStrategy", "rayClusterSpec", "jobId", "metadata", "managedBy",
}
RAYCLUSTER_SPEC_KEYS = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
    "authOptions", "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions",
}
WORKER_GROUP_KEYS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "idleTimeoutSeconds",
    "numOfHosts", "suspend", "scaleStrategy", "labels", "resources", "priority",
}


def _ray_util():
    pytest.importorskip("jsonschema")
    return pytest.importorskip("ray.autoscaler._private.util")


def test_aws_config_passes_ray_schema() -> None:
    util = _ray_util()
    import ray

    cfg = yaml.safe_load(AWS.read_text())
    full = util.prepare_config(copy.deepcopy(cfg))
    util.validate_config(full)  # raises on any schema error
    assert full["available_node_types"]["ray.head.default"]["resources"]["CPU"] == 0
    assert full["head_node_type"] == "ray.head.default"
    # the image's Ray must be the Ray that submits to it
    assert f":{ray.__version__}-" in cfg["docker"]["image"]
    assert any("--disable-usage-stats" in c for c in cfg["head_start_ray_commands"])


def test_aws_schema_check_is_live() -> None:
    """The same validation rejects an unknown key, so the test above can fail."""
    util = _ray_util()
    import jsonschema

    cfg = yaml.safe_load(AWS.read_text())
    cfg["available_node_types"]["ray.worker.gpu"]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        util.validate_config(util.prepare_config(cfg))


def test_rayjob_shape_and_entrypoint() -> None:
    doc = yaml.safe_load(RAYJOB.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_SPEC_KEYS, set(spec) - RAYJOB_SPEC_KEYS
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_KEYS, set(cluster) - RAYCLUSTER_SPEC_KEYS
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_KEYS, set(group) - WORKER_GROUP_KEYS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["autoscalerOptions"]["version"] in ("v1", "v2")

    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("jobs/table1.py")
    assert (ROOT / "jobs" / "table1.py").is_file()
    assert argv[argv.index("--profile") + 1] == "paper"
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http")  # multi-node needs a server, not sqlite


def test_rayjob_versions_match_installed_ray() -> None:
    ray = pytest.importorskip("ray")
    cluster = yaml.safe_load(RAYJOB.read_text())["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    images = [c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    images += [c["image"] for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert all(f":{ray.__version__}-" in image for image in images), images


def test_rayjob_entrypoint_parses_with_detlab_cli() -> None:
    """The entrypoint's options are ones `detlab table 1` accepts (parse only; no data needed)."""
    cli = pytest.importorskip("lab.cli")
    argv = shlex.split(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"])[2:]
    args = cli.build_parser().parse_args(["table", "1", *argv])
    assert args.profile == "paper" and args.table == 1 and str(args.out).startswith("/mnt/")


def test_heads_declare_the_sweep_trial_resource() -> None:
    """Sweep trial drivers with Train workers reserve lab.sweep.TRIAL_RESOURCE, not a CPU: both
    cluster configs put it on the CPU-less head (KubeRay's quoted string read by Ray's own parser)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    from lab.sweep import TRIAL_RESOURCE

    head = yaml.safe_load(AWS.read_text())["available_node_types"]["ray.head.default"]
    assert head["resources"]["CPU"] == 0 and head["resources"][TRIAL_RESOURCE] >= 100
    params = yaml.safe_load(RAYJOB.read_text())["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert _get_custom_resources({}, params, "headgroup") == {TRIAL_RESOURCE: 1000}
