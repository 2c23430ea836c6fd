"""Top-k retrieval, target ranks and ranking metrics for BERT4Rec scores (pure torch).

Token convention (shared with the model)
----------------------------------------
* token ``0`` is padding, tokens ``1..V`` are items, token ``V+1`` is ``[MASK]``;
* a score row has ``N >= V + 2`` columns indexed by token. Only columns ``1..V``
  are *rankable*: padding, ``[MASK]`` and any column past ``V+1`` (e.g. a vocabulary
  rounded up for the hardware) are never returned and never counted in a rank.

Deterministic order
-------------------
Everything here orders items by ``(score descending, token id ascending)``: of two
items with the same score the one with the lower token id ranks first. This is an
exact rule (no epsilon is ever added to a score, so distinct scores are never
reordered) and it is the same in :func:`topk_excluding`, :func:`chunked_topk`,
:func:`rank_of_target` and :func:`sampled_rank_of_target`: if the target is at
(1-based) position ``p`` of the top-k list, its rank is ``p``.

Exclusions
----------
``exclude`` / ``extra_exclude`` are ``(B, L)`` int64 token ids, one row per user;
``0`` means "no item" (left padding). Ids outside ``1..V`` are ignored and
duplicates are harmless. Excluded items get score ``-inf`` before the top-k.

All functions run under ``torch.no_grad()`` (their outputs carry no graph), sync the
host at most once per item block (to test for ties at the top-k boundary) and never
modify their inputs. Scores must not be NaN (the result is then unspecified). An item
whose score is ``-inf`` (after exclusion, or straight from the caller) is treated as
not rankable.

Short rows
----------
If a row has fewer than ``k`` rankable items, the top-k result is still ``(B, k)``:
the missing trailing slots hold token ``0`` (padding, never an item) and score
``-inf``. Test ``tokens > 0`` (or ``torch.isfinite(values)``) to find the real ones.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "topk_excluding",
    "chunked_topk",
    "rank_of_target",
    "chunked_rank_of_target",
    "sampled_rank_of_target",
    "sampled_rank_from_candidates",
    "hr_ndcg_mrr",
]

# Column block used internally to bound temporaries in rank_of_target.
_RANK_BLOCK = 1 << 16


# --------------------------------------------------------------------------- helpers


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


def _check_num_items(num_items: int, n_cols: int, what: str) -> int:
    if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) or num_items < 0:
        raise ValueError(f"num_items must be a non-negative int, got {num_items!r}")
    if n_cols < num_items + 2:
        raise ValueError(
            f"{what} has {n_cols} token columns but num_items={num_items} needs at least "
            f"{num_items + 2} (padding + items + [MASK])"
        )
    return int(num_items)


def _merge_exclusions(exclude: Tensor | None, extra_exclude: Tensor | None, batch: int, device) -> Tensor | None:
    """Concatenate the two exclusion tensors into one ``(B, L + L2)`` int64 tensor (or None)."""
    parts = []
    for name, ex in (("exclude", exclude), ("extra_exclude", extra_exclude)):
        if ex is None:
            continue
        if ex.dim() != 2 or ex.shape[0] != batch:
            raise ValueError(f"{name} must have shape (B={batch}, L), got {tuple(ex.shape)}")
        if ex.dtype.is_floating_point or ex.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got {ex.dtype}")
        if ex.shape[1]:
            parts.append(ex.to(device=device, dtype=torch.int64))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _exclude_in_block(block: Tensor, exclude: Tensor | None, first_token: int) -> None:
    """Set ``block[b, j] = -inf`` where token ``first_token + j`` is in ``exclude[b]`` (in place).

    Ids falling outside the block are routed to column 0 with a ``+inf`` operand of an
    ``amin`` scatter, i.e. they leave it untouched: no host sync, no boolean indexing.
    """
    if exclude is None:
        return
    width = block.shape[1]
    local = exclude - first_token
    inside = (local >= 0) & (local < width)
    src = torch.full(local.shape, -math.inf, dtype=block.dtype, device=block.device)
    src.masked_fill_(~inside, math.inf)
    block.scatter_reduce_(1, local.clamp_(0, width - 1), src, reduce="amin", include_self=True)


class _BlockBuffer:
    """One reusable ``(B, width)`` score buffer; ``get(w)`` is a contiguous ``(B, w)`` view.

    Reusing the memory matters on CPU: a fresh multi-MiB tensor per block is served by
    ``mmap`` and page-faulted in again every time, which costs more than the matmul.
    """

    def __init__(self, batch: int, width: int, dtype, device):
        self.batch = batch
        self.flat = torch.empty(batch * max(width, 0), dtype=dtype, device=device)

    def get(self, width: int) -> Tensor:
        return self.flat[: self.batch * width].view(self.batch, width)


def _block_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``min(k, C)`` of every row of ``x`` (B, C), ordered by (value desc, column asc).

    ``torch.topk`` picks an arbitrary subset among values tied with the k-th value and
    orders ties arbitrarily. Asking for one extra value tells, per row, whether the k-th
    value's ties spill past the cut-off; only such rows (rare with real-valued scores)
    are fixed, by taking the lowest columns holding the k-th value. The slots before
    the cut-off are then put in (value desc, column asc) order by two small sorts.
    Rows whose k-th value is -inf are not fixed: those slots are empty and reported as
    padding by the caller, so which -inf columns they hold does not matter.
    """
    width = x.shape[1]
    kk = min(k, width)
    kq = min(k + 1, width)
    vals, idx = torch.topk(x, kq, dim=1, largest=True, sorted=True)
    if kq > kk:
        kth = vals[:, kk - 1]
        spill = (vals[:, kk] == kth) & (kth > -math.inf)
        vals, idx = vals[:, :kk], idx[:, :kk]
        if bool(spill.any()):
            rows = spill.nonzero().squeeze(1)
            t = kth[rows].unsqueeze(1)
            n_gt = (vals[rows] > t).sum(1, keepdim=True)  # the > t items are all in the top-k
            cols = torch.arange(width, device=x.device, dtype=torch.int32)
            pos = torch.where(x[rows] == t, cols, torch.full_like(cols, width))
            first = torch.topk(pos, kk, dim=1, largest=False, sorted=True).values.to(torch.int64)
            slot = torch.arange(kk, device=x.device).unsqueeze(0)
            fixed = torch.where(slot >= n_gt, first.gather(1, (slot - n_gt).clamp_(min=0)), idx[rows])
            idx = idx.index_copy(0, rows, fixed)
    # (value desc, column asc): sort by column, then stable sort by value.
    idx, perm = torch.sort(idx, dim=1)
    vals = vals.gather(1, perm)
    vals, perm = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, idx.gather(1, perm)


def _streaming_topk(blocks: Iterator[tuple[int, Tensor]], k: int, batch: int, dtype, device) -> tuple[Tensor, Tensor]:
    """Merge per-block top-k lists into one, blocks given in increasing token order.

    Each block is ``(first_token, scores)`` with scores writable and already excluded.
    Invariant: the running list is sorted by (value desc, token asc) and all its tokens
    are lower than those of the next block, so a *stable* sort by value of
    ``cat(running, block_topk)`` is exactly the (value desc, token asc) order.
    """
    run_v = torch.empty(batch, 0, dtype=dtype, device=device)
    run_t = torch.empty(batch, 0, dtype=torch.int64, device=device)
    for first_token, block in blocks:
        v, i = _block_topk(block, k)
        del block
        if run_v.shape[1] == 0:
            run_v, run_t = v, i + first_token
            continue
        cat_v = torch.cat([run_v, v], dim=1)
        cat_t = torch.cat([run_t, i + first_token], dim=1)
        cat_v, perm = torch.sort(cat_v, dim=1, descending=True, stable=True)
        run_v, run_t = cat_v[:, :k], cat_t.gather(1, perm[:, :k])
    missing = k - run_v.shape[1]
    if missing > 0:  # fewer than k columns in total
        run_v = torch.cat([run_v, torch.full((batch, missing), -math.inf, dtype=dtype, device=device)], dim=1)
        run_t = torch.cat([run_t, torch.zeros(batch, missing, dtype=torch.int64, device=device)], dim=1)
    run_t = run_t.masked_fill(run_v == -math.inf, 0)
    return run_v, run_t


# --------------------------------------------------------------------------- top-k


@torch.no_grad()
def topk_excluding(
    scores: Tensor,
    k: int,
    exclude: Tensor | None,
    extra_exclude: Tensor | None,
    num_items: int,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k rankable items of each row of ``scores``, excluded items removed.

    Args:
        scores: ``(B, N)`` float scores indexed by token, ``N >= num_items + 2``.
            Not modified.
        k: number of items to return (>= 1).
        exclude: ``(B, L)`` int64 token ids to drop (e.g. the user's history), ``0`` =
            no item; ``None`` or ``L == 0`` for none.
        extra_exclude: ``(B, L2)`` further ids to drop (same convention), or ``None``.
        num_items: ``V``. Only tokens ``1..V`` can be returned: padding (0),
            ``[MASK]`` (V+1) and columns past it are dropped whatever their score.
        chunk_size: optional, keyword only: process the item columns in blocks of this
            width so that only ``B x chunk_size`` extra memory is used (the default
            ``None`` copies all ``B x V`` item scores once). The result does not
            depend on it.

    Returns:
        ``(values, tokens)``, both ``(B, k)``: ``values`` in ``scores.dtype``, ``tokens``
        int64, ordered by (score desc, token id asc). Slots beyond a row's number of
        rankable items hold token ``0`` and value ``-inf``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    k = _check_k(k)
    n_items = _check_num_items(num_items, scores.shape[1], "scores")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch = scores.shape[0]
    ex = _merge_exclusions(exclude, extra_exclude, batch, scores.device)
    step = n_items if chunk_size is None else int(chunk_size)

    def blocks() -> Iterator[tuple[int, Tensor]]:
        buf = _BlockBuffer(batch, min(step, n_items), scores.dtype, scores.device)
        for start in range(1, n_items + 1, max(step, 1)):
            stop = min(start + step, n_items + 1)
            block = buf.get(stop - start)
            block.copy_(scores[:, start:stop])
            _exclude_in_block(block, ex, start)
            yield start, block
            del block

    return _streaming_topk(blocks(), k, batch, scores.dtype, scores.device)


@torch.no_grad()
def chunked_topk(
    hidden: Tensor,
    item_weight: Tensor,
    item_bias: Tensor | None,
    k: int,
    exclude: Tensor | None,
    extra_exclude: Tensor | None,
    num_items: int,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Top-k of ``hidden @ item_weight.T + item_bias`` without the full ``(B, N)`` matrix.

    Args:
        hidden: ``(B, D)`` final hidden states (one position per user).
        item_weight: ``(N, D)`` output embedding, row ``t`` = token ``t`` (row 0 padding,
            row V+1 ``[MASK]``); ``N >= num_items + 2``. Only rows ``1..V`` are read.
        item_bias: ``(N,)`` output bias indexed by token, or ``None``.
        k, exclude, extra_exclude, num_items: as in :func:`topk_excluding`.
        chunk_size: number of item rows scored at once; peak extra memory is about
            ``B x chunk_size`` scores (plus the ``B x k`` running top-k).

    Returns:
        exactly what ``topk_excluding(torch.addmm(item_bias, hidden, item_weight.T), ...)``
        returns (same values, tokens, tie order and padding of short rows), provided the
        chunked matmul gives bitwise the same scores as the full one (it does whenever
        the products are exact; with general floats BLAS may round a block differently).
    """
    if hidden.dim() != 2 or item_weight.dim() != 2 or hidden.shape[1] != item_weight.shape[1]:
        raise ValueError(
            f"need hidden (B, D) and item_weight (N, D), got {tuple(hidden.shape)} and {tuple(item_weight.shape)}"
        )
    if item_bias is not None and (item_bias.dim() != 1 or item_bias.shape[0] != item_weight.shape[0]):
        raise ValueError(f"item_bias must be (N={item_weight.shape[0]},), got {tuple(item_bias.shape)}")
    k = _check_k(k)
    n_items = _check_num_items(num_items, item_weight.shape[0], "item_weight")
    if isinstance(chunk_size, bool) or chunk_size is None or chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    step = int(chunk_size)
    batch = hidden.shape[0]
    ex = _merge_exclusions(exclude, extra_exclude, batch, hidden.device)
    out_dtype = torch.result_type(hidden, item_weight)

    def blocks() -> Iterator[tuple[int, Tensor]]:
        buf = _BlockBuffer(batch, min(step, n_items), out_dtype, hidden.device)
        for start in range(1, n_items + 1, step):
            stop = min(start + step, n_items + 1)
            w = item_weight[start:stop]
            block = buf.get(stop - start)
            if item_bias is None:
                torch.mm(hidden, w.T, out=block)
            else:
                torch.addmm(item_bias[start:stop], hidden, w.T, out=block)
            _exclude_in_block(block, ex, start)
            yield start, block
            del block

    return _streaming_topk(blocks(), k, batch, out_dtype, hidden.device)


# --------------------------------------------------------------------------- ranks


def _check_target(target: Tensor, batch: int, n_items: int) -> Tensor:
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"target must be (B={batch},), got {tuple(target.shape)}")
    target = target.to(torch.int64)
    if batch and bool(((target < 1) | (target > n_items)).any()):
        raise ValueError(f"target tokens must be items in 1..{n_items}")
    return target


@torch.no_grad()
def rank_of_target(
    scores: Tensor,
    target: Tensor,
    exclude: Tensor | None,
    num_items: int,
    *,
    extra_exclude: Tensor | None = None,
) -> Tensor:
    """1-based rank of each row's target among the rankable, non-excluded items.

    ``rank = 1 + #{items with score > target's} + #{items with score == target's and a
    lower token id}``, counting only items ``1..V`` that are not excluded, i.e. the
    (1-based) position the target would have in :func:`topk_excluding`'s list.

    The target itself is never excluded, even when it appears in ``exclude``: in
    leave-one-out evaluation the history legitimately may contain the held-out item
    (the user interacted with it before), and dropping it would make the example
    unrankable. Excluded items (ids in ``1..V``, duplicates counted once) and padding,
    ``[MASK]`` and columns past ``V+1`` never count.

    Args:
        scores: ``(B, N)`` scores by token, not modified.
        target: ``(B,)`` item tokens in ``1..V`` (ValueError otherwise).
        exclude: ``(B, L)`` token ids, 0 = no item, or ``None``.
        num_items: ``V``.
        extra_exclude: optional ``(B, L2)`` further exclusions, keyword only.

    Returns:
        ``(B,)`` int64 ranks, ``1 <= rank <= V``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    n_items = _check_num_items(num_items, scores.shape[1], "scores")
    batch = scores.shape[0]
    target = _check_target(target.to(scores.device), batch, n_items)
    t_col = target.unsqueeze(1)
    t_score = scores.gather(1, t_col)
    count = torch.zeros(batch, dtype=torch.int64, device=scores.device)
    for start in range(1, n_items + 1, _RANK_BLOCK):
        stop = min(start + _RANK_BLOCK, n_items + 1)
        s = scores[:, start:stop]
        count += (s > t_score).sum(1)
        # ties with a lower token id: only columns before the target can qualify
        lower = torch.arange(start, stop, device=scores.device).unsqueeze(0) < t_col
        count += ((s == t_score) & lower).sum(1)

    ex = _merge_exclusions(exclude, extra_exclude, batch, scores.device)
    if ex is not None:
        ex, _ = torch.sort(ex, dim=1)
        first = torch.ones_like(ex, dtype=torch.bool)
        first[:, 1:] = ex[:, 1:] != ex[:, :-1]
        valid = first & (ex >= 1) & (ex <= n_items) & (ex != t_col)
        s = scores.gather(1, ex.clamp(0, n_items))
        beats = (s > t_score) | ((s == t_score) & (ex < t_col))
        count -= (beats & valid).sum(1)
    return count + 1


@torch.no_grad()
def chunked_rank_of_target(
    hidden: Tensor,
    item_weight: Tensor,
    item_bias: Tensor | None,
    target: Tensor,
    exclude: Tensor | None,
    num_items: int,
    chunk_size: int,
) -> Tensor:
    """:func:`rank_of_target` of ``hidden @ item_weight.T + item_bias`` without the full
    ``(B, N)`` score matrix: items are scored ``chunk_size`` at a time (peak extra memory
    about ``B x chunk_size`` scores), as :func:`chunked_topk` does for scoring.

    Two passes over the item blocks: the first reads each target's score from the block
    that holds it, the second counts the items that beat it. Both passes compute a block
    with the same matmul, so the target is compared with scores rounded the same way as
    its own (a separately computed dot product could round differently and let the target
    beat or tie itself). Exclusions are applied in the block (never to the target itself).

    Returns ``(B,)`` int64 ranks, ``1 <= rank <= V``.
    """
    if hidden.dim() != 2 or item_weight.dim() != 2 or hidden.shape[1] != item_weight.shape[1]:
        raise ValueError(
            f"need hidden (B, D) and item_weight (N, D), got {tuple(hidden.shape)} and {tuple(item_weight.shape)}"
        )
    n_items = _check_num_items(num_items, item_weight.shape[0], "item_weight")
    if isinstance(chunk_size, bool) or chunk_size is None or chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    batch = hidden.shape[0]
    target = _check_target(target.to(hidden.device), batch, n_items)
    t_col = target.unsqueeze(1)
    ex = _merge_exclusions(exclude, None, batch, hidden.device)
    out_dtype = torch.result_type(hidden, item_weight)
    buf = _BlockBuffer(batch, min(chunk_size, n_items), out_dtype, hidden.device)

    def block(start: int, stop: int) -> Tensor:
        out = buf.get(stop - start)
        w = item_weight[start:stop]
        if item_bias is None:
            return torch.mm(hidden, w.T, out=out)
        return torch.addmm(item_bias[start:stop], hidden, w.T, out=out)

    spans = [(s, min(s + chunk_size, n_items + 1)) for s in range(1, n_items + 1, chunk_size)]
    t_score = torch.empty(batch, 1, dtype=out_dtype, device=hidden.device)
    for start, stop in spans:
        inside = (t_col >= start) & (t_col < stop)
        b = block(start, stop)
        t_score = torch.where(inside, b.gather(1, (t_col - start).clamp(0, stop - start - 1)), t_score)
    count = torch.zeros(batch, dtype=torch.int64, device=hidden.device)
    for start, stop in spans:
        b = block(start, stop)
        _exclude_in_block(b, ex, start)
        cols = torch.arange(start, stop, device=hidden.device).unsqueeze(0)
        count += ((b > t_score) & (cols != t_col)).sum(1)
        count += ((b == t_score) & (cols < t_col)).sum(1)
    return count + 1


@torch.no_grad()
def sampled_rank_of_target(scores: Tensor, target: Tensor, negatives: Tensor) -> Tensor:
    """1-based rank of the target among itself and ``M`` sampled negatives.

    Same tie rule as :func:`rank_of_target`: a negative beats the target if its score
    is greater, or equal with a lower token id. Negatives equal to ``0`` (padding, "no
    sample") or to the target itself are ignored; other duplicates count as given (each
    sample is one competitor).

    Args:
        scores: ``(B, N)`` scores by token.
        target: ``(B,)`` tokens.
        negatives: ``(B, M)`` int64 tokens.

    Returns:
        ``(B,)`` int64 ranks in ``1..M+1``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    batch = scores.shape[0]
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"target must be (B={batch},), got {tuple(target.shape)}")
    if negatives.dim() != 2 or negatives.shape[0] != batch:
        raise ValueError(f"negatives must be (B={batch}, M), got {tuple(negatives.shape)}")
    t_col = target.to(device=scores.device, dtype=torch.int64).unsqueeze(1)
    neg = negatives.to(device=scores.device, dtype=torch.int64)
    return sampled_rank_from_candidates(torch.cat([scores.gather(1, t_col), scores.gather(1, neg)], dim=1), target, neg)


@torch.no_grad()
def sampled_rank_from_candidates(candidate_scores: Tensor, target: Tensor, negatives: Tensor) -> Tensor:
    """:func:`sampled_rank_of_target` from the scores of the candidates alone:
    ``candidate_scores`` ``(B, 1 + M)`` holds the target's score in column 0 and the
    negatives' (in ``negatives`` order) after it, e.g. from one small matmul per user when
    the full ``(B, N)`` score matrix is too large to hold."""
    t_col = target.to(device=candidate_scores.device, dtype=torch.int64).unsqueeze(1)
    neg = negatives.to(device=candidate_scores.device, dtype=torch.int64)
    t_score, s = candidate_scores[:, :1], candidate_scores[:, 1:]
    beats = (s > t_score) | ((s == t_score) & (neg < t_col))
    valid = (neg != 0) & (neg != t_col)
    return (beats & valid).sum(1) + 1


# --------------------------------------------------------------------------- metrics


def hr_ndcg_mrr(ranks: Tensor | np.ndarray | list, k: int) -> dict[str, float]:
    """Hit rate, NDCG and MRR of 1-based ranks (one relevant item per example).

    Returns ``{f"hr@{k}": ..., f"ndcg@{k}": ..., "mrr": ...}`` as python floats, each the
    mean over examples of ``rank <= k``, ``1/log2(rank + 1) if rank <= k else 0`` and
    ``1/rank`` (MRR is not cut off at ``k``). Raises ValueError on no ranks or a rank < 1.
    """
    k = _check_k(k)
    if isinstance(ranks, Tensor):
        ranks = ranks.detach().cpu().numpy()
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("hr_ndcg_mrr() needs at least one rank")
    if not np.all(r >= 1):
        raise ValueError("ranks are 1-based: every rank must be >= 1")
    hit = r <= k
    return {
        f"hr@{k}": float(hit.mean()),
        f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0).mean()),
        "mrr": float((1.0 / r).mean()),
    }
