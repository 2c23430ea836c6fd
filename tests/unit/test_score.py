"""The pure pieces of batch scoring (no Ray): featurize, score_batch, to_rows, the Scorer
called in-process, and the input readers (histories, --exclude, --items).

The hand-made model: a real ``BERT4Rec`` whose output head is overwritten so that every user's
last hidden state is exactly ``H`` (``head_norm.weight = 0``, ``head_norm.bias = H``) and the
item embedding holds small integers, so the scores of every token are exact integers that the
tests write down by hand (ties included). Padding and [MASK] get the highest scores on purpose:
they must never come out.
"""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bert4rec import checkpoint as ckpt_lib
from bert4rec import data
from bert4rec.config import ScoreConfig, StorageConfig
from bert4rec.io import InputError
from bert4rec.model import BERT4Rec, BERT4RecConfig
from bert4rec.score import (
    EXCLUDED_COLUMN,
    OUTPUT_SCHEMA,
    Scorer,
    attach_exclusions,
    check_cpu_reservation,
    check_histories,
    exclusion_side,
    featurize,
    history_side,
    read_exclusions,
    read_titles,
    score_batch,
    to_rows,
    user_check_rows,
    user_side,
)

INF = math.inf
V = 6  # items: tokens 1..6; padding 0; [MASK] 7
MASK = V + 1
MAX_LEN = 5
# the score of every token 0..7 for every user: 2 and 4 tie at 9; padding and [MASK] score 100
ITEM_SCORES = [100.0, 5.0, 9.0, 1.0, 9.0, 3.0, 8.0, 100.0]
VOCAB_IDS = np.array([10, 20, 30, 40, 50, 60], np.int64)  # token t <-> item_id VOCAB_IDS[t - 1]
POPULARITY = torch.tensor([0.0, 7.0, 3.0, 7.0, 1.0, 9.0, 2.0, 0.0])  # 1 and 3 tie at 7
GEN_AT = dt.datetime(2026, 11, 24, 3, 0, 0, tzinfo=dt.timezone.utc)


def hand_made_model() -> BERT4Rec:
    cfg = BERT4RecConfig(num_items=V, max_len=MAX_LEN, hidden=4, layers=1, heads=1, dropout=0.0, attn_dropout=0.0)
    model = BERT4Rec(cfg).eval()
    with torch.no_grad():
        model.head_norm.weight.zero_()
        model.head_norm.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # H: every user's last hidden state
        emb = torch.zeros(V + 2, 4)
        emb[:, 0] = torch.tensor(ITEM_SCORES)
        emb[:, 1] = torch.arange(V + 2, dtype=torch.float32)  # inputs differ; H . E = column 0 only
        model.item_emb.weight.copy_(emb)
        model.out_bias.zero_()
    return model


def random_model(seed: int = 0, num_items: int = 50, max_len: int = 8) -> BERT4Rec:
    torch.manual_seed(seed)
    cfg = BERT4RecConfig(num_items=num_items, max_len=max_len, hidden=16, layers=1, heads=2, dropout=0.0, attn_dropout=0.0)
    model = BERT4Rec(cfg).eval()
    with torch.no_grad():  # spread the scores out: ties between distinct items become improbable
        model.item_emb.weight.normal_(0, 1.0)
        model.out_bias.normal_(0, 1.0)
    return model


def reference_topk(scores, k, excluded, num_items):
    """Plain Python: rankable items 1..V not excluded, by (score desc, token asc), padded with (-inf, 0)."""
    out_v, out_t = [], []
    for row, excl in zip(np.asarray(scores, np.float64), excluded):
        excl = {int(e) for e in excl}
        items = sorted((t for t in range(1, num_items + 1) if t not in excl), key=lambda t: (-row[t], t))[:k]
        out_v.append([row[t] for t in items] + [-INF] * (k - len(items)))
        out_t.append(items + [0] * (k - len(items)))
    return out_v, out_t


def inputs(histories: list[list[int]], seen_extra: list[list[int]] | None = None):
    """Token histories -> (tokens (B, MAX_LEN) ending in [MASK], seen (B, L) left-padded)."""
    seqs = [np.array(h, np.int64) for h in histories]
    tokens = torch.as_tensor(data.inference_tokens(seqs, MAX_LEN, MASK))
    seen_lists = [np.r_[s, np.array(x, np.int64)] for s, x in zip(seqs, seen_extra or [[]] * len(seqs))]
    seen = torch.as_tensor(data.pad_left(seen_lists, max(1, max(len(s) for s in seen_lists))))
    return tokens, seen


# ---------------------------------------------------------------- score_batch, hand-made scores


def test_hand_made_model_gives_the_scores_written_down():
    model = hand_made_model()
    tokens, _ = inputs([[1, 2], [3]])
    logits = model.logits(model.last_hidden(tokens))
    assert logits.tolist() == [ITEM_SCORES, ITEM_SCORES]


def test_seen_items_excluded_padding_and_mask_never_returned_ties_by_token():
    model = hand_made_model()
    tokens, seen = inputs([[3], [2], [2, 6, 1]])
    values, top, fallback = score_batch(model, tokens, seen, k=3)
    # user 0: 2 and 4 tie at 9 -> the lower token first; pad/[MASK] (100) never appear
    # user 1: 2 seen -> 4 moves up;  user 2: 2, 6, 1 seen -> 4, 5, 3
    assert top.tolist() == [[2, 4, 6], [4, 6, 1], [4, 5, 3]]
    assert values.tolist() == [[9.0, 9.0, 8.0], [9.0, 8.0, 5.0], [9.0, 3.0, 1.0]]
    assert fallback.tolist() == [False, False, False]


def test_global_and_per_user_exclusions():
    model = hand_made_model()
    # user 0's own exclusion list adds 4; the global list drops 6 for everybody
    tokens, seen = inputs([[3], [1]], seen_extra=[[4], []])
    values, top, _ = score_batch(model, tokens, seen, k=3, global_exclude=torch.tensor([6]))
    assert top.tolist() == [[2, 1, 5], [2, 4, 5]]
    assert values.tolist() == [[9.0, 5.0, 3.0], [9.0, 9.0, 3.0]]


def test_fewer_rankable_items_than_k_leaves_empty_slots():
    model = hand_made_model()
    tokens, seen = inputs([[1, 2, 3, 4]], seen_extra=[[5]])
    values, top, _ = score_batch(model, tokens, seen, k=3)
    assert top.tolist() == [[6, 0, 0]]
    assert values.tolist() == [[8.0, -INF, -INF]]


@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 1000])
def test_chunked_topk_equals_unchunked(chunk):
    model = hand_made_model()
    tokens, seen = inputs([[3], [2], [2, 6, 1], []], seen_extra=[[4], [], [], [2]])
    full = score_batch(model, tokens, seen, k=4, global_exclude=torch.tensor([5]), popularity=POPULARITY)
    chunked = score_batch(model, tokens, seen, k=4, global_exclude=torch.tensor([5]), popularity=POPULARITY, item_chunk_size=chunk)
    for a, b in zip(full, chunked):
        assert torch.equal(a, b)


def test_fallback_user_gets_most_popular_unseen_items():
    model = hand_made_model()
    # user 1 has no known item (only [MASK] in the input) and their own exclusion of token 5;
    # token 6 is excluded globally. Popularity: 5 (9), then 1 and 3 tie at 7 -> 1 first.
    tokens, seen = inputs([[2], []], seen_extra=[[], [5]])
    values, top, fallback = score_batch(model, tokens, seen, k=3, global_exclude=torch.tensor([6]), popularity=POPULARITY)
    assert fallback.tolist() == [False, True]
    assert top.tolist() == [[4, 1, 5], [1, 3, 2]]
    assert values.tolist() == [[9.0, 5.0, 3.0], [7.0, 7.0, 3.0]]
    # without exclusions the most popular item comes first
    tokens, seen = inputs([[]])
    values, top, fallback = score_batch(model, tokens, seen, k=2, popularity=POPULARITY)
    assert (top.tolist(), values.tolist(), fallback.tolist()) == ([[5, 1]], [[9.0, 7.0]], [True])


# ---------------------------------------------------------------- score_batch vs the model itself


def test_score_batch_agrees_with_the_model_on_random_weights():
    model = random_model()
    mc = model.config
    g = np.random.default_rng(0)
    seqs = [g.choice(np.arange(1, mc.num_items + 1), size=n, replace=False) for n in (1, 3, 7, 12, 20)]
    tokens = torch.as_tensor(data.inference_tokens(seqs, mc.max_len, mc.mask_token))
    seen = torch.as_tensor(data.pad_left(seqs, 20))
    glob = torch.tensor([int(seqs[0][0]) % mc.num_items + 1, 17])
    expected_scores = model.logits(model.last_hidden(tokens)).detach()
    exp_v, exp_t = reference_topk(expected_scores, 10, [list(s) + glob.tolist() for s in seqs], mc.num_items)
    for chunk in (7, 1000):
        values, top, fallback = score_batch(model, tokens, seen, k=10, global_exclude=glob, item_chunk_size=chunk)
        assert top.tolist() == exp_t
        np.testing.assert_allclose(values.numpy(), np.array(exp_v), rtol=1e-5, atol=1e-5)
        assert not fallback.any()
        # the histories (all of them, even the items truncated off the model input) are excluded
        assert not any(set(t) & set(s.tolist()) for t, s in zip(top.tolist(), seqs))


# ---------------------------------------------------------------- to_rows


def test_to_rows_schema_and_exact_lists():
    values = np.array([[9.0, 8.0, 5.0], [7.0, -INF, -INF]], np.float32)
    tokens = np.array([[2, 6, 1], [5, 0, 0]], np.int64)
    rows = to_rows(np.array([101, 7]), values, tokens, np.array([False, True]), VOCAB_IDS, "e0004-abc", GEN_AT)
    assert rows.schema == OUTPUT_SCHEMA
    assert rows.to_pydict() == {
        "user_id": [101, 7],
        "item_ids": [[20, 60, 10], [50]],  # empty slots (token 0) left out
        "scores": [[9.0, 8.0, 5.0], [7.0]],
        "fallback": [False, True],
        "model_version": ["e0004-abc", "e0004-abc"],
        "generated_at": [GEN_AT, GEN_AT],
    }


def test_to_rows_titles_ride_along():
    titles = np.array([None, "a", "b", None, "d", "e", "f", None], dtype=object)  # token 3: no title
    values = np.array([[9.0, 1.0, 8.0]], np.float32)
    tokens = np.array([[2, 3, 6]], np.int64)
    rows = to_rows(np.array([5]), values, tokens, np.array([False]), VOCAB_IDS, "m", GEN_AT, titles)
    assert rows.schema == OUTPUT_SCHEMA.append(pa.field("titles", pa.list_(pa.string())))
    assert rows["item_ids"].to_pylist() == [[20, 30, 60]]
    assert rows["titles"].to_pylist() == [["b", None, "f"]]


def test_to_rows_empty_batch():
    rows = to_rows(np.zeros(0, np.int64), np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), np.zeros(0, bool), VOCAB_IDS, "m", GEN_AT)
    assert rows.num_rows == 0 and rows.schema == OUTPUT_SCHEMA


# ---------------------------------------------------------------- featurize


def test_featurize_drops_and_counts_unknown_items_and_keeps_all_seen():
    batch = pa.table(
        {
            "user_id": pa.array([3, 1, 2], pa.int64()),
            # 99 and 5 are not in the vocabulary; user 2 knows no item at all
            "item_ids": pa.array([[10, 99, 20, 30, 40, 50, 60], [60, 5], [99, 98]], pa.list_(pa.int64())),
        }
    )
    ex_users, ex_tokens = np.array([1, 1, 2], np.int64), np.array([4, 2, 3], np.int64)
    out = featurize(batch, VOCAB_IDS, MAX_LEN, MASK, use_ratings=False, exclude_users=ex_users, exclude_tokens=ex_tokens)
    assert out.column_names == ["user_id", "tokens", "seen", "unknown"]
    assert out["user_id"].to_pylist() == [3, 1, 2]
    # the last max_len - 1 known items, then [MASK], left-padded
    assert out["tokens"].to_pylist() == [[3, 4, 5, 6, MASK], [0, 0, 0, 6, MASK], [0, 0, 0, 0, MASK]]
    # seen: every known item of the history (even those truncated off the input) + own exclusions
    assert out["seen"].to_pylist() == [[1, 2, 3, 4, 5, 6], [6, 4, 2], [3]]
    assert out["unknown"].to_pylist() == [1, 1, 2]


def test_featurize_ratings_follow_the_known_items():
    batch = pa.table(
        {
            "user_id": pa.array([1], pa.int64()),
            "item_ids": pa.array([[10, 99, 20]], pa.list_(pa.int64())),
            "ratings": pa.array([[4.0, 1.0, 2.4]], pa.list_(pa.float32())),
        }
    )
    out = featurize(batch, VOCAB_IDS, MAX_LEN, MASK, use_ratings=True)
    assert out["tokens"].to_pylist() == [[0, 0, 1, 2, MASK]]
    assert out["ratings"].to_pylist() == [[0, 0, 4, 2, 0]]
    assert "ratings" not in featurize(batch, VOCAB_IDS, MAX_LEN, MASK, use_ratings=False).column_names


def test_featurize_excludes_the_items_prepare_cut_from_a_long_history():
    """A 300-item history cut to its latest 200 by prepare: none of the 300 comes back."""
    rows = [(1, item, ts) for ts, item in enumerate(range(1, 301))]
    rows += [(2, item, ts) for ts, item in enumerate(range(320, 0, -1))]  # keeps 200..1
    rows += [(3, item, ts) for ts, item in enumerate(range(301, 321))]
    cols = list(zip(*rows))
    table = pa.table({"user_id": pa.array(cols[0], pa.int64()), "item_id": pa.array(cols[1], pa.int64()), "timestamp": pa.array(cols[2], pa.int64())})
    hist, _ = data.build_histories(data.validate_interactions(table, "t"), max_len=200)
    vocab_ids = data.build_vocab(hist)["item_id"].to_numpy()
    assert vocab_ids.tolist() == list(range(1, 321))
    assert hist["item_ids"].to_pylist()[0] == list(range(101, 301))
    model = random_model(num_items=320, max_len=8)
    feats = featurize(hist, vocab_ids, 8, model.config.mask_token, use_ratings=False)
    seen_flat, seen_offsets = data.list_column(feats, "seen")
    seen = torch.as_tensor(data.pad_seen(np.split(seen_flat, seen_offsets[1:-1])))
    _, top, _ = score_batch(model, torch.as_tensor(np.array(feats["tokens"].to_pylist())), seen, k=25)
    # user 1 has seen 1..300: only 301..320 are left, then empty slots
    assert sorted(vocab_ids[t - 1] for t in top[0].tolist() if t) == list(range(301, 321))
    assert top[0].tolist().count(0) == 5
    # without the cut items' column the exclusion misses them: this test would see them
    feats = featurize(hist.drop_columns([data.TRUNCATED_COLUMN]), vocab_ids, 8, model.config.mask_token, use_ratings=False)
    seen_flat, seen_offsets = data.list_column(feats, "seen")
    seen = torch.as_tensor(data.pad_seen(np.split(seen_flat, seen_offsets[1:-1])))
    _, top, _ = score_batch(model, torch.as_tensor(np.array(feats["tokens"].to_pylist())), seen, k=25)
    assert any(vocab_ids[t - 1] <= 100 for t in top[0].tolist())


# ---------------------------------------------------------------- the Scorer, in-process


@pytest.fixture
def hand_made_checkpoint(tmp_path):
    vocab = pa.table(
        {
            "item_id": pa.array(VOCAB_IDS),
            "token": pa.array(np.arange(1, V + 1), pa.int32()),
            "count": pa.array(POPULARITY[1:-1].numpy().astype(np.int64)),
        }
    )
    meta = ckpt_lib.save(str(tmp_path / "ckpt"), hand_made_model(), vocab, {"epoch": 3, "metrics": {}})
    return str(tmp_path / "ckpt"), meta["model_version"]


@pytest.mark.parametrize("sub_batch", [None, 1, 2])
def test_scorer_end_to_end_without_ray(hand_made_checkpoint, sub_batch):
    """The same rows whether the batch goes through the model whole or in sub-batches
    (``ScoreConfig.sub_batch``) of one or two users grouped by history length."""
    uri, version = hand_made_checkpoint
    histories = pa.table(
        {
            "user_id": pa.array([11, 12, 13], pa.int64()),
            "item_ids": pa.array([[30], [20, 999], [777]], pa.list_(pa.int64())),
        }
    )
    titles = np.array([None, "t10", "t20", "t30", "t40", "t50", "t60", None], dtype=object)
    # user 12 also excludes item 40 (token 4); item 60 (token 6) is excluded for everybody
    feats = featurize(histories, VOCAB_IDS, MAX_LEN, MASK, False, np.array([12]), np.array([4]))
    scorer = Scorer(uri, StorageConfig(), k=3, item_chunk_size=2, use_gpu=False, global_exclude=np.array([6]), titles=titles, generated_at=GEN_AT, sub_batch=sub_batch)
    rows = scorer(feats)
    assert rows.column_names == OUTPUT_SCHEMA.names + ["titles", "unknown_items"]
    got = rows.to_pydict()
    assert got["user_id"] == [11, 12, 13]
    assert got["item_ids"] == [[20, 40, 10], [10, 50, 30], [50, 10, 30]]
    assert got["scores"] == [[9.0, 9.0, 5.0], [5.0, 3.0, 1.0], [9.0, 7.0, 7.0]]  # user 13: popularity
    assert got["fallback"] == [False, False, True]
    assert got["unknown_items"] == [0, 1, 1]
    assert got["titles"] == [["t20", "t40", "t10"], ["t10", "t50", "t30"], ["t50", "t10", "t30"]]
    assert got["model_version"] == [version] * 3


# ---------------------------------------------------------------- input readers


def _write(tmp_path, name, table):
    path = str(tmp_path / f"{name}.parquet")
    pq.write_table(table, path)
    return path


def test_read_exclusions_global_and_per_user(tmp_path):
    glob = _write(tmp_path, "glob", pa.table({"item_id": pa.array([60, 10, 999, 60], pa.int32())}))
    read = read_exclusions(glob, StorageConfig())
    assert read.global_items.tolist() == [60, 10, 999, 60] and read.users is None and read.items is None and read.files is None
    g, users, toks, files = read.to_tokens(VOCAB_IDS)
    assert g.tolist() == [1, 6] and users is None and toks is None and files is None  # unknown 999 ignored, duplicates harmless
    per_user = _write(tmp_path, "per", pa.table({"user_id": pa.array([5, 2, 5, 2], pa.int64()), "item_id": pa.array([20, 30, 999, 40], pa.int64())}))
    read = read_exclusions(per_user, StorageConfig())
    assert read.users.tolist() == [5, 2, 5, 2] and read.items.tolist() == [20, 30, 999, 40]
    g, users, toks, files = read.to_tokens(VOCAB_IDS)
    assert g.tolist() == [] and users.tolist() == [2, 2, 5] and toks.tolist() == [3, 4, 2] and files is None
    assert read_exclusions(None, StorageConfig()).to_tokens(VOCAB_IDS)[1:] == (None, None, None)
    bad = _write(tmp_path, "bad", pa.table({"item": pa.array([1], pa.int64())}))
    with pytest.raises(InputError, match="--exclude .*'item_id'"):
        read_exclusions(bad, StorageConfig())
    nulls = _write(tmp_path, "nulls", pa.table({"user_id": pa.array([5, None], pa.int64()), "item_id": pa.array([20, 30], pa.int64())}))
    with pytest.raises(InputError, match=r"--exclude .*: column 'user_id' has 1 null value\(s\), first at row 1"):
        read_exclusions(nulls, StorageConfig())
    huge = _write(tmp_path, "huge", pa.table({"item_id": pa.array([3, 2**64 - 1], pa.uint64())}))
    with pytest.raises(InputError, match=r"^--exclude .*huge.parquet: column 'item_id' row 1 is 18446744073709551615, past the largest int64 id"):
        read_exclusions(huge, StorageConfig())


def test_read_exclusions_leaves_a_large_per_user_table_to_the_cluster(tmp_path):
    """Above max_driver_rows only the schema and the footers are read: no rows, so not the null."""
    d = tmp_path / "ex"
    d.mkdir()
    pq.write_table(pa.table({"user_id": pa.array([5, None], pa.int64()), "item_id": pa.array([20, 30], pa.int64())}), str(d / "b.parquet"))
    pq.write_table(pa.table({"user_id": pa.array([7], pa.int64()), "item_id": pa.array([40], pa.int64())}), str(d / "a.parquet"))
    g, users, toks, files = read_exclusions(str(d), StorageConfig(), max_driver_rows=2).to_tokens(VOCAB_IDS)
    assert g.tolist() == [] and users is None and toks is None
    assert files == [str(d / "a.parquet"), str(d / "b.parquet")]
    assert read_exclusions(str(d / "a.parquet"), StorageConfig(), max_driver_rows=2).files is None
    # a global list (no user_id) is bounded by the catalogue: always the driver's
    glob = _write(tmp_path, "glob", pa.table({"item_id": pa.array([60, 10, 60], pa.int64())}))
    assert read_exclusions(glob, StorageConfig(), max_driver_rows=0).to_tokens(VOCAB_IDS).global_items.tolist() == [1, 6]


HISTORY_COLUMNS = pa.schema([("user_id", pa.int64()), ("item_ids", pa.list_(pa.int64())), ("ratings", pa.list_(pa.float32()))])


def test_exclusion_side_reads_a_file_in_the_histories_shape_and_names_a_null_row(tmp_path):
    ok = _write(tmp_path, "ok", pa.table({"item_id": pa.array([20, 30, 999], pa.int32()), "user_id": pa.array([5, 2, 5], pa.int32()), "note": ["a", "b", "c"]}))
    (out,) = list(exclusion_side(pa.table({"path": [ok]}), ok, StorageConfig(), HISTORY_COLUMNS))
    assert out.schema == history_side(pa.table({"user_id": pa.array([], pa.int64()), "item_ids": pa.array([], pa.list_(pa.int64())), "ratings": pa.array([], pa.list_(pa.float32()))})).schema
    assert out.to_pydict() == {"user_id": [5, 2, 5], "item_ids": [None] * 3, "ratings": [None] * 3, "side": [1, 1, 1], "excluded": [20, 30, 999]}
    bad = _write(tmp_path, "bad", pa.table({"user_id": pa.array([5, 2, 5], pa.int64()), "item_id": pa.array([20, 30, None], pa.int64())}))
    with pytest.raises(InputError, match=r"^--exclude .*bad.parquet: column 'item_id' has a null value at row 2$"):
        list(exclusion_side(pa.table({"path": [bad]}), bad, StorageConfig(), HISTORY_COLUMNS))
    huge = _write(tmp_path, "huge", pa.table({"user_id": pa.array([5, 2**63 + 7], pa.uint64()), "item_id": pa.array([20, 30], pa.int64())}))
    with pytest.raises(InputError, match=r"^--exclude .*huge.parquet: column 'user_id' row 1 is 9223372036854775815, past the largest int64 id \(2\*\*63 - 1\)$"):
        list(exclusion_side(pa.table({"path": [huge]}), huge, StorageConfig(), HISTORY_COLUMNS))


def test_attach_exclusions_gives_each_history_its_own_list():
    hist = pa.table(
        {
            "user_id": pa.array([3, 1, 2], pa.int64()),
            "item_ids": pa.array([[10, 20], [30], [40, 50]], pa.list_(pa.int64())),
            "ratings": pa.array([[4.0, 5.0], [3.0], [1.0, 2.0]], pa.list_(pa.float32())),
        }
    )
    ex = pa.table({"user_id": pa.array([1, 9, 1, 3], pa.int64()), "item_ids": pa.nulls(4, pa.list_(pa.int64())), "ratings": pa.nulls(4, pa.list_(pa.float32())), "side": pa.array([1, 1, 1, 1], pa.int8()), "excluded": pa.array([60, 70, 20, 40], pa.int64())})
    part = pa.concat_tables([ex.slice(0, 2), history_side(hist), ex.slice(2)])
    out = attach_exclusions(part)
    # the histories in their order, untouched; user 9 has no history: dropped; user 2 has no exclusions: null
    assert out.column_names == ["user_id", "item_ids", "ratings", EXCLUDED_COLUMN]
    assert out.select(["user_id", "item_ids", "ratings"]).equals(hist)
    assert out[EXCLUDED_COLUMN].to_pylist() == [[40], [60, 20], None]


def test_featurize_takes_a_joined_exclusion_column_as_it_takes_the_sorted_arrays():
    batch = pa.table(
        {
            "user_id": pa.array([3, 1, 2], pa.int64()),
            "item_ids": pa.array([[10, 99, 20, 30, 40, 50, 60], [60, 5], [99, 98]], pa.list_(pa.int64())),
        }
    )
    by_arrays = featurize(batch, VOCAB_IDS, MAX_LEN, MASK, use_ratings=False, exclude_users=np.array([1, 1, 2]), exclude_tokens=np.array([4, 2, 3]))
    # item ids, unknown ones (999) dropped, as the driver's read drops them
    joined = batch.append_column(EXCLUDED_COLUMN, pa.array([None, [40, 999, 20], [30]], pa.list_(pa.int64())))
    by_column = featurize(joined, VOCAB_IDS, MAX_LEN, MASK, use_ratings=False)
    assert by_column.equals(by_arrays)
    assert by_column["seen"].to_pylist() == [[1, 2, 3, 4, 5, 6], [6, 4, 2], [3]]


def test_read_titles_aligned_with_tokens(tmp_path):
    items = _write(tmp_path, "items", pa.table({"item_id": pa.array([30, 999, 10], pa.int64()), "title": ["c", "x", "a"], "genre": ["g", "g", "g"]}))
    assert read_titles(items, StorageConfig(), VOCAB_IDS).tolist() == [None, "a", None, "c", None, None, None, None]
    assert read_titles(None, StorageConfig(), VOCAB_IDS) is None
    bad = _write(tmp_path, "bad", pa.table({"item_id": pa.array([30], pa.int64())}))
    with pytest.raises(InputError, match="--items .*'title'"):
        read_titles(bad, StorageConfig(), VOCAB_IDS)


@pytest.mark.parametrize(
    "table, message",
    [
        (pa.table({"user": pa.array([1], pa.int64()), "item_ids": pa.array([[1]], pa.list_(pa.int64()))}), "missing column 'user_id'"),
        (pa.table({"user_id": pa.array([1], pa.int64()), "items": pa.array([[1]], pa.list_(pa.int64()))}), "missing column 'item_ids'"),
        (pa.table({"user_id": pa.array(["a"]), "item_ids": pa.array([[1]], pa.list_(pa.int64()))}), "'user_id' must be an integer"),
        (pa.table({"user_id": pa.array([1], pa.int64()), "item_ids": pa.array([1], pa.int64())}), "'item_ids' must be a list"),
        (pa.table({"user_id": pa.array([1], pa.int64()), "item_ids": pa.array([["x1"]], pa.list_(pa.string()))}), "'item_ids' must be a list of integer"),
        (pa.table({"user_id": pa.array([1, None], pa.int64()), "item_ids": pa.array([[1], [2]], pa.list_(pa.int64()))}), r"column 'user_id' has 1 null value\(s\), first at row 1$"),
        (pa.table({"user_id": pa.array([1, 2**63], pa.uint64()), "item_ids": pa.array([[1], [2]], pa.list_(pa.int64()))}), r"column 'user_id' row 1 is 9223372036854775808, past the largest int64 id"),
        (pa.table({"user_id": pa.array([4, 2, 4], pa.int64()), "item_ids": pa.array([[1], [2], [3]], pa.list_(pa.int64()))}), "1 duplicated user_id.*e.g. 4"),
    ],
)
def test_check_histories_rejects_bad_tables(tmp_path, table, message):
    with pytest.raises(InputError, match=message):
        check_histories(_write(tmp_path, "h", table), StorageConfig())


def test_check_histories_accepts_a_good_table(tmp_path):
    t = pa.table({"user_id": pa.array([3, 1], pa.int32()), "item_ids": pa.array([[1], [2]], pa.list_(pa.int64())), "ratings": pa.array([[1.0], [2.0]])})
    checked = check_histories(_write(tmp_path, "h", t), StorageConfig())
    assert checked.users == 2 and checked.ids.tolist() == [1, 3] and checked.has_ratings


def test_check_histories_leaves_a_large_table_s_users_to_the_cluster(tmp_path):
    # duplicated ids, but more rows than the driver checks: only the schema is checked here
    t = pa.table({"user_id": pa.array([4, 2, 4], pa.int64()), "item_ids": pa.array([[1], [2], [3]], pa.list_(pa.int64()))})
    checked = check_histories(_write(tmp_path, "h", t), StorageConfig(), max_driver_users=2)
    assert (checked.users, checked.ids, checked.has_ratings) == (3, None, False)
    with pytest.raises(InputError, match="1 duplicated user_id.*e.g. 4"):
        check_histories(_write(tmp_path, "h", t), StorageConfig(), max_driver_users=3)


def _sides(inputs, outputs, fallback=None, unknown=None):
    n_out = len(outputs)
    return pa.concat_tables(
        [
            user_side(pa.table({"user_id": pa.array(inputs, pa.int64())}), 0),
            user_side(
                pa.table(
                    {
                        "user_id": pa.array(outputs, pa.int64()),
                        "fallback": pa.array(fallback or [False] * n_out),
                        "unknown_items": pa.array(unknown or [0] * n_out, pa.int32()),
                    }
                ),
                1,
            ),
        ]
    )


def test_a_partition_whose_output_matches_its_input_counts_no_problem():
    row = user_check_rows(_sides([5, 3, 9], [9, 5, 3], fallback=[True, False, True], unknown=[2, 0, 1])).to_pylist()
    assert row == [
        {
            "input_rows": 3,
            "null_users": 0,
            "duplicated": 0,
            "first_duplicated": -1,
            "output_rows": 3,
            "missing": 0,
            "first_missing": -1,
            "extra": 0,
            "first_extra": -1,
            "fallback_users": 2,
            "unknown_items": 3,
        }
    ]


def test_a_partition_counts_each_kind_of_problem_with_its_smallest_id():
    # input: 7 twice and a null; output: 3 missing, 8 twice, 11 unknown, a null
    t = _sides([7, 3, 7, 8, None, 1], [1, 8, 8, 11, None, 7])
    row = user_check_rows(t).to_pylist()[0]
    assert row == {
        "input_rows": 6,
        "null_users": 1,
        "duplicated": 1,
        "first_duplicated": 7,
        "output_rows": 6,
        "missing": 1,
        "first_missing": 3,
        "extra": 3,  # the second 8, 11 and the null
        "first_extra": 8,
        "fallback_users": 0,
        "unknown_items": 0,
    }


def test_length_grouped_sub_batches_give_the_same_top_k():
    torch.manual_seed(3)
    model = BERT4Rec(BERT4RecConfig(num_items=40, max_len=12, hidden=16, layers=1, heads=2)).eval()
    rng = np.random.default_rng(0)
    seqs = [rng.choice(np.arange(1, 41), size=n, replace=False) for n in (1, 11, 3, 7, 2, 9, 5, 11, 4)]
    tokens = torch.as_tensor(data.inference_tokens(seqs, 12, model.config.mask_token))
    seen = torch.as_tensor(data.pad_left(seqs, 11))
    whole = score_batch(model, tokens, seen, 5)
    grouped = score_batch(model, tokens, seen, 5, sub_batch=2)
    assert torch.equal(whole[1], grouped[1])
    assert torch.allclose(whole[0], grouped[0], atol=1e-5)
    assert torch.equal(whole[2], grouped[2])


def test_scorer_sets_its_torch_thread_count(hand_made_checkpoint):
    """threads_per_actor: an actor may run more torch threads than the CPUs it reserves
    (Ray sets OMP_NUM_THREADS to the reservation); None leaves the count alone."""
    uri, _ = hand_made_checkpoint
    before = torch.get_num_threads()
    kw = dict(k=3, item_chunk_size=2, use_gpu=False, global_exclude=np.array([], np.int64), titles=None, generated_at=GEN_AT)
    try:
        Scorer(uri, StorageConfig(), **kw, threads=1)
        assert torch.get_num_threads() == 1
        Scorer(uri, StorageConfig(), **kw, threads=3)
        assert torch.get_num_threads() == 3
        Scorer(uri, StorageConfig(), **kw)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("actors", "cpus_per_actor", "cluster_cpus", "stalls"),
    [
        (1, 1.0, 2.0, False),  # one CPU left for reads and writes
        (2, 0.5, 2.0, False),
        (2, 1.0, 2.0, True),  # every CPU held by actors: the read never starts
        (3, 0.5, 2.0, True),  # half a CPU left is not enough for a 1-CPU task
        (2, 2.0, 4.0, True),
        (4, 2.0, 2.0, False),  # more than the cluster has: left to Ray (an autoscaler may add nodes)
        (4, 2.0, 9.0, False),
    ],
)
def test_cpu_reservation_must_leave_one_cpu_for_reads_and_writes(actors, cpus_per_actor, cluster_cpus, stalls):
    cfg = ScoreConfig(checkpoint="c", histories="h", out="o", actors=actors, cpus_per_actor=cpus_per_actor)
    if stalls:
        with pytest.raises(InputError, match=rf"actors x cpus_per_actor = {actors} x {cpus_per_actor:g} = .* leaves less than one of the cluster's {cluster_cpus:g} CPUs"):
            check_cpu_reservation(cfg, cluster_cpus)
    else:
        check_cpu_reservation(cfg, cluster_cpus)
