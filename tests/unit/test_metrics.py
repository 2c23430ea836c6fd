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
    # user 1 saw 1, 2, 3 and targets 4: only 5 and 6 are left, the rest is padding (0)
    assert sorted(neg[0].tolist()) == [0, 0, 5, 6]


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
