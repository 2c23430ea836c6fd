"""The publish contract on the local filesystem: manifest as commit point, replace, crashes, untrusted names."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec import publish as pub
from bert4rec.io import InputError, locate
from bert4rec.publish import make_plan, move_files, publish, read_manifest, read_table, staging_dir, write_manifest


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
    plan = make_plan(out, staging)
    move_files(out, staging, {**plan, "moves": plan["moves"][:1]})  # dies after the first move

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
    move_files(out, staging, make_plan(out, staging))  # dies before the commit
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
    plan = make_plan(out, staging)
    move_files(out, staging, plan)
    write_manifest(out, plan, {})  # dies before deleting the old files

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


# --------------------------------------------------------------------------- untrusted names


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../victim.parquet", "expected a plain name (no '/', '\\', '..' or leading '.')"),
        ("..\\victim.parquet", "expected a plain name (no '/', '\\', '..' or leading '.')"),
        ("sub/part-r1-00000.parquet", "expected a plain name (no '/', '\\', '..' or leading '.')"),
        (".part-r1-00000.parquet", "expected a plain name (no '/', '\\', '..' or leading '.')"),
        ("victim.parquet", "expected part-<run_id>-NNNNN.parquet"),
        (7, "expected a plain name (no '/', '\\', '..' or leading '.')"),
    ],
)
def test_crafted_manifest_never_reads_or_deletes_outside_the_table(tmp_path, name, why):
    out = str(tmp_path / "recs" / "dt=2026-11-24")
    _publish(out, "r1", [_table([1], "r1")])
    victim = tmp_path / "recs" / "victim.parquet"
    pq.write_table(_table([666], "victim"), victim)
    manifest_path = tmp_path / "recs" / "dt=2026-11-24" / "_SUCCESS"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "files": ["part-r1-00000.parquet", name]}))

    expected = f"{manifest_path}: bad file name {name!r}: {why}"
    for read in (read_manifest, read_table, pub.published_files):
        with pytest.raises(InputError) as e:
            read(out)
        assert str(e.value) == expected
    # a new publish over it stops at the same check, before anything moves or is deleted
    with pytest.raises(InputError) as e:
        _publish(out, "r2", [_table([2], "r2")])
    assert str(e.value) == expected
    assert pq.read_table(victim).column("user").to_pylist() == [666]
    assert _listing(out) == ["_SUCCESS", "_staging", "part-r1-00000.parquet"]


def test_manifest_rows_must_be_a_count(tmp_path):
    (tmp_path / "_SUCCESS").write_text(json.dumps({"files": [], "rows": "many"}))
    with pytest.raises(InputError) as e:
        read_manifest(str(tmp_path))
    assert str(e.value) == f"{tmp_path / '_SUCCESS'}: 'rows' must be a count, got 'many'"


@pytest.mark.parametrize(
    ("moves", "message"),
    [
        ([["../../victim.parquet", "part-r2-00000.parquet"]], "bad file name '../../victim.parquet': expected a plain name (no '/', '\\', '..' or leading '.')"),
        ([["a1b2c3_000000_000000.parquet", "../part-r2-00000.parquet"]], "bad file name '../part-r2-00000.parquet': expected part-r2-00000.parquet"),
        ([["a1b2c3_000000_000000.parquet", "part-r9-00000.parquet"]], "bad file name 'part-r9-00000.parquet': expected part-r2-00000.parquet"),
        ([["_publish.json", "part-r2-00000.parquet"]], "bad staged file name '_publish.json': expected a .parquet file"),
        ([["a1b2c3_000000_000000.parquet"]], "bad move ['a1b2c3_000000_000000.parquet']: expected [staged name, part name]"),
    ],
)
def test_crafted_plan_is_refused_before_anything_moves(tmp_path, moves, message):
    out = str(tmp_path / "recs" / "dt=2026-11-24")
    _publish(out, "r1", [_table([1], "r1")])
    victim = tmp_path / "recs" / "victim.parquet"
    pq.write_table(_table([666], "victim"), victim)
    staging = _stage(out, "r2", [_table([2], "r2")])
    plan_path = os.path.join(staging, "_publish.json")
    with open(plan_path, "w") as f:
        json.dump({"run_id": "r2", "rows": 1, "moves": moves}, f)

    with pytest.raises(InputError) as e:
        publish(out, staging, {})
    assert str(e.value) == f"{plan_path}: {message}"
    assert pq.read_table(victim).column("user").to_pylist() == [666]
    assert sorted(os.listdir(staging)) == ["_publish.json", "a1b2c3_000000_000000.parquet"]
    assert read_table(out).column("user").to_pylist() == [1]


def test_plan_of_another_run_is_refused(tmp_path):
    out = str(tmp_path / "out")
    staging = _stage(out, "r2", [_table([2], "r2")])
    with open(os.path.join(staging, "_publish.json"), "w") as f:
        json.dump({"run_id": "r1", "rows": 1, "moves": []}, f)
    with pytest.raises(InputError, match=r"_publish.json: plan is for run 'r1', not 'r2'"):
        publish(out, staging, {})


def test_staging_must_be_flat(tmp_path):
    out = str(tmp_path / "out")
    staging = _stage(out, "r1", [_table([1], "r1")])
    os.makedirs(os.path.join(staging, "sub"))
    pq.write_table(_table([2], "r1"), os.path.join(staging, "sub", "x.parquet"))
    with pytest.raises(InputError) as e:
        publish(out, staging, {})
    assert str(e.value) == f"{os.path.join(staging, 'sub')}: publish takes Parquet files directly in the staging dir, not in subdirectories"


def test_run_id_with_dot_dot_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"bad run_id 'a\.\.b'"):
        staging_dir(str(tmp_path), "a..b")


def test_publish_takes_locations(tmp_path):
    table = locate(str(tmp_path / "out"))
    staging = _stage(table.uri, "r1", [_table([1, 2], "r1")])
    manifest = publish(table, table.join("_staging", "r1"), {})
    assert manifest["files"] == ["part-r1-00000.parquet"]
    assert read_manifest(table) == manifest == read_manifest(table.uri)
    assert read_table(table).column("user").to_pylist() == [1, 2]
    assert not os.path.exists(staging)
