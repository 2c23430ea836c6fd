"""Leave-one-out evaluation: full ranking over the catalogue with seen items excluded, the
paper's sampled protocol (target vs 100 popularity-sampled negatives), and the popularity
baseline. Pure numpy/torch over an :class:`EvalSet`; no Ray, no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pyarrow as pa
import torch

from bert4rec import data
from bert4rec.model import BERT4Rec
from bert4rec.ranking import chunked_rank_of_target, rank_of_target, sampled_rank_from_candidates, sampled_rank_of_target


@dataclass
class EvalSet:
    """One leave-one-out split, as model-ready arrays."""

    tokens: np.ndarray  # (U, T) int32, left-padded history + [MASK]
    ratings: np.ndarray | None  # (U, T) int32 rating levels, or None
    targets: np.ndarray  # (U,) target tokens
    seen: list[np.ndarray]  # U arrays: every token the user had before the target (excluded from ranking)
    user_ids: np.ndarray  # (U,)

    def __len__(self) -> int:
        return len(self.targets)


def sampled_histories(histories: pa.Table, max_users: int | None, users: int, seed: int = 0) -> pa.Table:
    """The rows of ``histories`` in the deterministic user sample of about ``max_users`` of
    ``users`` (:func:`bert4rec.data.sample_mask`): the same users whichever file or batch they
    are read in. Ray Data calls this on each block."""
    if max_users is None or max_users >= users:
        return histories
    return histories.filter(pa.array(data.sample_mask(histories["user_id"].to_numpy(), max_users, users, seed)))


def make_eval_set(
    histories: pa.Table,
    vocab_ids: np.ndarray,
    split: str,
    max_len: int,
    mask_token: int,
    use_ratings: bool = False,
) -> EvalSet:
    """Histories -> the val or test examples of leave-one-out (users whose target is unknown to
    the vocabulary are skipped). Called per batch: the (U, T) arrays are the batch's.

    ``seen`` is the input history followed by the distinct items ``prepare --max-len`` cut
    before it (``truncated_item_ids``, when present), never repeating the target there."""
    flat, offsets = data.list_column(histories, "item_ids")
    tokens, _ = data.to_tokens(flat, vocab_ids)
    seqs = [tokens[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    inputs, targets = data.loo_examples(seqs, split)
    # unknown items (token 0) in an input are dropped; a user whose target is unknown is skipped
    keep = np.flatnonzero(targets > 0)
    known = [inputs[i] > 0 for i in keep]
    levels = None
    if use_ratings and "ratings" in histories.column_names:
        rflat, _ = data.list_column(histories, "ratings")
        lv = data.rating_levels(rflat, len(rflat))
        rin, _ = data.loo_examples([lv[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)], split)
        levels = data.inference_ratings([rin[i][m] for i, m in zip(keep, known)], max_len).astype(np.int32)
    inputs = [inputs[i][m] for i, m in zip(keep, known)]
    seen = inputs
    if data.TRUNCATED_COLUMN in histories.column_names:
        # cut items are all older than the kept ones, so older than either split's target
        tflat, toffsets = data.list_column(histories, data.TRUNCATED_COLUMN)
        ttokens, _ = data.to_tokens(tflat, vocab_ids)
        earlier = [ttokens[toffsets[i] : toffsets[i + 1]] for i in keep]
        seen = [np.r_[s, e[(e > 0) & (e != t)]] for s, e, t in zip(inputs, earlier, targets[keep])]
    return EvalSet(
        tokens=data.inference_tokens(inputs, max_len, mask_token).astype(np.int32),
        ratings=levels,
        targets=targets[keep],
        seen=seen,
        user_ids=histories["user_id"].to_numpy()[keep],
    )


def popularity(eval_set: EvalSet, num_items: int) -> np.ndarray:
    """Interaction counts per token over the input histories (never the targets): (V+2,)."""
    counts = np.zeros(num_items + 2, np.int64)
    if eval_set.seen:
        np.add.at(counts, np.concatenate(eval_set.seen), 1)
    counts[0] = 0
    return counts


def popularity_rows(
    histories: pa.Table, vocab_ids: np.ndarray, split: str, max_len: int, mask_token: int
) -> dict[str, np.ndarray]:
    """One batch's share of :func:`popularity`, sparse: ``token`` and ``count`` of the tokens
    its users' input histories hold (per-batch counts add up to the whole set's)."""
    counts = popularity(make_eval_set(histories, vocab_ids, split, max_len, mask_token), len(vocab_ids))
    tokens = np.flatnonzero(counts)
    return {"token": tokens.astype(np.int64), "count": counts[tokens]}


# salt of the negatives' per-user stream, apart from the user sample's hash of the same seed
NEGATIVES_SALT = 0x6E65676174697665


def popularity_draws(user_ids: np.ndarray, cdf: np.ndarray, m: int, seed: int) -> np.ndarray:
    """(U, m) tokens: draws 0..m-1 of each user's own stream, by popularity (``cdf``: the
    cumulative counts per token). Draw ``j`` of a user depends on (seed, user_id, j) only."""
    key = data.user_hash(user_ids, seed ^ NEGATIVES_SALT)  # (U,)
    steps = np.arange(m, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h = data.splitmix64(key[:, None] + steps[None, :])  # (U, m): a splitmix64 stream per user
    total = int(cdf[-1])
    # 53 bits -> [0, total): float64 holds them exactly; the rare product rounding to total is clipped
    r = np.minimum(np.floor((h >> np.uint64(11)).astype(np.float64) * (total / 2.0**53)), total - 1)
    return np.searchsorted(cdf, r.astype(np.int64), side="right")


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    # np.isin, through a binary search of the sorted keys (numpy's hashing isin is slower here)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def sample_negatives(eval_set: EvalSet, counts: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """(U, n) negatives per user drawn by popularity without replacement, never the target nor
    a seen item (the paper's sampled protocol). Each user's negatives depend on its id, the
    seed and ``counts`` alone, however users are batched: the first ``n`` distinct allowed
    draws of its own stream (:func:`popularity_draws`). A user with at most ``n`` unseen
    items gets all of them, ascending, and 0-padding (which the sampled rank ignores)."""
    u_count, width = len(eval_set), len(counts)
    p = counts.astype(np.int64).copy()
    p[0] = 0
    p[-1] = 0
    if p.sum() == 0:
        p[1:-1] = 1
    cdf = np.cumsum(p)
    candidate = p > 0
    out = np.zeros((u_count, n), np.int64)
    if u_count == 0:
        return out
    # forbidden (user row, token) pairs as sorted keys row * width + token: seen items and the target
    lengths = np.array([len(s) for s in eval_set.seen], np.int64)
    rows = np.arange(u_count, dtype=np.int64)
    flat = np.concatenate(eval_set.seen).astype(np.int64) if lengths.sum() else np.zeros(0, np.int64)
    forbidden = np.sort(np.r_[np.repeat(rows, lengths) * width + flat, rows * width + eval_set.targets])
    forbidden = forbidden[np.r_[True, forbidden[1:] != forbidden[:-1]]]
    blocked = np.bincount((forbidden // width)[candidate[forbidden % width]], minlength=u_count)
    unseen = int(candidate.sum()) - blocked
    items = np.flatnonzero(candidate)
    for u in np.flatnonzero(unseen <= n):
        rest = items[~_member(u * width + items, forbidden)]
        out[u, : len(rest)] = rest
    todo, m = np.flatnonzero(unseen > n), 2 * n
    while len(todo):
        draws = popularity_draws(eval_set.user_ids[todo], cdf, m, seed)  # (T, m)
        keys = todo[:, None] * width + draws
        # a draw counts once: at its first occurrence in the user's stream
        order = np.argsort(keys.ravel(), kind="stable")
        ranked = keys.ravel()[order]
        first = np.zeros(keys.size, bool)
        first[order[np.r_[True, ranked[1:] != ranked[:-1]]]] = True
        ok = first.reshape(keys.shape) & ~_member(keys, forbidden)
        take = ok & (np.cumsum(ok, axis=1) <= n)
        done = take.sum(axis=1) == n
        out[todo[done]] = draws[done][take[done]].reshape(-1, n)
        # the rest draw a longer prefix of the same streams: the same first draws, more after
        todo, m = todo[~done], 2 * m
    return out


def _batches(eval_set: EvalSet, batch_size: int):
    for start in range(0, len(eval_set), batch_size):
        sl = slice(start, start + batch_size)
        yield sl, torch.as_tensor(data.pad_seen(eval_set.seen[sl]))


@torch.no_grad()
def model_ranks(
    model: BERT4Rec,
    eval_set: EvalSet,
    batch_size: int = 256,
    negatives: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    item_chunk_size: int = 1 << 17,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Full-ranking ranks of each target (seen items excluded) and, given negatives, its rank
    among target + negatives; in ``eval_set``'s order. Users go through the model in order of
    history length, each batch trimmed of its shared padding (the same ranks, less work).
    A catalogue of more than ``item_chunk_size`` tokens is ranked in item chunks of that
    size, so that no (B, V) score matrix is held."""
    was_training = model.training
    model.eval()
    num_items = model.config.num_items
    n = len(eval_set)
    full = np.zeros(n, np.int64)
    sampled = np.zeros(n, np.int64) if negatives is not None else None
    for chunk in data.length_chunks(torch.as_tensor(eval_set.tokens), batch_size):
        idx = chunk.numpy()
        batch = {"tokens": torch.as_tensor(eval_set.tokens[idx])}
        if eval_set.ratings is not None:
            batch["ratings"] = torch.as_tensor(eval_set.ratings[idx])
        batch = {k: v.to(device) for k, v in data.trim_padding(batch).items()}
        hidden = model.last_hidden(batch["tokens"], batch.get("ratings"))  # (B, D)
        seen = torch.as_tensor(data.pad_seen([eval_set.seen[i] for i in idx]))
        targets = torch.as_tensor(eval_set.targets[idx])
        if num_items + 2 <= item_chunk_size:
            scores = model.logits(hidden).float().cpu()  # (B, V+2)
            full[idx] = rank_of_target(scores, targets, seen, num_items).numpy()
            if sampled is not None:
                sampled[idx] = sampled_rank_of_target(scores, targets, torch.as_tensor(negatives[idx])).numpy()
            continue
        # a large catalogue: never the (B, V+2) matrix, as in scoring
        weight, bias = model.item_emb.weight, model.out_bias
        full[idx] = chunked_rank_of_target(hidden, weight, bias, targets.to(device), seen.to(device), num_items, item_chunk_size).cpu().numpy()
        if sampled is not None:
            neg = torch.as_tensor(negatives[idx]).to(device)
            cand = torch.cat([targets.to(device)[:, None], neg], dim=1)  # (B, 1 + M)
            cand_scores = torch.bmm(hidden[:, None, :], weight[cand].transpose(1, 2)).squeeze(1) + bias[cand]
            sampled[idx] = sampled_rank_from_candidates(cand_scores.float(), targets.to(device), neg).cpu().numpy()
    model.train(was_training)
    return full, sampled


def popularity_ranks(
    counts: np.ndarray, eval_set: EvalSet, negatives: np.ndarray | None = None, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray | None]:
    """The same ranks for the most-popular baseline (scores = counts)."""
    num_items = len(counts) - 2
    row = torch.tensor(counts, dtype=torch.float32)  # a copy: counts may be a read-only view of Arrow memory
    full, sampled = [], []
    for sl, seen in _batches(eval_set, batch_size):
        targets = torch.as_tensor(eval_set.targets[sl])
        scores = row.expand(len(targets), -1)
        full.append(rank_of_target(scores, targets, seen, num_items))
        if negatives is not None:
            sampled.append(sampled_rank_of_target(scores, targets, torch.as_tensor(negatives[sl])))
    return torch.cat(full).numpy(), (torch.cat(sampled).numpy() if negatives is not None else None)


# Metric sums are exact: each user's NDCG gain and reciprocal rank (floats in [2**-31, 1] for
# ranks below 2**31) is an integer number of 2**-84, split into two 42-bit limbs whose int64
# sums cannot overflow within a batch. Summed as Python ints on the driver, the totals do not
# depend on how users were batched or in what order the batches came back, so the distributed
# figures equal the in-process ones exactly; each is the correctly rounded mean.
FIXED_BITS, LIMB_BITS = 84, 42
SUM_KEYS = ("users", "hits", "ndcg_hi", "ndcg_lo", "rr_hi", "rr_lo")


def _limb_sums(values: np.ndarray) -> tuple[int, int]:
    x = np.ldexp(values, FIXED_BITS)  # exact integers below 2**84
    hi = np.floor(np.ldexp(x, -LIMB_BITS))
    lo = x - np.ldexp(hi, LIMB_BITS)
    hi, lo = hi.astype(np.int64), lo.astype(np.int64)
    step = 1 << 20  # 2**20 values of < 2**42 each: an int64 sum cannot overflow
    return (sum(int(hi[i : i + step].sum()) for i in range(0, len(hi), step)), sum(int(lo[i : i + step].sum()) for i in range(0, len(lo), step)))


def rank_sums(ranks: np.ndarray, k: int) -> dict[str, int]:
    """1-based ranks -> exact sums (``SUM_KEYS``) from which :func:`metrics_from_sums` gives
    HR@k, NDCG@k and MRR as :func:`bert4rec.ranking.hr_ndcg_mrr` defines them. Sums of two
    sets of users add key by key (:func:`add_sums`)."""
    r = np.asarray(ranks, np.int64).reshape(-1)
    if len(r) and (r.min() < 1 or r.max() >= 2**31):
        raise ValueError("ranks are 1-based and below 2**31")
    hit = r <= k
    gain = np.where(hit, 1.0 / np.log2(r + 1.0), 0.0)
    ndcg_hi, ndcg_lo = _limb_sums(gain)
    rr_hi, rr_lo = _limb_sums(1.0 / r)
    return {"users": len(r), "hits": int(hit.sum()), "ndcg_hi": ndcg_hi, "ndcg_lo": ndcg_lo, "rr_hi": rr_hi, "rr_lo": rr_lo}


def add_sums(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Key-by-key sum of two :func:`rank_sums` (Python ints: no overflow)."""
    return {key: int(a.get(key, 0)) + int(b.get(key, 0)) for key in SUM_KEYS}


def metrics_from_sums(sums: dict[str, int], k: int) -> dict[str, float]:
    """``{"hr@k", "ndcg@k", "mrr"}``: each the correctly rounded mean over ``sums["users"]``."""
    n = int(sums["users"])
    if n == 0:
        raise ValueError("no ranks to report")
    scale = n << FIXED_BITS
    ndcg = (int(sums["ndcg_hi"]) << LIMB_BITS) + int(sums["ndcg_lo"])
    rr = (int(sums["rr_hi"]) << LIMB_BITS) + int(sums["rr_lo"])
    return {f"hr@{k}": float(Fraction(int(sums["hits"]), n)), f"ndcg@{k}": float(Fraction(ndcg, scale)), "mrr": float(Fraction(rr, scale))}


def report_from_sums(full: dict[str, int], sampled: dict[str, int] | None, k: int) -> dict:
    """Sums of full-ranking (and sampled-protocol) ranks -> the metrics dict of ``bert4rec evaluate``."""
    out = {**metrics_from_sums(full, k), "users": int(full["users"])}
    if sampled is not None:
        out["sampled"] = {**metrics_from_sums(sampled, k), "negatives": "popularity"}
    return out


def report(full: np.ndarray, sampled: np.ndarray | None, k: int) -> dict:
    """Rank arrays -> the metrics dict printed by ``bert4rec evaluate``."""
    return report_from_sums(rank_sums(full, k), rank_sums(sampled, k) if sampled is not None else None, k)


# the rank families that ``evaluate`` reports: the model's and popularity's, full and sampled
FAMILIES = ("full", "sampled", "pop_full", "pop_sampled")


def eval_sums(
    model: BERT4Rec,
    eval_set: EvalSet,
    counts: np.ndarray,
    negatives: int,
    seed: int,
    k: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, int]]:
    """Everything ``evaluate`` needs from a set of users, as :func:`rank_sums` per family in
    ``FAMILIES``: the model's and popularity's ranks, full (seen items excluded) and among
    the user's popularity-sampled negatives. Sums of two sets add (:func:`add_sums`)."""
    if len(eval_set) == 0:
        return {name: rank_sums(np.zeros(0, np.int64), k) for name in FAMILIES}
    neg = sample_negatives(eval_set, counts, negatives, seed)
    full, sampled = model_ranks(model, eval_set, batch_size, neg, device)
    pfull, psampled = popularity_ranks(counts, eval_set, neg)
    return {name: rank_sums(r, k) for name, r in zip(FAMILIES, (full, sampled, pfull, psampled))}
