"""Batch scoring end to end on the shared local Ray cluster, with the session's trained model.

Three scoring runs in all (each costs a few seconds of Ray Data start-up on 2 cores):
the base run, a rerun into the same --out (with a global --exclude list), and a run with a
per-user --exclude list, --items titles and two extra users (unknown items, no known item).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bert4rec import checkpoint, data
from bert4rec.config import ScoreConfig
from bert4rec.io import read_parquet
from bert4rec.publish import read_manifest, read_table
from bert4rec import score as score_mod
from bert4rec.io import InputError
from bert4rec.score import OUTPUT_SCHEMA, score

pytestmark = pytest.mark.ray

K = 5
# what is published: the scorer's rows plus the per-user count of dropped unknown item ids
PUBLISHED = OUTPUT_SCHEMA.append(pa.field("unknown_items", pa.int64()))


def columns(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    """Names and types, list element names aside (Parquet calls them "element", pyarrow "item")."""
    return [(f.name, pa.list_(f.type.value_type) if pa.types.is_list(f.type) else f.type) for f in schema]


def as_dict(table: pa.Table) -> dict[int, dict]:
    """user_id -> its row."""
    return {r["user_id"]: r for r in table.to_pylist()}


def history_dict(table: pa.Table) -> dict[int, list[int]]:
    return dict(zip(table["user_id"].to_pylist(), table["item_ids"].to_pylist()))


def check_invariants(table: pa.Table, manifest: dict, histories: dict[int, list[int]], k: int = K) -> None:
    users = table["user_id"].to_pylist()
    assert table.num_rows == len(histories) == manifest["rows"] == manifest["input_users"]
    assert len(set(users)) == len(users), "duplicated user_id"
    assert set(users) == set(histories)
    for row in table.to_pylist():
        assert len(row["item_ids"]) == len(row["scores"]) == k
        assert len(set(row["item_ids"])) == k
        assert not set(row["item_ids"]) & set(histories[row["user_id"]]), f"seen item recommended to {row['user_id']}"
        assert row["scores"] == sorted(row["scores"], reverse=True)


@pytest.fixture(scope="module")
def loaded(trained_run):
    return checkpoint.load(trained_run["out"])


@pytest.fixture(scope="module")
def histories(synthetic_data):
    return read_parquet(synthetic_data["histories"])


@pytest.fixture(scope="module")
def base(ray_session, trained_run, synthetic_data, tmp_path_factory):
    """The plain run; its table and manifest are kept in memory (a later test replaces it on disk)."""
    out = str(tmp_path_factory.mktemp("score") / "recs")
    result = score(ScoreConfig(checkpoint=trained_run["out"], histories=synthetic_data["histories"], out=out, k=K, batch_size=128))
    return {
        "out": out,
        "result": result,
        "manifest": read_manifest(out),
        "table": read_table(out),
        "files": sorted(os.listdir(out)),
    }


def test_every_user_gets_k_unseen_items(base, histories, loaded, trained_run):
    table, manifest = base["table"], base["manifest"]
    assert columns(table.schema) == columns(PUBLISHED)
    check_invariants(table, manifest, history_dict(histories))
    assert manifest["k"] == K
    assert manifest["model_version"] == loaded.model_version
    assert manifest["checkpoint"] == loaded.uri and loaded.uri.startswith(trained_run["out"])
    assert (manifest["fallback_users"], manifest["unknown_items"]) == (0, 0)
    assert set(table["model_version"].to_pylist()) == {loaded.model_version}
    assert not any(table["fallback"].to_pylist())
    assert len(set(table["generated_at"].to_pylist())) == 1
    # what a reader of the directory sees: the manifest and exactly the files it lists
    assert base["files"] == sorted(["_SUCCESS", *manifest["files"]])
    assert {k: base["result"][k] for k in manifest} == manifest
    # 600 users scored in blocks of 128, joined into one file (rows_per_file: 100,000)
    assert len(manifest["files"]) == 1
    # dictionary-encoded where values repeat (item ids, the model version), plain where they do not
    meta = pq.ParquetFile(os.path.join(base["out"], manifest["files"][0])).metadata.row_group(0)
    dictionary = {meta.column(i).path_in_schema for i in range(meta.num_columns) if "RLE_DICTIONARY" in meta.column(i).encodings}
    assert dictionary == {"item_ids.list.element", "model_version"}


def test_scores_agree_with_the_model_called_directly(base, histories, loaded):
    model, mc, vocab_ids = loaded.model, loaded.model.config, loaded.vocab_ids
    assert not mc.use_ratings  # the inputs below carry no ratings
    rows = as_dict(base["table"])
    picked = histories.take([0, 1, 57, 300, histories.num_rows - 1])
    seqs = []
    for items in picked["item_ids"].to_pylist():
        tokens, known = data.to_tokens(np.array(items), vocab_ids)
        assert known.all()
        seqs.append(tokens)
    with torch.inference_mode():
        logits = model.logits(model.last_hidden(torch.as_tensor(data.inference_tokens(seqs, mc.max_len, mc.mask_token)))).numpy()
    for user, seq, row in zip(picked["user_id"].to_pylist(), seqs, logits):
        row = row.copy()
        row[0] = row[mc.mask_token] = -np.inf
        row[seq] = -np.inf
        top = np.argsort(-row, kind="stable")[:K]
        assert rows[user]["item_ids"] == vocab_ids[top - 1].tolist()
        np.testing.assert_allclose(rows[user]["scores"], row[top], rtol=1e-4, atol=1e-4)


def test_rerun_replaces_the_table_whole(base, trained_run, synthetic_data, histories, tmp_path_factory):
    """Same --out again, now with a global --exclude list of the three most recommended items,
    and files of at least 250 users."""
    out = base["out"]
    old = as_dict(base["table"])
    counts = {}
    for row in old.values():
        for i in row["item_ids"]:
            counts[i] = counts.get(i, 0) + 1
    banned = sorted(counts, key=lambda i: (-counts[i], i))[:3]
    exclude = str(tmp_path_factory.mktemp("exclude") / "global.parquet")
    pq.write_table(pa.table({"item_id": pa.array(banned + [10**9], pa.int64())}), exclude)  # 10**9: unknown, ignored

    score(ScoreConfig(checkpoint=trained_run["out"], histories=synthetic_data["histories"], out=out, k=K, batch_size=128, exclude=exclude, rows_per_file=250))
    manifest, table = read_manifest(out), read_table(out)
    check_invariants(table, manifest, history_dict(histories))
    # blocks of 128 users are joined until a file holds 250; only the last may hold fewer
    file_rows = sorted(pq.read_metadata(os.path.join(out, f)).num_rows for f in manifest["files"])
    assert sum(file_rows) == histories.num_rows == 600 and len(file_rows) >= 2
    assert all(n >= 250 for n in file_rows[1:])
    assert manifest["run_id"] != base["manifest"]["run_id"]
    assert manifest["rows"] == base["manifest"]["rows"]
    # the old part files are gone; nothing but the new manifest and its files is left
    assert sorted(os.listdir(out)) == sorted(["_SUCCESS", *manifest["files"]])
    assert not set(manifest["files"]) & set(base["manifest"]["files"])
    # the banned items are never recommended; every user's old list minus them leads the new one
    new = as_dict(table)
    affected = 0
    for user, row in new.items():
        assert not set(row["item_ids"]) & set(banned)
        kept = [i for i in old[user]["item_ids"] if i not in banned]
        assert row["item_ids"][: len(kept)] == kept
        affected += len(kept) < K
    assert affected > 0


@pytest.mark.parametrize("joined_on", ["driver", "cluster"])
def test_per_user_exclusions_titles_unknown_items_and_fallback(base, trained_run, histories, loaded, tmp_path_factory, monkeypatch, joined_on):
    """The same run twice: with the --exclude table read by the driver, and as a table too
    large for it (DRIVER_EXCLUDE_MAX_ROWS = 0), in two files joined to the histories on the
    cluster. Both publish the same rows."""
    if joined_on == "cluster":
        monkeypatch.setattr(score_mod, "DRIVER_EXCLUDE_MAX_ROWS", 0)
    root = tmp_path_factory.mktemp("score_extra")
    vocab_ids = loaded.vocab_ids
    by_pop = loaded.vocab.sort_by([("count", "descending"), ("item_id", "ascending")])
    popular = by_pop["item_id"].to_pylist()
    counts = by_pop["count"].to_pylist()
    old = as_dict(base["table"])

    # two extra users: one knows no item at all (fallback), one has a few unknown ids among known ones
    new_user, mixed_user = int(histories["user_id"].to_numpy().max()) + 1, int(histories["user_id"].to_numpy().max()) + 2
    mixed_items = [int(vocab_ids[0]), -5, int(vocab_ids[1]), -6]
    extra = pa.table({"user_id": pa.array([new_user, mixed_user], pa.int64()), "item_ids": pa.array([[-1, -2, -3], mixed_items], pa.list_(pa.int64()))})
    hist = pa.concat_tables([histories.select(["user_id", "item_ids"]), extra])
    hist_path = str(root / "histories.parquet")
    pq.write_table(hist, hist_path)

    # per-user exclusions: three users lose their old top item; the fallback user loses the most popular one
    users = histories["user_id"].to_pylist()[:3]
    ex_users = users + [new_user, users[0]]
    ex_items = [old[u]["item_ids"][0] for u in users] + [popular[0], 10**9]  # 10**9: unknown, ignored
    exclusions = pa.table({"user_id": pa.array(ex_users, pa.int64()), "item_id": pa.array(ex_items, pa.int64())})
    exclude = str(root / "per_user")
    os.makedirs(exclude)
    pq.write_table(exclusions.slice(0, 2), os.path.join(exclude, "part-0.parquet"))
    pq.write_table(exclusions.slice(2), os.path.join(exclude, "part-1.parquet"))
    items = str(root / "items.parquet")
    titled = [int(i) for i in vocab_ids if i % 7]  # items whose id is a multiple of 7 have no title
    pq.write_table(pa.table({"item_id": pa.array(titled, pa.int64()), "title": [f"title {i}" for i in titled]}), items)

    out = str(root / "recs")
    score(ScoreConfig(checkpoint=trained_run["out"], histories=hist_path, out=out, k=K, batch_size=128, exclude=exclude, items=items))
    manifest, table = read_manifest(out), read_table(out)
    seen = history_dict(hist)
    check_invariants(table, manifest, seen)
    assert columns(table.schema) == columns(OUTPUT_SCHEMA) + [("titles", pa.list_(pa.string())), ("unknown_items", pa.int64())]
    assert (manifest["fallback_users"], manifest["unknown_items"], manifest["input_users"]) == (1, 5, histories.num_rows + 2)
    rows = as_dict(table)

    for u in users:  # the old top item is gone, the rest moves up
        assert rows[u]["item_ids"][: K - 1] == old[u]["item_ids"][1:]
    for u in set(old) - set(users):
        assert rows[u]["item_ids"] == old[u]["item_ids"]
    # the user with no known item: the most popular items but the excluded one, scored by popularity
    assert rows[new_user]["fallback"] is True
    assert rows[new_user]["item_ids"] == popular[1 : K + 1]
    assert rows[new_user]["scores"] == [float(c) for c in counts[1 : K + 1]]
    assert rows[mixed_user]["fallback"] is False
    assert not set(rows[mixed_user]["item_ids"]) & set(mixed_items)
    assert sum(r["fallback"] for r in rows.values()) == 1
    assert (rows[new_user]["unknown_items"], rows[mixed_user]["unknown_items"]) == (3, 2)
    for row in rows.values():
        assert row["titles"] == [None if i % 7 == 0 else f"title {i}" for i in row["item_ids"]]

    if joined_on == "cluster":  # a null id found by the reading task: one line naming file and row, nothing published
        before = read_manifest(out)
        bad = os.path.join(exclude, "part-2.parquet")
        pq.write_table(pa.table({"user_id": pa.array([users[0], None], pa.int64()), "item_id": pa.array([1, 2], pa.int64())}), bad)
        with pytest.raises(InputError, match=r"^--exclude .*part-2.parquet: column 'user_id' has a null value at row 1$"):
            score(ScoreConfig(checkpoint=trained_run["out"], histories=hist_path, out=out, k=K, batch_size=128, exclude=exclude, items=items))
        assert read_manifest(out) == before
