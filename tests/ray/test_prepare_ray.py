"""``prepare`` as a Ray Data pipeline on tiny partitioned tables: the same histories,
vocabulary and stats as the single-process builder, incremental nights equal to a full
rebuild, and one-line errors from inside the read tasks."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec import data
from bert4rec.config import PrepareConfig
from bert4rec.io import InputError
from bert4rec.prepare import prepare, read_interactions
from tests.nights import D1, DAY_S, SETTINGS, write_night1, write_night2

def _sorted(uri):
    return pq.read_table(uri).sort_by("user_id").to_pylist()


def _stats(out):
    s = json.loads((out / "stats.json").read_text())
    return {k: s[k] for k in ("input_rows", "dropped", "users", "interactions", "items")}


@pytest.fixture(scope="module")
def nights(ray_session, tmp_path_factory) -> dict:
    """Both nights' files (night 1 reads only its own partition: ``until``); night 1 prepared,
    and night 2 prepared in full from the files alone: the reference for the other runs."""
    root = tmp_path_factory.mktemp("nights")
    src, first, full = root / "in", root / "n1", root / "n2-full"
    write_night1(src)
    write_night2(src)
    s1 = prepare(PrepareConfig(interactions=str(src), out=str(first), until=dt.date(2023, 11, 15), **SETTINGS))
    prepare(PrepareConfig(interactions=str(src), out=str(full), until=dt.date(2023, 11, 16), **SETTINGS))
    return {"src": src, "first": first, "s1": s1, "full": full}


@pytest.mark.parametrize("events_per_partition", [None, 5], ids=["one partition", "five partitions"])
def test_the_pipeline_equals_the_single_process_builder(nights, tmp_path, monkeypatch, events_per_partition):
    src, until, out = nights["src"], dt.date(2023, 11, 16), nights["full"]
    if events_per_partition:
        # one partition takes Ray's hash shuffle; several take its default, task-based one
        monkeypatch.setattr("bert4rec.prepare.EVENTS_PER_PARTITION", events_per_partition)
        out = tmp_path / "out"
        prepare(PrepareConfig(interactions=str(src), out=str(out), until=until, **SETTINGS))

    table = read_interactions(str(src), until=until)
    before_ns = int(dt.datetime(2023, 11, 17, tzinfo=dt.timezone.utc).timestamp()) * 10**9
    hist, stats = data.build_histories(table, before_ns=before_ns, **SETTINGS)
    assert _sorted(out / "histories") == hist.sort_by("user_id").to_pylist()
    assert pq.read_table(out / "vocab.parquet").equals(data.build_vocab(hist))
    assert _stats(out) == {k: stats[k] for k in ("input_rows", "dropped", "users", "interactions", "items")}
    # exact values: user 1's tie at D1+1 keeps file order (10, 20 | 30 | 60 of the next
    # partition), 99 is rated 1, 80 is in a partition after until; max_len 3 cuts the first 3
    assert hist.sort_by("user_id").select(["user_id", "item_ids", data.TRUNCATED_COLUMN]).to_pylist()[0] == {
        "user_id": 1, "item_ids": [60, 40, 70], data.TRUNCATED_COLUMN: [10, 20, 30]
    }


def test_an_incremental_night_equals_a_full_rebuild(nights, tmp_path):
    src, first, full = nights["src"], nights["first"], nights["full"]
    assert (nights["s1"]["mode"], nights["s1"]["mode_reason"]) == ("full", "no previous prepared data")
    inc = tmp_path / "n2"
    s2 = prepare(PrepareConfig(interactions=str(src), out=str(inc), until=dt.date(2023, 11, 16), previous=str(first), **SETTINGS))
    assert s2["mode"] == "incremental"
    # 9 rows in the two new files; users 5 is new (2 and 4 were pending, 3 and 1 kept)
    assert (s2["new_rows"], s2["new_users"]) == (9, 1)
    for name in ("histories", "pending"):
        assert _sorted(inc / name) == _sorted(full / name)
    assert pq.read_table(inc / "vocab.parquet").equals(pq.read_table(full / "vocab.parquet"))
    assert _stats(inc) == _stats(full)
    # user 2 was short on night 1 and now has 3 events: 11 (late), 10, 12
    assert {r["user_id"]: r["item_ids"] for r in _sorted(inc / "histories")}[2] == [11, 10, 12]


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"max_len": 4}, "settings changed since {first}: max_len"),
        ({"full": True}, "full rebuild requested"),
        ({"previous_missing": True}, "previous prepared data {first}-gone unusable: FileNotFoundError"),
    ],
)
def test_a_changed_setting_or_an_unusable_previous_set_rebuilds_everything(nights, tmp_path, change, reason):
    src, first = nights["src"], nights["first"]
    previous = str(first) + ("-gone" if change.pop("previous_missing", False) else "")
    out = tmp_path / "n2"
    s = prepare(PrepareConfig(interactions=str(src), out=str(out), until=dt.date(2023, 11, 16), previous=previous, **{**SETTINGS, **change}))
    assert s["mode"] == "full"
    assert s["mode_reason"].startswith(reason.format(first=first))
    # a full rebuild reads every file dated up to night 2: 12 rows of night 1, 9 of night 2
    assert s["new_rows"] == 21
    if "max_len" not in change:
        assert _sorted(out / "histories") == _sorted(nights["full"] / "histories")


def test_a_bad_file_read_in_a_task_is_one_line_naming_it_and_nothing_is_written(ray_session, tmp_path):
    src = tmp_path / "in"
    write_night1(src)
    bad = src / "dt=2023-11-16" / "part.parquet"
    bad.parent.mkdir()
    # a schema that passes the driver's footer check; the null is found by the task reading the rows
    pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64()), "item_id": pa.array([1, None], pa.int64()), "timestamp": [D1, D1]}), bad)
    out = tmp_path / "out"
    with pytest.raises(InputError) as e:
        prepare(PrepareConfig(interactions=str(src), out=str(out)))
    assert str(e.value) == f"{bad}: column 'item_id' has 1 null value(s), first at row 1"
    assert not out.exists()


def _write3(path, user, item, ts):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": pa.array(user, pa.int64()), "item_id": pa.array(item, pa.int64()), "timestamp": pa.array(ts, pa.int64())}), path)


def test_until_drops_and_counts_later_rows_of_millisecond_partitions(ray_session, tmp_path):
    src = tmp_path / "interactions"
    # a partition in seconds and one in milliseconds; the second holds two rows past its date
    _write3(src / "dt=2023-11-15" / "part.parquet", [1, 1, 1], [10, 20, 30], [D1 + 1, D1 + 2, D1 + 3])
    ms = [(D1 + DAY_S + 10) * 1000 + 500, (D1 + DAY_S + 10) * 1000 + 100, (D1 + 2 * DAY_S) * 1000, (D1 + 3 * DAY_S) * 1000]
    _write3(src / "dt=2023-11-16" / "part.parquet", [1, 1, 1, 1], [40, 50, 60, 70], ms)
    _write3(src / "dt=2023-11-17" / "part.parquet", [1], [80], [D1 + 2 * DAY_S])  # not read at all
    out = tmp_path / "prepared"
    stats = prepare(PrepareConfig(interactions=str(src), out=str(out), until=dt.date(2023, 11, 16), min_user_interactions=3))
    hist = pq.read_table(out / "histories").to_pydict()
    # 50 and 40 share a second: their milliseconds order them
    assert hist["item_ids"] == [[10, 20, 30, 50, 40]]
    written = json.loads((out / "stats.json").read_text())
    assert written["dropped"] == {"null_timestamp": 0, "after_until_rows": 2, "short_user_rows": 0, "short_users": 0}
    assert written["input_rows"] == 7 and written["interactions"] == 5
    assert stats["dropped"] == written["dropped"]
