"""A local S3-compatible server for tests: moto's server mode in a child process on loopback.

S3 is a third-party cloud: the tests talk to it over real HTTP with delta-rs' own object-store client (and
boto3 to create buckets). moto runs in a child process because in-process it deadlocks with delta-rs calls
that hold the GIL. ``python -m tests.support.s3 READY_FILE`` is the child's entry point.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest

from depin_core.proc.server import ServerProcess

REPO = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
ACCESS_KEY = "depin-test-key"
SECRET_KEY = "depin-test-secret"  # moto accepts any credentials; these only have to be present


class S3Server(ServerProcess):
    """moto's S3 on 127.0.0.1 (or ``host``; a free port); ``storage_options`` reach it from
    delta-rs/pyarrow/polars."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__("moto s3", startup_timeout=60)
        self.host = host

    def start(self) -> Self:
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self._launch(
            [sys.executable, "-m", "tests.support.s3", str(self.ready_path), self.host],
            {"PYTHONPATH": path},
            [],
        )
        return self

    @property
    def storage_options(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ALLOW_HTTP": "true",
        }

    @property
    def env(self) -> dict[str, str]:
        """The same settings as ``DEPIN_DATASET_*`` variables (for child processes and the CLI)."""
        return {
            "DEPIN_DATASET_S3_ENDPOINT_URL": self.url,
            "DEPIN_DATASET_S3_REGION": REGION,
            "DEPIN_DATASET_S3_ACCESS_KEY_ID": ACCESS_KEY,
            "DEPIN_DATASET_S3_SECRET_ACCESS_KEY": SECRET_KEY,
            "DEPIN_DATASET_S3_ALLOW_HTTP": "true",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def new_bucket(self) -> str:
        """Create a fresh bucket and return its name."""
        name = f"depin-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (paginated)."""
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the test session (each test takes its own bucket)."""
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_table_uri(s3_server: S3Server) -> str:
    """A fresh ``s3://bucket/telemetry`` URI on the test server."""
    return f"s3://{s3_server.new_bucket()}/telemetry"


def _serve(ready: Path, host: str) -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": f"http://{host}:{port}"}))
    tmp.replace(ready)
    stop.wait()
    server.stop()


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1")
