"""The nightly job on a cluster of three nodes: a head and two worker nodes on loopback
(``ray start --head`` + two ``ray start --address``, 1 CPU each, see ``tests/raycluster.py``),
data and tables on a loopback S3 server (moto) that every node reaches.

What a single-node cluster cannot show: the training workers and the scoring actors run on
different nodes, so the training data, the checkpoints and the scored blocks cross nodes
through the object store and S3; and a local ``out`` is refused before any work.

Module time: the cluster's start (26 s at load average ~20 on 2 cores), one refused job (16 s),
one nightly job of one epoch (most of the module: it took minutes at load average 30-60, with
two epochs; it is the tier's only training and scoring).
"""

from __future__ import annotations

import os
import re
import time
import uuid

import numpy as np
import pytest
import yaml

from bert4rec.latest import read_latest
from bert4rec.publish import read_manifest, read_table
from tests.conftest import TINY_MODEL, TINY_TRAIN
from tests.raycluster import RayCluster, start_cluster, stop_cluster

pytestmark = pytest.mark.cluster

DATE = "2026-11-01"
USERS, ITEMS = 300, 100
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(s3_server) -> dict:
    """A bucket on the loopback S3 server (tests/conftest.py, which also puts fake credentials
    in this process's environment; the cluster gets them through its own)."""
    bucket = f"s3://cluster-{uuid.uuid4().hex[:12]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket[5:])
    return {"storage": s3_server.storage, "bucket": bucket, "client": client}


@pytest.fixture(scope="module")
def cluster(s3) -> RayCluster:
    node = {"num_cpus": 1, "object_store": 256 * 1024**2}
    started = start_cluster(
        head_cpus=1,
        head_object_store=256 * 1024**2,
        workers=[{**node, "resources": {"node_a": 1}}, {**node, "resources": {"node_b": 1}}],
        # the nodes' processes (raylets -> workers, job drivers) reach the loopback S3 with these
        env_vars={
            **FAKE_AWS,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            # a Ray Data actor pool starts all its actors before its input flows, so that both
            # scoring actors get batches (by default the first one ready may score them all)
            "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300",
        },
        prefix="b4r-cl-",
    )
    try:
        yield started
    finally:
        stop_cluster(started)


@pytest.fixture(scope="module")
def config(s3, tmp_path_factory) -> dict:
    """Interactions on S3 and the nightly YAML: two 1-CPU training workers, two 1-CPU scoring
    actors -- on 1-CPU nodes, no two of them fit on one node."""
    from bert4rec.synthetic import generate

    bucket, storage = s3["bucket"], s3["storage"]
    generate(f"{bucket}/interactions/dt={DATE}", users=USERS, items=ITEMS, seed=0, mean_length=20, storage=storage)
    config = {
        "interactions": f"{bucket}/interactions",
        "out": f"{bucket}/recs",
        "storage": storage.model_dump(exclude_none=True),
        "prepare": {"max_len": TINY_MODEL["max_len"]},
        "train": {"epochs": 1, "workers": 2, **TINY_TRAIN, "cpus_per_worker": 1, "samples_per_epoch": 1, "model": TINY_MODEL},
        "gate": {"min_ndcg": 0.0, "max_drop": 1.0},
        "score": {"k": 10, "batch_size": 16, "actors": 2, "cpus_per_actor": 1, "threads_per_actor": 1},
    }
    path = tmp_path_factory.mktemp("cluster") / "nightly.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"yaml": str(path), "config": config}


def job_failure(cluster: RayCluster, sid: str, result) -> str:
    return f"job {sid}: rc {result.returncode}\n--- submit stderr\n{result.stderr[-3000:]}\n--- job log\n{cluster.logs(sid)[-8000:]}"


def test_a_local_out_is_refused_on_the_multi_node_cluster(cluster, s3, config, tmp_path):
    out = str(tmp_path / "recs")
    sid, result = cluster.submit(["jobs/nightly.py", "--config", config["yaml"], "--date", DATE, "--out", out])
    info = cluster.info(sid)
    assert info["status"] == "FAILED" and result.returncode != 0, job_failure(cluster, sid, result)
    assert "exit code 2" in (info["message"] or ""), info["message"]
    logs = cluster.logs(sid)
    expected = f"bert4rec nightly: error: out is a local path ({out}) on a Ray cluster of 3 nodes, where it exists on one node only: use shared storage (s3://)"
    assert expected in logs, logs[-4000:]
    # before any work: nothing written locally or on S3 (no lock, no work dir), and the job
    # started no actor but the CLI's progress board
    assert not os.path.exists(out)
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=s3["bucket"][5:]).get("Contents", [])]
    assert keys and all(k.startswith("interactions/") for k in keys), keys
    assert {a["class_name"] for a in cluster.actors() if a["job_id"] == info["job_id"]} <= {"_Board"}


def test_the_nightly_job_trains_and_scores_across_nodes_and_publishes(cluster, s3, config):
    # the nightly job with batches that take 0.25 s, as real ones do (tests/jobs/faulty_nightly.py)
    sid, result = cluster.submit(["tests/jobs/faulty_nightly.py", "--config", config["yaml"], "--date", DATE, "--min-batch-s", "0.25"], submission_id=f"nightly-{DATE}-multinode")
    assert result.returncode == 0 and cluster.info(sid)["status"] == "SUCCEEDED", job_failure(cluster, sid, result)

    storage, out = s3["storage"], config["config"]["out"]
    table = f"{out}/dt={DATE}"
    manifest = read_manifest(table, storage)
    assert manifest is not None and manifest["rows"] == USERS and manifest["input_users"] == USERS
    rows = read_table(table, storage)
    assert rows.num_rows == USERS and len(np.unique(rows["user_id"].to_numpy())) == USERS
    assert all(len(x) == 10 for x in rows["item_ids"].to_pylist())
    assert read_latest(out, storage)["path"] == f"dt={DATE}"

    # where the work ran, from Ray's state API
    nodes = {n["node_id"]: n for n in cluster.nodes()}
    assert len(nodes) == 3 and all(n["state"] == "ALIVE" for n in nodes.values())
    actors = cluster.actors()
    summary = sorted((a["class_name"], str(a["node_id"])[:8], a["state"]) for a in actors if a["class_name"] in ("RayTrainWorker",) or "Scorer" in a["class_name"])
    trainers = [a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"]
    assert len(trainers) == 2 and len(set(trainers)) == 2 and set(trainers) <= nodes.keys(), summary
    # Both scoring actors scored: each ran batches, on its own node (one CPU each, so never two
    # on one node). The cluster's Ray Data waits for the whole actor pool before the read starts
    # (RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S in its environment, see the cluster fixture), and
    # each batch takes 0.25 s (a tiny model scores 16 users in ~12 ms, less than a round of Ray
    # Data's dispatch loop: the first actor ready would take every batch, each done before the
    # next arrives). Task events reach the state API a moment after the job ends.
    scorers = {a["actor_id"]: a["node_id"] for a in actors if re.search(r"MapWorker\(.*Scorer", a["class_name"])}
    assert len(scorers) == 2 and len(set(scorers.values())) == 2 and set(scorers.values()) <= nodes.keys(), summary
    blocks = -(-USERS // 16)  # one histories file of 300 users, read in blocks of 16 (the last of 12)
    batches: dict[str, int] = {}
    for _ in range(50):
        batches = {actor: len([t for t in cluster.tasks(actor_id=actor, state="FINISHED") if t["name"].endswith(".submit")]) for actor in scorers}
        if sum(batches.values()) == blocks and all(batches.values()):
            break
        time.sleep(0.2)
    assert sum(batches.values()) == blocks and all(n > 0 for n in batches.values()), (batches, summary)
