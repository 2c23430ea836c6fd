"""The ``s3`` tests' bucket on the loopback S3 server (``s3_server``, in tests/conftest.py).

``s3_server`` (session, tests/conftest.py): starts the server on 127.0.0.1 on a free port and **sets fake
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

import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import S3Server


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
