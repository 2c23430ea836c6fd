"""Scoring under faults: a scoring actor that dies mid-run, and runs that fail before they
publish (the table published earlier must stay exactly as it was)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert4rec import score as score_mod
from bert4rec.config import ScoreConfig
from bert4rec.io import InputError, read_parquet
from bert4rec.publish import read_manifest, read_table
from bert4rec.score import Scorer, score
from tests.conftest import snapshot

pytestmark = pytest.mark.ray

K = 5


def dies_once(marker: str, on_batch: int) -> type[Scorer]:
    """A scorer whose process exits hard on its ``on_batch``-th batch, as a lost node would
    look; once, for the whole run: ``marker`` is created first. Defined in a function, so
    that Ray pickles the class (and ``marker``) by value for the actors."""

    class DiesOnce(Scorer):
        batches = 0

        def __call__(self, batch: pa.Table) -> pa.Table:
            self.batches += 1
            if self.batches == on_batch and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return super().__call__(batch)

    return DiesOnce


@pytest.fixture(scope="module")
def crashed_once(ray_session, trained_run, synthetic_data, tmp_path_factory):
    """A run whose scoring actor calls os._exit(1) on its second batch, once."""
    root = tmp_path_factory.mktemp("faults")
    out, marker = str(root / "recs"), str(root / "actor-died")
    cfg = ScoreConfig(checkpoint=trained_run["out"], histories=synthetic_data["histories"], out=out, k=K, batch_size=64)
    return {"root": root, "out": out, "marker": marker, "result": score(cfg, scorer_cls=dies_once(marker, on_batch=2))}


def test_a_dead_scoring_actor_is_replaced_and_the_table_is_complete(crashed_once, synthetic_data):
    assert os.path.exists(crashed_once["marker"]), "the injected actor failure did not happen"
    histories = read_parquet(synthetic_data["histories"])
    seen = dict(zip(histories["user_id"].to_pylist(), histories["item_ids"].to_pylist()))
    table, manifest = read_table(crashed_once["out"]), read_manifest(crashed_once["out"])
    users = table["user_id"].to_pylist()
    assert len(users) == len(set(users)) == len(seen) == manifest["rows"] == manifest["input_users"]
    assert set(users) == set(seen)
    for user, items in zip(users, table["item_ids"].to_pylist()):
        assert len(items) == K and not set(items) & set(seen[user])
    assert manifest["run_id"] == crashed_once["result"]["run_id"]
    assert sorted(os.listdir(crashed_once["out"])) == sorted(["_SUCCESS", *manifest["files"]])


def _histories_with_duplicate(src: str, dst: str) -> str:
    t = read_parquet(src).select(["user_id", "item_ids"])
    pq.write_table(pa.concat_tables([t, t.slice(3, 1)]), dst)
    return dst


def test_failed_runs_leave_the_published_table_as_it_was(crashed_once, trained_run, synthetic_data, tmp_path):
    out = crashed_once["out"]
    before = snapshot(out)
    assert "_SUCCESS" in before and len(before) > 1
    base = dict(checkpoint=trained_run["out"], histories=synthetic_data["histories"], out=out, k=K, batch_size=128)

    dup = _histories_with_duplicate(synthetic_data["histories"], str(tmp_path / "dup.parquet"))
    with pytest.raises(InputError, match="duplicated user_id"):
        score(ScoreConfig(**{**base, "histories": dup}))
    assert snapshot(out) == before

    bad_exclude = str(tmp_path / "exclude.parquet")
    pq.write_table(pa.table({"item": pa.array([1, 2], pa.int64())}), bad_exclude)
    with pytest.raises(InputError, match="--exclude"):
        score(ScoreConfig(**{**base, "exclude": bad_exclude}))
    assert snapshot(out) == before

    not_parquet = tmp_path / "exclude.txt"
    not_parquet.write_text("item_id\n1\n")
    with pytest.raises(InputError):
        score(ScoreConfig(**{**base, "exclude": str(not_parquet)}))
    assert snapshot(out) == before


def test_a_run_failing_its_output_check_publishes_nothing(crashed_once, trained_run, synthetic_data, monkeypatch):
    """The whole pipeline runs, but the driver's check of the staged rows finds a user missing."""
    out = crashed_once["out"]
    before = snapshot(out)
    real = score_mod.read_parquet

    def lose_a_row(uri, storage=None, columns=None):
        t = real(uri, storage, columns)
        return t.slice(1) if "/_staging/" in uri else t

    monkeypatch.setattr(score_mod, "read_parquet", lose_a_row)
    cfg = ScoreConfig(checkpoint=trained_run["out"], histories=synthetic_data["histories"], out=out, k=K, batch_size=128)
    with pytest.raises(RuntimeError, match=r"1 missing, 0 duplicated or unknown\); nothing published"):
        score(cfg)
    assert snapshot(out) == before  # the staged files were discarded too
    assert not os.path.exists(os.path.join(out, "_staging")) or not os.listdir(os.path.join(out, "_staging"))
    assert np.array_equal(np.sort(read_table(out)["user_id"].to_numpy()), np.sort(read_parquet(synthetic_data["histories"])["user_id"].to_numpy()))


def drops_a_user(marker: str) -> type[Scorer]:
    """A scorer that leaves the first user of one batch out of its output, once for the
    whole run (``marker`` is created first), as a lost row would look."""

    class DropsAUser(Scorer):
        def __call__(self, batch: pa.Table) -> pa.Table:
            rows = super().__call__(batch)
            if not os.path.exists(marker):
                open(marker, "w").close()
                return rows.slice(1)
            return rows

    return DropsAUser


def test_a_table_too_large_for_the_driver_has_its_users_checked_on_the_cluster(crashed_once, trained_run, synthetic_data, tmp_path, monkeypatch):
    """Above DRIVER_CHECK_MAX_USERS the driver never reads the user ids: a Ray Data shuffle
    checks the input and, after scoring, the output against it. Here every table is above."""
    monkeypatch.setattr(score_mod, "DRIVER_CHECK_MAX_USERS", 0)
    published = crashed_once["out"]
    before = snapshot(published)
    base = dict(checkpoint=trained_run["out"], histories=synthetic_data["histories"], k=K, batch_size=128)

    out = str(tmp_path / "recs")
    result = score(ScoreConfig(**base, out=out))
    reference = read_manifest(published)
    assert result["rows"] == result["input_users"] == reference["input_users"] == 600
    assert (result["fallback_users"], result["unknown_items"]) == (reference["fallback_users"], reference["unknown_items"])
    ours, theirs = read_table(out), read_table(published)
    assert np.array_equal(np.sort(ours["user_id"].to_numpy()), np.sort(theirs["user_id"].to_numpy()))

    dup = _histories_with_duplicate(synthetic_data["histories"], str(tmp_path / "dup.parquet"))
    duplicated = read_parquet(dup)["user_id"][-1].as_py()
    with pytest.raises(InputError, match=rf"1 duplicated user_id value\(s\), e.g. {duplicated}; expected one row per user"):
        score(ScoreConfig(**{**base, "histories": dup}, out=published))
    assert snapshot(published) == before

    with pytest.raises(RuntimeError, match=r"599 rows for 600 input users \(1 missing, 0 duplicated or unknown\); nothing published"):
        score(ScoreConfig(**base, out=published), scorer_cls=drops_a_user(str(tmp_path / "dropped")))
    assert os.path.exists(tmp_path / "dropped")
    assert snapshot(published) == before
