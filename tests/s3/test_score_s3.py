"""Batch scoring with checkpoint, histories and output all on S3 (moto on loopback).

The Ray workers (the read tasks, the scoring actor, the write tasks) reach the server too:
they get the fake credentials from ``ray_session`` (see tests/conftest.py), whichever of
``ray_session`` and ``s3_server`` started first.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec import checkpoint
from bert4rec import score as score_mod
from bert4rec.config import ScoreConfig
from bert4rec.io import read_parquet
from bert4rec.publish import read_manifest, read_table
from bert4rec.score import score

pytestmark = [pytest.mark.s3, pytest.mark.ray]

K = 5


def in_process_top_k(ckpt: str, histories: str) -> dict[int, list[int]]:
    """Every user's top-K item ids from the Scorer called in this process (no Ray, no S3)."""
    import datetime as dt

    import numpy as np

    from bert4rec.config import StorageConfig
    from bert4rec.score import Scorer, featurize

    scorer = Scorer(ckpt, StorageConfig(), K, 262_144, False, np.zeros(0, np.int64), None, dt.datetime.now(dt.timezone.utc))
    mc = scorer.model.config
    rows = scorer(featurize(read_parquet(histories), scorer.vocab_ids, mc.max_len, mc.mask_token, mc.use_ratings))
    return dict(zip(rows["user_id"].to_pylist(), rows["item_ids"].to_pylist()))


def test_score_from_and_to_s3(ray_session, trained_run, synthetic_data, s3_server, s3_bucket, tmp_path, monkeypatch):
    """With a per-user --exclude on S3 taken as too large for the driver, so that Ray Data
    tasks read it from the bucket and join it to the histories."""
    storage = s3_server.storage
    run, hist, out = f"{s3_bucket}/train/run", f"{s3_bucket}/prepared/histories", f"{s3_bucket}/recs/dt=2026-11-24"
    s3_server.upload_dir(trained_run["out"], run)  # the whole run: --checkpoint resolves its best checkpoint on S3
    s3_server.upload_dir(synthetic_data["histories"], hist)
    top = in_process_top_k(trained_run["out"], synthetic_data["histories"])
    losers = sorted(top)[:3]  # these users lose their top item
    (tmp_path / "exclude").mkdir()
    pq.write_table(pa.table({"user_id": pa.array(losers, pa.int64()), "item_id": pa.array([top[u][0] for u in losers], pa.int64())}), str(tmp_path / "exclude" / "part-0.parquet"))
    exclude = f"{s3_bucket}/exclude"
    s3_server.upload_dir(str(tmp_path / "exclude"), exclude)
    monkeypatch.setattr(score_mod, "DRIVER_EXCLUDE_MAX_ROWS", 0)

    score(ScoreConfig(checkpoint=run, histories=hist, out=out, k=K, batch_size=128, storage=storage, exclude=exclude))

    local = checkpoint.load(trained_run["out"])
    manifest, table = read_manifest(out, storage), read_table(out, storage)
    histories = read_parquet(synthetic_data["histories"])
    seen = dict(zip(histories["user_id"].to_pylist(), histories["item_ids"].to_pylist()))
    users = table["user_id"].to_pylist()
    assert len(users) == len(set(users)) == len(seen) == manifest["rows"] == manifest["input_users"]
    assert set(users) == set(seen)
    for user, items in zip(users, table["item_ids"].to_pylist()):
        assert len(items) == K and not set(items) & set(seen[user])
        # the excluded top item is gone and the rest moves up; everyone else gets the in-process list
        expected = top[user][1:] if user in losers else top[user]
        assert items[: len(expected)] == expected
    assert manifest["model_version"] == local.model_version
    assert manifest["checkpoint"] == f"{run}/{os.path.relpath(local.uri, trained_run['out'])}"
    assert (manifest["k"], manifest["fallback_users"], manifest["unknown_items"]) == (K, 0, 0)
    assert set(table["model_version"].to_pylist()) == {local.model_version}
    # in the bucket: the manifest and exactly the files it lists; the staging area is gone
    assert s3_server.keys(out) == sorted(["_SUCCESS", *manifest["files"]])
