"""Retention of nightly work dirs: the pure choice, exact lists; the deleting step; the
night's composition with latest and the date locks."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from bert4rec.io import locate
from bert4rec.latest import write_latest
from bert4rec.locks import lock
from bert4rec.nightly import prune_after_night
from bert4rec.publish import publish, staging_dir
from bert4rec.retention import night_of, prune_work, running_nights, work_to_prune

NIGHTS = [f"dt=2026-11-{d}" for d in range(20, 26)]  # 20 .. 25
JUNK = ["notes", "_report", "dt=2026-02-30", "dt=2026-1-05", "dt=2026-11-24.bak", "latest"]


def test_work_to_prune_keeps_the_newest():
    assert work_to_prune(NIGHTS + JUNK, 3, "dt=2026-11-25") == ["dt=2026-11-20", "dt=2026-11-21", "dt=2026-11-22"]
    assert work_to_prune(list(reversed(NIGHTS)), 1, "dt=2026-11-25") == NIGHTS[:-1]
    assert work_to_prune(NIGHTS, 6, "dt=2026-11-25") == []
    assert work_to_prune(NIGHTS, 10, "dt=2026-11-25") == []
    assert work_to_prune([], 3, "dt=2026-11-25") == []
    assert work_to_prune(JUNK, 1, "dt=2026-11-25") == []


def test_work_to_prune_never_the_current_or_protected_night():
    # a backfill of 11-20: its own work dir stays although it is not among the newest 3
    assert work_to_prune(NIGHTS, 3, "dt=2026-11-20") == ["dt=2026-11-21", "dt=2026-11-22"]
    # the night whose model latest serves, and a night being run now
    assert work_to_prune(NIGHTS, 3, "dt=2026-11-25", {"dt=2026-11-21", "dt=2026-11-20"}) == ["dt=2026-11-22"]
    assert work_to_prune(NIGHTS, 1, "dt=2026-11-25", {"dt=2026-11-23"}) == ["dt=2026-11-20", "dt=2026-11-21", "dt=2026-11-22", "dt=2026-11-24"]


def test_night_of(tmp_path):
    work = locate(str(tmp_path / "out" / "_work"))
    assert night_of(str(tmp_path / "out" / "_work" / "dt=2026-11-21" / "train" / "checkpoint_000003"), work) == "dt=2026-11-21"
    assert night_of("file://" + str(tmp_path / "out" / "_work" / "dt=2026-11-21" / "train"), work) == "dt=2026-11-21"
    assert night_of(str(tmp_path / "out" / "_work2" / "dt=2026-11-21" / "train"), work) is None  # a sibling, not inside
    assert night_of(str(tmp_path / "out" / "_work" / "manual" / "ckpt"), work) is None
    assert night_of(str(tmp_path / "models" / "dt=2026-11-21"), work) is None
    assert night_of("s3://bucket/out/_work/dt=2026-11-21/train", work) is None
    assert night_of(None, work) is None
    assert night_of(["not", "a", "uri"], work) is None


def test_running_nights(tmp_path):
    locks = tmp_path / "_locks"
    locks.mkdir()
    for name in ["dt=2026-11-22.lock", "latest.lock", "dt=2026-11-23.lock.stale-abc", "dt=bad.lock"]:
        (locks / name).write_text("{}")
    assert running_nights(locate(str(locks))) == {"dt=2026-11-22"}
    assert running_nights(locate(str(tmp_path / "missing"))) == set()


def _make_work(work: str) -> None:
    for night in NIGHTS:
        os.makedirs(os.path.join(work, night, "train", "checkpoint_000001"))
        with open(os.path.join(work, night, "train", "checkpoint_000001", "model.pt"), "w") as f:
            f.write(night)
    os.makedirs(os.path.join(work, "notes"))
    with open(os.path.join(work, "dt=2026-01-01"), "w") as f:  # a file, not a night's directory
        f.write("x")


def test_prune_work_deletes_only_what_was_picked(tmp_path):
    work = str(tmp_path / "_work")
    _make_work(work)
    assert prune_work(locate(work), 2, "dt=2026-11-25", {"dt=2026-11-20"}) == ["dt=2026-11-21", "dt=2026-11-22", "dt=2026-11-23"]
    assert sorted(os.listdir(work)) == ["dt=2026-01-01", "dt=2026-11-20", "dt=2026-11-24", "dt=2026-11-25", "notes"]
    assert prune_work(locate(work), 2, "dt=2026-11-25", {"dt=2026-11-20"}) == []  # idempotent


def test_prune_after_night_keeps_the_served_model_and_running_nights(tmp_path):
    out = str(tmp_path / "out")
    work = os.path.join(out, "_work")
    _make_work(work)
    # latest serves 11-21's table, whose model was trained in _work/dt=2026-11-21
    table = os.path.join(out, "dt=2026-11-21")
    staging = staging_dir(table, "r1")
    os.makedirs(staging)
    pq.write_table(pa.table({"user_id": [1]}), os.path.join(staging, "a.parquet"))
    publish(table, staging, {"checkpoint": os.path.join(work, "dt=2026-11-21", "train", "checkpoint_000001")})
    write_latest(out, "dt=2026-11-21")

    root = locate(out)
    with lock(root.join("_locks", "dt=2026-11-22.lock"), "a backfill of 11-22 in progress"):
        pruned = prune_after_night(root, locate(work), "dt=2026-11-25", keep_nights=2)
    assert pruned == ["dt=2026-11-20", "dt=2026-11-23"]
    assert sorted(os.listdir(work)) == ["dt=2026-01-01", "dt=2026-11-21", "dt=2026-11-22", "dt=2026-11-24", "dt=2026-11-25", "notes"]


def test_prune_after_night_with_a_crafted_manifest_only_logs(tmp_path, caplog):
    out = str(tmp_path / "out")
    work = os.path.join(out, "_work")
    _make_work(work)
    os.makedirs(os.path.join(out, "dt=2026-11-21"))
    with open(os.path.join(out, "dt=2026-11-21", "_SUCCESS"), "w") as f:
        json.dump({"files": ["../../_work/dt=2026-11-24/x"], "rows": 0}, f)
    with open(os.path.join(out, "latest"), "w") as f:
        json.dump({"path": "dt=2026-11-21"}, f)
    assert prune_after_night(locate(out), locate(work), "dt=2026-11-25", keep_nights=1) == []
    assert "pruning" in caplog.text and "bad file name" in caplog.text
    assert sorted(os.listdir(work)) == sorted(NIGHTS + ["dt=2026-01-01", "notes"])  # nothing deleted


def test_keep_nights_config():
    import pydantic
    import pytest

    from bert4rec.config import NightlyConfig

    assert NightlyConfig(interactions="i", out="o").keep_nights == 3
    with pytest.raises(pydantic.ValidationError, match="keep_nights"):
        NightlyConfig(interactions="i", out="o", keep_nights=0)
