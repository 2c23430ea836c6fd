"""Bad input through the command line: exit code 2, one line naming the problem, nothing written."""

import json
import os

import pyarrow as pa
import pytest

from bert4rec.cli import main
from tests.conftest import cli_result


GOOD = pa.table({"user_id": [1, 1, 1, 2, 2, 2], "item_id": [5, 6, 7, 5, 7, 8], "timestamp": [1, 2, 3, 1, 2, 3]})


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
    code, err = cli_result(capsys, argv)
    assert code == 2
    assert expected in err
    assert len(err.splitlines()) == 1


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("data: d\nout: o\nepochs: 2\nmodel:\n  hiden: 32\n")
    code, err = cli_result(capsys, ["train", "--config", str(cfg)])
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
    code, err = cli_result(capsys, ["evaluate", "--checkpoint", str(tmp_path / "empty"), "--data", str(tmp_path)])
    assert code == 2
    assert "not a checkpoint (no metadata.json) and no checkpoint found under it" in err


# ---------------------------------------------------------------- flags generated from the configs

from bert4rec import config as C  # noqa: E402
from bert4rec.cli import COMMANDS, build_parser, config_flags, config_model  # noqa: E402


def _leaf_fields(model, prefix=""):
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, C.BaseModel):
            yield from _leaf_fields(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_config_field_is_a_flag(command):
    model = config_model(command)
    parser = build_parser(command)
    for dest, field in _leaf_fields(model):
        *parents, name = dest.split(".")
        flag = "--" + ".".join([*parents, name.replace("_", "-")])
        if field.annotation in (bool, bool | None):  # an optional bool (model.use_ratings: none = from the data) is an on/off flag too
            parsed = vars(parser.parse_args([command, flag]))
            assert parsed[dest] is True, flag
            assert vars(parser.parse_args([command, "--no-" + flag[2:]]))[dest] is False, flag
        else:
            value = "2026-11-24" if "date" in str(field.annotation) else ("val" if "Literal" in str(field.annotation) else "3")
            if "Literal" in str(field.annotation):
                value = typing_args(field.annotation)[0]
            assert dest in vars(parser.parse_args([command, flag, value])), flag


def typing_args(annotation):
    import typing

    return typing.get_args(annotation)


def test_short_spellings_in_use_still_parse():
    parse = lambda argv: {k: v for k, v in vars(build_parser(argv[0]).parse_args(argv)).items() if not k.startswith("_") and k != "command"}  # noqa: E731
    assert parse(["prepare", "--min-rating", "3.5", "--min-user-interactions", "4", "--max-len", "none"]) == {"min_rating": 3.5, "min_user_interactions": 4, "max_len": None}
    assert parse(["train", "--hidden", "32", "--max-len", "50", "--batch-size", "8", "--gpu", "--s3-endpoint-url", "http://h:9000"]) == {
        "model.hidden": 32, "model.max_len": 50, "batch_size": 8, "gpu": True, "storage.endpoint_url": "http://h:9000",
    }
    assert parse(["nightly", "--epochs", "3", "--train.window-stride", "50", "--time-budget-s", "600", "--score.gpu", "--date", "2026-11-24"]) == {
        "train.epochs": 3, "train.window_stride": 50, "train.time_budget_s": 600.0, "score.gpu": True, "date": "2026-11-24",
    }


def test_ambiguous_short_names_are_not_generated():
    options = {o for f in config_flags(C.NightlyConfig) for o in f.options}
    # gpu, batch_size: train's and score's; max_len: prepare's and the model's
    assert not {"--gpu", "--batch-size", "--max-len"} & options
    assert {"--train.gpu", "--score.gpu", "--train.model.max-len", "--prepare.max-len", "--hidden", "--epochs"} <= options


def test_nightly_flags_override_the_file_and_validate(tmp_path):
    from bert4rec.cli import load_config

    cfg = tmp_path / "n.yaml"
    cfg.write_text("interactions: i\nout: o\ntrain: {epochs: 9, model: {hidden: 32, heads: 2}}\n")
    args = {k: v for k, v in vars(build_parser("nightly").parse_args(["nightly", "--epochs", "2", "--heads", "4", "--gate.min-ndcg", "0"])).items() if not k.startswith("_") and k != "command"}
    loaded = load_config(C.NightlyConfig, str(cfg), args)
    assert (loaded.train.epochs, loaded.train.model.hidden, loaded.train.model.heads, loaded.gate.min_ndcg) == (2, 32, 4, 0.0)


def test_bad_flag_value_is_one_line(capsys):
    assert main(["train", "--data", "d", "--out", "o", "--epochs", "x"]) == 2
    assert capsys.readouterr().err == "bert4rec train: error: argument --epochs: invalid int value: 'x' (see bert4rec train --help)\n"


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from bert4rec.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nassert 'torch' not in sys.modules and 'ray' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- failures name the stage and the path


def test_failed_run_names_the_path_and_writes_the_traceback(tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = cli_result(capsys, ["generate", "--out", str(blocker / "sub"), "--users", "5", "--items", "4"])
    assert code == 1
    log_path = next((tmp_path / "tmp" / "bert4rec-logs").iterdir())
    assert err == f"bert4rec generate: failed: NotADirectoryError: [Errno 20] Not a directory: '{blocker / 'sub'}' (traceback: {log_path})"
    assert "Traceback (most recent call last)" in log_path.read_text()


def test_failed_job_logs_the_traceback_then_the_line(tmp_path, capsys, caplog):
    from bert4rec.cli import run_job

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run_job("generate", ["--out", str(blocker / "sub"), "--users", "5", "--items", "4"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"bert4rec generate: failed: NotADirectoryError: [Errno 20] Not a directory: '{blocker / 'sub'}'"
    assert len(err.splitlines()) == 1
    (record,) = [r for r in caplog.records if r.name == "bert4rec"]
    assert record.levelname == "ERROR" and record.message == "traceback of the failed run" and isinstance(record.exc_info[1], NotADirectoryError)


def test_a_finished_command_prints_its_figures_or_with_json_the_whole_result(tmp_path, capsys):
    from bert4rec.cli import main

    assert main(["generate", "--out", str(tmp_path / "a"), "--users", "10", "--items", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == ["users: 10", "items: 5", "interactions: 519", "files: 1"]
    assert main(["generate", "--out", str(tmp_path / "b"), "--users", "10", "--items", "5", "--seed", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"users": 10, "items": 5, "interactions": 519, "files": 1}


def test_the_nightly_summary_says_where_the_table_and_its_report_are():
    from bert4rec.console import summary

    result = {
        "date": "2026-11-01", "status": "published", "latest": "moved to dt=2026-11-01",
        "table": {"path": "dt=2026-11-01", "rows": 2000, "model_version": "e0010-abc"},
        "test": {"ndcg@10": 0.41234, "popularity": {"ndcg@10": 0.06789}}, "timings": {"train_s": 12.0},
    }
    assert summary("nightly", result, "s3://b/recs/") == [
        "2026-11-01: published",
        "table: s3://b/recs/dt=2026-11-01 (2000 users, model e0010-abc)",
        "report: s3://b/recs/dt=2026-11-01/_report/report.md",
        "test NDCG@10: 0.4123 (most popular: 0.0679)",
        "latest: moved to dt=2026-11-01",
    ]
    # a gated night: no table, no test figures
    assert summary("nightly", {"date": "2026-11-02", "status": "gate failed"}, "out") == ["2026-11-02: gate failed"]
    # the other commands: numbers and strings two levels deep, floats to 4 places, no lists
    assert summary("evaluate", {"users": 3, "ndcg@10": 0.123456, "popularity": {"ndcg@10": 0.1, "x": {"y": 1}}, "ks": [1]}) == [
        "users: 3", "ndcg@10: 0.1235", "popularity.ndcg@10: 0.1000"
    ]
