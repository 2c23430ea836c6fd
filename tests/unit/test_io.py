"""Parquet footers read from one listing."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec.config import StorageConfig
from bert4rec.io import InputError, parquet_footers


def test_parquet_footers_counts_rows_of_every_data_file_and_keeps_the_first_schema(tmp_path):
    d = tmp_path / "t"
    (d / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"user_id": pa.array([1, 2, 3], pa.int32())}), d / "b.parquet")
    pq.write_table(pa.table({"user_id": pa.array([4], pa.int64()), "x": [1.0]}), d / "sub" / "c.parquet")
    pq.write_table(pa.table({"user_id": [9] * 5}), d / "_staging.parquet")  # not a data file
    (d / "notes.txt").write_text("ignored")
    footers = parquet_footers(str(d), StorageConfig())
    assert footers.files == [str(d / "b.parquet"), str(d / "sub" / "c.parquet")]
    assert footers.rows == 4
    assert footers.schema.names == ["user_id"] and footers.schema.field("user_id").type == pa.int32()
    one = parquet_footers(str(d / "sub" / "c.parquet"), StorageConfig())
    assert (one.files, one.rows, one.schema.names) == ([str(d / "sub" / "c.parquet")], 1, ["user_id", "x"])


def test_parquet_footers_names_a_file_that_is_not_parquet(tmp_path):
    (tmp_path / "a.parquet").write_text("user_id\n1\n")
    with pytest.raises(InputError, match=r"^.*a\.parquet: not a Parquet file"):
        parquet_footers(str(tmp_path), StorageConfig())
