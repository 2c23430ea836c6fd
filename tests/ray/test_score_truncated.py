"""Scoring histories that ``prepare --max-len`` cut: what a user had before the cut is never
recommended back (one scoring run with the session's trained model)."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from bert4rec import data
from bert4rec.config import PrepareConfig, ScoreConfig
from bert4rec.io import read_parquet
from bert4rec.prepare import prepare
from bert4rec.publish import read_table
from bert4rec.score import score

pytestmark = pytest.mark.ray


def test_items_cut_by_max_len_are_never_recommended(ray_session, trained_run, synthetic_data, tmp_path):
    prepared = str(tmp_path / "prepared")
    stats = prepare(PrepareConfig(interactions=synthetic_data["raw"], out=prepared, max_len=5))
    assert stats["dropped"]["truncated_rows"] > 0
    hist = read_parquet(str(tmp_path / "prepared" / "histories"))
    assert pc.max(pc.list_value_length(hist["item_ids"])).as_py() == 5
    raw = read_parquet(synthetic_data["raw"])
    had: dict[int, set[int]] = {}
    for u, i in zip(raw["user_id"].to_pylist(), raw["item_id"].to_pylist()):
        had.setdefault(u, set()).add(i)

    out = str(tmp_path / "recs")
    score(ScoreConfig(checkpoint=trained_run["out"], histories=str(tmp_path / "prepared" / "histories"), out=out, k=10, batch_size=128))
    table = read_table(out)
    assert table.num_rows == hist.num_rows
    cut_users = sum(len(c) > 0 for c in hist[data.TRUNCATED_COLUMN].to_pylist())
    assert cut_users > 0
    for row in table.to_pylist():
        assert len(row["item_ids"]) == 10
        assert not set(row["item_ids"]) & had[row["user_id"]], f"user {row['user_id']} was recommended an item they had"
