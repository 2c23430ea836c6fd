"""``prepare`` reading from and writing to S3 (moto on loopback): a full night, then an
incremental one from the first, each equal to the same runs on local disk."""

from __future__ import annotations

import datetime as dt

import pyarrow.parquet as pq
import pytest

from bert4rec.config import PrepareConfig
from bert4rec.io import read_json, read_parquet
from bert4rec.prepare import prepare

from tests.nights import SETTINGS, write_night1, write_night2

pytestmark = [pytest.mark.s3, pytest.mark.ray]


def _rows(table):
    return table.sort_by("user_id").to_pylist()


def test_a_full_then_an_incremental_night_on_s3_equal_the_same_on_disk(ray_session, s3_server, s3_bucket, tmp_path):
    storage = s3_server.storage
    src = tmp_path / "in"
    write_night1(src)
    s3_server.upload_dir(str(src), f"{s3_bucket}/in")
    prepare(PrepareConfig(interactions=f"{s3_bucket}/in", out=f"{s3_bucket}/n1", until=dt.date(2023, 11, 15), storage=storage, **SETTINGS))
    write_night2(src)
    s3_server.upload_dir(str(src), f"{s3_bucket}/in")
    s3 = prepare(PrepareConfig(interactions=f"{s3_bucket}/in", out=f"{s3_bucket}/n2", until=dt.date(2023, 11, 16), previous=f"{s3_bucket}/n1", storage=storage, **SETTINGS))
    local = prepare(PrepareConfig(interactions=str(src), out=str(tmp_path / "n2"), until=dt.date(2023, 11, 16), **SETTINGS))

    assert (s3["mode"], s3["new_rows"]) == ("incremental", 9)
    for name in ("histories", "pending"):
        assert _rows(read_parquet(f"{s3_bucket}/n2/{name}", storage)) == _rows(pq.read_table(tmp_path / "n2" / name))
    assert read_parquet(f"{s3_bucket}/n2/vocab.parquet", storage).equals(pq.read_table(tmp_path / "n2" / "vocab.parquet"))
    assert read_json(f"{s3_bucket}/n2/stats.json", storage)["users"] == local["users"]
    # the staging area and the replaced sets are gone
    assert [k for k in s3_server.keys(f"{s3_bucket}/n2") if "_staging" in k or "-old-" in k] == []
