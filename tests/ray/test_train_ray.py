"""Training on the shared local Ray cluster: quality vs popularity, resume, worker restarts."""

import json
import os

import pytest
import torch

from bert4rec import checkpoint
from bert4rec.config import EvaluateConfig, TrainConfig
from bert4rec.evaluate import evaluate
from bert4rec.train import train
from tests.conftest import TINY_MODEL, TINY_TRAIN

pytestmark = pytest.mark.ray


def test_two_worker_training_beats_popularity(trained_run, synthetic_data):
    summary = trained_run["summary"]
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 5))
    # both workers saw their shard: 2 x (600 // 2) sequences x 16 fresh masks per epoch
    assert summary["history"][-1]["train_sequences"] == 600 * 16
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
    return TrainConfig(data=data, out=out, workers=2, **{"model": TINY_MODEL, **TINY_TRAIN, "samples_per_epoch": 1, **kw})


def fail_after_epoch(n: int):
    """A training callback that fails rank 0 after epoch ``n``'s checkpoint is reported. Once
    per run, as a resume never trains a checkpointed epoch again (if it did, it would fail
    again and so would the test). Defined in a function, so that Ray pickles it by value
    (pytest imports this file under a name the workers cannot import)."""

    class FailAfterEpoch:
        def on_epoch_end(self, epoch: int, metrics: dict, rank: int) -> None:
            if epoch == n and rank == 0:
                raise RuntimeError(f"injected failure after epoch {epoch}")

    return FailAfterEpoch()


def _metadata(out: str, epoch: int) -> dict:
    with open(os.path.join(out, "train", f"epoch-{epoch:04d}", "metadata.json")) as f:
        return json.load(f)


def test_interrupted_run_resumes_from_the_next_epoch_and_a_finished_one_is_not_trained_again(ray_session, synthetic_data, tmp_path):
    out = str(tmp_path / "run")
    # the rating embedding left to the data (the default): the synthetic histories have ratings
    model = {**TINY_MODEL, "use_ratings": None}
    with pytest.raises(Exception, match="injected failure after epoch 1"):
        train(_cfg(synthetic_data["prepared"], out, epochs=3, max_failures=0, model=model), callbacks=[fail_after_epoch(1)])
    assert sorted(d for d in os.listdir(os.path.join(out, "train")) if d.startswith("epoch-")) == ["epoch-0001"]
    first = _metadata(out, 1)
    assert first["stopped"] is None and first["since_best"] == 0 and first["train_time_s"] > 0

    summary = train(_cfg(synthetic_data["prepared"], out, epochs=3, model=model))
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    with open(os.path.join(out, "train", "epoch-0003", "config.json")) as f:
        assert json.load(f)["model"]["use_ratings"] is True  # settled from the data, recorded in the checkpoint
    meta = _metadata(out, 3)
    # the first attempt started at epoch 1, the rerun at epoch 2: epoch 1 was not trained again
    assert meta["attempts"] == [1, 2]
    assert meta["stopped"] == "epochs" and summary["stopped"] == "epochs"
    # the rerun's training time goes on from the first attempt's, not from zero (the slowest
    # rank's time, so at least rank 0's: the first attempt's plus this epoch's)
    second = _metadata(out, 2)
    assert second["train_time_s"] >= first["train_time_s"] + second["metrics"]["train_s"]

    # a rerun of the finished run trains nothing and answers with the same summary
    again = train(_cfg(synthetic_data["prepared"], out, epochs=3, model=model))
    assert {k: v for k, v in again.items() if k != "wall_s"} == {k: v for k, v in summary.items() if k != "wall_s"}
    assert sorted(d for d in os.listdir(os.path.join(out, "train")) if d.startswith("epoch-")) == ["epoch-0001", "epoch-0002", "epoch-0003"]
    assert _metadata(out, 3) == meta


def test_a_restarted_worker_group_keeps_its_patience_count(ray_session, synthetic_data, tmp_path):
    """A learning rate too small to move a float32 weight: every epoch's validation NDCG
    equals the first's, so none improves on epoch 1 and patience 2 ends the run after epoch 3,
    restart or not. The failure after epoch 2 restarts the group, which resumes at epoch 3
    with one epoch of patience already used."""
    out = str(tmp_path / "run")
    summary = train(_cfg(synthetic_data["prepared"], out, epochs=5, lr=1e-12, patience=2, max_failures=1), callbacks=[fail_after_epoch(2)])
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert len({h["val_ndcg@10"] for h in summary["history"]}) == 1
    meta = _metadata(out, 3)
    assert meta["attempts"] == [1, 3]
    assert (meta["since_best"], meta["stopped"]) == (2, "patience") and summary["stopped"] == "patience"


def test_a_weight_average_is_what_checkpoints_serve_and_a_resume_goes_on_with_it(ray_session, synthetic_data, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(Exception, match="injected failure after epoch 1"):
        train(_cfg(synthetic_data["prepared"], out, epochs=2, max_failures=0, weight_average=0.9), callbacks=[fail_after_epoch(1)])
    summary = train(_cfg(synthetic_data["prepared"], out, epochs=2, weight_average=0.9))
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert all(0.0 < h["raw_val_ndcg@10"] <= 1.0 for h in summary["history"])
    first = checkpoint.load(os.path.join(out, "train", "epoch-0001"), with_optimizer=True)
    last = checkpoint.load(os.path.join(out, "train", "epoch-0002"), with_optimizer=True)
    assert _metadata(out, 2)["attempts"] == [1, 2]
    # the rerun went on with the first attempt's average and its count, one update per step
    steps = first.optimizer_state["average_updates"]
    assert steps > 0 and last.optimizer_state["average_updates"] == 2 * steps
    # the checkpoint's model (what evaluate and score load) is the average; the weights as
    # trained ride with the optimizer's state, for the resume
    raw, served = last.optimizer_state["raw_model"], last.model.state_dict()
    assert set(raw) == set(served)
    assert not torch.equal(raw["item_emb.weight"], served["item_emb.weight"])
