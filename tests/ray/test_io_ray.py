"""The histories reader of the scoring and evaluation pipelines, on the shared local Ray cluster."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from bert4rec.config import StorageConfig
from bert4rec.io import parquet_dataset, parquet_footers

pytestmark = pytest.mark.ray


def test_parquet_dataset_gives_blocks_of_rows_from_every_listed_file(ray_session, tmp_path):
    d = tmp_path / "histories"
    d.mkdir()
    pq.write_table(pa.table({"user_id": [1, 2, 3, 4, 5], "item_ids": [[i] for i in range(5)], "timestamps": [[0]] * 5}), d / "a.parquet")
    pq.write_table(pa.table({"user_id": [6, 7, 8], "item_ids": [[7], [8, 9], []], "timestamps": [[0]] * 3}), d / "b.parquet")
    footers = parquet_footers(str(d), StorageConfig())
    ds = parquet_dataset(str(d), footers.files, StorageConfig(), ["user_id", "item_ids"], 2)
    blocks = ray.get(ds.to_arrow_refs())
    # each file is cut into blocks of 2 (its last may hold fewer); none joins two files' rows
    assert sorted(b.num_rows for b in blocks) == [1, 1, 2, 2, 2]
    table = pa.concat_tables(blocks).sort_by("user_id")
    assert table.column_names == ["user_id", "item_ids"]
    assert table.to_pydict() == {"user_id": [1, 2, 3, 4, 5, 6, 7, 8], "item_ids": [[0], [1], [2], [3], [4], [7], [8, 9], []]}
