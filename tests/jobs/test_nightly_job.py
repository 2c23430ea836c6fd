"""The nightly job end to end, as the cluster runs it: ``ray job submit --working-dir . --
python jobs/nightly.py --config <yaml>`` against a ``ray start --head`` on loopback.

One head node and one data set for the module; the nights build on each other:

* night 1 (2026-11-01) publishes the first table (``night1``);
* night 2 (2026-11-02) brings new users and new item ids; its first run is stopped with
  ``ray job stop`` while it scores (``night2_killed``), its rerun publishes (``night2``);
* night 3 (2026-11-03) fails the quality gate.

Sharing the stopped run with the two-nights case saves a whole training run: the rerun is the
second night, and it must warm-start from night 1 all the same. The stopped run's scoring is
kept open a few seconds longer by a scoring actor that dies once (that run is submitted as
``tests/jobs/faulty_nightly.py``, which passes such an actor class to the nightly flow; not
the kill -- the kill is ``ray job stop``). If the stopped run released its lock (the usual case:
SIGTERM -> SystemExit), the rerun meets the lock a SIGKILLed run would have left instead.

Module time is ~5-6 min on a busy 2-core machine, nearly all of it Ray start-up and training
overhead: night 1 ~1.5-2 min (with the head's start), the stopped run ~1 min, the rerun ~1 min,
the gate ~1 min.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from bert4rec import checkpoint as ckpt_lib
from bert4rec import publish
from bert4rec.latest import read_latest
from tests.conftest import TINY_MODEL, TINY_TRAIN, snapshot

pytestmark = pytest.mark.jobs

DAY1, DAY2, DAY3 = "2026-11-01", "2026-11-02", "2026-11-03"
DAY1_USERS, NEW_USERS, ITEMS = 400, 100, 150
EPOCHS = 5
NEW_ITEM_OFFSET = 1000  # day 2 renames every 5th item to an id above day 1's largest
PNG = b"\x89PNG\r\n\x1a\n"


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def job_failure(sid: str, result, head) -> str:
    return f"job {sid}: rc {result.returncode}\n--- submit stderr\n{result.stderr[-3000:]}\n--- job log\n{head.logs(sid)[-8000:]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Interactions as dt= partitions: day 1 = users 1..400; day 2 = 100 new users, with
    every 5th item renamed to a new id (> day 1's largest). Plus the nightly YAML."""
    from bert4rec.synthetic import generate

    root = tmp_path_factory.mktemp("nightly-job")
    raw = str(root / "raw")
    generate(raw, users=DAY1_USERS + NEW_USERS, items=ITEMS, seed=0, mean_length=20)
    table = pq.read_table(raw)
    interactions = root / "interactions"
    day1 = table.filter(pc.less_equal(table["user_id"], DAY1_USERS))
    day2 = table.filter(pc.greater(table["user_id"], DAY1_USERS))
    items = day2["item_id"].to_numpy()
    items = np.where(items % 5 == 0, items + NEW_ITEM_OFFSET, items)
    day2 = day2.set_column(day2.schema.get_field_index("item_id"), "item_id", pa.array(items, pa.int64()))
    for day, part in ((DAY1, day1), (DAY2, day2)):
        (interactions / f"dt={day}").mkdir(parents=True)
        pq.write_table(part, interactions / f"dt={day}" / "part.parquet")
    new_items = sorted(set(items[items > ITEMS].tolist()))
    assert new_items and min(new_items) > pc.max(day1["item_id"]).as_py()

    out, marker = root / "recs", root / "scorer-died-once"
    config = {
        "interactions": str(interactions),
        "out": str(out),
        # the latest 30 items per user, as the model sees them; it also leaves every user the
        # 100 unseen items that evaluate's sampled protocol draws from a 150-item catalogue
        "prepare": {"max_len": TINY_MODEL["max_len"]},
        "train": {"epochs": EPOCHS, "workers": 1, **TINY_TRAIN, "model": TINY_MODEL},
        # a tiny model on a changing data set: the gate's floor is what is tested, not its drop
        "gate": {"min_ndcg": 0.0, "max_drop": 0.5},
        "score": {"k": 10, "batch_size": 64, "actors": 1},
    }
    nightly_yaml = root / "nightly.yaml"
    nightly_yaml.write_text(yaml.safe_dump(config))
    return {"root": root, "out": str(out), "yaml": str(nightly_yaml), "marker": str(marker), "config": config, "new_items": new_items}


def nightly_args(data: dict, date: str, yaml_path: str | None = None, *extra: str) -> list[str]:
    return ["jobs/nightly.py", "--config", yaml_path or data["yaml"], "--date", date, *extra]


def faulty_nightly_args(data: dict, date: str) -> list[str]:
    """The run that gets stopped: the same night and config, but its first scoring actor dies
    on its first batch and is restarted (once: the marker file), which keeps the scoring stage
    open a few seconds longer than `ray job stop` needs to land in it, on a busy machine too."""
    return ["tests/jobs/faulty_nightly.py", "--config", data["yaml"], "--date", date, "--fail-marker", data["marker"]]


@pytest.fixture(scope="module")
def night1(ray_head, data) -> dict:
    sid, result = ray_head.submit(nightly_args(data, DAY1), submission_id=f"nightly-{DAY1}-first")
    assert result.returncode == 0, job_failure(sid, result, ray_head)
    info = ray_head.info(sid)
    assert info["status"] == "SUCCEEDED", job_failure(sid, result, ray_head)
    table = os.path.join(data["out"], f"dt={DAY1}")
    return {"sid": sid, "logs": ray_head.logs(sid), "table": table, "snapshot": snapshot(table)}


@pytest.fixture(scope="module")
def night2_killed(ray_head, data, night1) -> dict:
    """Night 2's first run, stopped with ``ray job stop`` once its log says it is scoring."""
    latest_before = read_bytes(os.path.join(data["out"], "latest"))
    sid, result = ray_head.submit(faulty_nightly_args(data, DAY2), wait=False, submission_id=f"nightly-{DAY2}-killed")
    assert result.returncode == 0, job_failure(sid, result, ray_head)
    m = ray_head.wait_for_log(sid, rf"dt={DAY2}: scoring (\d+) users")
    stopped = ray_head.stop(sid)
    info = ray_head.info(sid)
    assert info["status"] == "STOPPED", (
        f"`ray job stop` did not land while scoring (status {info['status']}); stop output: {stopped.stdout[-2000:]} {stopped.stderr[-2000:]}\n"
        + ray_head.logs(sid)[-6000:]
    )
    return {"sid": sid, "scoring_users": int(m.group(1)), "logs": ray_head.logs(sid), "latest_before": latest_before}


@pytest.fixture(scope="module")
def night2(ray_head, data, night2_killed) -> dict:
    """The rerun of night 2 (same date, the plain config) after the stopped run."""
    lock = os.path.join(data["out"], "_locks", f"dt={DAY2}.lock")
    planted = not os.path.exists(lock)
    if planted:
        # The stopped run let go of its lock (SIGTERM -> SystemExit -> the lock's finally).
        # A run SIGKILLed after `ray job stop`'s grace period (RAY_JOB_STOP_WAIT_TIME_S, 3 s)
        # leaves its lock behind: put one there as such a run would, so the rerun must also
        # get past that (its pid is gone on this host, so the lock is stale at any age).
        gone = subprocess.Popen(["true"])
        gone.wait()
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        with open(lock, "w") as f:
            json.dump({
                "owner": f"nightly dt={DAY2} {socket.gethostname()}:{gone.pid} killed", "token": uuid.uuid4().hex,
                "acquired_at": "2026-11-02T03:00:00+00:00", "acquired_at_epoch": time.time(), "host": socket.gethostname(), "pid": gone.pid,
            }, f)
    sid, result = ray_head.submit(nightly_args(data, DAY2), submission_id=f"nightly-{DAY2}-rerun")
    assert result.returncode == 0, job_failure(sid, result, ray_head)
    assert ray_head.info(sid)["status"] == "SUCCEEDED"
    logs = ray_head.logs(sid)
    assert "took over a stale lock" in logs, logs[-4000:]
    return {"sid": sid, "logs": logs, "table": os.path.join(data["out"], f"dt={DAY2}"), "planted_lock": planted}


def load_report(table: str) -> dict:
    with open(os.path.join(table, "_report", "report.json")) as f:
        return json.load(f)


def check_published(table: str, date: str, users: int) -> dict:
    """The table at ``table`` is whole: its manifest, one row per user, and the report."""
    manifest = publish.read_manifest(table)
    assert manifest is not None, f"no _SUCCESS in {table}"
    assert manifest["rows"] == users and manifest["input_users"] == users
    assert manifest["date"] == date and manifest["k"] == 10
    assert {"files", "run_id", "published_at", "model_version", "checkpoint", "val_ndcg@10", "test_ndcg@10"} <= manifest.keys()
    assert sorted(f for f in os.listdir(table) if f.endswith(".parquet")) == sorted(manifest["files"])
    rows = publish.read_table(table)
    assert rows.num_rows == users
    user_ids = rows["user_id"].to_numpy()
    assert len(np.unique(user_ids)) == users, "duplicate user_id rows"
    assert all(len(x) == 10 for x in rows["item_ids"].to_pylist())
    assert set(rows["model_version"].to_pylist()) == {manifest["model_version"]}

    report = load_report(table)
    assert report["status"] == "published" and report["date"] == date
    assert report["table"]["rows"] == users and report["table"]["path"] == f"dt={date}"
    assert report["training"]["model_version"] == manifest["model_version"]
    with open(os.path.join(table, "_report", "report.md")) as f:
        assert f.read().startswith(f"# Nightly run {date}: published")
    with open(os.path.join(table, "_report", "training.png"), "rb") as f:
        assert f.read(8) == PNG
    return {"manifest": manifest, "report": report, "rows": rows}


def test_first_night_publishes_through_ray_job_submit(ray_head, data, night1):
    assert f"Running entrypoint for job {night1['sid']}: python jobs/nightly.py" in night1["logs"]
    out = check_published(night1["table"], DAY1, DAY1_USERS)
    report = out["report"]
    assert report["warm_start"] == "from scratch: no published model yet" and report["previous"] is None
    assert report["data"]["users"] == DAY1_USERS and report["data"]["items"] == ITEMS
    assert [h["epoch"] for h in report["training"]["history"]] == list(range(1, EPOCHS + 1))
    # the tiny model learned something: clearly better than most-popular on held-out items
    assert report["test"]["ndcg@10"] > 1.5 * report["test"]["popularity"]["ndcg@10"], report["test"]
    assert read_latest(data["out"])["path"] == f"dt={DAY1}"
    # the run let go of its lock
    assert not os.path.exists(os.path.join(data["out"], "_locks", f"dt={DAY1}.lock"))


def test_a_run_stopped_while_scoring_leaves_the_published_state_intact(data, night1, night2_killed):
    out = data["out"]
    assert night2_killed["scoring_users"] == DAY1_USERS + NEW_USERS
    # latest still points at night 1, whose table reads back whole and unchanged
    assert read_bytes(os.path.join(out, "latest")) == night2_killed["latest_before"]
    assert read_latest(out)["path"] == f"dt={DAY1}"
    assert publish.read_table(night1["table"]).num_rows == DAY1_USERS
    assert snapshot(night1["table"]) == night1["snapshot"]
    # no table of the stopped night was committed
    assert publish.read_manifest(os.path.join(out, f"dt={DAY2}")) is None
    for name in os.listdir(out):
        if name.startswith("dt=") and name != f"dt={DAY1}":
            assert not os.path.exists(os.path.join(out, name, publish.MANIFEST)), name
    # the run released its lock (SIGTERM -> SystemExit), or died holding it (SIGKILL after
    # the grace period): then its pid is gone, which makes the lock stale for the rerun
    lock = read_bytes(os.path.join(out, "_locks", f"dt={DAY2}.lock"))
    if lock is not None:
        holder = json.loads(lock)
        with pytest.raises(ProcessLookupError):
            os.kill(holder["pid"], 0)


def test_the_rerun_of_a_stopped_night_publishes_without_training_again(data, night2):
    out = check_published(night2["table"], DAY2, DAY1_USERS + NEW_USERS)
    assert read_latest(data["out"])["path"] == f"dt={DAY2}"
    # the stopped run had finished training: the rerun resumed that run and trained no epoch
    best = ckpt_lib.load(out["report"]["training"]["best_checkpoint"])
    assert best.metadata["attempts"] == [1]
    assert [h["epoch"] for h in out["report"]["training"]["history"]] == list(range(1, EPOCHS + 1))
    # nothing of the stopped run is left behind in the table directory
    assert not os.path.exists(os.path.join(night2["table"], publish.STAGING))
    assert not os.path.exists(os.path.join(data["out"], "_locks", f"dt={DAY2}.lock"))


def test_the_second_night_warm_starts_and_keeps_the_first(data, night1, night2):
    report = load_report(night2["table"])
    day1_manifest = publish.read_manifest(night1["table"])
    # same architecture, new items: a warm start from night 1's published model
    assert report["warm_start"].startswith(f"warm start from dt={DAY1} ({day1_manifest['model_version']})"), report["warm_start"]
    assert report["previous"]["path"] == f"dt={DAY1}"
    assert report["previous"]["model_version"] == day1_manifest["model_version"]
    assert report["gate"]["previous_val_ndcg@10"] == day1_manifest["val_ndcg@10"]
    assert report["data"]["users"] == DAY1_USERS + NEW_USERS
    # the new ids joined the vocabulary; the shared items started from night 1's embeddings
    best = ckpt_lib.load(report["training"]["best_checkpoint"])
    vocab = set(best.vocab_ids.tolist())
    assert set(data["new_items"]) <= vocab
    warm = best.metadata["warm_start"]
    assert warm["from"] == day1_manifest["checkpoint"]
    assert warm["new_items"] == len(data["new_items"]) and warm["shared_items"] == len(vocab) - len(data["new_items"])
    # night 2's table is its own partition; night 1's files and _SUCCESS are byte-for-byte as they were
    assert night2["table"] != night1["table"]
    assert snapshot(night1["table"]) == night1["snapshot"]
    assert read_latest(data["out"])["path"] == f"dt={DAY2}"


def test_a_model_below_the_quality_gate_is_not_published(ray_head, data, night1, tmp_path):
    out = data["out"]
    latest_before = read_bytes(os.path.join(out, "latest"))
    published_before = {name: snapshot(os.path.join(out, name)) for name in os.listdir(out) if name.startswith("dt=")}
    config = {**data["config"], "gate": {"min_ndcg": 0.99, "max_drop": 0.5}}
    gated = tmp_path / "nightly-gate.yaml"
    gated.write_text(yaml.safe_dump(config))

    sid, result = ray_head.submit(nightly_args(data, DAY3, str(gated), "--epochs", "1"), submission_id=f"nightly-{DAY3}-gate")
    info = ray_head.info(sid)
    assert result.returncode == 1 and info["status"] == "FAILED", job_failure(sid, result, ray_head)
    # one line with the figures, in the job's log and in its status message
    figures = rf"bert4rec nightly: failed in stage gate: GateFailed: dt={DAY3}: validation NDCG@10 0\.\d{{4}} is below the floor 0\.9900; nothing published, latest unchanged"
    assert re.search(figures, ray_head.logs(sid)), ray_head.logs(sid)[-4000:]
    assert re.search(figures, info["message"] or ""), info["message"]

    assert read_bytes(os.path.join(out, "latest")) == latest_before
    assert not os.path.exists(os.path.join(out, f"dt={DAY3}"))
    assert {name: snapshot(os.path.join(out, name)) for name in os.listdir(out) if name.startswith("dt=")} == published_before
    # the gate's report stays with the run's work files
    with open(os.path.join(out, "_work", f"dt={DAY3}", "_report", "report.json")) as f:
        report = json.load(f)
    assert report["status"].startswith("gate failed: validation NDCG@10") and report["gate"]["min_ndcg"] == 0.99
    assert not os.path.exists(os.path.join(out, "_locks", f"dt={DAY3}.lock"))


@pytest.mark.parametrize(
    "job, config, typo",
    [
        ("nightly", {"interactions": "x", "out": "OUT", "train": {"epoch": 3}}, "train.epoch"),
        ("train", {"data": "x", "out": "OUT", "model": {"hiden": 8}}, "model.hiden"),
        ("score", {"checkpoint": "x", "histories": "y", "out": "OUT", "actor": 2}, "actor"),
    ],
)
def test_job_scripts_run_from_anywhere_and_report_a_bad_config(tmp_path, job, config, typo):
    """``python jobs/<job>.py`` outside the repository (as from the job's copy of it): a
    misspelt key is one line on stderr naming it, exit code 2, before Ray starts."""
    out = str(tmp_path / "out")
    bad = tmp_path / f"{job}.yaml"
    bad.write_text(yaml.safe_dump({k: (out if v == "OUT" else v) for k, v in config.items()}))
    script = Path(__file__).resolve().parents[2] / "jobs" / f"{job}.py"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, str(script), "--config", str(bad)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bert4rec {job}: error: invalid config {bad}"), result.stderr
    assert f"field '{typo}': unknown key" in lines[0]
    assert not os.path.exists(out)
