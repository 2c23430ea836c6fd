"""The publish contract on S3 (moto on loopback): publish, replace, crash, latest, lock."""

from __future__ import annotations

import json
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec import publish as pub
from bert4rec.io import InputError, filesystem, locate, write_json
from bert4rec.latest import advance_latest, read_latest, write_latest
from bert4rec.locks import LockHeld, S3Lock, lock
from bert4rec.publish import make_plan, move_files, publish, read_manifest, read_table, staging_dir

pytestmark = pytest.mark.s3


def _table(users: list[int], tag: str) -> pa.Table:
    return pa.table({"user": pa.array(users, pa.int64()), "tag": [tag] * len(users)})


def _stage(out: str, run_id: str, parts: list[pa.Table], storage) -> str:
    """Writes ``parts`` into the run's staging dir the way a Ray Data write would (uuid-ish names)."""
    staging = staging_dir(out, run_id)
    fs, path = filesystem(staging, storage)  # one S3 client for all parts: each new one costs ~0.2 s
    for i, t in enumerate(parts):
        pq.write_table(t, f"{path}/a1b2c3_{i:06d}_000000.parquet", filesystem=fs)
    return staging


def test_publish_replace_and_read(s3_server, s3_bucket):
    storage = s3_server.storage
    out = f"{s3_bucket}/recs/dt=2026-11-24"
    a, b = _table([1, 2, 3], "r1"), _table([4, 5], "r1")

    with pytest.raises(InputError) as e:
        read_table(out, storage)
    assert str(e.value) == f"no published table at {out} (no _SUCCESS manifest)"

    m1 = publish(out, _stage(out, "r1", [a, b], storage), {"model_version": "m1"}, storage)
    assert m1["files"] == ["part-r1-00000.parquet", "part-r1-00001.parquet"]
    assert (m1["rows"], m1["run_id"], m1["model_version"]) == (5, "r1", "m1")
    assert s3_server.keys(out) == ["_SUCCESS", "part-r1-00000.parquet", "part-r1-00001.parquet"]
    assert read_manifest(out, storage) == m1
    assert read_table(out, storage).equals(pa.concat_tables([a, b]))
    assert pub.published_files(out, storage) == [f"{out}/part-r1-00000.parquet", f"{out}/part-r1-00001.parquet"]

    # a run that moves files and dies before the commit: still the old table; its orphans are unlisted
    staging = _stage(out, "r3", [_table([7], "r3")], storage)
    move_files(out, staging, make_plan(out, staging, storage), storage)
    assert read_manifest(out, storage) == m1
    assert read_table(out, storage).equals(pa.concat_tables([a, b]))
    assert "part-r3-00000.parquet" in s3_server.keys(out)

    # the next publish replaces the table whole and cleans the orphans and every staging dir
    new = _table([10, 11], "r4")
    m2 = publish(out, _stage(out, "r4", [new], storage), {}, storage)
    assert m2["files"] == ["part-r4-00000.parquet"] and m2["rows"] == 2
    assert s3_server.keys(out) == ["_SUCCESS", "part-r4-00000.parquet"]
    assert read_table(out, storage).equals(new)


def test_resume_after_crash_mid_move(s3_server, s3_bucket):
    storage = s3_server.storage
    out = f"{s3_bucket}/t"
    parts = [_table([1], "r1"), _table([2, 3], "r1")]
    staging = _stage(out, "r1", parts, storage)
    plan = make_plan(out, staging, storage)
    move_files(out, staging, {**plan, "moves": plan["moves"][:1]}, storage)
    with pytest.raises(InputError, match="no published table"):
        read_table(out, storage)

    manifest = publish(out, staging, {}, storage)
    assert manifest["rows"] == 3
    assert s3_server.keys(out) == ["_SUCCESS", "part-r1-00000.parquet", "part-r1-00001.parquet"]
    assert read_table(out, storage).equals(pa.concat_tables(parts))


def test_empty_and_verification_errors(s3_server, s3_bucket):
    storage = s3_server.storage
    out = f"{s3_bucket}/t"
    with pytest.raises(InputError, match=r"_staging/r1: no Parquet files staged"):
        publish(out, staging_dir(out, "r1"), {}, storage)

    def reject(table: pa.Table) -> None:
        raise AssertionError("user ids must be unique")

    staging = _stage(out, "r2", [_table([1, 1], "r2")], storage)
    with pytest.raises(InputError, match="failed verification: AssertionError: user ids must be unique"):
        publish(out, staging, {}, storage, verify=reject)
    assert read_manifest(out, storage) is None


def test_latest(s3_server, s3_bucket):
    storage, client = s3_server.storage, s3_server.client()
    root = f"{s3_bucket}/recs"
    assert read_latest(root, storage) is None
    with pytest.raises(InputError, match="no published table there"):
        write_latest(root, "dt=2026-11-24", storage)
    for day, run in [("2026-11-23", "a"), ("2026-11-24", "b")]:
        out = f"{root}/dt={day}"
        publish(out, _stage(out, run, [_table([1], run)], storage), {}, storage)

    p1 = write_latest(root, "dt=2026-11-23", storage)
    assert read_latest(root, storage) == p1
    p2 = write_latest(root, "dt=2026-11-24", storage)
    assert read_latest(root, storage) == p2
    assert (p2["path"], p2["date"], p2["run_id"]) == ("dt=2026-11-24", "2026-11-24", "b")
    assert json.loads(client.get_object(Bucket=s3_bucket[5:], Key="recs/latest")["Body"].read()) == p2
    assert read_table(f"{root}/{p2['path']}", storage).column("tag").to_pylist() == ["b"]

    # only forward: a backfill of 11-23 leaves latest at 11-24, through one resolved Location
    loc = locate(root, storage)
    assert advance_latest(loc, "dt=2026-11-23", "backfill") == (False, p2)
    moved, p3 = advance_latest(loc, "dt=2026-11-24", "rerun")
    assert moved and (p3["path"], p3["run_id"]) == ("dt=2026-11-24", "b")
    assert s3_server.keys(f"{root}/_locks") == []

    # a crafted pointer is refused, naming the object
    write_json({"path": "../other-bucket"}, f"{root}/latest", storage)
    with pytest.raises(InputError, match=r"recs/latest: latest must name a table directory dt=YYYY-MM-DD under the root, got '../other-bucket'"):
        read_latest(root, storage)


class PlainPutS3Lock(S3Lock):
    """Creates the lock with a plain PUT, as on a server that ignores If-None-Match: the
    check, PUT, read-back path."""

    def create(self, data: bytes) -> str:
        return self.put(data)


def _lock(conditional: bool):
    if conditional:
        return lock
    return lambda uri, owner, storage, **kw: PlainPutS3Lock(locate(uri, storage), owner, **kw)


@pytest.mark.parametrize("conditional", [True, False], ids=["if-none-match", "check-then-put"])
def test_lock(s3_server, s3_bucket, conditional):
    lock = _lock(conditional)
    storage, client = s3_server.storage, s3_server.client()
    uri = f"{s3_bucket}/recs/_locks/dt=2026-11-24.lock"
    key = "recs/_locks/dt=2026-11-24.lock"

    with lock(uri, "run-A", storage) as held:
        assert json.loads(client.get_object(Bucket=s3_bucket[5:], Key=key)["Body"].read())["token"] == held["token"]
        with pytest.raises(LockHeld) as e:
            with lock(uri, "run-B", storage):
                pass
        assert (e.value.holder, e.value.since) == ("run-A", held["acquired_at"])
        assert str(e.value).startswith(f"{uri} is locked by 'run-A' since")
    assert s3_server.keys(f"{s3_bucket}/recs/_locks") == []

    with pytest.raises(RuntimeError, match="boom"):
        with lock(uri, "run-B", storage):
            raise RuntimeError("boom")
    assert s3_server.keys(f"{s3_bucket}/recs/_locks") == []

    stale = {"owner": "dead-run", "token": "t0", "acquired_at": "2026-11-23T00:00:00+00:00", "acquired_at_epoch": time.time() - 7 * 3600}
    write_json(stale, uri, storage)
    with pytest.raises(LockHeld, match="locked by 'dead-run'"):
        with lock(uri, "run-C", storage, stale_after_s=8 * 3600):
            pass
    with lock(uri, "run-C", storage) as held:
        assert json.loads(client.get_object(Bucket=s3_bucket[5:], Key=key)["Body"].read())["owner"] == "run-C"
    assert s3_server.keys(f"{s3_bucket}/recs/_locks") == []

    # taken over by another run meanwhile: release leaves their lock alone
    with lock(uri, "run-D", storage):
        write_json({"owner": "run-E", "token": "other"}, uri, storage)
    assert json.loads(client.get_object(Bucket=s3_bucket[5:], Key=key)["Body"].read())["owner"] == "run-E"


def test_lock_race(s3_server, s3_bucket):
    storage = s3_server.storage
    uri = f"{s3_bucket}/_locks/x.lock"
    n = 8
    barrier, won, lost = threading.Barrier(n), [], []

    def contender(i):
        barrier.wait()
        try:
            with lock(uri, f"run-{i}", storage):
                won.append(i)
                time.sleep(0.5)
        except LockHeld:
            lost.append(i)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == n - 1
