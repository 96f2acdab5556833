"""cluster/: the `ray up` config against Ray's own schema, the KubeRay manifests, the image.

Offline only: nothing here builds an image, launches a cluster or talks to Kubernetes (see
cluster/README.md for what is unverified). Each check is a function that returns its problems, so
that every test of the real files has a companion that mutates a copy and shows the same check
rejecting it.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AWS = CLUSTER / "aws-gpu.yaml"
KUBERAY = CLUSTER / "kuberay"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
MLFLOW = KUBERAY / "mlflow.yaml"
RAYJOBS = {"table1": KUBERAY / "rayjob-table1.yaml", "table2": KUBERAY / "rayjob-table2.yaml",
           "sweep": KUBERAY / "rayjob-sweep.yaml"}
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
DOCKERIGNORE = CLUSTER / "docker" / "Dockerfile.dockerignore"
NAMESPACE = "detlab"
#: the Secrets the manifests reference; cluster/README.md must say how to create each.
SECRETS = {"mlflow-db", "mlflow-db-tls", "mlflow-auth", "detlab-s3"}
#: images that are not the detlab/Ray image (so carry no Ray version), without their digest.
OTHER_IMAGES = {"postgres:17.6"}
#: ``name:tag@sha256:<64 hex>``: what runs is what was checked, whatever the registry does to the tag
PINNED_IMAGE = re.compile(r"^[^@\s]+:[^@:/\s]+@sha256:[0-9a-f]{64}$")

# KubeRay v1.7.0 CRD field names (json tags of raycluster_types.go / rayjob_types.go). The CRD does
# not reject unknown keys (the API server prunes them silently), so a typo would be lost without this.
RAYJOB_SPEC_KEYS = {
    "entrypoint", "runtimeEnvYAML", "submissionMode", "entrypointNumCpus", "entrypointNumGpus",
    "entrypointResources", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
    "preRunningDeadlineSeconds", "backoffLimit", "suspend", "clusterSelector", "submitterPodTemplate",
    "submitterConfig", "deletionStrategy", "rayClusterSpec", "jobId", "metadata", "managedBy",
}
RAYCLUSTER_SPEC_KEYS = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
    "authOptions", "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions",
    "upgradeStrategy", "historyServerOptions", "networkPolicy", "tlsOptions",
}
HEAD_GROUP_KEYS = {
    "template", "headService", "enableIngress", "ingressOptions", "resources", "labels", "rayStartParams",
    "serviceType", "suspend",
}
WORKER_GROUP_KEYS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "idleTimeoutSeconds",
    "numOfHosts", "suspend", "scaleStrategy", "labels", "resources", "priority",
}
# Required by the CRD (no omitempty) or by our use: a RayCluster without them is refused or useless.
HEAD_GROUP_REQUIRED = ("rayStartParams", "template")
WORKER_GROUP_REQUIRED = ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template")


# ---------------------------------------------------------------------------------------------
# Reading the files


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object under cluster/kuberay/ (kustomization.yaml is kubectl's, not one)."""
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) if p.name != "kustomization.yaml" for d in _docs(p)]


def _one(path: Path, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _docs(path) if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (path, kind, name, len(found))
    return found[0]


def _pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every pod spec in a manifest: workload templates, RayCluster groups, a RayJob's own cluster."""
    spec = doc.get("spec") or {}
    if doc["kind"] in ("Deployment", "StatefulSet"):
        yield spec["template"]["spec"]
    cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")
    if doc["kind"] in ("RayCluster", "RayJob") and cluster:
        yield cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield group["template"]["spec"]
    if doc["kind"] == "RayJob" and spec.get("submitterPodTemplate"):
        yield spec["submitterPodTemplate"]["spec"]


def _containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for pod in _pod_specs(doc):
        yield from pod.get("initContainers", [])
        yield from pod["containers"]


def _ray_containers(raycluster: dict[str, Any]) -> list[dict[str, Any]]:
    spec = raycluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"]["containers"][0] for g in groups]  # KubeRay: the Ray container is index 0


def _argv(rayjob: dict[str, Any]) -> list[str]:
    return shlex.split(rayjob["spec"]["entrypoint"])


def _opt(argv: list[str], name: str) -> list[str]:
    """Values of ``name`` in ``argv`` (``--x v`` and ``--x=v``)."""
    out = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return out + [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]


# ---------------------------------------------------------------------------------------------
# The checks (each returns its problems; [] = fine)


def _meta_problems(doc: dict[str, Any]) -> list[str]:
    problems = [f"missing {k}" for k in ("apiVersion", "kind", "metadata") if k not in doc]
    meta = doc.get("metadata") or {}
    if not meta.get("name"):
        problems.append("metadata.name missing")
    if doc.get("kind") != "Namespace" and meta.get("namespace") != NAMESPACE:
        problems.append(f"{doc.get('kind')} {meta.get('name')}: namespace {meta.get('namespace')!r}, not {NAMESPACE!r}")
    return problems


def _raycluster_problems(spec: dict[str, Any]) -> list[str]:
    problems = [f"unknown RayCluster spec key {k!r}" for k in sorted(set(spec) - RAYCLUSTER_SPEC_KEYS)]
    if not spec.get("rayVersion"):
        problems.append("rayVersion missing (KubeRay needs it for token auth and the job submitter)")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return [*problems, "headGroupSpec missing"]
    problems += [f"headGroupSpec.{k} missing" for k in HEAD_GROUP_REQUIRED if k not in head]
    problems += [f"unknown headGroupSpec key {k!r}" for k in sorted(set(head) - HEAD_GROUP_KEYS)]
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append("workerGroupSpecs missing or empty")
    for g in groups:
        name = g.get("groupName", "?")
        problems += [f"workerGroupSpecs[{name}].{k} missing" for k in WORKER_GROUP_REQUIRED if k not in g]
        problems += [f"unknown workerGroupSpecs[{name}] key {k!r}" for k in sorted(set(g) - WORKER_GROUP_KEYS)]
        if all(k in g for k in ("minReplicas", "replicas", "maxReplicas")) and not (
                g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]):
            problems.append(f"workerGroupSpecs[{name}]: not minReplicas <= replicas <= maxReplicas")
    for part in [head, *groups]:
        if "template" in part and not part["template"].get("spec", {}).get("containers"):
            problems.append("a group template has no containers")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("authOptions.mode is not 'token' (Ray token auth off)")
    return problems


def _rayjob_problems(doc: dict[str, Any], clusters: set[str]) -> list[str]:
    """KubeRay v1.7.0's ValidateRayJobSpec rules that apply here, plus the keys and the entrypoint."""
    spec = doc["spec"]
    problems = [f"unknown RayJob spec key {k!r}" for k in sorted(set(spec) - RAYJOB_SPEC_KEYS)]
    if not spec.get("entrypoint"):
        problems.append("entrypoint missing")
    selector = spec.get("clusterSelector") or {}
    if bool(selector) == bool(spec.get("rayClusterSpec")):
        problems.append("exactly one of rayClusterSpec and clusterSelector must be set")
    if selector:
        target = selector.get("ray.io/cluster")
        if target not in clusters:
            problems.append(f"clusterSelector ray.io/cluster={target!r} names no RayCluster here ({sorted(clusters)})")
        if (spec.get("backoffLimit") or 0) > 0:
            problems.append("backoffLimit > 0 is refused with clusterSelector")
        if spec.get("suspend"):
            problems.append("suspend is refused with clusterSelector")
        if spec.get("submissionMode") == "SidecarMode":
            problems.append("SidecarMode is refused with clusterSelector")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if spec.get("rayClusterSpec"):
        problems += _raycluster_problems(spec["rayClusterSpec"])
    return problems


def _ray_start_problems(params: dict[str, str]) -> list[str]:
    """rayStartParams become `ray start --key[=value]` (KubeRay's convertParamMap): keys must be options."""
    from ray.scripts.scripts import start

    options = {o.lstrip("-") for p in start.params for o in p.opts}
    return [f"rayStartParams {k!r} is not a `ray start` option" for k in sorted(set(params) - options)]


def _python_tag() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def _image_problems(images: list[str], ray_version: str) -> list[str]:
    """Every Ray image (rayproject/ray, or ours named .../detlab) is tagged <ray>-py<XY>-gpu."""
    problems = []
    for image in (i.split("@", 1)[0] for i in images):  # the digest is _digest_problems' business
        if image in OTHER_IMAGES:
            continue
        repo, _, tag = image.rpartition(":")
        if not (repo == "rayproject/ray" or repo.endswith("/detlab")):
            problems.append(f"{image}: neither the detlab image nor a known other image ({sorted(OTHER_IMAGES)})")
        elif tag != f"{ray_version}-{_python_tag()}-gpu":
            problems.append(f"{image}: tag is not {ray_version}-{_python_tag()}-gpu (installed Ray, venv Python)")
    return problems


def _dockerfile_from(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.strip().upper().startswith("FROM ")]


def _dockerfile_problems(text: str, ray_version: str) -> list[str]:
    froms = _dockerfile_from(text)
    problems = [] if len(froms) == 1 else [f"expected one FROM, found {froms}"]
    problems += [p for image in froms if not image.startswith("rayproject/ray:")
                 for p in [f"FROM {image}: not a rayproject/ray image"]]
    problems += _image_problems([f for f in froms if f.startswith("rayproject/ray:")], ray_version)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    if not users or users[-1] != "ray":
        problems.append(f"the image must end as the non-root user `ray` (USER lines: {users})")
    pip = [line for line in text.splitlines() if "pip install" in line]
    if not any("-c constraints.txt" in line for line in pip):
        problems.append("no `pip install ... -c constraints.txt`: the exact pins are not applied")
    deps_copy = text.find("COPY --chown=1000:100 pyproject.toml constraints.txt")
    code_copy = text.find("COPY --chown=1000:100 . .")
    if not 0 <= deps_copy < code_copy:
        problems.append("pyproject.toml + constraints.txt must be copied (and installed) before the code")
    return problems


def _dockerignore_problems(patterns: list[str]) -> list[str]:
    """Docker's rule (simplified: no `!` exceptions): a path is excluded if a pattern matches it or a parent."""
    def excluded(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatch(pre, pat.removeprefix("**/")) or fnmatch.fnmatch(pre, pat)
                   for pat in patterns for pre in prefixes)

    must_out = [".git", ".venv", "data", "mlruns", "results", "lab/__pycache__", "detlab.egg-info"]
    must_in = ["pyproject.toml", "constraints.txt", "lab/execution/train.py", "detector/model.py", "jobs/table1.py",
               "lab/settings/profiles/paper.yaml"]
    return ([f"{p} is sent to the docker daemon (not excluded)" for p in must_out if not excluded(p)]
            + [f"{p} is excluded but the image needs it" for p in must_in if excluded(p)])


SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|CREDENTIAL", re.I)
# literal values that look like credentials, anywhere in a file's text
SECRET_TEXT = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@$<]+:[^\s/@$<]+@"), "a URI with a password in it"),
    (re.compile(r"(?i)(password|secret|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{12,}"), "a password/secret/token literal"),
]


def _env_secret_problems(doc: dict[str, Any]) -> list[str]:
    """Env entries named like a credential must come from a Secret (valueFrom.secretKeyRef)."""
    problems = []
    if doc["kind"] == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append(f"Secret {doc['metadata']['name']} with values in a file")
    for c in _containers(doc):
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]) and ("value" in e or "secretKeyRef" not in (e.get("valueFrom") or {})):
                problems.append(f"{c['name']}: env {e['name']} is not a secretKeyRef")
    if doc["kind"] == "RayJob" and doc["spec"].get("runtimeEnvYAML"):
        env = (yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) or {}).get("env_vars") or {}
        problems += [f"runtimeEnvYAML env_vars.{k}: a credential as a literal" for k in env if SECRET_NAME.search(k)]
    return problems


def _text_secret_problems(name: str, text: str) -> list[str]:
    return [f"{name}: {what}: {m.group(0)[:40]!r}" for rx, what in SECRET_TEXT for m in rx.finditer(text)]


def _secret_refs(doc: dict[str, Any]) -> set[str]:
    names = set()
    for c in _containers(doc):
        names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                  if "secretKeyRef" in (e.get("valueFrom") or {})}
        names |= {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
    for pod in _pod_specs(doc):
        names |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    return names


def _service_hosts(service: dict[str, Any]) -> list[str]:
    """The Host headers in-cluster clients send to a Service (name:port in every DNS form)."""
    name, ns = service["metadata"]["name"], service["metadata"]["namespace"]
    port = service["spec"]["ports"][0]["port"]
    return [f"{h}:{port}" for h in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local")]


def _mlflow_problems(deployment: dict[str, Any], service: dict[str, Any], client_uris: list[str]) -> list[str]:
    """`mlflow server`'s own parser takes the args; --allowed-hosts (MLflow's own matcher) admits the
    Service's names and the clients' URIs and nothing else; no password in the backend URI."""
    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    c = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow")
    if c.get("command") != ["mlflow", "server"]:
        return [f"command {c.get('command')} is not `mlflow server`"]
    try:
        params = server.make_context("server", list(c["args"])).params
    except Exception as e:  # noqa: BLE001 - click's usage errors
        return [f"`mlflow server` refuses the args: {e}"]
    problems = []
    if not params.get("allowed_hosts"):
        return ["no --allowed-hosts: MLflow's default (localhost + private IPs) refuses the Service's names"]
    allowed = [h.strip() for h in params["allowed_hosts"].split(",")]
    hosts = _service_hosts(service) + [re.sub(r"^https?://", "", u).split("/")[0] for u in client_uris]
    problems += [f"--allowed-hosts refuses {h}" for h in hosts if not is_allowed_host_header(allowed, h)]
    if is_allowed_host_header(allowed, "attacker.example.com:5000"):
        problems.append("--allowed-hosts admits any host (DNS rebinding protection off)")
    backend = params.get("backend_store_uri") or ""
    if not backend.startswith("postgresql://"):
        problems.append(f"backend store {backend!r} is not PostgreSQL")
    elif ":" in backend.split("://", 1)[1].split("@")[0]:
        problems.append("the backend URI carries a password (use PGPASSWORD from a Secret)")
    if not (params.get("artifacts_destination") or "").startswith("s3://"):
        problems.append("artifacts do not go to S3 (--artifacts-destination s3://...)")
    if params.get("host") != "0.0.0.0":
        problems.append("--host is not 0.0.0.0: other pods cannot reach it")
    return problems


def _job_parse(kind: str, argv: list[str]) -> Any:
    """Parse a RayJob's entrypoint options with the detlab command it runs (raises SystemExit if refused)."""
    if kind == "sweep":
        from lab.sweep.command import build_parser

        return build_parser().parse_args(argv)
    from lab.cli import build_parser

    return build_parser().parse_args(["table", kind[-1], *argv])


# ---------------------------------------------------------------------------------------------
# `ray up`


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
    assert _image_problems([cfg["docker"]["image"]], ray.__version__) == []
    assert any("--disable-usage-stats" in c for c in cfg["head_start_ray_commands"])
    # one token on every node: the file is copied and every `ray start` requires token mode
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)


def test_aws_schema_check_is_live() -> None:
    """The same validation rejects an unknown key, so the test above can fail."""
    util = _ray_util()
    import jsonschema

    cfg = yaml.safe_load(AWS.read_text())
    cfg["available_node_types"]["ray.worker.gpu"]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        util.validate_config(util.prepare_config(cfg))


# ---------------------------------------------------------------------------------------------
# KubeRay manifests


def test_every_manifest_parses_and_is_namespaced() -> None:
    found = _manifests()
    kinds = sorted(d["kind"] for _, d in found)
    assert kinds == sorted(["Namespace", "PersistentVolumeClaim", "Service", "StatefulSet", "Service", "Deployment",
                            "ConfigMap", "RayCluster", "RayJob", "RayJob", "RayJob", "NetworkPolicy",
                            "NetworkPolicy"]), kinds
    for path, doc in found:
        assert _meta_problems(doc) == [], path
    yaml.safe_load(AWS.read_text())
    # kustomization: the long-lived objects, every one of them, and no RayJob (started on purpose)
    kust = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    assert all((KUBERAY / r).is_file() for r in listed)
    long_lived = {p.name for p, d in found if d["kind"] != "RayJob"}
    assert listed == long_lived and not any(p.name in listed for p, d in found if d["kind"] == "RayJob")


def test_meta_check_can_fail() -> None:
    doc = copy.deepcopy(_one(MLFLOW, "Deployment"))
    del doc["metadata"]["namespace"]
    assert any("namespace" in p for p in _meta_problems(doc))


def test_raycluster_has_what_kuberay_requires() -> None:
    doc = _one(RAYCLUSTER, "RayCluster")
    assert doc["apiVersion"] == "ray.io/v1"
    assert _raycluster_problems(doc["spec"]) == []
    spec = doc["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["autoscalerOptions"]["version"] in ("v1", "v2")
    for params in [spec["headGroupSpec"]["rayStartParams"], *(g["rayStartParams"] for g in spec["workerGroupSpecs"])]:
        assert _ray_start_problems(params) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda s: s["headGroupSpec"].pop("rayStartParams"), "headGroupSpec.rayStartParams missing"),
    (lambda s: s["workerGroupSpecs"][0].pop("maxReplicas"), "maxReplicas missing"),
    (lambda s: s.pop("rayVersion"), "rayVersion missing"),
    (lambda s: s.update(workerGroupSpec=s.pop("workerGroupSpecs")), "unknown RayCluster spec key 'workerGroupSpec'"),
    (lambda s: s["workerGroupSpecs"][0].update(replicas=9), "not minReplicas <= replicas <= maxReplicas"),
    (lambda s: s.pop("authOptions"), "token auth off"),
])
def test_raycluster_check_can_fail(mutate, expected: str) -> None:
    spec = copy.deepcopy(_one(RAYCLUSTER, "RayCluster")["spec"])
    mutate(spec)
    assert any(expected in p for p in _raycluster_problems(spec)), _raycluster_problems(spec)


def test_ray_start_params_check_can_fail() -> None:
    assert _ray_start_problems({"num-cpu": "0"}) == ["rayStartParams 'num-cpu' is not a `ray start` option"]


def test_ray_reads_the_raycluster_as_intended() -> None:
    """Ray's own KubeRay parser (what the autoscaler runs): a CPU-less head with the sweep's trial
    resource, 0..8 workers with 1 GPU (from the nvidia.com/gpu limit) and 8 CPUs each."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from lab.sweep import TRIAL_RESOURCE

    cfg = _derive_autoscaling_config_from_ray_cr(_one(RAYCLUSTER, "RayCluster"))
    types = cfg["available_node_types"]
    head = types["headgroup"]["resources"]
    assert head.get("CPU", 0) == 0 and head[TRIAL_RESOURCE] == 1000
    gpu = types["gpu-workers"]
    assert gpu["resources"]["GPU"] == 1 and gpu["resources"]["CPU"] == 8
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 8)


def test_ray_parser_check_can_fail() -> None:
    """Without the nvidia.com/gpu limit Ray would advertise no GPU: the assertion above would catch it."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    doc = copy.deepcopy(_one(RAYCLUSTER, "RayCluster"))
    res = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    for part in res.values():
        part.pop("nvidia.com/gpu")
    assert "GPU" not in _derive_autoscaling_config_from_ray_cr(doc)["available_node_types"]["gpu-workers"]["resources"]


def test_rayjobs_are_valid_for_kuberay() -> None:
    clusters = {_one(RAYCLUSTER, "RayCluster")["metadata"]["name"]}
    for name, path in RAYJOBS.items():
        doc = _one(path, "RayJob")
        assert doc["apiVersion"] == "ray.io/v1"
        assert _rayjob_problems(doc, clusters) == [], name


@pytest.mark.parametrize("mutate, expected", [
    (lambda s: s.pop("entrypoint"), "entrypoint missing"),
    (lambda s: s.pop("clusterSelector"), "exactly one of rayClusterSpec and clusterSelector"),
    (lambda s: s.update(clusterSelector={"ray.io/cluster": "other"}), "names no RayCluster"),
    (lambda s: s.update(backoffLimit=2), "backoffLimit > 0"),
    (lambda s: s.update(ttlSecondsAfterFinished=60), "needs shutdownAfterJobFinishes"),
    (lambda s: s.update(entrypointNumCPUs=1), "unknown RayJob spec key 'entrypointNumCPUs'"),
])
def test_rayjob_check_can_fail(mutate, expected: str) -> None:
    doc = copy.deepcopy(_one(RAYJOBS["table2"], "RayJob"))
    mutate(doc["spec"])
    problems = _rayjob_problems(doc, {"detlab"})
    assert any(expected in p for p in problems), problems


def test_rayjob_entrypoints_parse_with_detlab() -> None:
    """table1/table2/sweep accept their entrypoint's options; storage is S3, tracking the MLflow
    Service, and data paths lie on the volume every Ray pod mounts."""
    cluster = _one(RAYCLUSTER, "RayCluster")
    mounts = [{m["mountPath"] for m in c.get("volumeMounts", [])} for c in _ray_containers(cluster)]
    service = _one(MLFLOW, "Service", "mlflow")
    for kind, path in RAYJOBS.items():
        argv = _argv(_one(path, "RayJob"))
        assert argv[:2] == ["python", f"/app/jobs/{kind}.py"] and (ROOT / "jobs" / f"{kind}.py").is_file()
        args = _job_parse(kind, argv[2:])
        assert args.profile == "paper"
        assert args.storage.startswith("s3://"), kind
        assert args.tracking_uri == f"http://{_service_hosts(service)[2]}", kind
        for root in args.data_root:
            target = root.split("=", 1)[-1]
            assert all(any(target.startswith(m + "/") for m in ms) for ms in mounts), (kind, target)


def test_entrypoint_check_can_fail() -> None:
    argv = _argv(_one(RAYJOBS["table1"], "RayJob"))[2:]
    with pytest.raises(SystemExit):
        _job_parse("table1", [*argv, "--storage-uri", "s3://x/y"])
    with pytest.raises(SystemExit):
        _job_parse("sweep", ["--profile", "papr"])


def test_versions_agree_with_installed_ray() -> None:
    """rayVersion, every image (Ray pods, MLflow, `ray up`) and the Dockerfile's FROM: the installed Ray."""
    ray = pytest.importorskip("ray")
    assert _one(RAYCLUSTER, "RayCluster")["spec"]["rayVersion"] == ray.__version__
    images = [c["image"] for _, d in _manifests() for c in _containers(d)]
    images.append(yaml.safe_load(AWS.read_text())["docker"]["image"])
    assert len(images) >= 5 and _image_problems(images, ray.__version__) == []
    assert _dockerfile_problems(DOCKERFILE.read_text(), ray.__version__) == []
    assert _dockerfile_from(DOCKERFILE.read_text()) == [f"rayproject/ray:{ray.__version__}-{_python_tag()}-gpu"]


def test_version_checks_can_fail() -> None:
    text = DOCKERFILE.read_text()
    old = text.replace("rayproject/ray:2.60.0-", "rayproject/ray:2.59.0-")
    assert any("tag is not 2.60.0" in p for p in _dockerfile_problems(old, "2.60.0"))
    assert any("`ray`" in p for p in _dockerfile_problems(text + "\nUSER root\n", "2.60.0"))
    assert any("constraints" in p for p in _dockerfile_problems(text.replace("-c constraints.txt", ""), "2.60.0"))
    assert _image_problems(["my-registry/detlab:2.59.0-py311-gpu", "redis:7"], "2.60.0") == [
        f"my-registry/detlab:2.59.0-py311-gpu: tag is not 2.60.0-{_python_tag()}-gpu (installed Ray, venv Python)",
        "redis:7: neither the detlab image nor a known other image (['postgres:17.6'])",
    ]


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    assert _dockerignore_problems(patterns) == []
    assert "docker build -f cluster/docker/Dockerfile" in DOCKERFILE.read_text()


def test_dockerignore_check_can_fail() -> None:
    assert _dockerignore_problems(["data", "mlruns*"])[0] == ".git is sent to the docker daemon (not excluded)"
    assert "lab/execution/train.py is excluded but the image needs it" in _dockerignore_problems([".git", ".venv", "lab"])


def test_no_credentials_anywhere_under_cluster() -> None:
    """Env named like a credential comes from a Secret; no file under cluster/ holds a credential."""
    for path, doc in _manifests():
        assert _env_secret_problems(doc) == [], path
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        assert _text_secret_problems(str(path.relative_to(ROOT)), path.read_text()) == []


def test_credential_checks_can_fail() -> None:
    doc = copy.deepcopy(_one(MLFLOW, "Deployment"))
    doc["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"})
    assert _env_secret_problems(doc) == ["mlflow: env AWS_SECRET_ACCESS_KEY is not a secretKeyRef"]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"a": "b"}}
    assert _env_secret_problems(secret) == ["Secret s with values in a file"]
    job = copy.deepcopy(_one(RAYJOBS["table1"], "RayJob"))
    job["spec"]["runtimeEnvYAML"] = "env_vars: {MLFLOW_TRACKING_TOKEN: abc}"
    assert _env_secret_problems(job) == ["runtimeEnvYAML env_vars.MLFLOW_TRACKING_TOKEN: a credential as a literal"]
    leaks = ("--backend-store-uri postgresql://mlflow:hunter2hunter2@db:5432/mlflow\n"
             "AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP\npassword: 'Zx81sdfkj2349sdf'\n")
    assert [p.split(": ")[1] for p in _text_secret_problems("f", leaks)] == [
        "an AWS access key id", "a URI with a password in it", "a password/secret/token literal"]


def test_secrets_are_the_documented_ones() -> None:
    """Every Secret referenced is one cluster/README.md tells you to create; all Ray pods and the
    MLflow server get the S3 settings from detlab-s3."""
    refs = set().union(*(_secret_refs(d) for _, d in _manifests()))
    assert refs == SECRETS
    readme = (CLUSTER / "README.md").read_text()
    for s in SECRETS:
        assert re.search(rf"kubectl -n {NAMESPACE} create secret (generic|tls) {s}\b", readme), s
    server = _one(MLFLOW, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for c in [*_ray_containers(_one(RAYCLUSTER, "RayCluster")), server]:
        assert {"secretRef": {"name": "detlab-s3"}} in c.get("envFrom", []), c["name"]


@pytest.mark.medium
def test_mlflow_server_args() -> None:
    """`mlflow server` parses the Deployment's args; --allowed-hosts admits the Service names and
    the URI the jobs and Ray pods use, and rejects others; Postgres without a password in the URI; S3."""
    uris = [_opt(_argv(_one(p, "RayJob")), "--tracking-uri")[0] for p in RAYJOBS.values()]
    uris += [e["value"] for c in _ray_containers(_one(RAYCLUSTER, "RayCluster"))
             for e in c.get("env", []) if e["name"] == "MLFLOW_TRACKING_URI"]
    assert len(uris) == 5
    assert _mlflow_problems(_one(MLFLOW, "Deployment"), _one(MLFLOW, "Service", "mlflow"), uris) == []


@pytest.mark.parametrize("edit, expected", [
    (lambda a: a[: a.index("--allowed-hosts")] + a[a.index("--allowed-hosts") + 2:], "no --allowed-hosts"),
    (lambda a: [x if not x.startswith("mlflow:*") else "*" for x in a], "admits any host"),
    (lambda a: [x if not x.startswith("mlflow:*") else "localhost:*" for x in a], "refuses mlflow:5000"),
    (lambda a: [x.replace("$(DB_USER)@", "u:pw@") for x in a], "carries a password"),
    (lambda a: [*a, "--alowed-hosts", "x"], "refuses the args"),
])
@pytest.mark.medium
def test_mlflow_check_can_fail(edit, expected: str) -> None:
    dep = copy.deepcopy(_one(MLFLOW, "Deployment"))
    c = dep["spec"]["template"]["spec"]["containers"][0]
    c["args"] = edit(c["args"])
    problems = _mlflow_problems(dep, _one(MLFLOW, "Service", "mlflow"), [])
    assert any(expected in p for p in problems), problems


def test_heads_declare_the_sweep_trial_resource() -> None:
    """Sweep trial drivers with Train workers reserve lab.sweep.TRIAL_RESOURCE, not a CPU: both
    cluster configs put it on the CPU-less head (KubeRay's quoted string read by Ray's own parser)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    from lab.sweep import TRIAL_RESOURCE

    head = yaml.safe_load(AWS.read_text())["available_node_types"]["ray.head.default"]
    assert head["resources"]["CPU"] == 0 and head["resources"][TRIAL_RESOURCE] >= 100
    params = _one(RAYCLUSTER, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]
    assert _get_custom_resources({}, params, "headgroup") == {TRIAL_RESOURCE: 1000}


def test_aws_mlflow_server_sets_allowed_hosts():
    """The head's MLflow server names the Host headers it accepts (DNS-rebinding guard) explicitly."""
    cfg = yaml.safe_load(AWS.read_text())
    (cmd,) = [c for c in cfg["head_setup_commands"] if "mlflow server" in c]
    args = shlex.split(cmd.split("nohup", 1)[1].split(">", 1)[0])
    hosts = args[args.index("--allowed-hosts") + 1].split(",")
    assert "localhost:5000" in hosts and any("hostname -I" in h for h in hosts), hosts


# ---------------------------------------------------------------------------------------------
# Hardening (issue #17, findings 14 and 9): pod security, network policies, digests, TLS to the
# database, MLflow basic auth. Each check has a companion that breaks a copy and sees it refused.


def _container_security_problems(name: str, sc: dict[str, Any], pod_sc: dict[str, Any]) -> list[str]:
    """A container's effective securityContext (its own, else the pod's where Kubernetes inherits)."""
    caps = sc.get("capabilities") or {}
    problems = []
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: allowPrivilegeEscalation is not false")
    if "ALL" not in (caps.get("drop") or []):
        problems.append(f"{name}: capabilities.drop does not hold ALL")
    if caps.get("add") or sc.get("privileged"):
        problems.append(f"{name}: adds capabilities or is privileged")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{name}: root filesystem writable (readOnlyRootFilesystem is not true)")
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        problems.append(f"{name}: runAsNonRoot is not true")
    # numeric: the kubelet cannot check runAsNonRoot against an image's USER given by name (`ray`)
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if not isinstance(uid, int) or uid == 0:
        problems.append(f"{name}: runAsUser {uid!r} is not a numeric non-root uid")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{name}: no seccomp profile (RuntimeDefault)")
    return problems


def _pod_security_problems(doc: dict[str, Any]) -> list[str]:
    """Every pod: no service-account token, and each container (init ones too) locked down. The
    RayCluster's autoscaler (a container KubeRay adds to the head) gets the token, alone."""
    problems = []
    kind, name = doc["kind"], doc["metadata"]["name"]
    for pod in _pod_specs(doc):
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{kind} {name}: a pod mounts a service-account token (automountServiceAccountToken)")
        pod_sc = pod.get("securityContext") or {}
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            problems += _container_security_problems(f"{kind} {name}/{c['name']}", c.get("securityContext") or {},
                                                     pod_sc)
            if any(m["mountPath"].rstrip("/") == "/app" for m in c.get("volumeMounts", [])):
                problems.append(f"{kind} {name}/{c['name']}: a writable volume over /app")
    if kind == "RayCluster" and doc["spec"].get("enableInTreeAutoscaling"):
        head = doc["spec"]["headGroupSpec"]["template"]["spec"]
        opts = doc["spec"].get("autoscalerOptions") or {}
        problems += _container_security_problems(f"{kind} {name}/autoscaler", opts.get("securityContext") or {},
                                                 head.get("securityContext") or {})
        tokens = {v["name"] for v in head.get("volumes", [])
                  if any("serviceAccountToken" in s for s in (v.get("projected") or {}).get("sources", []))}
        mounted = {m["name"]: m["mountPath"] for m in opts.get("volumeMounts", [])}
        if not any(mounted.get(t) == "/var/run/secrets/kubernetes.io/serviceaccount" for t in tokens):
            problems.append(f"{kind} {name}: the autoscaler gets no service-account token (it cannot scale)")
        for c in head["containers"]:
            if tokens & {m["name"] for m in c.get("volumeMounts", [])}:
                problems.append(f"{kind} {name}/{c['name']}: mounts the autoscaler's token (jobs run there)")
    return problems


def test_every_pod_is_locked_down() -> None:
    for path, doc in _manifests():
        assert _pod_security_problems(doc) == [], path


@pytest.mark.parametrize("path, kind, edit, expected", [
    (MLFLOW, "Deployment", lambda d: d["spec"]["template"]["spec"].pop("automountServiceAccountToken"),
     "mounts a service-account token"),
    (MLFLOW, "StatefulSet", lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].pop(
        "readOnlyRootFilesystem"), "root filesystem writable"),
    (MLFLOW, "StatefulSet", lambda d: d["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0),
     "runAsUser 0 is not a numeric non-root uid"),
    (MLFLOW, "Deployment", lambda d: d["spec"]["template"]["spec"]["initContainers"][0].pop("securityContext"),
     "wait-for-postgres: allowPrivilegeEscalation"),
    (RAYCLUSTER, "RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["securityContext"].pop(
        "seccompProfile"), "no seccomp profile"),
    (RAYCLUSTER, "RayCluster", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "securityContext"]["capabilities"].update(drop=["NET_RAW"]), "capabilities.drop does not hold ALL"),
    (RAYCLUSTER, "RayCluster", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "volumeMounts"].append({"name": "autoscaler-token", "mountPath": "/t"}), "mounts the autoscaler's token"),
    (RAYCLUSTER, "RayCluster", lambda d: d["spec"]["autoscalerOptions"].pop("volumeMounts"),
     "the autoscaler gets no service-account token"),
    (RAYCLUSTER, "RayCluster", lambda d: d["spec"]["autoscalerOptions"]["securityContext"].update(privileged=True),
     "autoscaler: adds capabilities or is privileged"),
    (RAYJOBS["table1"], "RayJob", lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0][
        "volumeMounts"].append({"name": "tmp", "mountPath": "/app"}), "a writable volume over /app"),
])
def test_pod_security_check_can_fail(path: Path, kind: str, edit, expected: str) -> None:
    doc = copy.deepcopy(_one(path, kind))
    edit(doc)
    problems = _pod_security_problems(doc)
    assert any(expected in p for p in problems), problems


def _ray_pod_labels(raycluster: dict[str, Any]) -> list[dict[str, str]]:
    """The labels KubeRay gives the Ray pods (ray.io/cluster = the RayCluster's name) plus the templates' own."""
    spec = raycluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [{**(g["template"].get("metadata") or {}).get("labels", {}), "ray.io/cluster": raycluster["metadata"]["name"]}
            for g in groups]


def _admits(policies: list[dict[str, Any]], target: dict[str, str], client: dict[str, str], port: int) -> bool:
    """NetworkPolicy ingress semantics (same namespace, matchLabels, TCP ports): is a connection from
    a pod labelled ``client`` to one labelled ``target`` on ``port`` allowed?"""
    def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        if set(selector) - {"matchLabels"}:
            raise AssertionError(f"selector {selector}: only matchLabels is understood here")
        return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())

    isolating = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], target)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not isolating:
        return True  # no policy selects the pod: everything may connect
    for spec in isolating:
        for rule in spec.get("ingress") or []:
            peers = rule.get("from")
            ports = rule.get("ports")
            peer_ok = peers is None or any("podSelector" in f and set(f) == {"podSelector"}
                                           and selects(f["podSelector"], client) for f in peers)
            port_ok = ports is None or any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports)
            if peer_ok and port_ok:
                return True
    return False


def _network_policy_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Only the MLflow pods reach Postgres; only the Ray pods reach MLflow; nothing else reaches either."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = {(d["kind"], d["metadata"]["name"]): d["spec"]["template"]["metadata"]["labels"]
              for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    postgres, mlflow = labels[("StatefulSet", "mlflow-postgres")], labels[("Deployment", "mlflow")]
    ray = [lbl for d in docs if d["kind"] == "RayCluster" for lbl in _ray_pod_labels(d)]
    stranger = {"app": "something-else"}
    problems = []
    if not _admits(policies, postgres, mlflow, 5432):
        problems.append("the MLflow server cannot reach Postgres")
    problems += [f"{who} may reach Postgres" for who, lbl in (("a Ray pod", ray[0]), ("any pod", stranger))
                 if _admits(policies, postgres, lbl, 5432)]
    problems += [f"the Ray pod {lbl} cannot reach MLflow" for lbl in ray if not _admits(policies, mlflow, lbl, 5000)]
    if _admits(policies, mlflow, stranger, 5000):
        problems.append("any pod may reach MLflow")
    return problems


def test_network_policies_fence_mlflow_and_postgres() -> None:
    docs = [d for _, d in _manifests()]
    assert _network_policy_problems(docs) == []


@pytest.mark.parametrize("edit, expected", [
    (lambda ps: ps.pop(0), "a Ray pod may reach Postgres"),  # no policy on Postgres: open to all
    (lambda ps: ps[1]["spec"]["ingress"][0].pop("from"), "any pod may reach MLflow"),
    (lambda ps: ps[0]["spec"]["ingress"][0]["ports"][0].update(port=5433), "the MLflow server cannot reach Postgres"),
    (lambda ps: ps[1]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"].update(
        {"ray.io/node-type": "head"}), "cannot reach MLflow"),
])
def test_network_policy_check_can_fail(edit, expected: str) -> None:
    docs = copy.deepcopy([d for _, d in _manifests()])
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    others = [d for d in docs if d["kind"] != "NetworkPolicy"]
    edit(policies)
    problems = _network_policy_problems(others + policies)
    assert any(expected in p for p in problems), problems


def _digest_problems(images: list[str]) -> list[str]:
    problems = [f"{i}: not pinned by digest (name:tag@sha256:...)" for i in images if not PINNED_IMAGE.match(i)]
    for image in images:
        repo, _, tag = image.split("@", 1)[0].rpartition(":")
        if not repo.endswith("/detlab") and not re.fullmatch(r"\d+\.\d+(\.\d+)?([-.].*)?", tag):
            problems.append(f"{image}: tag {tag!r} floats (give the full version)")
    return problems


def test_every_kubernetes_image_is_pinned_by_digest() -> None:
    images = [c["image"] for _, d in _manifests() for c in _containers(d)]
    assert len(images) >= 7 and _digest_problems(images) == []


def test_digest_check_can_fail() -> None:
    assert _digest_problems(["postgres:17", "my-registry/detlab:2.60.0-py311-gpu", "postgres:17@sha256:" + "a" * 64]) == [
        "postgres:17: not pinned by digest (name:tag@sha256:...)",
        "my-registry/detlab:2.60.0-py311-gpu: not pinned by digest (name:tag@sha256:...)",
        "postgres:17: tag '17' floats (give the full version)",
        f"postgres:17@sha256:{'a' * 64}: tag '17' floats (give the full version)",
    ]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _mounted_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume ``path`` lies on in ``container`` (None: not on a mounted volume)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            return volumes.get(m["name"])
    return None


def _db_tls_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Postgres serves TLS from a Secret; both URIs of the MLflow server demand a verified certificate."""
    import configparser

    problems = []
    pg_pod = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    pg = pg_pod["containers"][0]
    args = " ".join(pg.get("args", []))
    if "ssl=on" not in args:
        problems.append("Postgres runs without ssl=on")
    for setting in ("ssl_cert_file", "ssl_key_file"):
        found = re.search(rf"{setting}=(\S+)", args)
        volume = _mounted_file(pg_pod, pg, found[1]) if found else None
        if volume is None or "secret" not in volume:
            problems.append(f"Postgres {setting} is not a file of a mounted Secret")
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    pod = dep["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "mlflow")
    backend = c["args"][c["args"].index("--backend-store-uri") + 1]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    ini = configparser.ConfigParser()
    ini.read_string(next(iter(config["data"].values())))
    for what, uri in (("backend store", backend), ("basic-auth database", ini["mlflow"].get("database_uri", ""))):
        if not re.search(r"[?&]sslmode=verify-(full|ca)\b", uri):
            problems.append(f"the {what} URI {uri!r} does not require a verified TLS connection (sslmode=verify-full)")
    root = _env(c).get("PGSSLROOTCERT")
    if not isinstance(root, str) or _mounted_file(pod, c, root) is None:
        problems.append("PGSSLROOTCERT is not a file of a mounted volume (libpq cannot verify the server)")
    return problems


def test_mlflow_reaches_postgres_over_verified_tls() -> None:
    assert _db_tls_problems(_docs(MLFLOW)) == []


@pytest.mark.parametrize("edit, expected", [
    (lambda ds: ds[1]["spec"]["template"]["spec"]["containers"][0].update(args=[]), "ssl=on"),
    (lambda ds: ds[4]["spec"]["template"]["spec"]["containers"][0]["args"].__setitem__(
        1, "postgresql://$(DB_USER)@mlflow-postgres:5432/mlflow?sslmode=require"), "backend store URI"),
    (lambda ds: ds[3]["data"].update({"basic_auth.ini": "[mlflow]\ndatabase_uri = postgresql://h/mlflow\n"}),
     "basic-auth database URI"),
    (lambda ds: ds[4]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"].pop(1), "PGSSLROOTCERT"),
])
def test_db_tls_check_can_fail(edit, expected: str) -> None:
    docs = copy.deepcopy(_docs(MLFLOW))
    assert [d["kind"] for d in docs] == ["Service", "StatefulSet", "Service", "ConfigMap", "Deployment"]
    edit(docs)
    problems = _db_tls_problems(docs)
    assert any(expected in p for p in problems), problems


def _mlflow_auth_problems(docs: list[dict[str, Any]]) -> list[str]:
    """The server runs MLflow's basic-auth app with its secrets from a Secret and its users in
    Postgres; the Ray containers log in as the admin from the same Secret keys."""
    import configparser

    from mlflow.cli import server

    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    pod = dep["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "mlflow")
    problems = []
    if server.make_context("server", list(c["args"])).params.get("app_name") != "basic-auth":
        problems.append("the MLflow server runs without --app-name basic-auth (anyone may write runs and tags)")
    env = _env(c)
    refs = {}
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        ref = (env.get(name) or {}).get("secretKeyRef") if isinstance(env.get(name), dict) else None
        if not ref:
            problems.append(f"{name} does not come from a Secret")
        refs[name] = (ref or {}).get("name"), (ref or {}).get("key")
    config_path = env.get("MLFLOW_AUTH_CONFIG_PATH")
    volume = _mounted_file(pod, c, config_path) if isinstance(config_path, str) else None
    if volume is None or "configMap" not in volume:
        problems.append("MLFLOW_AUTH_CONFIG_PATH is not a file of a mounted ConfigMap")
    else:
        config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
        ini = configparser.ConfigParser()
        ini.read_string(config["data"][Path(config_path).name])
        section = ini["mlflow"]
        if section.get("default_permission") != "NO_PERMISSIONS":
            problems.append(f"default_permission {section.get('default_permission')!r}: users see runs unless granted")
        db = section.get("database_uri", "")
        if not db.startswith("postgresql://"):
            problems.append(f"the users live in {db!r}, lost with the pod (not Postgres)")
        if "@" in db.split("://", 1)[-1].split("/", 1)[0] or section.get("admin_password"):
            problems.append("a user or password in the basic-auth config (it is not a Secret)")
    for ray in (c for d in docs if d["kind"] == "RayCluster" for c in _ray_containers(d)):
        renv = _env(ray)
        for var, admin in (("MLFLOW_TRACKING_USERNAME", "MLFLOW_AUTH_ADMIN_USERNAME"),
                           ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD")):
            ref = (renv.get(var) or {}).get("secretKeyRef") if isinstance(renv.get(var), dict) else None
            if not ref or (ref["name"], ref["key"]) != refs[admin]:
                problems.append(f"{ray['name']}: {var} is not the server's {admin} Secret key")
    return problems


def test_mlflow_requires_basic_auth_and_the_ray_pods_have_it() -> None:
    assert _mlflow_auth_problems(_docs(MLFLOW) + _docs(RAYCLUSTER)) == []


@pytest.mark.parametrize("edit, expected", [
    (lambda ds: ds[4]["spec"]["template"]["spec"]["containers"][0]["args"].__setitem__(
        slice(-4, -2), []), "without --app-name basic-auth"),
    (lambda ds: ds[4]["spec"]["template"]["spec"]["containers"][0]["env"].__setitem__(
        6, {"name": "MLFLOW_AUTH_ADMIN_PASSWORD", "value": "x"}), "MLFLOW_AUTH_ADMIN_PASSWORD does not come from"),
    (lambda ds: ds[3]["data"].update({"basic_auth.ini": ds[3]["data"]["basic_auth.ini"].replace(
        "NO_PERMISSIONS", "READ")}), "default_permission 'READ'"),
    (lambda ds: ds[3]["data"].update({"basic_auth.ini": ds[3]["data"]["basic_auth.ini"].replace(
        "postgresql://mlflow-postgres", "sqlite:///basic_auth.db#")}), "lost with the pod"),
    (lambda ds: ds[5]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"].pop(2),
     "ray-worker: MLFLOW_TRACKING_PASSWORD"),
])
def test_mlflow_auth_check_can_fail(edit, expected: str) -> None:
    docs = copy.deepcopy(_docs(MLFLOW) + _docs(RAYCLUSTER))
    env = [e["name"] for e in docs[4]["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert env[6] == "MLFLOW_AUTH_ADMIN_PASSWORD" and docs[4]["spec"]["template"]["spec"]["containers"][0][
        "args"][-4:-2] == ["--app-name", "basic-auth"]
    edit(docs)
    problems = _mlflow_auth_problems(docs)
    assert any(expected in p for p in problems), problems
