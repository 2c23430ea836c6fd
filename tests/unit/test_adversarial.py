"""Adversarial inputs across every command: a hostile upstream and a careless operator.

Each case runs ``bert4rec.cli.main([...])`` in-process (a few run ``python -m bert4rec.cli``
as a subprocess where the process's own exit and output matter) and asserts the contract:

* a non-zero exit: 2 for bad input;
* exactly one line on stderr, naming the field, file or row at fault;
* no "Traceback" anywhere in the output;
* where a table was published before: its ``_SUCCESS``, its files and ``latest`` are
  byte-identical afterwards, and nothing outside the output root is read, moved or deleted.

No Ray cluster is started. The ``no_cluster`` fixture makes ``ray.init`` a no-op and makes the
first real use of Ray (Ray Data's read, the cluster's resources) raise ``RayReached``: every
check here belongs before Ray starts, so a case that gets that far exits 1 with "RayReached"
in its message and fails its exit-code assertion, instead of starting a cluster.

A few cases call the library directly (``bert4rec.publish``, ``bert4rec.checkpoint``): crafted
manifests, publish plans and optimizer states are read there, and nowhere a command reaches
before Ray.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from bert4rec import checkpoint as ckpt_lib
from bert4rec import latest, publish
from bert4rec.cli import main
from bert4rec.io import InputError
from bert4rec.model import BERT4Rec, BERT4RecConfig
from tests.conftest import prepare_in_process, snapshot

REPO = Path(__file__).resolve().parents[2]
ITEMS = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]  # more than the default k of 10
DATE = "2026-01-01"
PART = f"dt={DATE}"
# seconds: 2024-11-24 onwards, one interaction a minute
T0 = 1_732_406_400


# ---------------------------------------------------------------- crafted files


class MarkerPayload:
    """Unpickling this creates ``path``: the stand-in for arbitrary code run by a crafted file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def interactions_table(users: int = 6, per_user: int = 6) -> pa.Table:
    rows = {"user_id": [], "item_id": [], "timestamp": [], "rating": []}
    for u in range(1, users + 1):
        for i in range(per_user):
            rows["user_id"].append(u)
            rows["item_id"].append(ITEMS[(u + i) % len(ITEMS)])
            rows["timestamp"].append(T0 + 60 * (u * per_user + i))
            rows["rating"].append(float(1 + (u + i) % 5))
    return pa.table({"user_id": pa.array(rows["user_id"], pa.int64()), "item_id": pa.array(rows["item_id"], pa.int64()), "timestamp": pa.array(rows["timestamp"], pa.int64()), "rating": pa.array(rows["rating"], pa.float32())})


def write_parquet(path: Path, table: pa.Table) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


def tiny_model(num_items: int = len(ITEMS), hidden: int = 8) -> BERT4Rec:
    torch.manual_seed(0)
    cfg = BERT4RecConfig(num_items=num_items, max_len=8, hidden=hidden, layers=1, heads=2, dropout=0.0, attn_dropout=0.0)
    return BERT4Rec(cfg)


def vocab_table(ids: list[int]) -> pa.Table:
    return pa.table({"item_id": pa.array(ids, pa.int64()), "token": pa.array(range(1, len(ids) + 1), pa.int64()), "count": pa.array([3] * len(ids), pa.int64())})


def save_checkpoint(directory: Path, optimizer_state: dict | None = None) -> str:
    ckpt_lib.save(str(directory), tiny_model(), vocab_table(ITEMS), {"epoch": 1, "metrics": {"val_ndcg@10": 0.1}, "history": []}, optimizer_state=optimizer_state)
    return str(directory)


def publish_table(out: str, run_id: str, extra: dict) -> dict:
    """A small published table, through the library's own staging and publish."""
    staging = publish.staging_dir(out, run_id)
    table = pa.table({"user_id": pa.array([1, 2], pa.int64()), "item_ids": pa.array([[10, 20], [30, 40]], pa.list_(pa.int64()))})
    write_parquet(Path(staging) / "block-0.parquet", table)
    return publish.publish(out, staging, extra)


# ---------------------------------------------------------------- fixtures


class RayReached(RuntimeError):
    """Ray was about to be used: the input should have been refused before this point."""


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch, request):
    import ray
    import ray.data

    if "ray_session" in request.fixturenames:
        return  # a case whose check runs in Ray's reading tasks: the real cluster

    def reached(*args, **kwargs):
        raise RayReached("Ray was used before the input was refused")

    import bert4rec.console

    # no cluster and no console board: the command's own checks run first
    monkeypatch.setattr(bert4rec.console, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "cluster_resources", reached)
    monkeypatch.setattr(ray.data, "read_parquet", reached)
    monkeypatch.setattr(ray.data, "from_items", reached)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Built once: raw interactions, what prepare makes of them, a checkpoint."""
    root = tmp_path_factory.mktemp("adversarial-base")
    write_parquet(root / "raw" / "part-0.parquet", interactions_table())
    prepare_in_process(str(root / "raw"), str(root / "prepared"), min_user_interactions=5)
    save_checkpoint(root / "ckpt", optimizer_state={"state": {}, "param_groups": [{"lr": 0.001, "params": []}]})
    return root


@pytest.fixture
def env(base, tmp_path) -> dict:
    """A fresh copy of the base files, plus a published nightly root and a published score
    table, both pointing at the checkpoint; ``victim`` is outside every output root."""
    for name in ("raw", "prepared", "ckpt"):
        shutil.copytree(base / name, tmp_path / name)
    ckpt = str(tmp_path / "ckpt")
    version = json.loads((tmp_path / "ckpt" / "metadata.json").read_text())["model_version"]
    extra = {"checkpoint": ckpt, "model_version": version, "val_ndcg@10": 0.1, "date": DATE}
    root = tmp_path / "nightly"
    # the model the nightly root serves lies where the flow writes its runs: <out>/_work/dt=.../
    served = root / "_work" / PART / "train" / "train" / "epoch-0001"
    shutil.copytree(tmp_path / "ckpt", served)
    publish_table(str(root / PART), "20260101T000000-aaaaaaaa", {**extra, "checkpoint": str(served)})
    latest.write_latest(str(root), PART)
    publish_table(str(tmp_path / "scored"), "20260101T000000-bbbbbbbb", extra)
    victim = tmp_path / "victim"
    write_parquet(victim / "secret.parquet", pa.table({"user_id": [99], "item_ids": [[1]]}))
    (victim / "_SUCCESS").write_text(json.dumps({"files": ["secret.parquet"], "rows": 1, "run_id": "v", "checkpoint": ckpt}))
    return {
        "dir": tmp_path,
        "raw": str(tmp_path / "raw"),
        "prepared": str(tmp_path / "prepared"),
        "histories": str(tmp_path / "prepared" / "histories"),
        "ckpt": ckpt,
        "served": str(served),
        "root": str(root),
        "scored": str(tmp_path / "scored"),
        "victim": str(victim),
        "marker": str(tmp_path / "MARKER-code-ran"),
    }


def published_state(env: dict) -> dict:
    """What must survive a failed run byte for byte: both published tables, ``latest``, the
    victim outside the roots."""
    root = Path(env["root"])
    return {
        "nightly_table": snapshot(str(root / PART)),
        "latest": (root / "latest").read_bytes(),
        "scored": {k: v for k, v in snapshot(env["scored"]).items() if not k.startswith("_staging")},
        "victim": snapshot(env["victim"]),
    }


def changed(env: dict, before: dict) -> list[str]:
    """Which of the published tables, ``latest`` and the victim differ from ``before``."""
    after = published_state(env)
    return [k for k in before if after[k] != before[k]]


def assert_intact(env: dict, before: dict) -> None:
    diff = changed(env, before)
    assert not diff, f"changed: {diff}"


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every local file opened through fsspec or ``open`` during the test."""
    import fsspec.implementations.local as local

    seen: list[str] = []
    real_open, real_fs_open = builtins.open, local.LocalFileSystem._open

    def spy_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            seen.append(os.path.abspath(os.fspath(file)))
        return real_open(file, *args, **kwargs)

    def spy_fs_open(self, path, *args, **kwargs):
        seen.append(os.path.abspath(path))
        return real_fs_open(self, path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(local.LocalFileSystem, "_open", spy_fs_open)
    return seen


# ---------------------------------------------------------------- the contract


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, out: str, err: str, names: list[str], exit_code: int | None = 2) -> None:
    """Non-zero (``exit_code`` if given), one stderr line matching every regex in ``names``."""
    line = err.strip()
    assert "Traceback" not in out + err, err
    assert code != 0, f"exit 0; stdout: {out[-300:]!r}"
    if exit_code is not None:
        assert code == exit_code, f"exit {code}, expected {exit_code}: {line!r}"
    assert len(line.splitlines()) == 1, f"{len(line.splitlines())} lines on stderr: {err!r}"
    for pattern in names:
        assert re.search(pattern, line, re.IGNORECASE), f"{pattern!r} not named in {line!r}"


def raised(call) -> str:
    """The message of the InputError ``call`` raises; "(returned ...)" if it raised nothing, so
    that the checks that matter more (nothing read, run or moved) are asserted first."""
    try:
        result = call()
    except InputError as error:
        return str(error)
    return f"(returned {result!r:.200})"


def yaml_file(env: dict, obj: dict | str, name: str = "config.yaml") -> str:
    path = Path(env["dir"]) / name
    path.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj))
    return str(path)


def nightly_config(env: dict, **over) -> dict:
    cfg = {
        "interactions": env["raw"],
        "out": env["root"],
        "date": "2026-01-02",
        "prepare": {"min_user_interactions": 5},
        "train": {"epochs": 1, "workers": 1, "model": {"max_len": 8, "hidden": 8, "layers": 1, "heads": 2}},
    }
    for key, value in over.items():
        cfg[key] = value
    return cfg


def e(s: str) -> str:
    return re.escape(s)


# ---------------------------------------------------------------- controls: the fixtures are sound


def test_control_evaluate_accepts_the_good_checkpoint(env, capsys):
    """The command gets as far as Ray (it ranks on Ray Data actors); the in-process reference
    evaluates the same inputs."""
    from bert4rec.config import EvaluateConfig
    from bert4rec.evaluate import evaluate_in_process

    code, out, err = run_cli(capsys, ["evaluate", "--checkpoint", env["ckpt"], "--data", env["prepared"]])
    assert code == 1 and "RayReached" in err, err
    assert evaluate_in_process(EvaluateConfig(checkpoint=env["ckpt"], data=env["prepared"]))["users"] == 6


def test_control_score_with_good_inputs_gets_as_far_as_ray(env, capsys):
    """So that every score case below fails because of its one crafted input."""
    code, out, err = run_cli(capsys, ["score", "--checkpoint", env["ckpt"], "--histories", env["histories"], "--out", str(Path(env["dir"]) / "new")])
    assert code == 1 and "RayReached" in err, err


def test_control_nightly_with_good_inputs_gets_as_far_as_ray(env, capsys):
    before = published_state(env)
    code, out, err = run_cli(capsys, ["nightly", "--config", yaml_file(env, nightly_config(env))])
    assert code == 1 and "RayReached" in err, err
    assert_intact(env, before)


# ---------------------------------------------------------------- configs (every command)

CONFIG_CASES = [
    # (id, argv (CONFIG = the YAML below), yaml content or None, names)
    ("generate-users-0", ["generate", "--out", "OUT", "--users", "0"], None, [r"'users'", "greater than 0"]),
    ("generate-items-1", ["generate", "--out", "OUT", "--items", "1"], None, [r"'items'"]),
    ("generate-yaml-unknown-key", ["generate", "--config", "CONFIG"], {"out": "OUT", "userz": 10}, [r"'userz'", "unknown"]),
    ("generate-yaml-not-a-mapping", ["generate", "--config", "CONFIG"], "- out\n- users\n", [r"config\.yaml", "mapping"]),
    ("generate-yaml-malformed", ["generate", "--config", "CONFIG"], "out: [unclosed\nusers: 3\n", [r"config\.yaml", "YAML"]),
    ("generate-config-missing-file", ["generate", "--config", "NOFILE"], None, [r"nope\.yaml"]),
    ("prepare-min-user-interactions-2", ["prepare", "--interactions", "RAW", "--out", "OUT", "--min-user-interactions", "2"], None, [r"'min_user_interactions'"]),
    ("prepare-until-not-a-date", ["prepare", "--config", "CONFIG"], {"interactions": "RAW", "out": "OUT", "until": "yesterday"}, [r"'until'"]),
    ("train-epochs-wrong-type", ["train", "--config", "CONFIG"], {"data": "PREPARED", "out": "OUT", "epochs": "ten"}, [r"'epochs'", "integer"]),
    ("train-nested-unknown-key", ["train", "--config", "CONFIG"], {"data": "PREPARED", "out": "OUT", "model": {"hiden": 64}}, [r"'model\.hiden'", "unknown"]),
    ("train-nested-heads-do-not-divide", ["train", "--config", "CONFIG"], {"data": "PREPARED", "out": "OUT", "model": {"hidden": 30, "heads": 4}}, [r"'model'", "divisible"]),
    ("train-negative-lr", ["train", "--config", "CONFIG"], {"data": "PREPARED", "out": "OUT", "lr": -0.1}, [r"'lr'"]),
    ("train-mask-prob-1", ["train", "--config", "CONFIG"], {"data": "PREPARED", "out": "OUT", "mask_prob": 1.0}, [r"'mask_prob'"]),
    ("train-test-switch-fail-after-epoch", ["train", "--config", "CONFIG"], {"data": "PREPARED", "out": "OUT", "fail_after_epoch": 1}, [r"'fail_after_epoch'", "unknown"]),
    ("evaluate-k-0", ["evaluate", "--checkpoint", "CKPT", "--data", "PREPARED", "--k", "0"], None, [r"'k'"]),
    ("evaluate-split-train", ["evaluate", "--checkpoint", "CKPT", "--data", "PREPARED", "--split", "train"], None, [r"split", "test"]),
    ("score-k-0", ["score", "--checkpoint", "CKPT", "--histories", "HIST", "--out", "OUT", "--k", "0"], None, [r"'k'"]),
    ("score-negative-batch-size", ["score", "--checkpoint", "CKPT", "--histories", "HIST", "--out", "OUT", "--batch-size", "-1"], None, [r"'batch_size'"]),
    ("score-test-switch-fail-on-batch", ["score", "--config", "CONFIG"], {"checkpoint": "CKPT", "histories": "HIST", "out": "OUT", "fail_on_batch": 0, "fail_marker": "MARKER"}, [r"'fail_on_batch'", "unknown"]),
    ("nightly-missing-interactions", ["nightly", "--config", "CONFIG"], {"out": "ROOT"}, [r"'interactions'"]),
    ("nightly-nested-unknown-key", ["nightly", "--config", "CONFIG"], {"interactions": "RAW", "out": "ROOT", "train": {"epoch": 1}}, [r"'train\.epoch'", "unknown"]),
    ("nightly-gate-max-drop-over-1", ["nightly", "--config", "CONFIG"], {"interactions": "RAW", "out": "ROOT", "gate": {"max_drop": 1.5}}, [r"'gate\.max_drop'"]),
    ("nightly-date-not-a-date", ["nightly", "--config", "CONFIG", "--date", "2026-13-45"], {"interactions": "RAW", "out": "ROOT"}, [r"'date'"]),
    ("nightly-future-date", ["nightly", "--config", "CONFIG", "--date", "2999-01-01"], {"interactions": "RAW", "out": "ROOT"}, [r"'?date'?", "2999-01-01"]),
    ("nightly-out-inside-interactions", ["nightly", "--config", "CONFIG"], {"interactions": "RAW", "out": "RAW/nightly", "date": "2026-01-02"}, [r"'?out'?", "interactions"]),
    ("nightly-work-inside-interactions", ["nightly", "--config", "CONFIG"], {"interactions": "RAW", "out": "ROOT", "work": "RAW/_work", "date": "2026-01-02"}, [r"'?work'?", "interactions"]),
]


def _fill(env: dict, value):
    if isinstance(value, dict):
        return {k: _fill(env, v) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    subs = {"RAW": env["raw"], "PREPARED": env["prepared"], "CKPT": env["ckpt"], "HIST": env["histories"], "ROOT": env["root"], "OUT": str(Path(env["dir"]) / "new-out"), "NOFILE": str(Path(env["dir"]) / "nope.yaml"), "MARKER": env["marker"]}
    for k, v in subs.items():
        if value == k or value.startswith(k + "/"):
            return v + value[len(k) :]
    return value


@pytest.mark.parametrize("argv, content, names", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused(env, capsys, argv, content, names):
    cfg = yaml_file(env, content if isinstance(content, str) else _fill(env, content)) if content is not None else None
    argv = [cfg if a == "CONFIG" else _fill(env, a) for a in argv]
    before = published_state(env)
    code, out, err = run_cli(capsys, argv)
    assert_refused(code, out, err, names)
    assert_intact(env, before)
    assert not (Path(env["dir"]) / "new-out").exists()
    assert not (Path(env["raw"]) / "nightly").exists() and not (Path(env["raw"]) / "_work").exists()


# ---------------------------------------------------------------- prepare: what upstream sends


def _mixed_units(t: pa.Table) -> pa.Table:
    ts = t["timestamp"].to_numpy().copy()
    ts[t["user_id"].to_numpy() == 2] *= 1000  # one user's events in milliseconds
    return t.set_column(2, "timestamp", pa.array(ts))


def _col(t: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    return t.set_column(t.column_names.index(name), name, arr)


GOOD = interactions_table()
N = GOOD.num_rows
PREPARE_TABLE_CASES = [
    ("item-id-strings", _col(GOOD, "item_id", pa.array([str(x) for x in GOOD["item_id"].to_pylist()])), [r"'item_id'", "integer"]),
    ("user-id-null", _col(GOOD, "user_id", pa.array([1, None] + GOOD["user_id"].to_pylist()[2:], pa.int64())), [r"'user_id'", r"row 1\b"]),
    ("item-id-float", _col(GOOD, "item_id", pa.array([x + 0.5 for x in GOOD["item_id"].to_pylist()])), [r"'item_id'"]),
    ("item-id-over-int64", _col(GOOD, "item_id", pa.array([2**63 + 5] + GOOD["item_id"].to_pylist()[1:], pa.uint64())), [r"'item_id'", r"row 0\b"]),
    ("timestamp-strings", _col(GOOD, "timestamp", pa.array(["2024-01-01"] * N)), [r"'timestamp'"]),
    ("timestamp-mixed-seconds-and-ms", _mixed_units(GOOD), [r"'?timestamp'?", r"row \d+"]),
    ("timestamp-negative", _col(GOOD, "timestamp", pa.array([-T0 - i for i in range(N)], pa.int64())), [r"'?timestamp'?", r"row 0\b"]),
    ("missing-timestamp-column", GOOD.drop_columns(["timestamp"]), [r"timestamp"]),
    ("duplicate-user-id-columns", pa.Table.from_arrays([GOOD["user_id"], GOOD["item_id"], GOOD["timestamp"], GOOD["user_id"]], names=["user_id", "item_id", "timestamp", "user_id"]), [r"'?user_id'?", "(duplicate|twice|2 times)"]),
    # names the input directory: a file without rows is fine (an empty dt= partition), an input without any is not
    ("zero-rows", GOOD.slice(0, 0), ["empty"]),
    ("rating-strings", _col(GOOD, "rating", pa.array(["five"] * N)), [r"'rating'"]),
]


# found only by reading the rows, which prepare does in Ray tasks (the footer checks on the
# driver catch the rest before Ray starts)
ROW_LEVEL = {
    "user-id-null", "item-id-over-int64", "timestamp-mixed-seconds-and-ms", "timestamp-negative", "zero-rows",
    "ratings-dat-short-line", "ratings-dat-non-integer-id", "ratings-csv-non-integer-id",
}


def our_line(err: str, command: str) -> str:
    """The command's own stderr lines, without Ray's forwarded worker output (the tests' Ray
    forwards it; the CLI's own Ray keeps it in its log files unless --verbose)."""
    return "".join(line + "\n" for line in err.splitlines() if line.startswith(f"bert4rec {command}:"))


def _cases(cases, row_level: bool):
    picked = [c for c in cases if (c[0] in ROW_LEVEL) == row_level]
    return {"argvalues": [c[1:] for c in picked], "ids": [c[0] for c in picked]}


@pytest.mark.parametrize("table, names", **_cases(PREPARE_TABLE_CASES, row_level=False))
def test_prepare_refuses_bad_tables(env, capsys, table, names):
    _refuses_bad_table(env, capsys, table, names)


@pytest.mark.ray
@pytest.mark.parametrize("table, names", **_cases(PREPARE_TABLE_CASES, row_level=True))
def test_prepare_refuses_bad_rows_read_in_ray_tasks(ray_session, env, capsys, table, names):
    _refuses_bad_table(env, capsys, table, names)


def _prepare_refuses(env, capsys, interactions: str, names: list[str]) -> None:
    """``prepare --interactions <interactions>`` exits 2 with one line matching ``names`` and writes nothing."""
    out = Path(env["dir"]) / "prep-out"
    code, stdout, err = run_cli(capsys, ["prepare", "--interactions", interactions, "--out", str(out)])
    assert_refused(code, stdout, our_line(err, "prepare"), names)
    assert not out.exists()


def _refuses_bad_table(env, capsys, table, names):
    src = write_parquet(Path(env["dir"]) / "bad" / "part-0.parquet", table)
    named = str(Path(src).parent) if "empty" in names else src
    _prepare_refuses(env, capsys, str(Path(src).parent), [e(named)] + names)


def _truncated_parquet(path: Path) -> None:
    write_parquet(path, GOOD)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


PREPARE_FILE_CASES = [
    ("missing-path", lambda p: None, ["no such file"]),
    ("empty-directory", lambda p: p.mkdir(parents=True), ["no .parquet"]),
    ("text-named-parquet", lambda p: (p.mkdir(parents=True), (p / "part-0.parquet").write_text("user_id,item_id\n1,2\n")), [e("part-0.parquet"), "parquet"]),
    ("truncated-parquet", lambda p: _truncated_parquet(p / "part-0.parquet"), [e("part-0.parquet"), "parquet"]),
    ("ratings-dat-short-line", lambda p: (p.mkdir(parents=True), (p / "ratings.dat").write_text("1::10::5::978300760\n1::20::3\n1::30::4::978300762\n")), [e("ratings.dat"), r"line 2\b"]),
    ("ratings-dat-non-integer-id", lambda p: (p.mkdir(parents=True), (p / "ratings.dat").write_text("1::10::5::978300760\n1::abc::3::978300761\n1::30::4::978300762\n")), [e("ratings.dat"), r"line 2\b"]),
    ("ratings-csv-non-integer-id", lambda p: (p.mkdir(parents=True), (p / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,5.0,978300760\n1,x,3.0,978300761\n")), [e("ratings.csv"), r"(row [12]|line 3)\b"]),
]


@pytest.mark.parametrize("make, names", **_cases(PREPARE_FILE_CASES, row_level=False))
def test_prepare_refuses_bad_files(env, capsys, make, names):
    _refuses_bad_file(env, capsys, make, names)


@pytest.mark.ray
@pytest.mark.parametrize("make, names", **_cases(PREPARE_FILE_CASES, row_level=True))
def test_prepare_refuses_bad_lines_read_in_ray_tasks(ray_session, env, capsys, make, names):
    _refuses_bad_file(env, capsys, make, names)


def _refuses_bad_file(env, capsys, make, names):
    src = Path(env["dir"]) / "upstream"
    make(src)
    files = list(src.iterdir()) if src.is_dir() else []
    target = str(files[0]) if len(files) == 1 and files[0].suffix in (".dat", ".csv") else str(src)
    _prepare_refuses(env, capsys, target, names)


def test_prepare_refuses_out_inside_interactions(env, capsys):
    before = snapshot(env["raw"])
    code, out, err = run_cli(capsys, ["prepare", "--interactions", env["raw"], "--out", env["raw"] + "/prepared"])
    assert_refused(code, out, err, [r"'?out'?", "interactions"])
    assert snapshot(env["raw"]) == before


@pytest.mark.ray
def test_prepare_refuses_declared_seconds_on_millisecond_values(ray_session, env, capsys):
    t = GOOD.set_column(2, "timestamp", pa.array(GOOD["timestamp"].to_numpy() * 1000))
    src = write_parquet(Path(env["dir"]) / "ms" / "part-0.parquet", t)
    cfg = yaml_file(env, {"interactions": str(Path(src).parent), "out": str(Path(env["dir"]) / "prep-out"), "timestamp_unit": "s"})
    code, out, err = run_cli(capsys, ["prepare", "--config", cfg])
    assert_refused(code, out, our_line(err, "prepare"), [e(src), r"'?timestamp'?", r"row 0\b"])


def test_generate_refuses_out_that_is_a_file(env, capsys):
    target = Path(env["dir"]) / "a-file"
    target.write_text("keep me")
    code, out, err = run_cli(capsys, ["generate", "--out", str(target), "--users", "3"])
    assert_refused(code, out, err, [e(str(target))])
    assert target.read_text() == "keep me"


# ---------------------------------------------------------------- train: refused on the driver, before Ray


def test_train_refuses_data_that_is_not_prepared(env, capsys):
    code, out, err = run_cli(capsys, ["train", "--data", env["raw"], "--out", str(Path(env["dir"]) / "run")])
    assert_refused(code, out, err, [e(env["raw"]), "prepare"])


def test_train_refuses_histories_without_item_ids(env, capsys):
    hist = Path(env["histories"])
    for f in hist.glob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["item_ids"]), f)
    code, out, err = run_cli(capsys, ["train", "--data", env["prepared"], "--out", str(Path(env["dir"]) / "run")])
    assert_refused(code, out, err, [r"'item_ids'"])


def test_train_refuses_use_ratings_without_ratings(env, capsys):
    hist = Path(env["histories"])
    for f in hist.glob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["ratings"]), f)
    cfg = yaml_file(env, {"data": env["prepared"], "out": str(Path(env["dir"]) / "run"), "model": {"use_ratings": True, "max_len": 8, "hidden": 8, "layers": 1, "heads": 2}})
    code, out, err = run_cli(capsys, ["train", "--config", cfg])
    assert_refused(code, out, err, [r"use_ratings", e(env["histories"]) + "|ratings"])


def test_train_refuses_corrupt_vocab(env, capsys):
    (Path(env["prepared"]) / "vocab.parquet").write_bytes(b"PAR1 not really")
    code, out, err = run_cli(capsys, ["train", "--data", env["prepared"], "--out", str(Path(env["dir"]) / "run")])
    assert_refused(code, out, err, [e("vocab.parquet")])


# ---------------------------------------------------------------- checkpoints: crafted, corrupt, inconsistent


def _evil_pickle(path: Path, marker: str) -> None:
    torch.save({"item_emb.weight": MarkerPayload(marker)}, path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _vocab_rows(ckpt: Path, ids: list[int]) -> None:
    pq.write_table(vocab_table(ids), ckpt / "vocab.parquet")


def _config_json(ckpt: Path, update: dict) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"].update(update)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _other_weights(ckpt: Path) -> None:
    torch.save(tiny_model(hidden=16).state_dict(), ckpt / "model.pt")


CHECKPOINT_CASES = [
    ("model-pt-pickle-payload", lambda c, m: _evil_pickle(c / "model.pt", m), [e("model.pt")]),
    ("model-pt-truncated", lambda c, m: _truncate(c / "model.pt"), [e("model.pt")]),
    ("model-pt-missing", lambda c, m: (c / "model.pt").unlink(), [e("model.pt")]),
    ("model-pt-other-shapes", lambda c, m: _other_weights(c), [e("model.pt") + "|shape|size"]),
    ("metadata-json-invalid", lambda c, m: (c / "metadata.json").write_text("{not json"), [e("metadata.json")]),
    ("metadata-json-a-list", lambda c, m: (c / "metadata.json").write_text("[1, 2]"), [e("metadata.json")]),
    ("config-json-invalid", lambda c, m: (c / "config.json").write_text("{"), [e("config.json")]),
    ("config-json-bad-model", lambda c, m: _config_json(c, {"hidden": "wide"}), [e("config.json"), "hidden"]),
    ("config-json-unknown-model-key", lambda c, m: _config_json(c, {"layerz": 3}), [e("config.json"), "layerz"]),
    ("vocab-fewer-items-than-weights", lambda c, m: _vocab_rows(c, ITEMS[:3]), [r"vocab", r"\b3\b", r"\b12\b"]),
    ("vocab-more-items-than-weights", lambda c, m: _vocab_rows(c, ITEMS + [130, 140]), [r"vocab", r"\b14\b", r"\b12\b"]),
    ("vocab-ids-not-increasing", lambda c, m: _vocab_rows(c, ITEMS[::-1]), [r"vocab", r"item_id"]),
    ("vocab-not-parquet", lambda c, m: (c / "vocab.parquet").write_text("item_id,token\n"), [e("vocab.parquet")]),
]


@pytest.mark.parametrize("command", ["evaluate", "score"])
@pytest.mark.parametrize("craft, names", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint_is_refused(env, capsys, command, craft, names):
    ckpt = Path(env["ckpt"])
    craft(ckpt, env["marker"])
    before = published_state(env)
    if command == "evaluate":
        argv = ["evaluate", "--checkpoint", str(ckpt), "--data", env["prepared"]]
    else:
        argv = ["score", "--checkpoint", str(ckpt), "--histories", env["histories"], "--out", env["scored"]]
    code, out, err = run_cli(capsys, argv)
    assert not os.path.exists(env["marker"]), "unpickling the checkpoint ran code"
    assert_refused(code, out, err, [e(str(ckpt))] + names)
    assert_intact(env, before)


def test_optimizer_pt_pickle_payload_never_runs(env):
    """optimizer.pt is loaded on every resume, by every training worker."""
    _evil_pickle(Path(env["ckpt"]) / "optimizer.pt", env["marker"])
    error = raised(lambda: ckpt_lib.load(env["ckpt"], with_optimizer=True))
    assert not os.path.exists(env["marker"]), "unpickling optimizer.pt ran code"
    assert "optimizer.pt" in error and len(error.splitlines()) == 1, error


def test_training_run_dir_without_checkpoints_is_refused(env, capsys):
    run = Path(env["dir"]) / "empty-run"
    (run / "train" / "epoch-0001").mkdir(parents=True)
    (run / "train" / "epoch-0001" / "metadata.json").write_text("{not json")
    code, out, err = run_cli(capsys, ["evaluate", "--checkpoint", str(run), "--data", env["prepared"]])
    assert_refused(code, out, err, [e(str(run))])


# ---------------------------------------------------------------- score: inputs checked before Ray


def _histories(env: dict, table: pa.Table) -> str:
    return write_parquet(Path(env["dir"]) / "hist" / "part-00000.parquet", table)


H = pa.table({"user_id": pa.array([1, 2, 3], pa.int64()), "item_ids": pa.array([[10, 20], [30], [40, 50]], pa.list_(pa.int64()))})
SCORE_CASES = [
    ("histories-duplicate-user", {"hist": H.set_column(0, "user_id", pa.array([1, 2, 1], pa.int64()))}, [r"'?user_id'?", "duplicat"]),
    ("histories-null-user", {"hist": H.set_column(0, "user_id", pa.array([1, None, 3], pa.int64()))}, [r"'?user_id'?", r"row 1\b"]),
    ("histories-missing-item-ids", {"hist": H.drop_columns(["item_ids"])}, [r"'item_ids'"]),
    ("histories-item-ids-strings", {"hist": H.set_column(1, "item_ids", pa.array([["a"], ["b"], ["c"]]))}, [r"'item_ids'"]),
    ("histories-user-id-float", {"hist": H.set_column(0, "user_id", pa.array([1.5, 2.0, 3.0]))}, [r"'user_id'"]),
    ("histories-not-parquet", {"hist_text": "user_id,item_ids\n"}, [r"parquet"]),
    ("histories-missing", {"hist_path": "does-not-exist"}, [r"does-not-exist"]),
    ("k-above-catalogue", {"argv": ["--k", "13"]}, [r"'?k'?", r"\b12\b"]),
    ("exclude-wrong-columns", {"exclude": pa.table({"movie": [10]})}, [r"exclude", r"item_id"]),
    ("exclude-item-id-strings", {"exclude": pa.table({"item_id": ["10"]})}, [r"exclude", r"item_id"]),
    ("exclude-user-id-float", {"exclude": pa.table({"user_id": [1.5], "item_id": pa.array([10], pa.int64())})}, [r"exclude", r"user_id"]),
    ("exclude-null-item-id", {"exclude": pa.table({"item_id": pa.array([10, None], pa.int64())})}, [r"exclude", r"item_id", r"row 1\b|null"]),
    ("exclude-missing", {"argv": ["--exclude", "/nonexistent/exclude.parquet"]}, [e("/nonexistent/exclude.parquet")]),
    ("items-without-title", {"items": pa.table({"item_id": pa.array([10], pa.int64()), "name": ["x"]})}, [r"items", r"title"]),
]


@pytest.mark.parametrize("spec, names", [c[1:] for c in SCORE_CASES], ids=[c[0] for c in SCORE_CASES])
def test_score_refuses_bad_inputs_before_ray(env, capsys, spec, names):
    hist = env["histories"]
    if "hist" in spec:
        hist = _histories(env, spec["hist"])
    if "hist_text" in spec:
        hist = str(Path(env["dir"]) / "hist.parquet")
        Path(hist).write_text(spec["hist_text"])
    if "hist_path" in spec:
        hist = str(Path(env["dir"]) / spec["hist_path"])
    argv = ["score", "--checkpoint", env["ckpt"], "--histories", hist, "--out", env["scored"], *spec.get("argv", [])]
    for flag in ("exclude", "items"):
        if flag in spec:
            argv += [f"--{flag}", write_parquet(Path(env["dir"]) / f"{flag}.parquet", spec[flag])]
    before = published_state(env)
    code, out, err = run_cli(capsys, argv)
    assert_refused(code, out, err, names)
    assert_intact(env, before)


# ---------------------------------------------------------------- nightly: published state is untrusted too


def _write_latest(env: dict, obj) -> None:
    (Path(env["root"]) / "latest").write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _manifest_update(env: dict, **update) -> None:
    path = Path(env["root"]) / PART / "_SUCCESS"
    m = json.loads(path.read_text())
    m.update(update)
    path.write_text(json.dumps(m))


NIGHTLY_CASES = [
    ("latest-dotdot-path", lambda env: _write_latest(env, {"path": "../victim"}), [r"latest", e("../victim")]),
    ("latest-absolute-path", lambda env: _write_latest(env, {"path": env["victim"]}), [r"latest", "VICTIM"]),
    ("latest-not-a-date-dir", lambda env: _write_latest(env, {"path": "_work"}), [r"latest", r"_work"]),
    ("latest-corrupt-json", lambda env: _write_latest(env, "{\"path\": "), [r"latest"]),
    ("latest-without-path", lambda env: _write_latest(env, {"date": DATE}), [r"latest", r"path"]),
    ("manifest-file-dotdot", lambda env: _manifest_update(env, files=["../../victim/secret.parquet"]), [e("_SUCCESS"), e("../../victim/secret.parquet")]),
    ("manifest-file-absolute", lambda env: _manifest_update(env, files=[env["victim"] + "/secret.parquet"]), [e("_SUCCESS"), "secret.parquet"]),
    ("manifest-checkpoint-pickle-payload", lambda env: _evil_pickle(Path(env["served"]) / "model.pt", env["marker"]), [e("model.pt")]),
    ("interactions-not-parquet", lambda env: (Path(env["raw"]) / "part-0.parquet").write_text("nope"), [e("part-0.parquet")]),
    # a null item id is found by prepare's reading tasks: see test_prepare_refuses_bad_rows_read_in_ray_tasks
]


@pytest.mark.parametrize("craft, names", [c[1:] for c in NIGHTLY_CASES], ids=[c[0] for c in NIGHTLY_CASES])
def test_nightly_refuses_untrusted_state(env, capsys, reads, craft, names):
    craft(env)
    names = [n.replace("VICTIM", re.escape(env["victim"])) for n in names]
    before = published_state(env)
    reads.clear()
    code, out, err = run_cli(capsys, ["nightly", "--config", yaml_file(env, nightly_config(env))])
    outside = [p for p in reads if p.startswith(env["victim"])]
    assert not os.path.exists(env["marker"]), "unpickling a checkpoint named by the manifest ran code"
    assert not outside, f"read outside the output root: {outside}"
    assert_intact(env, before)
    assert_refused(code, out, err, names)


def test_nightly_never_loads_a_checkpoint_named_outside_its_work_root(env, capsys, caplog):
    """A manifest naming a checkpoint elsewhere (here a crafted one) is not followed: the night
    trains from scratch, says why, and never unpickles the file."""
    _evil_pickle(Path(env["ckpt"]) / "model.pt", env["marker"])
    _manifest_update(env, checkpoint=env["ckpt"])
    before = published_state(env)
    code, out, err = run_cli(capsys, ["nightly", "--config", yaml_file(env, nightly_config(env))])
    assert not os.path.exists(env["marker"]), "unpickling a checkpoint named by the manifest ran code"
    assert code == 1 and "in stage prepare: RayReached" in err, err  # went on, to train from scratch
    assert "not under" in caplog.text and "not loaded" in caplog.text
    assert_intact(env, before)


def test_nightly_refuses_while_the_date_is_locked(env, capsys):
    """A second run of the same date, while the first (this live process) holds the lock."""
    lock = Path(env["root"]) / "_locks" / "dt=2026-01-02.lock"
    lock.parent.mkdir(parents=True)
    held = {"owner": "nightly dt=2026-01-02 other", "token": "t", "acquired_at": "now", "acquired_at_epoch": 4e9, "host": os.uname().nodename, "pid": os.getpid()}
    lock.write_text(json.dumps(held))
    before = published_state(env)
    code, out, err = run_cli(capsys, ["nightly", "--config", yaml_file(env, nightly_config(env))])
    assert_refused(code, out, err, [e(str(lock)) + "|locked"], exit_code=None)
    assert_intact(env, before)
    assert json.loads(lock.read_text()) == held


# ---------------------------------------------------------------- crafted manifests and plans (library)


@pytest.mark.parametrize(
    "name",
    ["../victim/secret.parquet", "VICTIM_ABS", "sub/../../victim/secret.parquet", ".hidden.parquet"],
    ids=["dotdot", "absolute", "nested-dotdot", "leading-dot"],
)
def test_read_table_refuses_manifest_names_outside_the_table(env, reads, name):
    name = name.replace("VICTIM_ABS", env["victim"] + "/secret.parquet")
    out = Path(env["dir"]) / "crafted"
    out.mkdir()
    (out / "_SUCCESS").write_text(json.dumps({"files": [name], "rows": 1, "run_id": "x"}))
    reads.clear()
    msg = raised(lambda: publish.read_table(str(out)))
    outside = [p for p in reads if p.startswith(env["victim"])]
    assert not outside, f"read outside the table: {outside}"
    assert len(msg.splitlines()) == 1 and "_SUCCESS" in msg and name in msg, msg


def test_publish_over_a_crafted_manifest_deletes_nothing_outside(env):
    """The next publish must not trust the old manifest's names when it cleans up."""
    out = env["scored"]
    m = json.loads((Path(out) / "_SUCCESS").read_text())
    m["files"] = ["../victim/secret.parquet"]
    (Path(out) / "_SUCCESS").write_text(json.dumps(m))
    victim = snapshot(env["victim"])
    staging = publish.staging_dir(out, "20260102T000000-cccccccc")
    write_parquet(Path(staging) / "b.parquet", H)
    error = raised(lambda: publish.publish(out, staging, {}))
    assert snapshot(env["victim"]) == victim
    assert "_SUCCESS" in error and "../victim/secret.parquet" in error, error


@pytest.mark.parametrize(
    "moves",
    [[["../../../victim/secret.parquet", "part-20260102T000000-dddddddd-00000.parquet"]], [["b.parquet", "../escaped.parquet"]], [["b.parquet", "ESCAPED_ABS"]]],
    ids=["source-dotdot", "target-dotdot", "target-absolute"],
)
def test_publish_refuses_a_crafted_plan(env, moves):
    """``_publish.json`` is resumed as is after a crash: its names are untrusted."""
    out = env["scored"]
    run_id = "20260102T000000-dddddddd"
    escaped_abs = str(Path(env["dir"]) / "escaped-abs.parquet")
    moves = [[src, escaped_abs if dst == "ESCAPED_ABS" else dst] for src, dst in moves]
    staging = publish.staging_dir(out, run_id)
    write_parquet(Path(staging) / "b.parquet", H)
    (Path(staging) / "_publish.json").write_text(json.dumps({"run_id": run_id, "rows": 3, "moves": moves}))
    before = published_state(env)
    error = raised(lambda: publish.publish(out, staging, {}))
    assert_intact(env, before)
    assert not (Path(env["dir"]) / "escaped.parquet").exists() and not Path(escaped_abs).exists()
    assert "_publish.json" in error, error


@pytest.mark.parametrize("path", ["../victim", "/etc", "dt=2026-01-01/../../victim", "_work"], ids=["dotdot", "absolute", "nested-dotdot", "not-a-date"])
def test_read_latest_refuses_pointers_outside_the_root(env, path):
    _write_latest(env, {"path": path})
    error = raised(lambda: latest.read_latest(env["root"]))
    assert "latest" in error and path in error, error


# ---------------------------------------------------------------- the process itself


def _subprocess(argv: list[str]) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bert4rec.cli", *argv], capture_output=True, text=True, env=environ, timeout=120)


def test_process_malformed_ratings_dat(env):
    dat = Path(env["dir"]) / "ratings.dat"
    dat.write_text("1::10::5::978300760\n1::20::3::97830x761\n")
    p = _subprocess(["prepare", "--interactions", str(dat), "--out", str(Path(env["dir"]) / "o")])
    assert_refused(p.returncode, p.stdout, p.stderr, [e(str(dat)), r"line 2\b"])
    assert not (Path(env["dir"]) / "o").exists()
