"""What a training run carries across reruns and worker restarts, without Ray: the state read
from its latest checkpoint's metadata, and the decision to stop after an epoch."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec.config import TrainConfig, TrainSettings
from bert4rec.io import InputError
from bert4rec.train import RunState, run_state, stop_reason, train


def _history(*ndcgs):
    return [{"epoch": i + 1, "val_ndcg@10": v} for i, v in enumerate(ndcgs)]


def test_a_new_run_starts_at_epoch_1_with_nothing_spent():
    assert run_state(None) == RunState(next_epoch=1, history=[], attempts=[], since_best=0, train_time_s=0.0, stopped=None)


def test_the_state_comes_back_from_the_metadata():
    meta = {"epoch": 4, "history": _history(0.1, 0.3, 0.2, 0.2), "attempts": [1, 3], "since_best": 2, "train_time_s": 123.5, "stopped": None}
    assert run_state(meta) == RunState(next_epoch=5, history=meta["history"], attempts=[1, 3], since_best=2, train_time_s=123.5, stopped=None)
    assert run_state({**meta, "stopped": "patience"}).stopped == "patience"


def test_older_checkpoints_count_patience_from_their_history():
    # no since_best stored: epochs after the best one (the first of equal bests counts)
    assert run_state({"epoch": 4, "history": _history(0.1, 0.3, 0.2, 0.3)}).since_best == 2
    assert run_state({"epoch": 2, "history": _history(0.1, 0.3)}).since_best == 0
    assert run_state({"epoch": 1}) == RunState(next_epoch=2, since_best=0)


def test_an_unknown_stop_reason_is_refused():
    with pytest.raises(InputError, match=r"^run/train: 'stopped' must be one of \('patience', 'time_budget', 'epochs'\) or null, found 'tired'$"):
        run_state({"epoch": 1, "stopped": "tired"}, "run/train")


@pytest.mark.parametrize(
    "epoch, since_best, train_time_s, settings, expected",
    [
        (3, 0, 10.0, {"epochs": 5}, None),
        (5, 0, 10.0, {"epochs": 5}, "epochs"),
        (3, 2, 10.0, {"epochs": 5, "patience": 2}, "patience"),
        (3, 1, 10.0, {"epochs": 5, "patience": 2}, None),
        (3, 0, 60.0, {"epochs": 5, "time_budget_s": 60}, "time_budget"),
        (3, 0, 59.9, {"epochs": 5, "time_budget_s": 60}, None),
        # patience first: it says more about the run than the clock does
        (5, 2, 60.0, {"epochs": 5, "patience": 2, "time_budget_s": 60}, "patience"),
    ],
)
def test_stop_reason(epoch, since_best, train_time_s, settings, expected):
    assert stop_reason(epoch, since_best, train_time_s, TrainSettings(**settings)) == expected


def test_a_resumed_run_keeps_its_patience_and_spent_budget():
    """Resume after epoch 3 of a run with patience 2 whose best was epoch 2, 50 s spent of 60:
    one more epoch without a better NDCG stops it, and so does passing the budget."""
    run = run_state({"epoch": 3, "history": _history(0.1, 0.3, 0.2), "since_best": 1, "train_time_s": 50.0})
    settings = TrainSettings(epochs=10, patience=2, time_budget_s=60)
    assert stop_reason(run.next_epoch, run.since_best + 1, run.train_time_s + 5, settings) == "patience"
    assert stop_reason(run.next_epoch, 0, run.train_time_s + 10, settings) == "time_budget"
    assert stop_reason(run.next_epoch, 0, run.train_time_s + 5, settings) is None


def test_use_ratings_without_a_ratings_column_is_refused_before_ray_starts(tmp_path, monkeypatch):
    import bert4rec.console

    def ray_asked(*args, **kwargs):
        raise AssertionError("Ray was started before the input was refused")

    # another test of the session may have started Ray: ask whether this run reaches it
    monkeypatch.setattr(bert4rec.console, "ensure_ray", ray_asked)
    prepared = tmp_path / "prepared"
    (prepared / "histories").mkdir(parents=True)
    pq.write_table(pa.table({"item_id": pa.array([5, 6, 7], pa.int64()), "token": pa.array([1, 2, 3], pa.int32()), "count": pa.array([2, 1, 1], pa.int64())}), prepared / "vocab.parquet")
    pq.write_table(pa.table({"user_id": [1, 2], "item_ids": [[5, 6, 7], [7, 5, 6]]}), prepared / "histories" / "part-00000.parquet")
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(prepared), out=str(out), model={"use_ratings": True, "max_len": 4, "hidden": 8, "heads": 2})
    with pytest.raises(InputError) as e:
        train(cfg)
    assert str(e.value) == (
        f"model.use_ratings is true, but the histories at {prepared / 'histories'} have no 'ratings' column; "
        "set model.use_ratings: false or prepare data with ratings"
    )
    assert not os.path.exists(out)
