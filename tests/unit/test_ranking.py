"""Unit tests for bert4rec.ranking: exact top-k with exclusions, chunked top-k, ranks, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bert4rec.ranking import (
    chunked_rank_of_target,
    chunked_topk,
    hr_ndcg_mrr,
    rank_of_target,
    sampled_rank_of_target,
    topk_excluding,
)

INF = math.inf
V = 6  # items 1..6, pad 0, [MASK] 7 -> N = 8

# Hand-made scores, columns = tokens 0..7. Padding and [MASK] get the highest scores
# on purpose: they must never come out.
SCORES = torch.tensor(
    [
        [90.0, 5.0, 9.0, 1.0, 7.0, 3.0, 8.0, 100.0],
        [60.0, 4.0, 4.0, 2.0, 4.0, 1.0, 2.0, 50.0],
        [-5.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 99.0],
    ]
)


def t64(rows):
    return torch.tensor(rows, dtype=torch.int64)


def reference_topk(scores, k, excludes, num_items):
    """Brute force oracle: sort rankable items by (score desc, token asc), pad with (-inf, 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    values, tokens = [], []
    for row, excl in zip(scores, excludes):
        excl = set(int(e) for e in excl)
        items = [t for t in range(1, num_items + 1) if t not in excl and row[t] != -INF]
        items.sort(key=lambda t: (-row[t], t))
        items = items[:k]
        values.append([row[t] for t in items] + [-INF] * (k - len(items)))
        tokens.append(items + [0] * (k - len(items)))
    return np.array(values), np.array(tokens, dtype=np.int64)


def reference_rank(row, target, excl, num_items):
    excl = set(int(e) for e in excl) - {int(target)}
    s_t = row[target]
    return 1 + sum(
        1
        for t in range(1, num_items + 1)
        if t != target and t not in excl and (row[t] > s_t or (row[t] == s_t and t < target))
    )


def assert_topk(result, exp_values, exp_tokens):
    values, tokens = result
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == [list(map(int, r)) for r in exp_tokens]
    np.testing.assert_array_equal(values.double().numpy(), np.asarray(exp_values, dtype=np.float64))


def random_case(seed, batch=5, num_items=40, hist=12, decimals=1, neg_inf_frac=0.05):
    """Scores with many ties (rounded), some -inf items, histories with padding/duplicates/junk."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.round(torch.rand(batch, num_items + 2, generator=g) * 10**decimals) / 10**decimals
    scores[torch.rand(batch, num_items + 2, generator=g) < neg_inf_frac] = -INF
    exclude = torch.randint(0, num_items + 1, (batch, hist), generator=g)
    exclude[:, : hist // 3] = 0  # left padding
    exclude[:, -1] = exclude[:, -2]  # duplicates
    extra = torch.randint(0, num_items + 3, (batch, 3), generator=g)  # may hold [MASK] / out-of-range ids
    return scores, exclude, extra


# --------------------------------------------------------------------------- topk_excluding


def test_seen_items_excluded_and_pad_mask_never_returned():
    exclude = t64([[0, 0, 2, 4], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert_topk(
        topk_excluding(SCORES, 3, exclude, None, V),
        [[8.0, 5.0, 3.0], [4.0, 4.0, 4.0], [3.0, 3.0, 3.0]],
        [[6, 1, 5], [1, 2, 4], [1, 2, 3]],
    )


def test_all_items_returned_when_k_equals_num_items_never_pad_or_mask():
    values, tokens = topk_excluding(SCORES, V, None, None, V)
    assert tokens.tolist() == [[2, 6, 4, 1, 5, 3], [1, 2, 4, 3, 6, 5], [1, 2, 3, 4, 5, 6]]
    assert values[0].tolist() == [9.0, 8.0, 7.0, 5.0, 3.0, 1.0]


def test_extra_exclude_and_fewer_than_k_rankable_items_are_padded():
    exclude = t64([[0, 0, 2, 4], [0, 0, 0, 1], [1, 2, 3, 4]])
    extra = t64([[6, 0], [0, 0], [5, 0]])
    assert_topk(
        topk_excluding(SCORES, 3, exclude, extra, V),
        [[5.0, 3.0, 1.0], [4.0, 4.0, 2.0], [3.0, -INF, -INF]],
        [[1, 5, 3], [2, 4, 3], [6, 0, 0]],
    )


def test_every_item_excluded_gives_only_padding():
    exclude = t64([[1, 2, 3, 4, 5, 6]] * 3)
    values, tokens = topk_excluding(SCORES, 2, exclude, None, V)
    assert tokens.tolist() == [[0, 0]] * 3
    assert torch.isinf(values).all() and (values < 0).all()


def test_k_larger_than_num_items_is_padded():
    values, tokens = topk_excluding(SCORES[1:2], 8, None, None, V)
    assert tokens.tolist() == [[1, 2, 4, 3, 6, 5, 0, 0]]
    assert values.tolist() == [[4.0, 4.0, 4.0, 2.0, 2.0, 1.0, -INF, -INF]]


@pytest.mark.parametrize(
    "k, expected",
    [(1, [1]), (2, [1, 2]), (3, [1, 2, 4]), (4, [1, 2, 4, 3]), (5, [1, 2, 4, 3, 6]), (6, [1, 2, 4, 3, 6, 5])],
)
def test_ties_broken_by_lower_token_id_at_every_cutoff(k, expected):
    # row: items 1, 2, 4 tied at 4.0; items 3, 6 tied at 2.0
    _, tokens = topk_excluding(SCORES[1:2], k, None, None, V)
    assert tokens.tolist() == [expected]


def test_ties_above_the_cutoff_are_ordered_too():
    # 9.0 at token 5 and token 2 (both above the k-th value 5.0), 5.0 tied at tokens 6, 3, 1
    scores = torch.tensor([[0.0, 5.0, 9.0, 5.0, 1.0, 9.0, 5.0, 0.0]])
    assert_topk(topk_excluding(scores, 3, None, None, V), [[9.0, 9.0, 5.0]], [[2, 5, 1]])
    assert_topk(topk_excluding(scores, 4, None, None, V), [[9.0, 9.0, 5.0, 5.0]], [[2, 5, 1, 3]])


def test_columns_past_mask_are_not_items():
    scores = torch.cat([SCORES, torch.full((3, 2), 1000.0)], dim=1)  # vocab padded to N = 10
    values, tokens = topk_excluding(scores, 3, None, None, V)
    assert tokens.tolist() == [[2, 6, 4], [1, 2, 4], [1, 2, 3]]


def test_exclusion_ids_out_of_range_are_ignored_and_input_untouched():
    before = SCORES.clone()
    exclude = t64([[-3, 7, 8, 99], [0, 7, 0, 0], [7, 7, 7, 7]])
    _, tokens = topk_excluding(SCORES, 2, exclude, t64([[0], [0], [0]]), V)
    assert tokens.tolist() == [[2, 6], [1, 2], [1, 2]]
    assert torch.equal(SCORES, before)


def test_empty_exclusion_tensors_and_float64_dtype():
    scores = SCORES.double()
    values, tokens = topk_excluding(scores, 2, torch.zeros(3, 0, dtype=torch.int64), None, V)
    assert values.dtype == torch.float64
    assert tokens.tolist() == [[2, 6], [1, 2], [1, 2]]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 10, 45])
def test_topk_excluding_matches_bruteforce_on_tied_random_scores(seed, k):
    scores, exclude, extra = random_case(seed)
    excludes = [list(a) + list(b) for a, b in zip(exclude.tolist(), extra.tolist())]
    exp_v, exp_t = reference_topk(scores, k, excludes, 40)
    assert_topk(topk_excluding(scores, k, exclude, extra, 40), exp_v, exp_t)
    for chunk in (1, 3, 7, 40, 100):  # the optional block size never changes the result
        assert_topk(topk_excluding(scores, k, exclude, extra, 40, chunk_size=chunk), exp_v, exp_t)


# --------------------------------------------------------------------------- chunked_topk

CHUNKS = [1, 2, 4, 5, 6, 7, 1000]  # 1, non-divisors of V, == V, > V, > N


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_topk_hand_made_exact(chunk):
    # identity hidden and item_weight = scores.T reproduce SCORES exactly through the matmul
    hidden = torch.eye(3)
    weight = SCORES.T.contiguous()
    exclude = t64([[0, 0, 2, 4], [0, 0, 0, 1], [1, 2, 3, 4]])
    extra = t64([[6, 0], [0, 0], [5, 0]])
    for bias in (None, torch.zeros(8)):
        assert_topk(
            chunked_topk(hidden, weight, bias, 3, exclude, extra, V, chunk),
            [[5.0, 3.0, 1.0], [4.0, 4.0, 2.0], [3.0, -INF, -INF]],
            [[1, 5, 3], [2, 4, 3], [6, 0, 0]],
        )
        _, tokens = chunked_topk(hidden, weight, bias, 2, None, None, V, chunk)
        assert tokens.tolist() == [[2, 6], [1, 2], [1, 2]]


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 41, 42, 64, 1000])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 5, 12, 50])
def test_chunked_equals_unchunked_on_integer_scores(seed, k, chunk):
    # small integer embeddings -> exact scores (any summation order) with lots of ties
    g = torch.Generator().manual_seed(100 + seed)
    n_items, batch, dim = 41, 6, 4
    hidden = torch.randint(-2, 3, (batch, dim), generator=g).float()
    weight = torch.randint(-2, 3, (n_items + 2, dim), generator=g).float()
    bias = torch.randint(-1, 2, (n_items + 2,), generator=g).float()
    _, exclude, extra = random_case(seed, batch=batch, num_items=n_items)
    full = topk_excluding(torch.addmm(bias, hidden, weight.T), k, exclude, extra, n_items)
    chunked = chunked_topk(hidden, weight, bias, k, exclude, extra, n_items, chunk)
    assert torch.equal(chunked[0], full[0]) and torch.equal(chunked[1], full[1])
    excludes = [list(a) + list(b) for a, b in zip(exclude.tolist(), extra.tolist())]
    assert_topk(chunked, *reference_topk(torch.addmm(bias, hidden, weight.T), k, excludes, n_items))


@pytest.mark.parametrize("chunk", [1, 3, 7, 40, 1000])
@pytest.mark.parametrize("seed", range(4))
def test_chunked_equals_unchunked_on_rounded_scores(seed, chunk):
    # D = 1, hidden = 1, no bias: the matmul returns item_weight[:, 0] exactly, so the
    # scores are the rounded random values (ties everywhere, some -inf)
    scores, exclude, extra = random_case(seed, batch=1, num_items=40)
    hidden, weight = torch.ones(1, 1), scores.T.contiguous()
    for k in (1, 4, 10, 50):
        full = topk_excluding(scores, k, exclude, extra, 40)
        chunked = chunked_topk(hidden, weight, None, k, exclude, extra, 40, chunk)
        assert torch.equal(chunked[0], full[0]) and torch.equal(chunked[1], full[1])


def test_chunked_topk_accepts_tensors_that_require_grad():
    hidden = torch.eye(3).requires_grad_()
    weight = SCORES.T.contiguous().requires_grad_()
    values, tokens = chunked_topk(hidden, weight, torch.zeros(8), 2, None, None, V, 3)
    assert tokens.tolist() == [[2, 6], [1, 2], [1, 2]] and not values.requires_grad


def test_chunked_topk_validates_arguments():
    hidden, weight = torch.zeros(2, 3), torch.zeros(8, 3)
    with pytest.raises(ValueError):
        chunked_topk(hidden, weight, None, 2, None, None, V, 0)
    with pytest.raises(ValueError):
        chunked_topk(hidden, weight, None, 2, None, None, 7, 4)  # needs N >= V + 2
    with pytest.raises(ValueError):
        chunked_topk(hidden, weight, torch.zeros(7), 2, None, None, V, 4)
    with pytest.raises(ValueError):
        topk_excluding(SCORES, 0, None, None, V)


# --------------------------------------------------------------------------- ranks


def test_rank_of_target_exact_values():
    row = SCORES[1:2].expand(6, -1)  # items 1, 2, 4 tied at 4.0; 3, 6 tied at 2.0; 5 at 1.0
    target = t64([4, 4, 4, 6, 6, 5])
    exclude = t64(
        [
            [0, 0, 0],  # 1 and 2 tie with 4 and have lower ids -> rank 3
            [0, 0, 1],  # 1 excluded -> 2
            [4, 1, 1],  # target in history is NOT excluded, 1 counted once -> 2
            [0, 0, 0],  # 1, 2, 4 score higher, 3 ties with lower id -> 5
            [3, 2, 7],  # 3 and 2 excluded ([MASK] id ignored) -> 3
            [6, 6, 0],  # everything beats 5 but 6 -> 5
        ]
    )
    ranks = rank_of_target(row, target, exclude, V)
    assert ranks.dtype == torch.int64
    assert ranks.tolist() == [3, 2, 2, 5, 3, 5]
    # the pad (60.0) and [MASK] (50.0) scores never count
    assert rank_of_target(row, target, None, V).tolist() == [3, 3, 3, 5, 5, 6]
    assert rank_of_target(row, target, exclude, V, extra_exclude=t64([[2]] * 6)).tolist() == [2, 1, 1, 4, 3, 4]


def test_rank_of_target_agrees_with_topk_position():
    scores, exclude, extra = random_case(7, batch=8, num_items=30, neg_inf_frac=0.0)
    values, tokens = topk_excluding(scores, 30, exclude, extra, 30)
    for b in range(8):
        for pos, tok in enumerate(tokens[b].tolist(), start=1):
            if tok == 0:
                continue
            rank = rank_of_target(scores[b : b + 1], t64([tok]), exclude[b : b + 1], 30, extra_exclude=extra[b : b + 1])
            assert rank.item() == pos


@pytest.mark.parametrize("seed", range(5))
def test_rank_of_target_matches_bruteforce(seed):
    scores, exclude, _ = random_case(seed, batch=8, num_items=30)
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(1, 31, (8,), generator=g)
    exclude[:4, -1] = target[:4]  # target also in the history
    ranks = rank_of_target(scores, target, exclude, 30)
    expected = [reference_rank(scores[b].tolist(), int(target[b]), exclude[b].tolist(), 30) for b in range(8)]
    assert ranks.tolist() == expected


def test_rank_of_target_rejects_non_item_targets():
    with pytest.raises(ValueError):
        rank_of_target(SCORES, t64([1, 0, 2]), None, V)
    with pytest.raises(ValueError):
        rank_of_target(SCORES, t64([1, 7, 2]), None, V)


def test_sampled_rank_of_target():
    row = SCORES[1:2].expand(3, -1)
    target = t64([4, 3, 6])
    negatives = t64(
        [
            [1, 3, 5, 0, 4],  # 1 ties with a lower id; 0 and the target itself ignored -> 2
            [6, 5, 6, 0, 0],  # 6 ties but has a higher id, 5 lower score -> 1
            [3, 3, 1, 5, 0],  # 3 ties with lower id (twice, counted as given), 1 beats -> 4
        ]
    )
    ranks = sampled_rank_of_target(row, target, negatives)
    assert ranks.dtype == torch.int64
    assert ranks.tolist() == [2, 1, 4]


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("as_type", [list, np.array, torch.tensor])
def test_hr_ndcg_mrr_hand_computed(as_type):
    metrics = hr_ndcg_mrr(as_type([1, 3, 11]), 10)
    assert set(metrics) == {"hr@10", "ndcg@10", "mrr"}
    assert all(type(v) is float for v in metrics.values())
    assert metrics["hr@10"] == pytest.approx(2 / 3)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 0) / 3) == pytest.approx(0.5)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)


def test_hr_ndcg_mrr_boundary_and_errors():
    assert hr_ndcg_mrr([10, 11], 10) == pytest.approx({"hr@10": 0.5, "ndcg@10": 0.5 / math.log2(11), "mrr": (0.1 + 1 / 11) / 2})
    with pytest.raises(ValueError):
        hr_ndcg_mrr([], 10)
    with pytest.raises(ValueError):
        hr_ndcg_mrr([0, 1], 10)


@pytest.mark.parametrize("chunk", [1, 3, 7, 40, 41, 1000])
@pytest.mark.parametrize("seed", range(4))
def test_chunked_rank_of_target_equals_full_rank_on_integer_scores(seed, chunk):
    # small integer embeddings: exact scores in any summation order, with many ties
    g = torch.Generator().manual_seed(200 + seed)
    n_items, batch, dim = 41, 8, 4
    hidden = torch.randint(-2, 3, (batch, dim), generator=g).float()
    weight = torch.randint(-2, 3, (n_items + 2, dim), generator=g).float()
    bias = torch.randint(-1, 2, (n_items + 2,), generator=g).float()
    _, exclude, _ = random_case(seed, batch=batch, num_items=n_items)
    target = torch.randint(1, n_items + 1, (batch,), generator=g)
    exclude[:3, -1] = target[:3]  # a target also in the history is never excluded
    full = rank_of_target(torch.addmm(bias, hidden, weight.T), target, exclude, n_items)
    chunked = chunked_rank_of_target(hidden, weight, bias, target, exclude, n_items, chunk)
    assert chunked.tolist() == full.tolist()


def test_chunked_rank_of_target_hand_made():
    # D = 1, hidden = 1: the scores are item_weight itself. Items 1..4 score 5, 9, 9, 1.
    weight = torch.tensor([[0.0], [5.0], [9.0], [9.0], [1.0], [0.0]])
    hidden = torch.ones(3, 1)
    target = t64([1, 3, 4])
    exclude = t64([[0, 2], [0, 0], [3, 2]])
    # user 0: item 2 excluded, 3 beats 1 -> rank 2; user 1: 2 ties 3 with a lower id -> 2;
    # user 2: 2 and 3 excluded, 1 beats 4 -> 2
    for chunk in (1, 2, 4):
        assert chunked_rank_of_target(hidden, weight, None, target, exclude, 4, chunk).tolist() == [2, 2, 2]
