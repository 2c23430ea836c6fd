"""Bad input to ``bert4rec score`` through the CLI: exit code 2, one line on stderr, nothing
written under --out. Ray is up already (``ray_session``), so ``console.ensure_ray`` is a
no-op and every case fails in validation, before any Ray work."""

from __future__ import annotations

import os
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec.cli import main
from bert4rec.io import read_parquet

pytestmark = pytest.mark.ray


# Ray forwards its workers' and actors' log lines to the driver's stderr as
# "(ActorName pid=123) message", possibly coloured. Earlier tests' actors (the Train controller's
# placement-group cleaner, say) can still be logging while a case runs; those lines are not the
# CLI's, so they are set aside before counting.
RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((?:[A-Za-z_][\w.]* )?pid=\d+[^)]*\)")


def run_cli(capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["score", *args])
    err = capsys.readouterr().err
    return rc, "\n".join(line for line in err.splitlines() if not RAY_FORWARDED.match(line))


def assert_input_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bert4rec score: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def good(ray_session, trained_run, synthetic_data, tmp_path):
    """Arguments of a valid run; ``out`` must stay absent in every test."""
    return {"checkpoint": trained_run["out"], "histories": synthetic_data["histories"], "out": str(tmp_path / "recs")}


def args(**kw) -> list[str]:
    return [x for key, value in kw.items() for x in (f"--{key.replace('_', '-')}", str(value))]


def bad_histories(tmp_path, synthetic_data, case: str) -> str:
    t = read_parquet(synthetic_data["histories"]).select(["user_id", "item_ids"]).slice(0, 20)
    if case == "no_user_id":
        t = t.rename_columns(["user", "item_ids"])
    elif case == "no_item_ids":
        t = t.rename_columns(["user_id", "items"])
    elif case == "null_user_id":
        users = t["user_id"].to_pylist()
        users[7] = None
        t = t.set_column(0, "user_id", pa.array(users, pa.int64()))
    elif case == "duplicated_user_id":
        t = pa.concat_tables([t, t.slice(5, 1)])
    path = str(tmp_path / f"{case}.parquet")
    pq.write_table(t, path)
    return path


@pytest.mark.parametrize(
    "case, needles",
    [
        ("no_user_id", ["missing column 'user_id'"]),
        ("no_item_ids", ["missing column 'item_ids'"]),
        ("null_user_id", ["column 'user_id' has 1 null value(s), first at row 7"]),
        ("duplicated_user_id", ["1 duplicated user_id"]),
    ],
)
def test_bad_histories(capsys, good, tmp_path, synthetic_data, case, needles):
    path = bad_histories(tmp_path, synthetic_data, case)
    rc, err = run_cli(capsys, args(**{**good, "histories": path}))
    assert_input_error(rc, err, path, *needles)
    assert not os.path.exists(good["out"])


def test_checkpoint_that_is_not_a_checkpoint(capsys, good, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run_cli(capsys, args(**{**good, "checkpoint": empty}))
    assert_input_error(rc, err, str(empty), "not a checkpoint")
    missing = tmp_path / "no" / "such" / "run"
    rc, err = run_cli(capsys, args(**{**good, "checkpoint": missing}))
    assert_input_error(rc, err, str(missing), "no such file or directory")
    assert not os.path.exists(good["out"])


def test_bad_k(capsys, good):
    rc, err = run_cli(capsys, args(**good, k=201))  # the catalogue has 200 items
    assert_input_error(rc, err, "--k 201", "catalogue of 200 items")
    rc, err = run_cli(capsys, args(**good, k=0))
    assert_input_error(rc, err, "field 'k'", "greater than 0")
    assert not os.path.exists(good["out"])


def test_unknown_key_in_config_file(capsys, good, tmp_path):
    config = tmp_path / "score.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in good.items()) + "top_k: 5\n")
    rc, err = run_cli(capsys, ["--config", str(config)])
    assert_input_error(rc, err, str(config), "field 'top_k'", "unknown key")
    assert not os.path.exists(good["out"])


def test_unreachable_s3_endpoint_fails_fast(capsys, ray_session, monkeypatch):
    # credentials present (fake), so what fails is the connection, not the credential lookup
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    start = time.monotonic()
    rc, err = run_cli(
        capsys,
        [*args(checkpoint="s3://bucket/run", histories="s3://bucket/histories", out="s3://bucket/recs"), "--s3-endpoint-url", "http://127.0.0.1:9"],
    )
    elapsed = time.monotonic() - start
    assert_input_error(rc, err, "cannot reach storage for s3://bucket/run", "127.0.0.1:9")
    assert elapsed < 15, f"took {elapsed:.1f} s to give up on an unreachable endpoint"
