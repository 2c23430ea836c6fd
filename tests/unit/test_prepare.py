"""Reading and validating interactions for ``prepare`` on tiny files (no Ray): time units, --until accounting, malformed
MovieLens lines, odd partitions, and outputs placed where the next run would read them."""

from __future__ import annotations


import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from bert4rec.config import NightlyConfig, PrepareConfig, is_within
from bert4rec.data import build_histories
from bert4rec.io import InputError
from bert4rec.prepare import read_interactions

DAY_S = 86_400
D1 = 1_700_006_400  # 2023-11-15 00:00:00 UTC


def _write(path, user, item, ts, ts_type=pa.int64()):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": pa.array(user, pa.int64()), "item_id": pa.array(item, pa.int64()), "timestamp": pa.array(ts, ts_type)}), path)


def test_a_file_mixing_seconds_and_milliseconds_is_refused(tmp_path):
    src = tmp_path / "in.parquet"
    _write(src, [1, 1, 1], [10, 20, 30], [D1, D1 * 1000, D1 + 1])
    with pytest.raises(InputError) as e:
        read_interactions(str(src))
    assert str(e.value) == (
        f"{src}: column 'timestamp' mixes units: row 1 is {D1 * 1000} (milliseconds?) while most values, e.g. row 0 = {D1}, "
        "read as seconds; declare the unit with timestamp_unit: s, ms, us or ns"
    )
    # declared, the same file is still refused: as seconds, row 1 is after 2100
    with pytest.raises(InputError, match=rf"row 1 is {D1 * 1000}, in seconds: not a time between 1970 and 2100"):
        read_interactions(str(src), timestamp_unit="s")


def test_declared_unit_is_used(tmp_path):
    src = tmp_path / "in.parquet"
    # small values that "auto" would read as seconds: declared as milliseconds, 1999 < 2000 < 2001 ms
    _write(src, [1, 1, 1], [10, 20, 30], [2000, 1999, 2001])
    hist, stats = build_histories(read_interactions(str(src), timestamp_unit="ms"), min_user_interactions=3, before_ns=86_400 * 10**9)
    assert stats["dropped"]["after_until_rows"] == 0
    assert hist["item_ids"].to_pylist() == [[20, 10, 30]]


def test_an_empty_partition_is_not_an_error_but_an_empty_input_is(tmp_path):
    src = tmp_path / "interactions"
    _write(src / "dt=2023-11-15" / "part.parquet", [1, 1, 1], [10, 20, 30], [D1 + 1, D1 + 2, D1 + 3])
    _write(src / "dt=2023-11-16" / "part.parquet", [], [], [])
    assert read_interactions(str(src)).num_rows == 3
    only_empty = tmp_path / "empty"
    _write(only_empty / "dt=2023-11-16" / "part.parquet", [], [], [])
    with pytest.raises(InputError, match=r"the interactions table is empty \(no rows in any file\)"):
        read_interactions(str(only_empty))


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    src = tmp_path / "interactions"
    _write(src / "dt=2023-11-15" / "part.parquet", [1, 1, 1], [10, 20, 30], [D1 + 1, D1 + 2, D1 + 3])
    bad = src / "dt=2023-11-16" / "part.parquet"
    bad.parent.mkdir()
    bad.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(InputError) as e:
        read_interactions(str(src))
    assert str(e.value).startswith(f"{bad}: cannot read Parquet")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("ratings.dat", "1::10::5::978300760\n1::20::3\n", "line 2: expected 4 fields (user_id, item_id, rating, timestamp), found 3: '1::20::3'"),
        ("ratings.dat", "1::10::5::978300760\n1::20::3::978300761\nx::30::4::978300762\n", "line 3: user_id 'x' is not an integer"),
        ("ratings.dat", "1::10::5::978300760\n1::2.5::3::978300761\n", "line 2: item_id '2.5' is not an integer"),
        ("ratings.dat", "1::10::five::978300760\n", "line 1: rating 'five' is not a number"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,5.0,978300760\n1,20,3.0\n", "line 3: expected 4 fields (userId, movieId, rating, timestamp), found 3: '1,20,3.0'"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,5.0,978300760\n1,abc,3.0,978300761\n", "line 3: movieId 'abc' is not an integer"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,5.0,\n1,20,3.0,97830076x\n", "line 3: timestamp '97830076x' is not an integer"),
    ],
)
def test_a_malformed_movielens_line_is_named_by_file_and_line(tmp_path, name, text, message):
    src = tmp_path / name
    src.write_text(text)
    with pytest.raises(InputError) as e:
        read_interactions(str(src))
    assert str(e.value) == f"{src}: {message}"


def test_movielens_dat_with_fractional_ratings_and_a_trailing_newline(tmp_path):
    src = tmp_path / "ratings.dat"
    src.write_text("1::10::4.5::978300760\n1::20::3::978300761\n\n")
    t = read_interactions(str(src))
    assert t.to_pydict() == {"user_id": [1, 1], "item_id": [10, 20], "timestamp": [978300760 * 10**9, 978300761 * 10**9], "rating": [4.5, 3.0]}


@pytest.mark.parametrize(
    "inner, outer, within",
    [
        ("s3://b/x/out", "s3://b/x", True),
        ("s3://b/x", "s3://b/x/", True),
        ("s3://b/x2", "s3://b/x", False),
        ("s3://b/x/../y", "s3://b/x", True),  # S3 keys are not paths: ".." is a key part
        ("s3://c/x", "s3://b/x", False),
        ("/data/x/./out", "/data/x", True),
        ("/data/x2", "/data/x", False),
        ("/data/x/../y", "/data/x", False),
        ("file:///data/x/out", "/data/x", True),
    ],
)
def test_is_within(inner, outer, within):
    assert is_within(inner, outer) is within


def test_is_within_resolves_relative_paths_and_links(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    assert is_within("link/out", str(tmp_path / "real"))
    assert is_within(str(tmp_path / "real" / "out"), "link")


@pytest.mark.parametrize(
    "model, fields, message",
    [
        (PrepareConfig, {"interactions": "s3://b/events", "out": "s3://b/events/prepared"}, "out (s3://b/events/prepared) is inside interactions (s3://b/events)"),
        (PrepareConfig, {"interactions": "/d/prep/histories", "out": "/d/prep"}, "interactions (/d/prep/histories) is inside out's histories"),
        (NightlyConfig, {"interactions": "s3://b/events", "out": "s3://b/events/recs"}, "out (s3://b/events/recs) is inside interactions"),
        (NightlyConfig, {"interactions": "s3://b/events", "out": "s3://b/recs", "work": "s3://b/events/work"}, "work (s3://b/events/work) is inside interactions"),
    ],
)
def test_outputs_inside_the_interactions_are_refused(model, fields, message):
    with pytest.raises(ValidationError) as e:
        model(**fields)
    assert message in str(e.value)


def test_outputs_next_to_the_interactions_are_fine():
    PrepareConfig(interactions="s3://b/events", out="s3://b/events2/prepared")
    NightlyConfig(interactions="s3://b/bert4rec/interactions", out="s3://b/bert4rec/recommendations", work="s3://b/bert4rec/work")
    PrepareConfig(interactions="/d/raw/ratings.dat", out="/d/prepared")


def test_movielens_csv_empty_fields_are_nulls(tmp_path):
    src = tmp_path / "ratings.csv"
    src.write_text("userId,movieId,rating,timestamp\n1,10,5.0,\n1,20,,978300761\n")
    t = read_interactions(str(src))
    assert t.to_pydict() == {"user_id": [1, 1], "item_id": [10, 20], "timestamp": [None, 978300761 * 10**9], "rating": [5.0, None]}
    src.write_text("userId,movieId,rating,timestamp\n1,10,5.0,978300760\n,20,3.0,978300761\n")
    with pytest.raises(InputError, match=r"ratings.csv: column 'user_id' has 1 null value\(s\), first at row 1$"):
        read_interactions(str(src))
