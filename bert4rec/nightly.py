"""The nightly run: prepare -> train -> gate -> evaluate -> score -> publish -> report.

    bert4rec nightly --config configs/nightly.yaml [--date 2026-11-24]

Layout under ``out`` (local or ``s3://``)::

    <out>/dt=2026-11-24/part-*.parquet   the recommendation table of that date
    <out>/dt=2026-11-24/_SUCCESS         its manifest, written last (the commit point)
    <out>/dt=2026-11-24/_report/         report.json, report.md, training.png
    <out>/latest                         {"path": "dt=2026-11-24", ...}, moved last
    <out>/_locks/dt=2026-11-24.lock      held while a run of that date is in progress
    <out>/_work/dt=2026-11-24/           prepared data and the training run of that date

Guarantees: two runs of one date never interleave (the lock); a rerun of a date replaces
its table whole (the manifest names its files); ``latest`` moves only after the table and
its report are complete, so a run killed at any point leaves every published date and
``latest`` readable and consistent. A rerun of a date resumes that date's training run
(Ray Train restores its latest checkpoint), so a run killed while scoring does not train
again. A model that fails the quality gate publishes nothing and exits non-zero.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import socket
import time
import uuid

from bert4rec import checkpoint as ckpt_lib
from bert4rec import publish
from bert4rec.config import EvaluateConfig, NightlyConfig, PrepareConfig, ScoreConfig, TrainConfig
from bert4rec.io import filesystem, join
from bert4rec.report import write_report

log = logging.getLogger(__name__)


class GateFailed(RuntimeError):
    """The new model is not good enough to publish."""


def gate(new_ndcg: float, previous_ndcg: float | None, min_ndcg: float, max_drop: float) -> str | None:
    """The quality gate as a pure function: None when the model may be published, else why not."""
    if new_ndcg < min_ndcg:
        return f"validation NDCG@10 {new_ndcg:.4f} is below the floor {min_ndcg:.4f}"
    if previous_ndcg is not None and new_ndcg < previous_ndcg * (1 - max_drop):
        return (
            f"validation NDCG@10 {new_ndcg:.4f} is more than {max_drop:.0%} below the last "
            f"published model's {previous_ndcg:.4f} (bar {previous_ndcg * (1 - max_drop):.4f})"
        )
    return None


def _terminate_gracefully() -> None:
    """``ray job stop`` sends SIGTERM: turn it into an exception so that locks are released
    and staging is left for the next run to clean, instead of dying mid-statement."""

    def handler(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


def previous_model(out: str, storage) -> dict | None:
    """The manifest of the table ``latest`` points to, or None on the first night."""
    pointer = publish.read_latest(out, storage)
    if pointer is None:
        return None
    manifest = publish.read_manifest(join(out, pointer["path"]), storage)
    return {**(manifest or {}), "path": pointer["path"]} if manifest else None


def previous_prepared(work_root: str, date: dt.date, previous: dict | None, storage) -> str | None:
    """The prepared data the night merges into: that of the date ``latest`` points to, else
    the newest earlier date's that has a stats.json (prepare rebuilds when it is unusable)."""
    if previous and previous.get("path", "") < f"dt={date.isoformat()}":
        return join(work_root, previous["path"], "prepared")
    fs, root = filesystem(work_root, storage)
    try:
        dates = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        return None
    earlier = [d for d in dates if d.startswith("dt=") and d < f"dt={date.isoformat()}" and fs.exists(f"{root}/{d}/prepared/stats.json")]
    return join(work_root, earlier[-1], "prepared") if earlier else None


def nightly(cfg: NightlyConfig) -> dict:
    """Runs one night for ``cfg.date`` (default: today, UTC); returns the report."""
    _terminate_gracefully()
    date = cfg.date or dt.datetime.now(dt.timezone.utc).date()
    part = f"dt={date.isoformat()}"
    table_uri = join(cfg.out, part)
    work = join(cfg.work or join(cfg.out, "_work"), part)
    owner = f"nightly {part} {socket.gethostname()}:{os.getpid()} {uuid.uuid4().hex[:8]}"
    with publish.lock(join(cfg.out, "_locks", f"{part}.lock"), owner, cfg.storage, cfg.lock_stale_after_s):
        return _run(cfg, date, part, table_uri, work)


def _run(cfg: NightlyConfig, date: dt.date, part: str, table_uri: str, work: str) -> dict:
    from bert4rec.evaluate import evaluate
    from bert4rec.prepare import prepare
    from bert4rec.score import score
    from bert4rec.train import train

    timings: dict[str, float] = {}
    previous = previous_model(cfg.out, cfg.storage)

    t = time.time()
    prepared_uri = join(work, "prepared")
    prev_prepared = previous_prepared(cfg.work or join(cfg.out, "_work"), date, previous, cfg.storage)
    prepared = prepare(
        PrepareConfig(interactions=cfg.interactions, out=prepared_uri, until=date, previous=prev_prepared, storage=cfg.storage, **cfg.prepare.model_dump())
    )
    timings["prepare_s"] = time.time() - t

    init_from, warm = None, "never"
    if cfg.warm_start == "auto" and previous and previous.get("checkpoint"):
        prev_ckpt = ckpt_lib.load(previous["checkpoint"], cfg.storage)
        ours = cfg.train.model.model_dump(exclude={"num_items"})
        theirs = prev_ckpt.model.config.model_dump(exclude={"num_items"})
        if ours == theirs:
            init_from, warm = prev_ckpt.uri, f"warm start from {previous['path']} ({previous.get('model_version')})"
        else:
            changed = sorted(k for k in ours if ours[k] != theirs.get(k))
            warm = f"from scratch: the model config changed since {previous['path']} ({', '.join(changed)})"
    elif cfg.warm_start == "auto":
        warm = "from scratch: no published model yet"

    t = time.time()
    train_out = join(work, "train")
    summary = train(TrainConfig(data=prepared_uri, out=train_out, init_from=init_from, storage=cfg.storage, **cfg.train.model_dump()))
    timings["train_s"] = time.time() - t

    new_ndcg = summary["best_metrics"]["val_ndcg@10"]
    prev_ndcg = (previous or {}).get("val_ndcg@10")
    t = time.time()
    test = evaluate(EvaluateConfig(checkpoint=summary["best_checkpoint"], data=prepared_uri, storage=cfg.storage))
    timings["evaluate_s"] = time.time() - t
    report = {
        "date": date.isoformat(),
        "status": "running",
        "warm_start": warm,
        "data": prepared,
        "training": {k: summary[k] for k in ("best_checkpoint", "best_epoch", "best_metrics", "model_version", "history", "val_popularity")},
        "test": test,
        "previous": {k: previous.get(k) for k in ("path", "model_version", "val_ndcg@10", "test_ndcg@10")} if previous else None,
        "gate": {**cfg.gate.model_dump(), "val_ndcg@10": new_ndcg, "previous_val_ndcg@10": prev_ndcg},
        "timings": timings,
    }

    reason = gate(new_ndcg, prev_ndcg, cfg.gate.min_ndcg, cfg.gate.max_drop)
    if reason:
        report["status"] = f"gate failed: {reason}"
        # kept with the run's work files, never next to a published table
        write_report(report, join(work, "_report"), cfg.storage)
        raise GateFailed(f"{part}: {reason}; nothing published, latest unchanged")

    # operators (and the job tests) watch for this line: from here on, a stopped run is a
    # run killed while scoring
    log.info("%s: scoring %d users with model %s into %s", part, prepared["users"], summary["model_version"], table_uri)
    t = time.time()
    scored = score(
        ScoreConfig(
            checkpoint=summary["best_checkpoint"],
            histories=join(prepared_uri, "histories"),
            out=table_uri,
            storage=cfg.storage,
            **cfg.score.model_dump(),
        ),
        manifest_extra={"date": date.isoformat(), "val_ndcg@10": new_ndcg, "test_ndcg@10": test["ndcg@10"]},
    )
    timings["score_s"] = time.time() - t
    report["status"] = "published"
    report["table"] = {"path": part, **{k: scored[k] for k in ("rows", "input_users", "fallback_users", "unknown_items", "run_id", "model_version")}}
    write_report(report, join(table_uri, "_report"), cfg.storage)
    # the commit point of the night: consumers follow latest
    publish.write_latest(cfg.out, part, cfg.storage)
    return report

