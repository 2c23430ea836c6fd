"""``bert4rec evaluate``: leave-one-out metrics of a checkpoint next to the popularity baseline."""

from __future__ import annotations

import torch

from bert4rec import checkpoint as ckpt_lib
from bert4rec.config import EvaluateConfig
from bert4rec.metrics import make_eval_set, model_ranks, popularity, popularity_ranks, report, sample_negatives
from bert4rec.train import read_prepared


def evaluate(cfg: EvaluateConfig) -> dict:
    """Full ranking (seen items excluded) and the sampled protocol, for the model and for
    the most-popular baseline; popularity is counted on the input histories only."""
    loaded = ckpt_lib.load(cfg.checkpoint, cfg.storage)
    vocab, histories = read_prepared(cfg.data, cfg.storage)
    mc = loaded.model.config
    eval_set = make_eval_set(histories, loaded.vocab_ids, cfg.split, mc.max_len, mc.mask_token, mc.use_ratings)
    counts = popularity(eval_set, mc.num_items)
    negatives = sample_negatives(eval_set, counts, cfg.negatives, cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    full, sampled = model_ranks(loaded.model.to(device), eval_set, cfg.batch_size, negatives, device)
    pfull, psampled = popularity_ranks(counts, eval_set, negatives)
    return {
        **report(full, sampled, cfg.k),
        "split": cfg.split,
        "checkpoint": loaded.uri,
        "model_version": loaded.model_version,
        "skipped_users": histories.num_rows - len(eval_set),
        "popularity": report(pfull, psampled, cfg.k),
    }
