"""Checkpoints without Ray: the loaded model is the saved one, ready to use; every file is
untrusted (no pickled code runs, a damaged or mismatched file is one line naming it)."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bert4rec import checkpoint as ckpt_lib
from bert4rec.cli import main
from bert4rec.io import InputError
from bert4rec.model import BERT4Rec, BERT4RecConfig, cloze_loss
from bert4rec.train import WarmupCosine

CFG = BERT4RecConfig(num_items=5, max_len=4, hidden=8, layers=1, heads=2, use_ratings=True)
VOCAB = pa.table({"item_id": pa.array([10, 20, 30, 40, 50], pa.int64()), "token": pa.array([1, 2, 3, 4, 5], pa.int32()), "count": pa.array([5, 4, 3, 2, 1], pa.int64())})


def test_loaded_weights_equal_the_saved_ones_and_train(tmp_path):
    torch.manual_seed(0)
    model = BERT4Rec(CFG)
    meta = ckpt_lib.save(str(tmp_path / "c"), model, VOCAB, {"epoch": 2, "metrics": {"val_ndcg@10": 0.5}})
    loaded = ckpt_lib.load(str(tmp_path / "c"))
    assert loaded.metadata["epoch"] == 2 and loaded.model_version == meta["model_version"]
    assert loaded.vocab_ids.tolist() == [10, 20, 30, 40, 50]
    assert not loaded.model.training
    saved, got = model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == got.keys()
    for name in saved:
        assert got[name].device.type == "cpu", name
        assert torch.equal(saved[name], got[name]), name
    assert all(p.requires_grad for p in loaded.model.parameters())
    tokens = torch.tensor([[1, 2, 6, 4]])
    ratings = torch.tensor([[5, 3, 0, 1]])
    model.eval()
    assert torch.equal(model(tokens, ratings), loaded.model(tokens, ratings))
    # it trains: every parameter gets a gradient
    loaded.model.train()
    cloze_loss(loaded.model, tokens, torch.tensor([[0, 0, 3, 0]]), ratings).backward()
    assert all(p.grad is not None for p in loaded.model.parameters())
    assert np.isfinite(loaded.model.item_emb.weight.grad.numpy()).all()


# ---------------------------------------------------------------- untrusted files


class WritesAMarker:
    """A pickle that runs code when loaded: it would create the file ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _saved(tmp_path, optimizer_state=None):
    torch.manual_seed(0)
    directory = str(tmp_path / "c")
    ckpt_lib.save(directory, BERT4Rec(CFG), VOCAB, {"epoch": 1, "metrics": {"val_ndcg@10": 0.5}}, optimizer_state=optimizer_state)
    return directory


def _load_error(directory, **kw) -> str:
    with pytest.raises(InputError) as e:
        ckpt_lib.load(directory, **kw)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {directory}: "), message
    return message


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt"])
def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, name):
    directory = _saved(tmp_path, optimizer_state={"optimizer": {}, "scheduler": {}})
    marker = tmp_path / "code-ran"
    # the payload is live: an unsafe load would run it (checked on a throwaway copy)
    probe = tmp_path / "probe-ran"
    torch.save({"x": WritesAMarker(str(probe))}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()

    torch.save({"state": WritesAMarker(str(marker))}, os.path.join(directory, name))
    message = _load_error(directory, with_optimizer=True)
    assert message.endswith(f": {name} refused: not plain tensors, loading it could run code (it pickles io.open)"), message
    assert not marker.exists()


def test_the_optimizer_and_lr_schedule_round_trip_as_plain_data(tmp_path):
    model = BERT4Rec(CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # numpy integers, as step counts computed with numpy would be: stored as plain ints
    schedule = WarmupCosine(np.int64(2), np.int64(10), np.float32(0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    cloze_loss(model, torch.tensor([[1, 2, 6, 4]]), torch.tensor([[0, 0, 3, 0]]), torch.tensor([[5, 3, 0, 1]])).backward()
    optimizer.step()
    scheduler.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    directory = str(tmp_path / "c")
    ckpt_lib.save(directory, model, VOCAB, {"epoch": 1, "metrics": {}}, optimizer_state=state)
    loaded = ckpt_lib.load(directory, with_optimizer=True)
    assert loaded.optimizer_state["scheduler"]["lr_lambdas"] == [{"warmup_steps": 2, "total_steps": 10, "min_ratio": pytest.approx(0.1)}]
    assert loaded.optimizer_state["scheduler"]["last_epoch"] == 1
    restored = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(BERT4Rec(CFG).parameters(), lr=1e-3), WarmupCosine(1, 1, 0.5))
    restored.load_state_dict(loaded.optimizer_state["scheduler"])
    assert (restored.lr_lambdas[0].warmup_steps, restored.lr_lambdas[0].total_steps) == (2, 10)
    assert restored.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(loaded.optimizer_state["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def _write_bytes(directory, name, data: bytes):
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def _truncate(directory, name):
    with open(os.path.join(directory, name), "rb") as f:
        data = f.read()
    _write_bytes(directory, name, data[: len(data) // 2])


def _edit_json(directory, name, edit):
    with open(os.path.join(directory, name)) as f:
        obj = json.load(f)
    edit(obj)
    _write_bytes(directory, name, json.dumps(obj).encode())


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: _truncate(d, "model.pt"), "model.pt is damaged or not a torch file"),
        (lambda d: _write_bytes(d, "model.pt", b""), "model.pt is damaged or not a torch file"),
        (lambda d: _truncate(d, "metadata.json"), "metadata.json is not valid JSON"),
        (lambda d: _write_bytes(d, "metadata.json", b"[1, 2]"), "metadata.json: expected a JSON object, found list"),
        (lambda d: _edit_json(d, "metadata.json", lambda m: m.update(epoch="3")), "metadata.json: field 'epoch' must be int, found '3'"),
        (lambda d: _edit_json(d, "metadata.json", lambda m: m.update(history={"a": 1})), "metadata.json: field 'history' must be list"),
        (lambda d: _edit_json(d, "metadata.json", lambda m: m.pop("model_version")), "metadata.json: field 'model_version' must be str, found None"),
        (lambda d: _truncate(d, "config.json"), "config.json is not valid JSON"),
        (lambda d: _write_bytes(d, "config.json", b'"model"'), "config.json must be an object with a 'model' object, found str"),
        (lambda d: _edit_json(d, "config.json", lambda c: c["model"].update(heads=3)), "config.json has an invalid model config: (model): Value error, hidden (8) must be divisible by heads (3)"),
        (lambda d: _edit_json(d, "config.json", lambda c: c["model"].update(hidden="wide")), "config.json has an invalid model config: hidden: Input should be a valid integer"),
        (lambda d: _edit_json(d, "config.json", lambda c: c["model"].update(colour=1)), "config.json has an invalid model config: colour: Extra inputs are not permitted"),
        (lambda d: _truncate(d, "vocab.parquet"), "vocab.parquet is not a readable Parquet file"),
        (lambda d: os.remove(os.path.join(d, "vocab.parquet")), "incomplete, missing vocab.parquet"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_a_damaged_file_is_one_line_naming_it(tmp_path, damage, expected):
    directory = _saved(tmp_path)
    damage(directory)
    assert expected in _load_error(directory)


def _vocab(ids, tokens=None):
    tokens = tokens if tokens is not None else list(range(1, len(ids) + 1))
    return pa.table({"item_id": pa.array(ids, pa.int64()), "token": pa.array(tokens, pa.int32()), "count": pa.array([1] * len(ids), pa.int64())})


@pytest.mark.parametrize(
    "vocab, expected",
    [
        (_vocab(list(range(10, 310))), "vocab.parquet: 300 items, but the model's item embedding is for num_items=5"),
        (_vocab([10, 20, 20, 40, 50]), "vocab.parquet: item_id must be strictly increasing, row 2 has 20 after 20"),
        (_vocab([50, 40, 30, 20, 10]), "vocab.parquet: item_id must be strictly increasing, row 1 has 40 after 50"),
        (_vocab([10, 20, 30, 40, 50], [0, 1, 2, 3, 4]), "vocab.parquet: token must be 1..5 in row order, row 0 has 0 (expected 1)"),
        (VOCAB.drop_columns(["count"]), "vocab.parquet: missing column 'count'"),
        (VOCAB.set_column(0, "item_id", pa.array(["a", "b", "c", "d", "e"])), "vocab.parquet: column 'item_id' must be integers, found string"),
    ],
)
def test_a_vocabulary_that_does_not_match_the_weights_is_refused(tmp_path, vocab, expected):
    directory = _saved(tmp_path)
    pq.write_table(vocab, os.path.join(directory, "vocab.parquet"))
    assert expected in _load_error(directory)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s.pop("out_bias"), "model.pt: weights do not match the model config: missing ['out_bias']"),
        (lambda s: s.update(extra=torch.zeros(1)), "model.pt: weights do not match the model config: unexpected ['extra']"),
        (lambda s: s.update({"item_emb.weight": torch.zeros(202, 8)}), "model.pt: weight 'item_emb.weight' is (202, 8), the model config needs (7, 8)"),
        (lambda s: s.update({"out_bias": [0.0] * 7}), "model.pt: weight 'out_bias' is a list, expected a tensor"),
    ],
)
def test_weights_that_do_not_match_the_model_config_are_refused(tmp_path, edit, expected):
    directory = _saved(tmp_path)
    state = torch.load(os.path.join(directory, "model.pt"), weights_only=True)
    edit(state)
    torch.save(state, os.path.join(directory, "model.pt"))
    assert expected in _load_error(directory)


def test_the_cli_reports_a_refused_checkpoint_in_one_line_with_exit_2(tmp_path, capsys):
    directory = _saved(tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"state": WritesAMarker(str(marker))}, os.path.join(directory, "model.pt"))
    code = main(["evaluate", "--checkpoint", directory, "--data", str(tmp_path / "no-data")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"bert4rec evaluate: error: checkpoint {directory}: model.pt refused: not plain tensors, loading it could run code (it pickles io.open)")
    assert not marker.exists()
