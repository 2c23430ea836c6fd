"""Quality on a real table: MovieLens-1M (users 1..2999, whose timestamps are complete),
all ratings, no rating threshold, leave-one-out, full ranking with seen items excluded.

    python benchmarks/quality.py --ratings ../shared/data/ratings.parquet --minutes 45
    python benchmarks/quality.py --ratings ../shared/data/ratings.parquet --minutes 5 --gpu

It trains with the library's defaults (``bert4rec train --data D --out O --time-budget-s S``:
the paper's model size and dropout 0.1, batch 64, lr 2e-3, epochs of 20,000 sequences, windows every 50 items
over histories longer than 200, a rating embedding when the data has ratings). Only the time
budget and the resources are set here: one Ray Train worker with all of this machine's cores
(``--workers``, ``--cpus-per-worker``, ``--gpu``). Any other setting can be changed for an
experiment with ``--set key=value`` (a TrainConfig key, dotted for the model:
``--set model.hidden=128``).

Prints, per epoch, the wall time since training started and the validation NDCG@10; the
times at which validation NDCG@10 first passes 0.15 and 0.17; then the test set's
full-ranking and sampled (100 popularity-drawn negatives) metrics of the best-validation
checkpoint next to the popularity baseline's. Targets: full-ranking test NDCG@10 >= 0.17 and
HR@10 >= 0.30 (published BERT4Rec on ML-1M: 0.1537 / 0.2843).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratings", required=True, help="MovieLens-1M ratings as Parquet (user_id, item_id, rating, timestamp)")
    p.add_argument("--max-user", type=int, default=2999)
    p.add_argument("--minutes", type=float, default=45.0, help="training time budget")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=None, help="default: this machine's cores shared between the workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one TrainConfig default (YAML value), e.g. model.hidden=128; repeatable")
    p.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    a = p.parse_args(argv)
    if a.cpus_per_worker is None:
        a.cpus_per_worker = max(1.0, (os.cpu_count() or 1) // a.workers)
    return a


def train_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items -> {dotted key: YAML value} for ``cli.load_config``."""
    import yaml

    return {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in items)}


def main() -> None:
    a = parse_args()

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from bert4rec import console
    from bert4rec.cli import load_config
    from bert4rec.config import EvaluateConfig, PrepareConfig, TrainConfig
    from bert4rec.evaluate import evaluate
    from bert4rec.prepare import prepare
    from bert4rec.train import train

    work = a.work or tempfile.mkdtemp(prefix="bert4rec-quality-")
    os.makedirs(work, exist_ok=True)
    # before prepare, which would otherwise start a Ray of its own with every core; the CLI's
    # console: the epoch lines come through it, Ray's own output stays in its log files
    console.setup_logging(verbose=False)
    console.ensure_ray(num_cpus=max(1, int(a.workers * a.cpus_per_worker)), num_gpus=a.workers if a.gpu else 0)
    t = pq.read_table(a.ratings)
    t = t.filter(pc.less_equal(t["user_id"], a.max_user))
    pq.write_table(t, os.path.join(work, "ratings.parquet"))
    stats = prepare(PrepareConfig(interactions=os.path.join(work, "ratings.parquet"), out=os.path.join(work, "prepared")))
    print(f"data: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions")

    # the CLI's own loader: dotted keys nest (model.hidden), errors are its one-line messages
    overrides = train_overrides(a.set)
    cfg = load_config(
        TrainConfig,
        None,
        {
            "data": os.path.join(work, "prepared"),
            "out": os.path.join(work, "train"),
            "workers": a.workers,
            "gpu": a.gpu,
            "cpus_per_worker": a.cpus_per_worker,
            "time_budget_s": a.minutes * 60,
            **overrides,
        },
    )
    print("settings changed from the defaults: " + (", ".join(a.set) or "none"))
    t0 = time.time()
    summary = train(cfg)
    console.stop()  # the epoch lines printed, before the tables below
    print(f"training wall time {time.time() - t0:.0f}s (incl. start-up), best epoch {summary['best_epoch']}")
    print(f"{'epoch':>5} {'wall_s':>8} {'loss':>7} {'val_ndcg@10':>11} {'val_hr@10':>9}")
    wall, first = 0.0, {0.15: None, 0.17: None}
    for h in summary["history"]:
        wall += h["epoch_s"]
        print(f"{h['epoch']:>5} {wall:>8.1f} {h['loss']:>7.3f} {h['val_ndcg@10']:>11.4f} {h['val_hr@10']:>9.4f}")
        for bar, seen in first.items():
            if seen is None and h["val_ndcg@10"] >= bar:
                first[bar] = (h["epoch"], wall)
    for bar, seen in first.items():
        print(f"validation NDCG@10 first >= {bar}: " + (f"epoch {seen[0]} at {seen[1]:.0f}s ({seen[1] / 60:.1f} min)" if seen else "never"))
    result = evaluate(EvaluateConfig(checkpoint=cfg.out, data=cfg.data))
    pop = result["popularity"]
    print(f"test (full ranking, {result['users']} users): NDCG@10 {result['ndcg@10']:.4f}  HR@10 {result['hr@10']:.4f}  MRR {result['mrr']:.4f}")
    print(f"test (sampled, 100 popularity negatives): NDCG@10 {result['sampled']['ndcg@10']:.4f}  HR@10 {result['sampled']['hr@10']:.4f}")
    print(f"popularity (full ranking): NDCG@10 {pop['ndcg@10']:.4f}  HR@10 {pop['hr@10']:.4f}  MRR {pop['mrr']:.4f}")
    print(f"popularity (sampled): NDCG@10 {pop['sampled']['ndcg@10']:.4f}  HR@10 {pop['sampled']['hr@10']:.4f}")
    print(json.dumps({"test": result, "best_epoch": summary["best_epoch"], "work": work}, default=str))


if __name__ == "__main__":
    main()
