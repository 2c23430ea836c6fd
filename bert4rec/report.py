"""The run report a person reads instead of logs: JSON for machines, Markdown and PNG
plots (training loss and validation NDCG@10 per epoch; validation NDCG@10 over the last
nights) for people, and the figures an operator watches night to night: catalogue
coverage of the published top-k, the share of fallback users, how much users' lists
changed since the previous night."""

from __future__ import annotations

import io as _io
import json
import logging

import numpy as np

from bert4rec import data, publish
from bert4rec.config import StorageConfig
from bert4rec.io import filesystem, join, read_json, read_parquet, write_json

log = logging.getLogger(__name__)

CHURN_SAMPLE_USERS = 100_000  # users compared with the previous night, at most (about)
HISTORY_NIGHTS = 30  # nights of validation NDCG@10 in the history plot


# ------------------------------------------------------------------ pure figures


def format_timings(timings: dict[str, float]) -> str:
    """``{"prepare_s": 1.24, "train_s": 60.0}`` -> ``prepare 1.2s, train 60.0s``."""
    return ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in timings.items())


def topk_change(cur_users: np.ndarray, cur_items: list[list[int]], prev_users: np.ndarray, prev_items: list[list[int]]) -> dict:
    """How the top-k lists of users present both nights changed: the mean Jaccard similarity
    of the item sets and the share of users whose list (as a set) changed."""
    prev = dict(zip(np.asarray(prev_users).tolist(), prev_items))
    sims = []
    for u, items in zip(np.asarray(cur_users).tolist(), cur_items):
        if u in prev:
            a, b = set(items), set(prev[u])
            sims.append(len(a & b) / len(a | b) if a | b else 1.0)
    if not sims:
        return {"users_compared": 0, "mean_jaccard": None, "changed_share": None}
    return {"users_compared": len(sims), "mean_jaccard": float(np.mean(sims)), "changed_share": float(np.mean([s < 1 for s in sims]))}


def ndcg_history(reports: list[dict], limit: int = HISTORY_NIGHTS) -> list[dict]:
    """``[{"date", "val_ndcg@10"}]`` of the published nights among ``reports``, oldest first,
    the last ``limit``; reports that do not look like ours are skipped (read from storage)."""
    points = []
    for r in reports:
        try:
            if r["status"] == "published":
                points.append({"date": str(r["date"]), "val_ndcg@10": float(r["training"]["best_metrics"]["val_ndcg@10"])})
        except (KeyError, TypeError, ValueError):
            continue
    return sorted(points, key=lambda p: p["date"])[-limit:]


# ------------------------------------------------------------------ reading the tables


def _sampled_lists(table_uri: str, rows: int, storage: StorageConfig | None) -> tuple[np.ndarray, list, set]:
    """The lists of about ``CHURN_SAMPLE_USERS`` of a published table's ``rows`` users (the
    same users every night: ``data.sample_mask``) and every distinct recommended item, one
    file at a time (the driver never holds the whole table)."""
    users, lists, distinct = [], [], set()
    for uri in publish.published_files(table_uri, storage):
        t = read_parquet(uri, storage, columns=["user_id", "item_ids"])
        distinct.update(np.unique(t["item_ids"].combine_chunks().flatten().to_numpy()).tolist())
        keep = data.sample_mask(t["user_id"].to_numpy(), CHURN_SAMPLE_USERS, rows)
        users.append(t["user_id"].to_numpy()[keep])
        lists += [x for x, k in zip(t["item_ids"].to_pylist(), keep) if k]
    return (np.concatenate(users) if users else np.zeros(0, np.int64)), lists, distinct


def operations_report(out: str, part: str, previous_path: str | None, catalogue_items: int, table: dict, val_ndcg: float, storage: StorageConfig | None = None) -> dict:
    """The night-to-night figures of the table just written at ``<out>/<part>``."""
    rows = table["rows"]
    rate = min(1.0, CHURN_SAMPLE_USERS / max(1, rows))
    users, lists, distinct = _sampled_lists(join(out, part), rows, storage)
    churn = None
    if previous_path:
        try:
            prev_users, prev_lists, _ = _sampled_lists(join(out, previous_path), rows, storage)
            churn = {**topk_change(users, lists, prev_users, prev_lists), "previous": previous_path, "sample_rate": rate}
        except Exception as e:  # the report never fails a night that scored
            log.warning("%s: could not compare with %s: %s", part, previous_path, e)
    reports = []
    for name in _previous_nights(out, part, storage)[-HISTORY_NIGHTS:]:
        try:
            reports.append(read_json(join(out, name, "_report", "report.json"), storage))
        except Exception:
            continue
    history = ndcg_history([*reports, {"status": "published", "date": part.removeprefix("dt="), "training": {"best_metrics": {"val_ndcg@10": val_ndcg}}}])
    return {
        "coverage": len(distinct) / catalogue_items if catalogue_items else None,
        "distinct_items": len(distinct),
        "catalogue_items": catalogue_items,
        "fallback_share": table["fallback_users"] / rows if rows else None,
        "churn": churn,
        "ndcg_history": history,
    }


def _previous_nights(out: str, part: str, storage: StorageConfig | None) -> list[str]:
    fs, path = filesystem(out, storage)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [n for n in names if n.startswith("dt=") and n < part]


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("-" if x is None else str(x))


def markdown(report: dict) -> str:
    """The report as a short Markdown page."""
    test, pop = report["test"], report["test"]["popularity"]
    prev = report.get("previous") or {}
    train = report["training"]
    lines = [
        f"# Nightly run {report['date']}: {report['status']}",
        "",
        f"- model: `{train['model_version']}`, best epoch {train['best_epoch']}, {report['warm_start']}",
        f"- previous: {prev.get('path') or 'none'} (`{prev.get('model_version') or '-'}`)",
        "",
        "| metric | model | popularity | previous night |",
        "| --- | --- | --- | --- |",
        f"| val NDCG@10 | {_fmt(train['best_metrics']['val_ndcg@10'])} | {_fmt(train['val_popularity'].get('ndcg@10'))} | {_fmt(prev.get('val_ndcg@10'))} |",
        f"| test NDCG@10 | {_fmt(test['ndcg@10'])} | {_fmt(pop['ndcg@10'])} | {_fmt(prev.get('test_ndcg@10'))} |",
        f"| test HR@10 | {_fmt(test['hr@10'])} | {_fmt(pop['hr@10'])} | |",
        f"| test MRR | {_fmt(test['mrr'])} | {_fmt(pop['mrr'])} | |",
        f"| sampled HR@10 (100 popularity negatives) | {_fmt(test['sampled']['hr@10'])} | {_fmt(pop['sampled']['hr@10'])} | |",
        "",
        "## Counts",
        "",
        f"- interactions read: {report['data']['input_rows']}, users: {report['data']['users']}, items: {report['data']['items']}, dropped: {json.dumps(report['data']['dropped'])}",
    ]
    if "table" in report:
        t = report["table"]
        lines.append(f"- users in: {t['input_users']}, rows out: {t['rows']}, fallbacks: {t['fallback_users']}, unknown items: {t['unknown_items']}")
    ops = report.get("operations")
    if ops:
        churn = ops.get("churn") or {}
        lines += [
            "",
            "## Night to night",
            "",
            f"- catalogue coverage of the top-k: {_fmt(ops['coverage'])} ({ops['distinct_items']} of {ops['catalogue_items']} items)",
            f"- fallback users: {_fmt(ops['fallback_share'])}",
            f"- lists changed since {churn.get('previous') or 'the previous night'}: "
            + (f"{_fmt(churn['changed_share'])} of {churn['users_compared']} sampled users, mean Jaccard {_fmt(churn['mean_jaccard'])}" if churn.get("users_compared") else "-"),
            "",
            "![validation NDCG@10 by night](history.png)",
        ]
    lines += ["", "## Stage timings", "", format_timings(report["timings"]), "", "![training](training.png)", ""]
    return "\n".join(lines)


def plot(history: list[dict]) -> bytes:
    """PNG of training loss and validation NDCG@10 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(7, 4), dpi=100)
    ax1.plot(epochs, [h["loss"] for h in history], color="tab:blue", marker="o", label="training loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [h["val_ndcg@10"] for h in history], color="tab:orange", marker="s", label="val NDCG@10")
    ax2.set_ylabel("validation NDCG@10", color="tab:orange")
    ax1.set_title("BERT4Rec training")
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def history_plot(points: list[dict]) -> bytes:
    """PNG of validation NDCG@10 by night."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
    ax.plot([p["date"] for p in points], [p["val_ndcg@10"] for p in points], color="tab:orange", marker="s")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title(f"the last {len(points)} published nights")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict, uri: str, storage: StorageConfig | None = None) -> None:
    """Writes report.json, report.md, training.png (and history.png) under ``uri``."""
    fs, path = filesystem(uri, storage)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(filesystem(join(uri, "training.png"), storage)[1], plot(report["training"]["history"]))
    if report.get("operations"):
        fs.pipe_file(filesystem(join(uri, "history.png"), storage)[1], history_plot(report["operations"]["ndcg_history"]))
    fs.pipe_file(filesystem(join(uri, "report.md"), storage)[1], markdown(report).encode())
    write_json(report, join(uri, "report.json"), storage)
