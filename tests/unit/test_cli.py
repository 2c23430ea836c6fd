"""Bad input through the command line: exit code 2, one line naming the problem, nothing written."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec.cli import main


def _write(path, table):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)
    return path


GOOD = pa.table({"user_id": [1, 1, 1, 2, 2, 2], "item_id": [5, 6, 7, 5, 7, 8], "timestamp": [1, 2, 3, 1, 2, 3]})


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--data", "d", "--out", "o", "--epochs", "0"], "field 'epochs': Input should be greater than 0 (got 0)"),
        (["train", "--data", "d", "--out", "o", "--workers", "-1"], "field 'workers': Input should be greater than 0"),
        (["evaluate", "--checkpoint", "c", "--data", "d", "--k", "0"], "field 'k': Input should be greater than 0 (got 0)"),
        (["score", "--checkpoint", "c", "--histories", "h", "--out", "o", "--k", "-3"], "field 'k': Input should be greater than 0"),
        (["train", "--out", "o"], "field 'data': Field required"),
    ],
)
def test_invalid_values_name_the_field(capsys, argv, expected):
    code, err = _run(capsys, argv)
    assert code == 2
    assert expected in err
    assert len(err.splitlines()) == 1


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("data: d\nout: o\nepochs: 2\nmodel:\n  hiden: 32\n")
    code, err = _run(capsys, ["train", "--config", str(cfg)])
    assert code == 2
    assert "field 'model.hiden': unknown key (not a field of this command)" in err


def test_flags_override_the_config_file(tmp_path):
    from bert4rec.cli import load_config
    from bert4rec.config import TrainConfig

    cfg = tmp_path / "train.yaml"
    cfg.write_text("data: d\nout: o\nepochs: 2\nmodel: {hidden: 32, heads: 2}\n")
    loaded = load_config(TrainConfig, str(cfg), {"epochs": 7, "model.layers": 3})
    assert (loaded.epochs, loaded.model.hidden, loaded.model.layers, loaded.data) == (7, 32, 3, "d")


def test_evaluate_rejects_a_path_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _run(capsys, ["evaluate", "--checkpoint", str(tmp_path / "empty"), "--data", str(tmp_path)])
    assert code == 2
    assert "not a checkpoint (no metadata.json) and no checkpoint found under it" in err
