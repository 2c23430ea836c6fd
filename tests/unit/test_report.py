"""The nightly report's night-to-night figures, on hand-written tables."""

import numpy as np
import pyarrow as pa

from bert4rec import publish
from bert4rec.io import write_json
from bert4rec.report import format_timings, markdown, ndcg_history, operations_report, topk_change


def test_format_timings():
    assert format_timings({"prepare_s": 1.24, "train_s": 60.0, "score_s": 0.05}) == "prepare 1.2s, train 60.0s, score 0.1s"


def test_topk_change():
    got = topk_change(np.array([1, 2, 3, 9]), [[1, 2], [3, 4], [5, 6], [7]], np.array([1, 2, 3, 8]), [[2, 1], [3, 5], [7, 8], [7]])
    # user 1 the same set (1.0), user 2 1/3, user 3 0; 9 and 8 not in both
    assert got == {"users_compared": 3, "mean_jaccard": (1 + 1 / 3 + 0) / 3, "changed_share": 2 / 3}
    assert topk_change(np.array([1]), [[1]], np.array([2]), [[1]]) == {"users_compared": 0, "mean_jaccard": None, "changed_share": None}


def test_ndcg_history_skips_unpublished_and_foreign_reports_and_bounds():
    reports = [
        {"status": "published", "date": "2026-01-02", "training": {"best_metrics": {"val_ndcg@10": 0.2}}},
        {"status": "gate failed: x", "date": "2026-01-03", "training": {"best_metrics": {"val_ndcg@10": 0.01}}},
        {"status": "published", "date": "2026-01-01", "training": {"best_metrics": {"val_ndcg@10": "0.1"}}},
        {"status": "published", "date": "2026-01-04"},
        ["not", "a", "report"],
    ]
    assert ndcg_history(reports) == [{"date": "2026-01-01", "val_ndcg@10": 0.1}, {"date": "2026-01-02", "val_ndcg@10": 0.2}]
    assert ndcg_history(reports, limit=1) == [{"date": "2026-01-02", "val_ndcg@10": 0.2}]


def _publish(out, part, users, lists, tmp_path):
    import pyarrow.parquet as pq

    staging = publish.staging_dir(str(out / part), "r1")
    import os

    os.makedirs(staging, exist_ok=True)
    pq.write_table(pa.table({"user_id": pa.array(users, pa.int64()), "item_ids": pa.array(lists, pa.list_(pa.int64()))}), os.path.join(staging, "part-0.parquet"))
    publish.publish(str(out / part), staging)


def test_operations_report_on_two_published_nights(tmp_path):
    out = tmp_path / "out"
    _publish(out, "dt=2026-01-01", [1, 2, 3], [[10, 11], [10, 12], [11, 12]], tmp_path)
    write_json({"status": "published", "date": "2026-01-01", "training": {"best_metrics": {"val_ndcg@10": 0.25}}}, str(out / "dt=2026-01-01" / "_report" / "report.json"))
    _publish(out, "dt=2026-01-02", [1, 2, 3, 4], [[10, 11], [12, 10], [13, 14], [10, 11]], tmp_path)
    got = operations_report(str(out), "dt=2026-01-02", "dt=2026-01-01", 10, {"rows": 4, "fallback_users": 1}, 0.3)
    assert got == {
        "coverage": 5 / 10,
        "distinct_items": 5,
        "catalogue_items": 10,
        "fallback_share": 0.25,
        "churn": {"users_compared": 3, "mean_jaccard": (1 + 1 + 0) / 3, "changed_share": 1 / 3, "previous": "dt=2026-01-01", "sample_rate": 1.0},
        "ndcg_history": [{"date": "2026-01-01", "val_ndcg@10": 0.25}, {"date": "2026-01-02", "val_ndcg@10": 0.3}],
    }
    report = {
        "date": "2026-01-02", "status": "published", "warm_start": "w", "data": {"input_rows": 1, "users": 4, "items": 10, "dropped": {}},
        "training": {"model_version": "m", "best_epoch": 1, "best_metrics": {"val_ndcg@10": 0.3}, "val_popularity": {}},
        "test": {"ndcg@10": 0.1, "hr@10": 0.2, "mrr": 0.1, "sampled": {"hr@10": 0.5}, "popularity": {"ndcg@10": 0.1, "hr@10": 0.1, "mrr": 0.1, "sampled": {"hr@10": 0.1}}},
        "previous": None, "timings": {"prepare_s": 1.0, "train_s": 2.0}, "operations": got,
    }
    md = markdown(report)
    assert "- catalogue coverage of the top-k: 0.5000 (5 of 10 items)" in md
    assert "- fallback users: 0.2500" in md
    assert "- lists changed since dt=2026-01-01: 0.3333 of 3 sampled users, mean Jaccard 0.6667" in md
    assert "## Stage timings\n\nprepare 1.0s, train 2.0s" in md
