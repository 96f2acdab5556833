"""A local S3-compatible server for tests: moto's server on 127.0.0.1, run as a subprocess in its
own session (``.venv/bin/moto_server``), so Ray workers and an ``mlflow server`` started by the
tests reach it too. Start it under ``flock /tmp/detlab-ray.lock`` like every other server.

    with moto_s3() as s3:            # sets AWS_ENDPOINT_URL + dummy credentials in os.environ
        s3.create_bucket("detlab")
        ... s3.keys("detlab", "prefix/")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
#: what a client needs to reach the server (dummy credentials: moto accepts any)
AWS_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3(set_env: bool = True, log: Path | None = None) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1; with ``set_env`` its endpoint and dummy credentials are put in
    ``os.environ`` for the duration (and restored after)."""
    port = _free_port()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{port}", proc)
    saved = {k: os.environ.get(k) for k in AWS_KEYS}
    try:
        deadline = time.time() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}")
            try:
                with closing(urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=2)):
                    break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError("moto_server did not answer in 30 s") from None
                time.sleep(0.2)
        if set_env:
            os.environ.update(server.env)
        yield server
    finally:
        if set_env:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()
