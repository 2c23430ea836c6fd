"""The run report a person reads instead of logs: JSON for machines, Markdown and a PNG
plot (training loss and validation NDCG@10 per epoch) for people."""

from __future__ import annotations

import io as _io
import json

from bert4rec.config import StorageConfig
from bert4rec.io import filesystem, join, write_json


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
    lines += ["", "## Timings (s)", "", " | ".join(f"{k[:-2]} {v:.1f}" for k, v in report["timings"].items()), "", "![training](training.png)", ""]
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


def write_report(report: dict, uri: str, storage: StorageConfig | None = None) -> None:
    """Writes report.json, report.md and training.png under ``uri``."""
    fs, path = filesystem(uri, storage)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(filesystem(join(uri, "training.png"), storage)[1], plot(report["training"]["history"]))
    fs.pipe_file(filesystem(join(uri, "report.md"), storage)[1], markdown(report).encode())
    write_json(report, join(uri, "report.json"), storage)
