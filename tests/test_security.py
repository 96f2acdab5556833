"""Security (issue #11): secrets never logged, services on 127.0.0.1, Ray token auth on.

A real ``detlab train`` (one Train worker, so Ray's own processes and the runtime_env path are
real) runs with fake credentials in its environment and a tracking URI that carries a password
in its query; then every place detlab writes to is searched for the fake values: the console,
MLflow params, tags and text artifacts. Ray's own processes must listen on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lab.settings import scrub
from lab.records import tracking

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402

BIN = Path(sys.executable).parent
FAKE_SECRET = "FAKEsecretKEY0123456789abcdefFAKE"
FAKE_KEY_ID = "AKIAFAKEFAKEFAKE1234"
FAKE_PASSWORD = "hunter2-FAKE-pw"


def test_scrub_masks_secret_keys_url_passwords_and_key_ids():
    data = {"AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "nested": {"api_key": "x", "keys": [1, 2]},
            "MLFLOW_TRACKING_URI": f"http://bob:{FAKE_PASSWORD}@mlflow:5000", "note": f"id {FAKE_KEY_ID} here",
            "url": "https://host/x?token=abc&b=1", "model.weights": "/w/model.pt", "num_keys": 3}
    out = scrub.scrub_mapping(data)
    assert out["AWS_SECRET_ACCESS_KEY"] == scrub.MASK and out["nested"] == {"api_key": scrub.MASK, "keys": [1, 2]}
    assert out["MLFLOW_TRACKING_URI"] == "http://bob:***@mlflow:5000"
    assert out["note"] == "id *** here" and out["url"] == "https://host/x?token=***&b=1"
    assert out["model.weights"] == "/w/model.pt" and out["num_keys"] == 3  # not secrets: untouched
    assert data["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET  # the input is not changed


def _dashboard_refuses_without_token(out: str) -> int | None:
    """HTTP status of the job list asked without Ray's token (token auth on: 401/403)."""
    import urllib.error
    import urllib.request

    m = re.search(r"detlab: Ray dashboard (http://\S+)", out)
    if not m:
        return None
    try:
        urllib.request.urlopen(f"{m[1]}/api/jobs/", timeout=10).close()
        return 200
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
@pytest.mark.heavy
def test_no_secret_reaches_logs_params_or_artifacts_and_ray_listens_on_localhost(tmp_path):
    mark = uuid.uuid4().hex
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "DETLAB_TEST_MARK": mark, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1",
           "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
           "MLFLOW_TRACKING_PASSWORD": FAKE_PASSWORD, "MLFLOW_TRACKING_USERNAME": "bob",
           # hold the cell after its first epoch so the test can look at Ray's sockets meanwhile
           "DETLAB_FAULT": "pause_after_epoch:0:15", "DETLAB_FAULT_FILE": str(tmp_path / "paused")}
    cmd = [str(BIN / "detlab"), "train", "--profile", "smoke", "--workers", "1", "--out", str(tmp_path / "out"),
           "--tracking-uri", uri, "--set", "train.system_metrics_s=0",
           # a secret in a config value: a path with a token query, as a presigned URL would carry
           "--set", f"eval.test_dev_split=val?token={FAKE_SECRET}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    listening: set = set()
    lines: list[str] = []
    refused = None
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if "paused after epoch" in line and not listening:
            listening = procs.listening(procs.marked(mark))
            refused = _dashboard_refuses_without_token("".join(lines))
    proc.wait()
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]

    secrets = (FAKE_SECRET, FAKE_KEY_ID, FAKE_PASSWORD)
    assert "runtime_env env_vars:" in out and "AWS_SECRET_ACCESS_KEY=***" in out  # printed, masked
    assert not [s for s in secrets if s in out], "a secret reached the console"
    client = MlflowClient(uri)
    (run,) = [r for r in tracking.search_all_runs(uri, "detlab-train")]
    logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
    assert "eval.test_dev_split" in run.data.params and "token=***" in run.data.params["eval.test_dev_split"]
    texts = []
    for f in client.list_artifacts(run.info.run_id, "config"):
        texts.append(Path(client.download_artifacts(run.info.run_id, f.path, str(tmp_path))).read_text())
    assert texts and "token=***" in texts[0]
    assert not [s for s in secrets if s in logged + " ".join(texts)], "a secret reached MLflow"

    # What listens while a cell runs. The dashboard (HTTP, job submission) is on 127.0.0.1; Ray
    # 2.60's core gRPC servers (GCS, raylet, workers) bind every interface whatever the node IP,
    # and token auth is what guards them (it must stay on).
    assert listening, "no listening socket found while the cell ran"
    port = int(re.search(r"detlab: Ray dashboard http://127\.0\.0\.1:(\d+)", out)[1])
    assert {ip for ip, p, _ in listening if p == port} == {"127.0.0.1"}, sorted(listening)
    exposed = sorted({x for x in listening if x[0] not in ("127.0.0.1", "::1")})
    print(f"listening beyond localhost while a cell ran (Ray core, token-guarded): {len(exposed)} sockets, "
          f"processes {sorted({x[2] for x in exposed})}")
    assert refused in (401, 403), f"the dashboard answered a client without the token: {refused}"
