"""Quality on a real table: MovieLens-1M (users 1..2999, whose timestamps are complete),
all ratings, no rating threshold, the paper's model size, leave-one-out.

    python benchmarks/quality.py --ratings ../shared/data/ratings.parquet --minutes 42
    python benchmarks/quality.py --ratings ../shared/data/ratings.parquet --minutes 5 --gpu --workers 1 --batch-size 64

The defaults are the recipe that benchmarks/README.md reports: two Ray Train workers sharing
the machine's cores, 32 sequences each (a global batch of 64), lr 2e-3, a rating embedding, no
dropout on attention weights, and sliding windows every 50 items over histories longer than the
model's 200 positions.

Prints, per epoch, the wall time since training started and the validation NDCG@10; the
time at which validation NDCG@10 first passes 0.15; then the test set's full-ranking and
sampled (100 popularity-drawn negatives) metrics next to the popularity baseline's.
Targets: full-ranking test NDCG@10 >= 0.15 and HR@10 >= 0.28 (published BERT4Rec on ML-1M:
0.1537 / 0.2843).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratings", required=True, help="MovieLens-1M ratings as Parquet (user_id, item_id, rating, timestamp)")
    p.add_argument("--max-user", type=int, default=2999)
    p.add_argument("--minutes", type=float, default=45.0, help="training time budget")
    p.add_argument("--epochs", type=int, default=400, help="the LR schedule's length; the budget may stop earlier")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=None, help="default: this machine's cores shared between the workers")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=64, help="model width (the paper's ML-1M setting is 64)")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--attn-dropout", type=float, default=0.0, help="dropout on attention weights")
    p.add_argument("--mask-prob", type=float, default=0.2)
    p.add_argument("--samples-per-epoch", type=int, default=1)
    p.add_argument("--window-stride", type=int, default=50, help="also train on earlier windows of long histories, this many items apart (0: the latest 200 items only)")
    p.add_argument("--use-ratings", action=argparse.BooleanOptionalAction, default=True, help="a rating embedding added to the input tokens")
    p.add_argument("--post-ln", action="store_true", help="the paper's post-LayerNorm layers")
    p.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    a = p.parse_args()
    if a.cpus_per_worker is None:
        a.cpus_per_worker = max(1.0, (os.cpu_count() or 1) // a.workers)

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    from bert4rec.config import EvaluateConfig, PrepareConfig, TrainConfig
    from bert4rec.evaluate import evaluate
    from bert4rec.model import BERT4RecConfig
    from bert4rec.prepare import prepare
    from bert4rec.train import train

    work = a.work or tempfile.mkdtemp(prefix="bert4rec-quality-")
    t = pq.read_table(a.ratings)
    t = t.filter(pc.less_equal(t["user_id"], a.max_user))
    pq.write_table(t, os.path.join(work, "ratings.parquet"))
    stats = prepare(PrepareConfig(interactions=os.path.join(work, "ratings.parquet"), out=os.path.join(work, "prepared")))
    print(f"data: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions")

    ray.init(num_cpus=max(1, int(a.workers * a.cpus_per_worker)), num_gpus=a.workers if a.gpu else 0, include_dashboard=False, logging_level="ERROR", log_to_driver=True)
    model = BERT4RecConfig(max_len=200, hidden=a.hidden, layers=2, heads=2, dropout=a.dropout, attn_dropout=a.attn_dropout, use_ratings=a.use_ratings, norm_first=not a.post_ln)
    cfg = TrainConfig(
        data=os.path.join(work, "prepared"),
        out=os.path.join(work, "train"),
        epochs=a.epochs,
        workers=a.workers,
        gpu=a.gpu,
        cpus_per_worker=a.cpus_per_worker,
        batch_size=a.batch_size,
        lr=a.lr,
        mask_prob=a.mask_prob,
        samples_per_epoch=a.samples_per_epoch,
        window_stride=a.window_stride or None,
        time_budget_s=a.minutes * 60,
        model=model,
    )
    t0 = time.time()
    summary = train(cfg)
    print(f"training wall time {time.time() - t0:.0f}s (incl. start-up), best epoch {summary['best_epoch']}")
    print(f"{'epoch':>5} {'wall_s':>8} {'loss':>7} {'val_ndcg@10':>11} {'val_hr@10':>9}")
    wall, first = 0.0, None
    for h in summary["history"]:
        wall += h["epoch_s"]
        print(f"{h['epoch']:>5} {wall:>8.1f} {h['loss']:>7.3f} {h['val_ndcg@10']:>11.4f} {h['val_hr@10']:>9.4f}")
        if first is None and h["val_ndcg@10"] >= 0.15:
            first = (h["epoch"], wall)
    print("validation NDCG@10 first >= 0.15: " + (f"epoch {first[0]} at {first[1]:.0f}s ({first[1] / 60:.1f} min)" if first else "never"))
    result = evaluate(EvaluateConfig(checkpoint=cfg.out, data=cfg.data))
    pop = result["popularity"]
    print(f"test (full ranking, {result['users']} users): NDCG@10 {result['ndcg@10']:.4f}  HR@10 {result['hr@10']:.4f}  MRR {result['mrr']:.4f}")
    print(f"test (sampled, 100 popularity negatives): NDCG@10 {result['sampled']['ndcg@10']:.4f}  HR@10 {result['sampled']['hr@10']:.4f}")
    print(f"popularity (full ranking): NDCG@10 {pop['ndcg@10']:.4f}  HR@10 {pop['hr@10']:.4f}  MRR {pop['mrr']:.4f}")
    print(f"popularity (sampled): NDCG@10 {pop['sampled']['ndcg@10']:.4f}  HR@10 {pop['sampled']['hr@10']:.4f}")
    print(json.dumps({"test": result, "best_epoch": summary["best_epoch"], "work": work}, default=str))


if __name__ == "__main__":
    main()
