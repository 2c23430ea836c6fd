"""Shared fixtures. Tiers: tests/unit (no Ray), tests/ray (one local Ray cluster per
session), tests/s3 (a moto S3 server on loopback), tests/jobs (ray start --head + ray job
submit), tests/gpu (skipped without CUDA)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bert4rec.config import StorageConfig

# small enough to train in seconds on 2 CPU cores, big enough to beat popularity clearly
# no rating embedding (the default takes one when the data has ratings, as the synthetic data
# does): the scoring tests compare against the model called on item tokens alone
TINY_MODEL = {"max_len": 30, "hidden": 32, "layers": 2, "heads": 2, "dropout": 0.1, "attn_dropout": 0.1, "use_ratings": False}
# epochs of whole passes (epoch_sequences none) and the latest max_len items only (no windows), so that
# the tests' epochs and sequence counts follow from the table
TINY_TRAIN = {"batch_size": 32, "lr": 0.003, "samples_per_epoch": 8, "epoch_sequences": None, "window_stride": None, "warmup_epochs": 0.5, "cpus_per_worker": 0.5}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        # Ray workers keep the environment of ray.init: the s3 tier's fake credentials
        # (tests/s3/conftest.py) reach them only if set before it. Give the workers -- not
        # this process -- fake ones where none are set, so tests on the loopback S3 server work
        # whichever fixture started first (moto does not check them).
        fake_aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        env_vars = {k: v for k, v in fake_aws.items() if k not in os.environ}
        if "AWS_ACCESS_KEY_ID" in os.environ:  # keep a key and its secret together
            env_vars.pop("AWS_SECRET_ACCESS_KEY", None)
        ray.init(
            num_cpus=2,
            object_store_memory=2 * 1024**3,
            include_dashboard=False,
            logging_level="WARNING",
            runtime_env={"env_vars": env_vars} if env_vars else None,
        )
    yield ray


@pytest.fixture(scope="session")
def synthetic_data(ray_session, tmp_path_factory):
    """A generated interactions table and what `prepare` (a Ray Data pipeline) makes of it."""
    from bert4rec.config import PrepareConfig
    from bert4rec.prepare import prepare
    from bert4rec.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    raw, prepared = str(root / "raw"), str(root / "prepared")
    generate(raw, users=600, items=200, seed=0, mean_length=25)
    prepare(PrepareConfig(interactions=raw, out=prepared))
    return {"raw": raw, "prepared": prepared, "histories": str(root / "prepared" / "histories")}


@pytest.fixture(scope="session")
def trained_run(ray_session, synthetic_data, tmp_path_factory):
    """A short 2-worker training run on the synthetic data, shared by the scoring tests."""
    from bert4rec.config import TrainConfig
    from bert4rec.train import train

    out = str(tmp_path_factory.mktemp("train") / "run")
    # 4 epochs of 16 masked copies of each history: per-epoch overhead, not compute, is what costs here
    cfg = TrainConfig(data=synthetic_data["prepared"], out=out, epochs=4, workers=2, model=TINY_MODEL, **{**TINY_TRAIN, "samples_per_epoch": 16})
    summary = train(cfg)
    return {"out": out, "summary": summary, "config": cfg}


def snapshot(root: str) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def prepare_in_process(raw: str, out: str, **settings) -> dict:
    """What ``prepare`` writes, made in this process from the single-process builder (the
    reference the Ray pipeline is tested against): for unit tests that need prepared data
    without a Ray cluster. One histories file, vocab.parquet, stats.json."""
    import json

    import pyarrow.parquet as pq

    from bert4rec.data import build_histories, build_vocab
    from bert4rec.prepare import read_interactions

    histories, stats = build_histories(read_interactions(raw), **settings)
    os.makedirs(os.path.join(out, "histories"), exist_ok=True)
    pq.write_table(histories, os.path.join(out, "histories", "part-00000.parquet"))
    pq.write_table(build_vocab(histories), os.path.join(out, "vocab.parquet"))
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(stats, f)
    return stats


def write_table(path: str, table) -> str:
    """Writes ``table`` as Parquet at ``path`` (its folder made); returns the path."""
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)
    return path


def cli_result(capsys, argv: list[str]) -> tuple[int, str]:
    """``bert4rec <argv>`` in this process: (exit code, stripped stderr)."""
    from bert4rec.cli import main

    code = main(argv)
    return code, capsys.readouterr().err.strip()


# ---------------------------------------------------------------- S3 on loopback

REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    region: str
    storage: StorageConfig

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)

    def upload_dir(self, local: str, uri: str) -> None:
        """Every file under ``local`` to ``uri`` (``s3://bucket/prefix``), same relative keys."""
        client = self.client()
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        for dirpath, _, names in os.walk(local):
            for name in names:
                path = os.path.join(dirpath, name)
                client.upload_file(path, bucket, f"{prefix}/{os.path.relpath(path, local)}")

    def keys(self, uri: str) -> list[str]:
        """Every key under ``uri``, relative to it."""
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"][len(prefix) :] for page in pages for o in page.get("Contents", []))


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
