"""The publish contract on the local filesystem: manifest as commit point, replace, crashes, latest, lock."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec import publish as pub
from bert4rec.io import InputError
from bert4rec.publish import LockHeld, lock, publish, read_latest, read_manifest, read_table, staging_dir, write_latest


def _table(users: list[int], tag: str) -> pa.Table:
    return pa.table({"user": pa.array(users, pa.int64()), "items": pa.array([[u, u + 1] for u in users], pa.list_(pa.int64())), "tag": [tag] * len(users)})


def _stage(out: str, run_id: str, parts: list[pa.Table]) -> str:
    """Writes ``parts`` into the run's staging dir the way a Ray Data write would (uuid-ish names)."""
    staging = staging_dir(out, run_id)
    os.makedirs(staging, exist_ok=True)
    for i, t in enumerate(parts):
        pq.write_table(t, os.path.join(staging, f"a1b2c3_{i:06d}_000000.parquet"))
    return staging


def _listing(out: str) -> list[str]:
    return sorted(os.listdir(out))


def _publish(out: str, run_id: str, parts: list[pa.Table], **kw) -> dict:
    return publish(out, _stage(out, run_id, parts), {"model_version": "m1", "counts": {"users": 3}}, **kw)


def test_staging_dir(tmp_path):
    assert staging_dir(str(tmp_path / "out"), "r1") == str(tmp_path / "out" / "_staging" / "r1")
    with pytest.raises(InputError, match="bad run_id"):
        staging_dir(str(tmp_path), "../x")


def test_first_publish(tmp_path):
    out = str(tmp_path / "out")
    a, b = _table([1, 2, 3], "r1"), _table([4, 5], "r1")
    manifest = _publish(out, "r1", [a, b])

    assert manifest["files"] == ["part-r1-00000.parquet", "part-r1-00001.parquet"]
    assert manifest["rows"] == 5
    assert manifest["run_id"] == "r1"
    assert manifest["model_version"] == "m1" and manifest["counts"] == {"users": 3}
    assert manifest["published_at"].endswith("+00:00")
    assert read_manifest(out) == manifest
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text()) == manifest
    # the data files, the manifest, and nothing else (staging removed)
    assert _listing(out) == ["_SUCCESS", "part-r1-00000.parquet", "part-r1-00001.parquet"]
    assert read_table(out).equals(pa.concat_tables([a, b]))
    assert read_table(out, columns=["user"]).column("user").to_pylist() == [1, 2, 3, 4, 5]
    assert pub.published_files(out) == [os.path.join(out, f) for f in manifest["files"]]


def test_second_publish_replaces_whole(tmp_path):
    out = str(tmp_path / "out")
    _publish(out, "r1", [_table([1, 2, 3], "r1"), _table([4, 5], "r1")])
    new = _table([10, 11], "r2")
    manifest = _publish(out, "r2", [new])

    assert manifest["files"] == ["part-r2-00000.parquet"]
    assert manifest["rows"] == 2
    assert _listing(out) == ["_SUCCESS", "part-r2-00000.parquet"]
    got = read_table(out)
    assert got.equals(new)
    assert got.column("user").to_pylist() == [10, 11]  # old rows gone, no duplicates


def test_same_run_id_twice_is_refused(tmp_path):
    out = str(tmp_path / "out")
    _publish(out, "r1", [_table([1], "r1")])
    before = (tmp_path / "out" / "_SUCCESS").read_bytes()
    with pytest.raises(InputError, match="run r1 is already published"):
        _publish(out, "r1", [_table([2], "r1")])
    assert (tmp_path / "out" / "_SUCCESS").read_bytes() == before
    assert read_table(out).column("user").to_pylist() == [1]


def test_crash_before_publish_leaves_old_table(tmp_path):
    out = str(tmp_path / "out")
    old = _table([1, 2, 3], "r1")
    _publish(out, "r1", [old])
    manifest_bytes = (tmp_path / "out" / "_SUCCESS").read_bytes()

    # a run that stages and dies before publishing
    _stage(out, "r2", [_table([7, 8], "r2")])
    assert (tmp_path / "out" / "_SUCCESS").read_bytes() == manifest_bytes
    assert read_table(out).equals(old)

    # a run whose verification fails: nothing moves, staged files are kept for inspection
    def reject(table: pa.Table) -> None:
        raise ValueError(f"{table.num_rows} rows is too few")

    staging = _stage(out, "r3", [_table([9], "r3")])
    with pytest.raises(InputError, match=r"staged table failed verification: ValueError: 1 rows is too few"):
        publish(out, staging, {}, verify=reject)
    assert (tmp_path / "out" / "_SUCCESS").read_bytes() == manifest_bytes
    assert read_table(out).equals(old)
    assert os.listdir(staging) == ["a1b2c3_000000_000000.parquet"]
    assert _listing(out) == ["_SUCCESS", "_staging", "part-r1-00000.parquet"]

    # the next successful publish cleans every stale staging dir
    new = _table([20, 21], "r4")
    _publish(out, "r4", [new])
    assert _listing(out) == ["_SUCCESS", "part-r4-00000.parquet"]
    assert read_table(out).equals(new)


def test_crash_after_moves_before_commit(tmp_path):
    """Files moved into out but no new manifest: readers still see the old table; resumable."""
    out = str(tmp_path / "out")
    old = _table([1, 2, 3], "r1")
    _publish(out, "r1", [old])
    manifest_bytes = (tmp_path / "out" / "_SUCCESS").read_bytes()

    new_parts = [_table([5], "r2"), _table([6, 7], "r2")]
    staging = _stage(out, "r2", new_parts)
    plan = pub._plan(out, staging, None, None, None, False)
    pub._move(out, staging, {**plan, "moves": plan["moves"][:1]}, None)  # dies after the first move

    assert (tmp_path / "out" / "_SUCCESS").read_bytes() == manifest_bytes
    assert read_table(out).equals(old)
    assert "part-r2-00000.parquet" in _listing(out)  # an orphan, not listed

    # calling publish again on the same staging dir resumes the recorded plan
    manifest = publish(out, staging, {"resumed": True})
    assert manifest["files"] == ["part-r2-00000.parquet", "part-r2-00001.parquet"]
    assert manifest["rows"] == 3
    assert _listing(out) == ["_SUCCESS", "part-r2-00000.parquet", "part-r2-00001.parquet"]
    assert read_table(out).equals(pa.concat_tables(new_parts))


def test_orphans_of_a_dead_run_are_cleaned_by_the_next_run(tmp_path):
    out = str(tmp_path / "out")
    _publish(out, "r1", [_table([1], "r1")])
    staging = _stage(out, "r2", [_table([2], "r2"), _table([3], "r2")])
    pub._move(out, staging, pub._plan(out, staging, None, None, None, False), None)  # dies before the commit
    (tmp_path / "out" / "_SUCCESS.tmp-deadbeef").write_text("{")  # a torn manifest write
    (tmp_path / "out" / "notes.txt").write_text("not ours")  # not a data file: left alone
    assert read_table(out).column("user").to_pylist() == [1]

    new = _table([30], "r3")
    _publish(out, "r3", [new])
    assert _listing(out) == ["_SUCCESS", "notes.txt", "part-r3-00000.parquet"]
    assert read_table(out).equals(new)


def test_crash_after_commit_before_cleanup(tmp_path):
    out = str(tmp_path / "out")
    _publish(out, "r1", [_table([1, 2], "r1")])
    new = _table([3], "r2")
    staging = _stage(out, "r2", [new])
    plan = pub._plan(out, staging, None, None, None, False)
    pub._move(out, staging, plan, None)
    pub._commit(out, plan, {}, None)  # dies before deleting the old files

    assert read_table(out).equals(new)  # committed: only the listed file is read
    assert _listing(out) == ["_SUCCESS", "_staging", "part-r1-00000.parquet", "part-r2-00000.parquet"]
    # re-running the publish just finishes the cleanup
    manifest = publish(out, staging, {})
    assert manifest == read_manifest(out)
    assert manifest["files"] == ["part-r2-00000.parquet"]
    assert _listing(out) == ["_SUCCESS", "part-r2-00000.parquet"]


def test_empty_staging_is_an_error_unless_allowed(tmp_path):
    out = str(tmp_path / "out")
    _publish(out, "r1", [_table([1], "r1")])
    with pytest.raises(InputError, match=r"_staging/r2: no Parquet files staged"):
        publish(out, staging_dir(out, "r2"), {})
    with pytest.raises(InputError, match=r"_staging/r3: staged files hold 0 rows"):
        _publish(out, "r3", [_table([], "r3")])
    assert read_table(out).column("user").to_pylist() == [1]

    manifest = _publish(out, "r4", [_table([], "r4")], allow_empty=True)
    assert manifest["rows"] == 0 and manifest["files"] == ["part-r4-00000.parquet"]
    empty = read_table(out)
    assert empty.num_rows == 0 and empty.column_names == ["user", "items", "tag"]

    manifest = publish(out, staging_dir(out, "r5"), {}, allow_empty=True)
    assert manifest["rows"] == 0 and manifest["files"] == []
    assert read_table(out).num_rows == 0
    assert _listing(out) == ["_SUCCESS"]


def test_bad_arguments(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(InputError, match=r"manifest_extra may not set \['files', 'rows'\]"):
        publish(out, _stage(out, "r1", [_table([1], "r1")]), {"rows": 1, "files": []})
    other = str(tmp_path / "elsewhere" / "r1")
    os.makedirs(other)
    with pytest.raises(InputError, match="staging dir must be staging_dir"):
        publish(out, other, {})


def test_verify_sees_the_staged_table(tmp_path):
    out = str(tmp_path / "out")
    seen = []
    publish(out, _stage(out, "r1", [_table([1, 2], "r1"), _table([3], "r1")]), {}, verify=lambda t: seen.append(t.num_rows))
    assert seen == [3]


def test_read_table_without_manifest(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    pq.write_table(_table([1], "x"), os.path.join(out, "part-x-00000.parquet"))
    with pytest.raises(InputError) as e:
        read_table(out)
    assert str(e.value) == f"no published table at {out} (no _SUCCESS manifest)"
    assert read_manifest(out) is None
    with pytest.raises(InputError, match="no published table at"):
        read_table(str(tmp_path / "missing"))


def test_read_table_with_a_listed_file_missing(tmp_path):
    out = str(tmp_path / "out")
    _publish(out, "r1", [_table([1], "r1")])
    os.unlink(os.path.join(out, "part-r1-00000.parquet"))
    with pytest.raises(InputError, match=r"a file listed in _SUCCESS \(run r1\) is missing"):
        read_table(out)


def test_corrupt_manifest(tmp_path):
    (tmp_path / "_SUCCESS").write_text("")  # Spark's empty marker is not a manifest
    with pytest.raises(InputError, match="corrupt _SUCCESS manifest"):
        read_table(str(tmp_path))


def test_partition_style_paths_add_no_columns(tmp_path):
    out = str(tmp_path / "recs" / "dt=2026-11-24")
    t = _table([1, 2], "r1")
    _publish(out, "r1", [t])
    assert read_table(out).equals(t)


# --------------------------------------------------------------------------- latest


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
    with pytest.raises(InputError, match="relative to the root"):
        write_latest(root, "../elsewhere")
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


# --------------------------------------------------------------------------- lock


def test_lock_is_exclusive_and_released(tmp_path):
    uri = str(tmp_path / "_locks" / "dt=2026-11-24.lock")
    with lock(uri, "run-A") as held:
        assert held["owner"] == "run-A"
        assert json.loads(Path(uri).read_text())["token"] == held["token"]
        with pytest.raises(LockHeld) as e:
            with lock(uri, "run-B"):
                pass
        assert e.value.holder == "run-A"
        assert e.value.since == held["acquired_at"]
        assert str(e.value).startswith(f"{uri} is locked by 'run-A' since {held['acquired_at']}")
        assert isinstance(e.value, RuntimeError)
        with pytest.raises(LockHeld):  # not re-entrant either
            with lock(uri, "run-A"):
                pass
    assert not os.path.exists(uri)
    with lock(uri, "run-B"):
        pass
    assert os.listdir(tmp_path / "_locks") == []


def test_lock_released_after_exception(tmp_path):
    uri = str(tmp_path / "_locks" / "x.lock")
    with pytest.raises(ZeroDivisionError):
        with lock(uri, "run-A"):
            1 / 0
    assert not os.path.exists(uri)
    with lock(uri, "run-B") as held:
        assert held["owner"] == "run-B"


def test_stale_lock_is_taken_over(tmp_path):
    uri = str(tmp_path / "_locks" / "x.lock")
    os.makedirs(tmp_path / "_locks")
    old = {"owner": "dead-run", "token": "t0", "acquired_at": "2026-11-23T00:00:00+00:00", "acquired_at_epoch": time.time() - 7 * 3600}
    with open(uri, "w") as f:
        json.dump(old, f)
    with lock(uri, "run-B") as held:
        assert json.loads(Path(uri).read_text())["token"] == held["token"]
    assert os.listdir(tmp_path / "_locks") == []

    # the same age is fresh under a longer staleness limit
    with open(uri, "w") as f:
        json.dump(old, f)
    with pytest.raises(LockHeld, match="locked by 'dead-run' since 2026-11-23T00:00:00"):
        with lock(uri, "run-B", stale_after_s=8 * 3600):
            pass


def test_unreadable_lock_file_ages_by_mtime(tmp_path):
    uri = str(tmp_path / "x.lock")
    open(uri, "w").close()  # a run that died between creating the lock and writing it
    with pytest.raises(LockHeld, match="unknown"):
        with lock(uri, "run-B"):
            pass
    os.utime(uri, (time.time() - 7 * 3600,) * 2)
    with lock(uri, "run-B"):
        pass
    assert not os.path.exists(uri)


def test_lock_taken_over_meanwhile_is_not_deleted(tmp_path):
    uri = str(tmp_path / "x.lock")
    with lock(uri, "run-A"):
        with open(uri, "w") as f:  # another run judged us stale and took over
            json.dump({"owner": "run-B", "token": "other"}, f)
    assert json.loads(Path(uri).read_text())["owner"] == "run-B"


def test_lock_race(tmp_path):
    uri = str(tmp_path / "x.lock")
    barrier, won, lost = threading.Barrier(16), [], []

    def contender(i):
        barrier.wait()
        try:
            with lock(uri, f"run-{i}"):
                won.append(i)
                time.sleep(0.2)
        except LockHeld:
            lost.append(i)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 15
