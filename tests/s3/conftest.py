"""A real S3-compatible server on loopback (moto's ThreadedMotoServer) for the ``s3`` tests.

``s3_server`` (session): starts the server on 127.0.0.1 on a free port and **sets fake
credentials in ``os.environ``** (``AWS_ACCESS_KEY_ID=testing``, ``AWS_SECRET_ACCESS_KEY=testing``,
``AWS_DEFAULT_REGION=us-east-1``; any ``AWS_PROFILE``/``AWS_SESSION_TOKEN`` is removed, and
127.0.0.1 is added to ``NO_PROXY``) for the whole session, restoring the previous values at
the end. Processes started afterwards -- Ray workers after ``ray.init``, ``subprocess`` --
inherit these, so they can reach the server too (the server runs inside the pytest process:
keep it alive while they work). Code under test is pointed at the server with
``s3_server.storage`` (a ``StorageConfig``); ``s3_server.client()`` is a boto3 client for it.

``s3_bucket`` (function): a fresh, empty bucket; yields its URI ``s3://<name>``. Emptied and
deleted afterwards.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bert4rec.config import StorageConfig

REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    region: str
    storage: StorageConfig

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", REGION)
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.delenv(var, raising=False)
        for var in ("NO_PROXY", "no_proxy"):
            env.setenv(var, ",".join(v for v in (os.environ.get(var), "127.0.0.1,localhost") if v))

        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            yield S3Server(endpoint_url=endpoint, region=REGION, storage=StorageConfig(endpoint_url=endpoint, region=REGION))
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    client = s3_server.client()
    name = f"test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys})
    client.delete_bucket(Bucket=name)
