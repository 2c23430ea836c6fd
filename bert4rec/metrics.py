"""Leave-one-out evaluation: full ranking over the catalogue with seen items excluded, the
paper's sampled protocol (target vs 100 popularity-sampled negatives), and the popularity
baseline. Pure numpy/torch over an :class:`EvalSet`; no Ray, no files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from bert4rec import data
from bert4rec.model import BERT4Rec
from bert4rec.ranking import chunked_rank_of_target, hr_ndcg_mrr, rank_of_target, sampled_rank_from_candidates, sampled_rank_of_target


@dataclass
class EvalSet:
    """One leave-one-out split, as model-ready arrays."""

    tokens: np.ndarray  # (U, T) left-padded history + [MASK]
    ratings: np.ndarray | None  # (U, T) rating levels, or None
    targets: np.ndarray  # (U,) target tokens
    seen: list[np.ndarray]  # U arrays: every token the user had before the target (excluded from ranking)
    user_ids: np.ndarray  # (U,)

    def __len__(self) -> int:
        return len(self.targets)


def make_eval_set(
    histories: pa.Table,
    vocab_ids: np.ndarray,
    split: str,
    max_len: int,
    mask_token: int,
    use_ratings: bool = False,
    max_users: int | None = None,
    seed: int = 0,
) -> EvalSet:
    """Histories -> the val or test examples of leave-one-out (users whose target is unknown to
    the vocabulary are skipped). ``max_users`` samples users deterministically.

    ``seen`` is the input history followed by the distinct items ``prepare --max-len`` cut
    before it (``truncated_item_ids``, when present), never repeating the target there."""
    if max_users is not None and histories.num_rows > max_users:
        rows = np.sort(np.random.default_rng(seed).choice(histories.num_rows, max_users, replace=False))
        histories = histories.take(pa.array(rows))
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
        levels = data.inference_ratings([rin[i][m] for i, m in zip(keep, known)], max_len)
    inputs = [inputs[i][m] for i, m in zip(keep, known)]
    seen = inputs
    if data.TRUNCATED_COLUMN in histories.column_names:
        # cut items are all older than the kept ones, so older than either split's target
        tflat, toffsets = data.list_column(histories, data.TRUNCATED_COLUMN)
        ttokens, _ = data.to_tokens(tflat, vocab_ids)
        earlier = [ttokens[toffsets[i] : toffsets[i + 1]] for i in keep]
        seen = [np.r_[s, e[(e > 0) & (e != t)]] for s, e, t in zip(inputs, earlier, targets[keep])]
    return EvalSet(
        tokens=data.inference_tokens(inputs, max_len, mask_token),
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


def sample_negatives(eval_set: EvalSet, counts: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """(U, n) negatives per user drawn by popularity without replacement, never the target nor
    a seen item (the paper's sampled protocol)."""
    rng = np.random.default_rng(seed)
    p = counts.astype(np.float64)
    p[0] = 0
    p[-1] = 0
    if p.sum() == 0:
        p[1:-1] = 1
    p /= p.sum()
    candidates = set(np.flatnonzero(p > 0).tolist())
    out = np.zeros((len(eval_set), n), np.int64)
    for u in range(len(eval_set)):
        forbidden = set(eval_set.seen[u].tolist())
        forbidden.add(int(eval_set.targets[u]))
        unseen = len(candidates) - len(forbidden & candidates)
        # a user who has seen nearly everything gets every unseen item; the rest stays 0,
        # which the sampled rank ignores
        want = min(n, unseen)
        chosen: list[int] = []
        taken = set(forbidden)
        while len(chosen) < want:
            for t in rng.choice(len(p), size=2 * n, p=p).tolist():
                if t not in taken:
                    taken.add(t)
                    chosen.append(t)
                    if len(chosen) == want:
                        break
        chosen += [0] * (n - want)
        out[u] = chosen
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
    row = torch.as_tensor(counts, dtype=torch.float32)
    full, sampled = [], []
    for sl, seen in _batches(eval_set, batch_size):
        targets = torch.as_tensor(eval_set.targets[sl])
        scores = row.expand(len(targets), -1)
        full.append(rank_of_target(scores, targets, seen, num_items))
        if negatives is not None:
            sampled.append(sampled_rank_of_target(scores, targets, torch.as_tensor(negatives[sl])))
    return torch.cat(full).numpy(), (torch.cat(sampled).numpy() if negatives is not None else None)


def report(full: np.ndarray, sampled: np.ndarray | None, k: int) -> dict:
    """Rank arrays -> the metrics dict printed by ``bert4rec evaluate``."""
    out = {**hr_ndcg_mrr(full, k), "users": int(len(full))}
    if sampled is not None:
        out["sampled"] = {**hr_ndcg_mrr(sampled, k), "negatives": "popularity"}
    return out
