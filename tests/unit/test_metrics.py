"""Leave-one-out evaluation on a hand-written histories table."""

import numpy as np
import pyarrow as pa

from bert4rec.metrics import make_eval_set, popularity, popularity_ranks, report, sample_negatives

# items 10..60 -> tokens 1..6; [MASK] = 7
VOCAB = np.array([10, 20, 30, 40, 50, 60])
HIST = pa.table({"user_id": [1, 2, 3], "item_ids": [[10, 20, 30, 40], [20, 10, 50], [30, 99, 10, 20]]})


def test_eval_set_test_split():
    e = make_eval_set(HIST, VOCAB, "test", max_len=4, mask_token=7)
    assert e.user_ids.tolist() == [1, 2, 3]
    assert e.targets.tolist() == [4, 5, 2]
    # the unknown item 99 is dropped from user 3's history
    assert e.tokens.tolist() == [[1, 2, 3, 7], [0, 2, 1, 7], [0, 3, 1, 7]]
    assert [s.tolist() for s in e.seen] == [[1, 2, 3], [2, 1], [3, 1]]


def test_eval_set_val_split_and_popularity_baseline():
    e = make_eval_set(HIST, VOCAB, "val", max_len=4, mask_token=7)
    assert e.targets.tolist() == [3, 1, 1]
    assert [s.tolist() for s in e.seen] == [[1, 2], [2], [3]]
    counts = popularity(e, 6)
    assert counts.tolist() == [0, 1, 2, 1, 0, 0, 0, 0]
    full, _ = popularity_ranks(counts, e)
    # user 1: seen {1,2}; token 3 has count 1 and is the only one left with a count -> rank 1
    # user 2: seen {2}; scores 1:1, 3:1 -> target 1 ties with 3, lower token first -> rank 1
    # user 3: seen {3}; 2 has count 2 > target 1's count 1 -> rank 2
    assert full.tolist() == [1, 1, 2]
    m = report(full, None, k=1)
    assert m == {"hr@1": 2 / 3, "ndcg@1": 2 / 3, "mrr": (1 + 1 + 0.5) / 3, "users": 3}


def test_sampled_negatives_exclude_seen_items_and_the_target():
    e = make_eval_set(HIST, VOCAB, "test", max_len=4, mask_token=7)
    counts = np.array([0, 5, 5, 5, 5, 5, 5, 0])
    neg = sample_negatives(e, counts, n=2, seed=0)
    assert neg.shape == (3, 2)
    for u in range(3):
        forbidden = set(e.seen[u].tolist()) | {int(e.targets[u])} | {0, 7}
        assert not set(neg[u].tolist()) & forbidden
        assert len(set(neg[u].tolist())) == 2
    assert np.array_equal(neg, sample_negatives(e, counts, n=2, seed=0))


def test_a_user_who_has_seen_almost_everything_gets_every_unseen_item_as_negatives():
    e = make_eval_set(HIST, VOCAB, "test", max_len=4, mask_token=7)
    counts = np.array([0, 5, 5, 5, 5, 5, 5, 0])
    neg = sample_negatives(e, counts, n=4, seed=0)
    # user 1 saw 1, 2, 3 and targets 4: only 5 and 6 are left (ascending), the rest is padding (0)
    assert neg[0].tolist() == [5, 6, 0, 0]


def test_model_ranks_in_length_order_equal_the_untrimmed_ranks_in_input_order():
    """Trimming each length-sorted batch's shared padding changes no rank (positions count
    from the end), and the ranks come back in the eval set's order."""
    import torch

    from bert4rec.metrics import EvalSet, model_ranks, sampled_rank_of_target
    from bert4rec.model import BERT4Rec, BERT4RecConfig
    from bert4rec.ranking import rank_of_target

    torch.manual_seed(0)
    model = BERT4Rec(BERT4RecConfig(num_items=6, max_len=6, hidden=8, layers=1, heads=2)).eval()
    mask = model.config.mask_token
    hists = [[1, 2, 3, 4, 5], [2], [6, 1], [3, 4, 5, 6], [5], [1, 6, 2]]
    tokens = np.array([[0] * (5 - len(h)) + h + [mask] for h in hists])
    e = EvalSet(
        tokens=tokens,
        ratings=None,
        targets=np.array([6, 3, 2, 1, 4, 5]),
        seen=[np.array(h) for h in hists],
        user_ids=np.arange(6),
    )
    negatives = np.array([[1, 2], [4, 5], [3, 4], [2, 3], [6, 1], [3, 4]])
    with torch.no_grad():
        scores = model.logits(model.last_hidden(torch.as_tensor(tokens))).float()
    seen = torch.as_tensor(np.array([[0] * (5 - len(h)) + h for h in hists]))
    expected = rank_of_target(scores, torch.as_tensor(e.targets), seen, 6).tolist()
    expected_sampled = sampled_rank_of_target(scores, torch.as_tensor(e.targets), torch.as_tensor(negatives)).tolist()
    full, sampled = model_ranks(model, e, batch_size=2, negatives=negatives)
    assert full.tolist() == expected
    assert sampled.tolist() == expected_sampled
    assert all(1 <= r <= 6 for r in full.tolist())
    # a catalogue ranked in item chunks (as a large one is) gives the same ranks
    for chunk in (1, 3, 5):
        full_c, sampled_c = model_ranks(model, e, batch_size=2, negatives=negatives, item_chunk_size=chunk)
        assert full_c.tolist() == expected
        assert sampled_c.tolist() == expected_sampled
    # no users: no ranks, and no batch is run
    nobody = EvalSet(tokens=tokens[:0], ratings=None, targets=e.targets[:0], seen=[], user_ids=e.user_ids[:0])
    full, sampled = model_ranks(model, nobody, batch_size=2, negatives=negatives[:0])
    assert full.tolist() == [] and sampled.tolist() == []


def test_eval_set_excludes_the_items_cut_by_prepare_but_never_the_target():
    # user 1 had 50 and 60 cut, and 40 (its test target); 99 is unknown to the vocabulary
    hist = HIST.slice(0, 1).append_column("truncated_item_ids", pa.array([[40, 50, 60, 99]], pa.list_(pa.int64())))
    e = make_eval_set(hist, VOCAB, "test", max_len=4, mask_token=7)
    assert e.targets.tolist() == [4]
    assert [s.tolist() for s in e.seen] == [[1, 2, 3, 5, 6]]
    assert e.tokens.tolist() == [[1, 2, 3, 7]]
    e = make_eval_set(hist, VOCAB, "val", max_len=4, mask_token=7)
    assert e.targets.tolist() == [3]
    assert [s.tolist() for s in e.seen] == [[1, 2, 4, 5, 6]]
    full, _ = popularity_ranks(np.array([0, 1, 1, 1, 9, 9, 9, 0]), e)
    # 4, 5, 6 outscore the target but were seen before it: the target ranks first
    assert full.tolist() == [1]


# ---------------------------------------------------------------- samples, negatives, exact sums


def test_the_user_sample_depends_on_the_user_id_alone():
    from bert4rec.data import sample_mask, user_hash

    # a fixed function: the same users night after night, in every process and version
    assert user_hash(np.array([0, 1, -1])).tolist() == [12035550249420947055, 627405149472732430, 3303439293501059696]
    ids = np.arange(100_000, dtype=np.int64) * 7 - 300
    mask = sample_mask(ids, 1_000, len(ids), seed=0)
    assert int(mask.sum()) == 1_033  # about 1,000: users whose hash is below 1,000/100,000 of its range
    # the same users whatever the order or the batches they come in
    perm = np.random.default_rng(0).permutation(len(ids))
    assert np.array_equal(sample_mask(ids[perm], 1_000, len(ids), seed=0), mask[perm])
    parts = np.concatenate([sample_mask(p, 1_000, len(ids), seed=0) for p in np.array_split(ids, 7)])
    assert np.array_equal(parts, mask)
    # a larger sample keeps the smaller one; another seed draws other users; everyone when fewer
    assert not (mask & ~sample_mask(ids, 5_000, len(ids), seed=0)).any()
    assert (mask != sample_mask(ids, 1_000, len(ids), seed=1)).any()
    assert sample_mask(ids, None, len(ids)).all() and sample_mask(ids, len(ids), len(ids)).all()


def test_sampled_histories_keep_the_hash_sample_of_a_table():
    from bert4rec.data import sample_mask
    from bert4rec.metrics import sampled_histories

    hist = pa.table({"user_id": np.arange(40, dtype=np.int64), "item_ids": [[1, 2, 3]] * 40})
    kept = sampled_histories(hist, 10, 40, seed=3)
    assert kept["user_id"].to_pylist() == np.flatnonzero(sample_mask(np.arange(40), 10, 40, seed=3)).tolist()
    assert sampled_histories(hist, None, 40) is hist and sampled_histories(hist, 40, 40) is hist


def test_eval_set_tokens_are_int32():
    e = make_eval_set(HIST, VOCAB, "test", max_len=4, mask_token=7)
    assert e.tokens.dtype == np.int32


def _catalogue_eval_set(users: int, items: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = np.arange(1, items + 1, dtype=np.int64) * 10
    hist = pa.table(
        {
            "user_id": pa.array(rng.permutation(10 * users)[:users].astype(np.int64)),
            "item_ids": [rng.choice(vocab, rng.integers(3, 30), replace=False).tolist() for _ in range(users)],
        }
    )
    return hist, vocab


def test_negatives_are_the_same_however_users_are_batched():
    hist, vocab = _catalogue_eval_set(60)
    whole = make_eval_set(hist, vocab, "test", max_len=8, mask_token=51)
    counts = popularity(whole, 50)
    neg = sample_negatives(whole, counts, n=10, seed=4)
    parts = [sample_negatives(make_eval_set(hist.slice(s, 13), vocab, "test", 8, 51), counts, 10, seed=4) for s in range(0, 60, 13)]
    assert np.array_equal(np.concatenate(parts), neg)
    for u in range(len(whole)):
        row = neg[u].tolist()
        assert len(set(row)) == 10 and 0 not in row
        assert not set(row) & (set(whole.seen[u].tolist()) | {int(whole.targets[u])})
        # items nobody had in their input are never drawn
        assert all(counts[t] > 0 for t in row)
    assert not np.array_equal(neg, sample_negatives(whole, counts, n=10, seed=5))


def test_negatives_follow_popularity():
    # one user, 3 allowed items with counts 1 : 2 : 7; its first draws over many seeds
    e = make_eval_set(pa.table({"user_id": [5], "item_ids": [[10, 20, 60]]}), VOCAB, "test", max_len=4, mask_token=7)
    counts = np.array([0, 9, 9, 1, 2, 7, 9, 0])  # seen: 1, 2; target 6
    first = np.array([sample_negatives(e, counts, n=1, seed=s)[0, 0] for s in range(3000)])
    share = np.bincount(first, minlength=8)[3:6] / len(first)
    assert np.allclose(share, [0.1, 0.2, 0.7], atol=0.03), share


def test_metric_sums_are_exact_and_add_up_in_any_order():
    from bert4rec.metrics import add_sums, metrics_from_sums, rank_sums
    from bert4rec.ranking import hr_ndcg_mrr

    ranks = np.random.default_rng(0).integers(1, 5000, 10_001)
    whole = rank_sums(ranks, 10)
    parts = [rank_sums(p, 10) for p in np.array_split(ranks[::-1], 17)]
    total = {}
    for p in parts:
        total = add_sums(total, p)
    assert total == whole
    m = metrics_from_sums(whole, 10)
    assert m == metrics_from_sums(total, 10)
    ref = hr_ndcg_mrr(ranks, 10)
    assert m["hr@10"] == ref["hr@10"]
    assert abs(m["ndcg@10"] - ref["ndcg@10"]) < 1e-15 and abs(m["mrr"] - ref["mrr"]) < 1e-15
    # exact: the MRR of ranks 1, 2, 3 is 11/18 correctly rounded
    assert metrics_from_sums(rank_sums([1, 2, 3], 10), 10)["mrr"] == 11 / 18


def test_eval_sums_of_batches_add_up_to_the_whole_set():
    import torch

    from bert4rec.metrics import FAMILIES, add_sums, eval_sums
    from bert4rec.model import BERT4Rec, BERT4RecConfig

    torch.manual_seed(0)
    hist, vocab = _catalogue_eval_set(45)
    model = BERT4Rec(BERT4RecConfig(num_items=50, max_len=8, hidden=8, layers=1, heads=2)).eval()
    whole = make_eval_set(hist, vocab, "test", 8, model.config.mask_token)
    counts = popularity(whole, 50)
    expected = eval_sums(model, whole, counts, negatives=10, seed=1, k=10, batch_size=16)
    total = {name: {} for name in FAMILIES}
    for start in range(0, 45, 7):
        part = make_eval_set(hist.slice(start, 7), vocab, "test", 8, model.config.mask_token)
        sums = eval_sums(model, part, counts, negatives=10, seed=1, k=10, batch_size=3)
        total = {name: add_sums(total[name], sums[name]) for name in FAMILIES}
    assert total == expected
    assert expected["full"]["users"] == 45
