"""Parquet footers read from one listing; a file read in batches by a task that imports no torch."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec.config import StorageConfig
from bert4rec.io import InputError, parquet_file_batches, parquet_footers


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


def test_parquet_file_batches_reads_a_file_in_tables_of_rows_with_the_columns_asked_for(tmp_path):
    f = tmp_path / "h.parquet"
    table = pa.table({"user_id": [5, 3, 9, 1, 7], "item_ids": [[1], [2, 3], [], [4], [5, 6, 7]], "timestamps": [[0], [0, 1], [], [2], [3, 4, 5]]})
    pq.write_table(table, f, row_group_size=3)  # two row groups: batches run across them
    one_row = pa.table({"path": [str(f)]})
    out = list(parquet_file_batches(one_row, str(tmp_path), StorageConfig(), ["user_id", "item_ids"], 2))
    assert [t.num_rows for t in out] == [2, 2, 1]
    assert all(t.column_names == ["user_id", "item_ids"] for t in out)
    assert pa.concat_tables(out).to_pydict() == {"user_id": [5, 3, 9, 1, 7], "item_ids": [[1], [2, 3], [], [4], [5, 6, 7]]}


def test_parquet_file_batches_names_the_file_that_lacks_a_column_or_is_not_parquet(tmp_path):
    f = tmp_path / "h.parquet"
    pq.write_table(pa.table({"user_id": [1]}), f)
    with pytest.raises(InputError, match=r"h\.parquet: missing column\(s\) \['item_ids'\]"):
        list(parquet_file_batches(pa.table({"path": [str(f)]}), str(tmp_path), StorageConfig(), ["user_id", "item_ids"], 2))
    (tmp_path / "x.parquet").write_text("user_id\n1\n")
    with pytest.raises(InputError, match=r"x\.parquet: not a Parquet file"):
        list(parquet_file_batches(pa.table({"path": [str(tmp_path / "x.parquet")]}), str(tmp_path), StorageConfig(), ["user_id"], 2))


def test_reading_files_imports_neither_torch_nor_the_model():
    # a Ray Data task that only reads (parquet_file_batches, with a StorageConfig argument)
    # unpickles into a worker that imports bert4rec.io alone: ~1 CPU-s less than with torch
    code = "import sys, pickle, bert4rec.io as io\npickle.loads(pickle.dumps((io.parquet_file_batches, io.StorageConfig())))\nassert 'torch' not in sys.modules and 'bert4rec.model' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'bert4rec')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr
