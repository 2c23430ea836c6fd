"""The latest pointer: round trip, atomic replace, only forward, untrusted content; and the
nightly's date rules built on it."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec import latest as latest_mod
from bert4rec.io import InputError, locate
from bert4rec.latest import advance_latest, moves_forward, partition_date, read_latest, write_latest
from bert4rec.locks import LockHeld, lock
from bert4rec.nightly import latest_status, run_date
from bert4rec.publish import publish, read_table, staging_dir


def _table(users: list[int], tag: str) -> pa.Table:
    return pa.table({"user": pa.array(users, pa.int64()), "tag": [tag] * len(users)})


def _publish(out: str, run_id: str, parts: list[pa.Table]) -> dict:
    staging = staging_dir(out, run_id)
    os.makedirs(staging, exist_ok=True)
    for i, t in enumerate(parts):
        pq.write_table(t, os.path.join(staging, f"a1b2c3_{i:06d}_000000.parquet"))
    return publish(out, staging, {})




def test_latest_round_trip_and_replace(tmp_path):
    root = str(tmp_path / "recs")
    assert read_latest(root) is None
    for day, run in [("2026-11-23", "a"), ("2026-11-24", "b")]:
        _publish(os.path.join(root, f"dt={day}"), run, [_table([1], run)])

    p1 = write_latest(root, "dt=2026-11-23")
    assert read_latest(root) == p1
    assert (p1["path"], p1["date"], p1["run_id"]) == ("dt=2026-11-23", "2026-11-23", "a")
    p2 = write_latest(root, "dt=2026-11-24")
    assert read_latest(root) == p2
    assert (p2["path"], p2["date"], p2["run_id"]) == ("dt=2026-11-24", "2026-11-24", "b")
    assert sorted(os.listdir(root)) == ["dt=2026-11-23", "dt=2026-11-24", "latest"]  # no temp files left
    assert read_table(os.path.join(root, read_latest(root)["path"])).column("tag").to_pylist() == ["b"]


def test_latest_refuses_unpublished_and_bad_targets(tmp_path):
    root = str(tmp_path / "recs")
    os.makedirs(os.path.join(root, "dt=2026-11-25"))
    with pytest.raises(InputError, match=r"dt=2026-11-25: no published table there"):
        write_latest(root, "dt=2026-11-25")
    for bad in ["../elsewhere", "a/dt=2026-11-25", "dt=2026-11-25/..", "dt=2026-02-30"]:
        with pytest.raises(InputError) as e:
            write_latest(root, bad)
        assert str(e.value) == f"{root}: latest must name a table directory dt=YYYY-MM-DD under the root, got {bad!r}"
    assert read_latest(root) is None
    assert write_latest(root, "dt=2026-11-25", require_published=False)["run_id"] is None


def test_latest_readers_never_see_a_torn_pointer(tmp_path):
    root = str(tmp_path / "recs")
    for i in range(2):
        _publish(os.path.join(root, f"dt=2026-11-2{i}"), f"r{i}", [_table([i], "x")])
    write_latest(root, "dt=2026-11-20")
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                seen.add(read_latest(root)["path"])
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(60):
        write_latest(root, f"dt=2026-11-2{i % 2}")
    stop.set()
    t.join()
    assert errors == []
    assert seen <= {"dt=2026-11-20", "dt=2026-11-21"}




def test_partition_date():
    assert partition_date("dt=2026-11-24") == dt.date(2026, 11, 24)
    assert [partition_date(n) for n in ["dt=2026-02-30", "dt=2026-1-05", "dt=2026-11-24x", "x/dt=2026-11-24", "latest", ""]] == [None] * 6


def test_moves_forward():
    at = {"path": "dt=2026-11-24"}
    assert moves_forward(None, "dt=2020-01-01") is True
    assert moves_forward(at, "dt=2026-11-25") is True
    assert moves_forward(at, "dt=2026-11-24") is True  # a rerun of the same date
    assert moves_forward(at, "dt=2026-11-23") is False  # a backfill


def test_advance_moves_forward_and_keeps_a_newer_latest(tmp_path):
    root = str(tmp_path / "recs")
    for day, run in [("2026-11-22", "a"), ("2026-11-24", "b"), ("2026-11-23", "c")]:
        _publish(os.path.join(root, f"dt={day}"), run, [_table([1], run)])

    moved, p = advance_latest(root, "dt=2026-11-22", "night-22")
    assert moved and (p["path"], p["run_id"]) == ("dt=2026-11-22", "a")
    moved, p = advance_latest(root, "dt=2026-11-24", "night-24")
    assert moved and (p["path"], p["run_id"]) == ("dt=2026-11-24", "b")

    # a backfill of 11-23 published its own table but leaves latest at the newer 11-24
    before = (tmp_path / "recs" / "latest").read_bytes()
    moved, p = advance_latest(root, "dt=2026-11-23", "backfill-23")
    assert not moved and p == json.loads(before)
    assert (tmp_path / "recs" / "latest").read_bytes() == before
    assert read_table(os.path.join(root, "dt=2026-11-23")).column("tag").to_pylist() == ["c"]

    # a rerun of the date latest points to republishes and keeps latest there, on the new run
    _publish(os.path.join(root, "dt=2026-11-24"), "b2", [_table([2], "b2")])
    moved, p = advance_latest(locate(root), "dt=2026-11-24", "rerun-24")
    assert moved and (p["path"], p["run_id"]) == ("dt=2026-11-24", "b2")
    assert read_latest(root) == p
    assert os.listdir(tmp_path / "recs" / "_locks") == []  # the latest lock is released


def test_advance_waits_for_the_latest_lock_then_gives_up(tmp_path, monkeypatch):
    root = str(tmp_path / "recs")
    _publish(os.path.join(root, "dt=2026-11-24"), "a", [_table([1], "a")])
    monkeypatch.setattr(latest_mod, "LATEST_LOCK_WAIT_S", 0.0)
    with lock(os.path.join(root, "_locks", "latest.lock"), "other night"):
        with pytest.raises(LockHeld, match="locked by 'other night'"):
            advance_latest(root, "dt=2026-11-24", "night-24")
    assert read_latest(root) is None


@pytest.mark.parametrize(
    "pointer",
    [
        {"path": "../elsewhere"},
        {"path": "dt=2026-11-24/../../etc"},
        {"path": "/etc"},
        {"path": "dt=2026-11-24/x"},
        {"path": ".hidden"},
        {"path": "dt=2026-13-01"},
    ],
)
def test_a_crafted_pointer_is_refused_before_anything_is_read(tmp_path, pointer):
    root = tmp_path / "recs"
    root.mkdir()
    (root / "latest").write_text(json.dumps(pointer))
    with pytest.raises(InputError) as e:
        read_latest(str(root))
    assert str(e.value) == (
        f"{root / 'latest'}: latest must name a table directory dt=YYYY-MM-DD under the root, got {pointer['path']!r}"
    )
    # and the nightly's forward check refuses it too instead of comparing against it
    with pytest.raises(InputError):
        advance_latest(str(root), "dt=2026-11-24", "night", None)


def test_corrupt_pointer(tmp_path):
    (tmp_path / "latest").write_text("{")
    with pytest.raises(InputError, match=r"latest: not valid JSON"):
        read_latest(str(tmp_path))
    (tmp_path / "latest").write_text("[]")
    with pytest.raises(InputError, match=r"latest: not a latest pointer \(needs 'path'\)"):
        read_latest(str(tmp_path))


def test_run_date():
    today = dt.date(2026, 11, 24)
    assert run_date(None, today) == today
    assert run_date(dt.date(2026, 11, 1), today) == dt.date(2026, 11, 1)  # a backfill
    with pytest.raises(InputError) as e:
        run_date(dt.date(2026, 11, 25), today)
    assert str(e.value) == "date 2026-11-25 is in the future (today is 2026-11-24 UTC); run a date up to today"


def test_latest_status():
    assert latest_status(True, {"path": "dt=2026-11-24"}, "dt=2026-11-24") == "moved to dt=2026-11-24"
    assert latest_status(False, {"path": "dt=2026-11-24"}, "dt=2026-11-20") == "unchanged: points to dt=2026-11-24 (newer)"


def test_a_future_date_is_refused_by_the_config_and_the_cli(capsys):
    from bert4rec.cli import main
    from bert4rec.config import NightlyConfig

    today = dt.datetime.now(dt.timezone.utc).date()
    assert NightlyConfig(interactions="i", out="o", date=today).date == today
    tomorrow = today + dt.timedelta(days=1)
    rc = main(["nightly", "--interactions", "i", "--out", "o", "--date", tomorrow.isoformat()])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines() == [
        f"bert4rec nightly: error: invalid config: field 'date': Value error, {tomorrow.isoformat()} is in the future "
        f"(today is {today.isoformat()} UTC); run a date up to today (got '{tomorrow.isoformat()}')"
    ]


def test_previous_model_is_the_newest_published_before_the_run_date(tmp_path):
    from bert4rec.nightly import previous_model

    root = str(tmp_path / "nightly")
    for day, run in (("2026-01-01", "a"), ("2026-01-03", "b")):
        staging = staging_dir(f"{root}/dt={day}", f"20260101T000000-{run * 8}")
        os.makedirs(staging, exist_ok=True)
        pq.write_table(pa.table({"user_id": [1]}), os.path.join(staging, "block-0.parquet"))
        publish(f"{root}/dt={day}", staging, {"checkpoint": f"ck-{day}"})
    write_latest(root, "dt=2026-01-03")
    assert previous_model(root, before=dt.date(2026, 1, 4))["path"] == "dt=2026-01-03"  # an ordinary night
    assert previous_model(root, before=dt.date(2026, 1, 3))["path"] == "dt=2026-01-01"  # a rerun of latest's date
    assert previous_model(root, before=dt.date(2026, 1, 2))["path"] == "dt=2026-01-01"  # a backfill
    assert previous_model(root, before=dt.date(2026, 1, 1)) is None


def test_a_published_checkpoint_outside_the_work_root_is_never_loaded(tmp_path):
    from bert4rec.io import locate
    from bert4rec.nightly import served_checkpoint

    work = locate(str(tmp_path / "work"))
    inside = str(tmp_path / "work" / "dt=2026-01-01" / "train" / "train" / "epoch-0001")
    assert served_checkpoint({"checkpoint": inside}, work) == inside
    for bad in (str(tmp_path / "elsewhere" / "ck"), "/etc", inside + "/../../../../victim", str(tmp_path / "work" / "_locks"), None, 7):
        assert served_checkpoint({"checkpoint": bad}, work) is None, bad
