"""Training on the shared local Ray cluster: quality vs popularity, resume, worker restarts."""

import json
import os

import pytest

from bert4rec import checkpoint
from bert4rec.config import EvaluateConfig, TrainConfig
from bert4rec.evaluate import evaluate
from bert4rec.train import train
from tests.conftest import TINY_MODEL, TINY_TRAIN

pytestmark = pytest.mark.ray


def test_two_worker_training_beats_popularity(trained_run, synthetic_data):
    summary = trained_run["summary"]
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 9))
    # both workers saw their shard: 2 x (600 // 2) sequences x 8 fresh masks per epoch
    assert summary["history"][-1]["train_sequences"] == 600 * 8
    result = evaluate(EvaluateConfig(checkpoint=trained_run["out"], data=synthetic_data["prepared"], k=10))
    assert result["users"] == 600
    assert set(result) >= {"ndcg@10", "hr@10", "mrr", "users", "sampled", "popularity"}
    assert result["ndcg@10"] >= 1.5 * result["popularity"]["ndcg@10"], result
    assert result["hr@10"] >= 1.5 * result["popularity"]["hr@10"], result
    # the sampled protocol is reported separately and is easier than full ranking
    assert result["sampled"]["hr@10"] >= result["hr@10"]


def test_checkpoints_describe_themselves(trained_run):
    loaded = checkpoint.load(trained_run["out"])
    assert loaded.uri.endswith(f"epoch-{loaded.metadata['epoch']:04d}")
    # the best checkpoint by validation NDCG@10 is what a run's --out resolves to
    history = trained_run["summary"]["history"]
    assert loaded.metadata["metrics"]["val_ndcg@10"] == max(h["val_ndcg@10"] for h in history)
    assert loaded.model.config.num_items == len(loaded.vocab) == 200
    assert loaded.config["train"]["workers"] == 2
    assert loaded.model_version.startswith(f"e{loaded.metadata['epoch']:04d}-")
    kept = sorted(d for d in os.listdir(os.path.join(trained_run["out"], "train")) if d.startswith("epoch-"))
    assert len(kept) <= 3  # keep_checkpoints


def _cfg(data, out, **kw):
    return TrainConfig(data=data, out=out, workers=2, model=TINY_MODEL, **{**TINY_TRAIN, "samples_per_epoch": 1, **kw})


def test_interrupted_run_resumes_from_the_next_epoch(ray_session, synthetic_data, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(Exception, match="injected failure after epoch 1"):
        train(_cfg(synthetic_data["prepared"], out, epochs=3, fail_after_epoch=1, max_failures=0))
    assert sorted(d for d in os.listdir(os.path.join(out, "train")) if d.startswith("epoch-")) == ["epoch-0001"]

    summary = train(_cfg(synthetic_data["prepared"], out, epochs=3))
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    with open(os.path.join(out, "train", "epoch-0003", "metadata.json")) as f:
        meta = json.load(f)
    # the first attempt started at epoch 1, the rerun at epoch 2: epoch 1 was not trained again
    assert meta["attempts"] == [1, 2]


def test_failed_worker_group_restarts_from_the_latest_checkpoint(ray_session, synthetic_data, tmp_path):
    out = str(tmp_path / "run")
    summary = train(_cfg(synthetic_data["prepared"], out, epochs=2, fail_after_epoch=1, max_failures=1))
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    with open(os.path.join(out, "train", "epoch-0002", "metadata.json")) as f:
        assert json.load(f)["attempts"] == [1, 2]
