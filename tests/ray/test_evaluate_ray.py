"""Evaluation on Ray Data actors against the in-process reference; the hash sample of users
read from every histories file."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from bert4rec.config import EvaluateConfig
from bert4rec.data import sample_mask
from bert4rec.evaluate import evaluate, evaluate_in_process
from bert4rec.train import read_prepared, read_sample

pytestmark = pytest.mark.ray


def test_distributed_evaluation_equals_the_in_process_reference(trained_run, synthetic_data):
    # batches of 64 users on 1 actor; the reference ranks all users at once
    cfg = EvaluateConfig(checkpoint=trained_run["out"], data=synthetic_data["prepared"], batch_size=64, negatives=50)
    got = evaluate(cfg)
    assert got == evaluate_in_process(cfg)
    assert got["users"] == 600 and got["skipped_users"] == 0
    assert set(got) >= {"ndcg@10", "hr@10", "mrr", "users", "sampled", "popularity"}
    # a hash sample of about 200 users: the same users, negatives and figures both ways
    sampled = cfg.model_copy(update={"max_users": 200, "actors": 1})
    got = evaluate(sampled)
    assert got == evaluate_in_process(sampled)
    users = np.arange(600)  # the synthetic generator's user ids
    assert got["users"] + got["skipped_users"] == int(sample_mask(users, 200, 600).sum()) == 189


def test_the_validation_sample_spans_every_histories_file(ray_session, synthetic_data, tmp_path):
    histories = pq.read_table(synthetic_data["histories"])
    split = tmp_path / "histories"
    split.mkdir()
    # three files, lowest user ids first, as prepare writes a large table
    for i, start in enumerate(range(0, histories.num_rows, 200)):
        pq.write_table(histories.slice(start, 200), split / f"part-{i:05d}.parquet")
    users = read_prepared(synthetic_data["prepared"], None).users
    assert users == histories.num_rows == 600
    sample = read_sample(str(split), None, 50, 600, seed=0)
    ids = sample["user_id"].to_numpy()
    assert len(ids) == 50 and np.all(np.diff(ids) > 0)
    # from all three files, and the same users as from the single file
    assert {int(u) // 200 for u in ids} == {0, 1, 2}
    assert np.array_equal(ids, read_sample(synthetic_data["histories"], None, 50, 600, seed=0)["user_id"].to_numpy())
    # all of them in the hash sample (of which the lowest hashes are kept when it runs over)
    mask = sample_mask(histories["user_id"].to_numpy(), 50, 600)
    assert set(ids.tolist()) <= set(histories["user_id"].to_numpy()[mask].tolist())
