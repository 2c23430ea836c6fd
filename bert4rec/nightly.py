"""The nightly run: prepare -> train -> gate -> evaluate -> score -> publish -> report.

    bert4rec nightly --config configs/nightly.yaml [--date 2026-11-24]

Layout under ``out`` (local or ``s3://``)::

    <out>/dt=2026-11-24/part-*.parquet   the recommendation table of that date
    <out>/dt=2026-11-24/_SUCCESS         its manifest, written last (the commit point)
    <out>/dt=2026-11-24/_report/         report.json, report.md, training.png
    <out>/latest                         {"path": "dt=2026-11-24", ...}, moved last
    <out>/_locks/dt=2026-11-24.lock      held while a run of that date is in progress
    <out>/_locks/latest.lock             held for the moment latest is compared and moved
    <out>/_work/dt=2026-11-24/           prepared data and the training run of that date

Guarantees: two runs of one date never interleave (the lock); a rerun of a date replaces
its table whole (the manifest names its files); ``latest`` moves only after the table and
its report are complete, so a run killed at any point leaves every published date and
``latest`` readable and consistent. ``latest`` only moves forward: a backfill of a date
older than the one it points to publishes ``dt=D`` and leaves ``latest`` alone (the result's
``latest`` says so); a date after today (UTC) is refused before anything runs. After a
successful night, ``_work/dt=*`` beyond the newest ``keep_nights`` is deleted
(``bert4rec.retention``). A rerun of a date resumes that date's training run
(Ray Train restores its latest checkpoint), so a run killed while scoring does not train
again. A model that fails the quality gate publishes nothing and exits non-zero.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import socket
import uuid

from bert4rec import checkpoint as ckpt_lib
from bert4rec import cluster
from bert4rec.config import EvaluateConfig, NightlyConfig, PrepareConfig, ScoreConfig, TrainConfig
from bert4rec.console import stage
from bert4rec.io import InputError, Location, join, locate
from bert4rec.latest import advance_latest, partition_date, read_latest
from bert4rec.locks import lock
from bert4rec.publish import read_manifest
from bert4rec.report import format_timings, operations_report, write_report
from bert4rec.retention import night_of, prune_work, running_nights

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


def previous_model(root: str | Location, before: dt.date | None = None, storage=None) -> dict | None:
    """The manifest of the newest published table dated before ``before`` (the run date), with
    its ``path``: on an ordinary night the one ``latest`` points to; on a rerun of latest's own
    date or a backfill, the newest published ``dt=`` before the run date, so that a night is
    never warm-started from, or gated against, a model trained on its own or later data. None
    when there is none (the first night)."""
    root = locate(root, storage)
    pointer = read_latest(root)
    if pointer is not None and (before is None or partition_date(pointer["path"]) < before):
        manifest = read_manifest(root.join(pointer["path"]))
        return {**manifest, "path": pointer["path"]} if manifest else None
    if before is None:
        return None
    names = [c["name"] for c in root.children() if c.get("type") == "directory"]
    for name in sorted((n for n in names if (d := partition_date(n)) is not None and d < before), reverse=True):
        manifest = read_manifest(root.join(name))
        if manifest:
            return {**manifest, "path": name}
    return None


def served_checkpoint(previous: dict, work_root: Location) -> str | None:
    """The checkpoint URI that a published manifest names, if it lies where this flow writes
    its training runs (``<work>/dt=YYYY-MM-DD/...``, no ``..``); None otherwise. A manifest is
    read from storage and untrusted: a path elsewhere is never loaded."""
    uri = previous.get("checkpoint")
    if not isinstance(uri, str) or ".." in uri.replace("\\", "/").split("/"):
        return None
    return uri if night_of(uri, work_root) else None


def previous_prepared(work_root: Location, date: dt.date, previous: dict | None) -> str | None:
    """The prepared data the night merges its new partitions into: that of the previous
    model's date, else the newest earlier date's that has a stats.json (prepare rebuilds from
    everything when it is unusable). Only ``dt=YYYY-MM-DD`` directories of the work root."""
    part = f"dt={date.isoformat()}"
    path = (previous or {}).get("path")
    if isinstance(path, str) and partition_date(path) is not None and path < part and work_root.join(path, "prepared", "stats.json").exists():
        return work_root.join(path, "prepared").uri
    names = sorted(c["name"] for c in work_root.children() if partition_date(c["name"]) is not None and c["name"] < part)
    earlier = [n for n in names if work_root.join(n, "prepared", "stats.json").exists()]
    return work_root.join(earlier[-1], "prepared").uri if earlier else None


def run_date(requested: dt.date | None, today: dt.date) -> dt.date:
    """The night's date: ``requested`` (default ``today``), refused when after ``today``: no
    data exists for it yet, and publishing it would hold ``latest`` in the future."""
    date = requested or today
    if date > today:
        raise InputError(f"date {date.isoformat()} is in the future (today is {today.isoformat()} UTC); run a date up to today")
    return date


def latest_status(moved: bool, pointer: dict, part: str) -> str:
    """What the night did to ``latest``, for the result and the log."""
    if moved:
        return f"moved to {part}"
    return f"unchanged: points to {pointer['path']} (newer)"


def nightly(cfg: NightlyConfig, scorer_cls: type | None = None) -> dict:
    """Runs one night for ``cfg.date`` (default: today, UTC); returns the report.
    ``scorer_cls``: the scoring actor class, as :func:`bert4rec.score.score` takes it."""
    date = run_date(cfg.date, dt.datetime.now(dt.timezone.utc).date())
    cluster.require_shared_storage({"interactions": cfg.interactions, "out": cfg.out, "work": cfg.work}, cfg.storage)
    _terminate_gracefully()
    part = f"dt={date.isoformat()}"
    # resolved once: every step of the night reuses this filesystem
    root = locate(cfg.out, cfg.storage)
    work_root = locate(cfg.work or join(cfg.out, "_work"), cfg.storage)
    owner = f"nightly {part} {socket.gethostname()}:{os.getpid()} {uuid.uuid4().hex[:8]}"
    with lock(root.join("_locks", f"{part}.lock"), owner, stale_after_s=cfg.lock_stale_after_s):
        report = _run(cfg, date, part, root.join(part).uri, work_root.join(part).uri, root, work_root, scorer_cls)
        with stage("publish", report["timings"]):
            moved, pointer = advance_latest(root, part, owner)
        report["latest"] = latest_status(moved, pointer, part)
        log.info("%s: latest %s", part, report["latest"])
        log.info("%s: published; stage timings: %s", part, format_timings(report["timings"]))
        report["pruned_work"] = prune_after_night(root, work_root, part, cfg.keep_nights)
    return report


def prune_after_night(root: Location, work_root: Location, part: str, keep_nights: int) -> list[str]:
    """Deletes ``<work>/dt=*`` beyond the newest ``keep_nights`` after the successful night
    ``part``, keeping the night whose model ``latest`` serves and nights whose run holds its
    date lock (``bert4rec.retention``). Returns the names deleted. A failure only logs: the
    night is published, and the next one retries."""
    try:
        pointer = read_latest(root)
        served = read_manifest(root.join(pointer["path"])) if pointer else None
        protected = running_nights(root.join("_locks")) - {part}
        night = night_of((served or {}).get("checkpoint"), work_root)
        if night:
            protected.add(night)
        pruned = prune_work(work_root, keep_nights, part, protected)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("%s: pruning %s failed (%s: %s); the next night retries", part, work_root.uri, type(e).__name__, e)
        return []
    if pruned:
        log.info("%s: pruned work dirs %s (keep_nights=%d)", part, pruned, keep_nights)
    return pruned


def _run(cfg: NightlyConfig, date: dt.date, part: str, table_uri: str, work: str, root: Location, work_root: Location, scorer_cls: type | None) -> dict:
    from bert4rec.evaluate import evaluate
    from bert4rec.prepare import prepare
    from bert4rec.score import score
    from bert4rec.train import train

    timings: dict[str, float] = {}
    previous = previous_model(root, before=date)

    # the previous model first: a published checkpoint that cannot be loaded stops the night
    # before hours of preparing data
    init_from, warm = None, "never"
    prev_uri = served_checkpoint(previous, work_root) if previous else None
    if cfg.warm_start == "auto" and previous and not prev_uri:
        warm = f"from scratch: the checkpoint named by {previous['path']}/_SUCCESS is not under {work_root.uri}; not loaded"
        log.warning("%s: %s", part, warm)
    elif cfg.warm_start == "auto" and previous:
        prev_ckpt = ckpt_lib.load(prev_uri, cfg.storage)
        changed = cfg.train.model.changes_from(prev_ckpt.model.config)
        if not changed:
            init_from, warm = prev_ckpt.uri, f"warm start from {previous['path']} ({previous.get('model_version')})"
        else:
            warm = f"from scratch: the model config changed since {previous['path']} ({', '.join(changed)})"
    elif cfg.warm_start == "auto":
        warm = "from scratch: no published model yet"

    prepared_uri = join(work, "prepared")
    with stage("prepare", timings):
        prev_prepared = previous_prepared(work_root, date, previous)
        prepared = prepare(
            PrepareConfig(interactions=cfg.interactions, out=prepared_uri, until=date, previous=prev_prepared, storage=cfg.storage, **cfg.prepare.model_dump())
        )

    train_out = join(work, "train")
    with stage("train", timings):
        summary = train(TrainConfig(data=prepared_uri, out=train_out, init_from=init_from, storage=cfg.storage, **cfg.train.model_dump()))

    new_ndcg = summary["best_metrics"]["val_ndcg@10"]
    prev_ndcg = (previous or {}).get("val_ndcg@10")
    with stage("evaluate", timings):
        # on the scoring actors' resources (GPU when scoring has one), on a hash sample of users
        test = evaluate(
            EvaluateConfig(
                checkpoint=summary["best_checkpoint"],
                data=prepared_uri,
                max_users=cfg.evaluate_users,
                actors=cfg.score.actors,
                cpus_per_actor=cfg.score.cpus_per_actor,
                gpu=cfg.score.gpu,
                storage=cfg.storage,
            )
        )
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

    with stage("gate", timings):
        reason = gate(new_ndcg, prev_ndcg, cfg.gate.min_ndcg, cfg.gate.max_drop)
        if reason:
            report["status"] = f"gate failed: {reason}"
            # kept with the run's work files, never next to a published table
            write_report(report, join(work, "_report"), cfg.storage)
            raise GateFailed(f"{part}: {reason}; nothing published, latest unchanged")

    # operators (and the job tests) watch for this line: from here on, a stopped run is a
    # run killed while scoring
    log.info("%s: scoring %d users with model %s into %s", part, prepared["users"], summary["model_version"], table_uri)
    with stage("score", timings):
        scored = score(
            ScoreConfig(
                checkpoint=summary["best_checkpoint"],
                histories=join(prepared_uri, "histories"),
                out=table_uri,
                storage=cfg.storage,
                **cfg.score.model_dump(),
            ),
            manifest_extra={"date": date.isoformat(), "val_ndcg@10": new_ndcg, "test_ndcg@10": test["ndcg@10"]},
            **({"scorer_cls": scorer_cls} if scorer_cls is not None else {}),
        )
    report["status"] = "published"
    report["table"] = {"path": part, **{k: scored[k] for k in ("rows", "input_users", "fallback_users", "unknown_items", "run_id", "model_version")}}
    with stage("report", timings):
        prev_path = previous["path"] if previous else None
        report["operations"] = operations_report(cfg.out, part, prev_path, prepared["items"], report["table"], new_ndcg, cfg.storage)
        write_report(report, join(table_uri, "_report"), cfg.storage)
    # the caller then moves latest (the commit point of the night: consumers follow it)
    return report

