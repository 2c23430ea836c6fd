"""The table commit: publishing a table so that readers never see a partial one.

The publish contract
--------------------

A *table* is a directory ``OUT`` (a local path or ``s3://bucket/prefix``) holding:

* data files ``OUT/part-<run_id>-NNNNN.parquet``;
* a manifest ``OUT/_SUCCESS`` (JSON), written **last**. The manifest is the commit point::

      {"files": ["part-<run_id>-00000.parquet", ...],   # names relative to OUT
       "rows": 123456, "run_id": "...", "published_at": "2026-11-24T03:12:45+00:00",
       ...extra fields from the writer: counts, model version, checkpoint URI, timings}

**Readers** read only directories that have a manifest, and only the files it lists
(``read_table``/``published_files`` do this). Anything else in ``OUT`` -- files of a crashed
run, ``_staging/`` -- is ignored. Plain directory readers (pyarrow, Spark, pandas) skip the
underscore-prefixed ``_SUCCESS`` and ``_staging``, but they would also pick up orphan data
files (and not every reader skips underscore paths), so consumers should go through the
manifest: ``read_table(OUT)``, or ``ray.data.read_parquet(published_files(OUT))``.

**Writers** (one at a time per ``OUT``: hold ``bert4rec.locks.lock(...)`` for the whole run):

1. write the Parquet files into ``staging_dir(OUT, run_id)`` = ``OUT/_staging/<run_id>``;
2. run their own checks on the staged data (``publish(verify=...)`` can run one more on the
   staged table before anything moves);
3. ``publish(OUT, staging, manifest_extra)`` which runs four steps (each also a public
   function, so that the tests can stop between two of them as a crash would):

   a. (``make_plan``) lists the staged files, sums their row counts from the Parquet footers, refuses an empty
      table unless ``allow_empty=True``, and records the plan (file -> new name) in
      ``<staging>/_publish.json``;
   b. (``move_files``) moves each staged file to ``OUT/part-<run_id>-NNNNN.parquet`` (local: ``os.rename``,
      after fsyncing it; S3: copy + delete);
   c. (``write_manifest``) writes the new ``OUT/_SUCCESS`` atomically (local: temporary file + ``os.replace``;
      S3: a single PUT) -- **the commit point**;
   d. (``clean_up``) deletes the ``part-*.parquet`` files in ``OUT`` that the new manifest does not list (the
      previous table's and orphans of crashed runs) and removes ``OUT/_staging`` entirely.

What a crash leaves behind:

* before (c): the old manifest still lists only the old files, which nothing has touched;
  readers see the old table, whole. New-run files already moved into ``OUT`` are orphans
  (unlisted). Calling ``publish`` again on the same staging dir resumes from the recorded
  plan; a new run (new ``run_id``) ignores them and its publish deletes them.
* after (c): the new table is complete and is what readers see; leftovers from (d) are
  deleted by the next successful publish.

A reader that opened the old manifest just before a publish may find an old file gone by the
time it reads it; ``read_table`` then re-reads the manifest and retries. Writers that need
readers never to race at all publish each day to a new directory (``dt=YYYY-MM-DD``) and
switch a ``latest`` pointer (``bert4rec.latest``).

Everything read from storage is untrusted: a manifest whose ``files`` are not all
``part-<run_id>-NNNNN.parquet`` names, or a plan (``_publish.json``) whose entries are not
plain names, is an ``InputError`` naming the file and the entry, raised before any file is
read, moved or deleted. So a crafted ``../x`` never reaches outside the table directory.

Errors meant for the user are ``bert4rec.io.InputError``, one line, naming the path.
"""


from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import re
import shutil
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bert4rec.config import StorageConfig
from bert4rec.io import fsync_dir, InputError, Location, check_plain_name, fs_path, is_s3, locate
from bert4rec.io import join as ujoin

log = logging.getLogger(__name__)

MANIFEST = "_SUCCESS"
STAGING = "_staging"
PLAN = "_publish.json"
RESERVED_KEYS = frozenset({"files", "rows", "run_id", "published_at"})

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,127}$")
# what a manifest may list: the names step (b) gives, nothing that could leave the directory
PART_FILE = re.compile(r"^part-[A-Za-z0-9][A-Za-z0-9._=-]{0,127}-\d{5,}\.parquet$")
# what the cleanup deletes from a listing of OUT (names there are real children of OUT)
_ANY_PART = re.compile(r"^part-.+-\d{5,}\.parquet$")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _read_parquet(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file. Through a file object: on S3 ~4x fewer requests than
    ``pq.read_table(path, filesystem=fs)``, which runs dataset discovery first."""
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read(columns=columns)


def _num_rows(fs, path: str) -> int:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _check_run_id(run_id: Any, source: str = "") -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        where = f"{source}: " if source else ""
        raise InputError(f"{where}bad run_id {run_id!r}: use letters, digits and . _ = - (at most 128, no '..')")
    return run_id


def staging_dir(out: str, run_id: str) -> str:
    """``<out>/_staging/<run_id>``: where a run writes its files before ``publish``."""
    _check_run_id(run_id)
    return ujoin(out, STAGING, run_id)


# --------------------------------------------------------------------------- manifests


def check_manifest(manifest: Any, source: str) -> dict:
    """``manifest`` if it is a table manifest whose ``files`` are all part-file names of this
    directory; else an ``InputError`` naming ``source`` and the bad entry. Run on everything
    read from storage before a single listed file is read or kept."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list) or "rows" not in manifest:
        raise InputError(f"{source}: not a table manifest (needs 'files' and 'rows')")
    if not isinstance(manifest["rows"], int) or manifest["rows"] < 0:
        raise InputError(f"{source}: 'rows' must be a count, got {manifest['rows']!r}")
    for name in manifest["files"]:
        check_plain_name(name, source)
        if not PART_FILE.match(name):
            raise InputError(f"{source}: bad file name {name!r}: expected part-<run_id>-NNNNN.parquet")
    return manifest


def read_manifest(out: str | Location, storage: StorageConfig | None = None) -> dict | None:
    """The manifest of the table at ``out``, or ``None`` when nothing is published there.

    The manifest is checked (``check_manifest``): a bad one is an ``InputError``."""
    table = locate(out, storage)
    try:
        data = table.join(MANIFEST).read_bytes()
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise InputError(f"{table.uri}: corrupt {MANIFEST} manifest: {e}") from e
    return check_manifest(manifest, table.join(MANIFEST).uri)


def published_files(out: str | Location, storage: StorageConfig | None = None) -> list[str]:
    """The URIs of the files the manifest at ``out`` lists (e.g. for ``ray.data.read_parquet``)."""
    table = locate(out, storage)
    manifest = read_manifest(table)
    if manifest is None:
        raise InputError(f"no published table at {table.uri} (no {MANIFEST} manifest)")
    return [table.join(f).uri for f in manifest["files"]]


def read_table(out: str | Location, storage: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """Reads exactly the files that ``out``'s manifest lists, as one table.

    If a listed file vanishes mid-read because a new table was published meanwhile, the
    manifest is read again and the read retried. A published empty table with no files reads
    as a table with no columns.
    """
    table = locate(out, storage)
    last_run = object()
    for _attempt in range(4):
        manifest = read_manifest(table)
        if manifest is None:
            raise InputError(f"no published table at {table.uri} (no {MANIFEST} manifest)")
        if manifest.get("run_id") == last_run:
            break  # same table as last attempt: the file really is missing
        last_run = manifest.get("run_id")
        try:
            parts = [table.call(lambda f=f: _read_parquet(table.fs, table.join(f).path, columns)) for f in manifest["files"]]
        except FileNotFoundError:
            table.fs.invalidate_cache()
            continue
        except (pa.ArrowInvalid, KeyError) as e:
            raise InputError(f"{table.uri}: cannot read published Parquet: {e}") from e
        if not parts:
            return pa.table({})
        result = parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")
        if result.num_rows != manifest["rows"]:
            raise InputError(f"{table.uri}: manifest says {manifest['rows']} rows but its files hold {result.num_rows}")
        return result
    raise InputError(f"{table.uri}: a file listed in {MANIFEST} (run {last_run}) is missing")


# --------------------------------------------------------------------------- publish


def _staged_files(stg: Location) -> list[str]:
    """Names of the staged Parquet files, sorted. Staging is flat (Ray Data writes it so): a
    subdirectory with data would not be published, so it is an error rather than skipped."""
    files = []
    for e in stg.children():
        name = e["name"]
        if name.startswith(("_", ".")):
            continue
        if e["type"] == "directory":
            raise InputError(f"{stg.join(name).uri}: publish takes Parquet files directly in the staging dir, not in subdirectories")
        if name.endswith(".parquet"):
            files.append(name)
    return sorted(files)


def check_plan(plan: Any, run_id: str, source: str) -> dict:
    """``plan`` if it is the plan step (a) records for ``run_id``; else an ``InputError`` naming
    ``source`` and the bad entry. Run before a resumed publish moves anything."""
    if not isinstance(plan, dict) or not isinstance(plan.get("moves"), list) or not isinstance(plan.get("rows"), int):
        raise InputError(f"{source}: not a publish plan (needs 'run_id', 'rows' and 'moves')")
    if plan.get("run_id") != run_id:
        raise InputError(f"{source}: plan is for run {plan.get('run_id')!r}, not {run_id!r}")
    for i, move in enumerate(plan["moves"]):
        if not (isinstance(move, list) and len(move) == 2):
            raise InputError(f"{source}: bad move {move!r}: expected [staged name, part name]")
        src, dst = move
        check_plain_name(src, source)
        if src.startswith("_") or not src.endswith(".parquet"):
            raise InputError(f"{source}: bad staged file name {src!r}: expected a .parquet file")
        if dst != f"part-{run_id}-{i:05d}.parquet":
            raise InputError(f"{source}: bad file name {dst!r}: expected part-{run_id}-{i:05d}.parquet")
    return plan


def _resolve(out: str | Location, staging: str | Location, storage: StorageConfig | None, run_id: str | None) -> tuple[Location, Location, str]:
    """(table, staging) as Locations on one filesystem, and the run id; checks that ``staging``
    is ``staging_dir(out, run_id)``."""
    table = locate(out, storage)
    stg_uri = staging.uri if isinstance(staging, Location) else staging
    if is_s3(stg_uri) != table.s3:
        raise InputError(f"staging {stg_uri} and output {table.uri} must be on the same storage")
    stg_path = staging.path if isinstance(staging, Location) else fs_path(staging)
    run_id = _check_run_id(run_id or posixpath.basename(stg_path.rstrip("/")))
    stg = table.join(STAGING, run_id)
    if stg_path != stg.path:
        raise InputError(f"staging dir must be staging_dir(out, run_id) = {stg.uri}, got {stg_uri}")
    return table, stg, run_id


def make_plan(
    out: str | Location,
    staging: str | Location,
    storage: StorageConfig | None = None,
    verify: Callable[[pa.Table], None] | None = None,
    run_id: str | None = None,
    allow_empty: bool = False,
) -> dict:
    """Step (a): checks the staged files and records which file gets which name.

    Returns the plan; resumes (after checking it) the one a crashed ``publish`` left in the
    staging dir.
    """
    table, stg, run_id = _resolve(out, staging, storage, run_id)
    plan_loc = stg.join(PLAN)
    recorded = plan_loc.read_json(default=None)
    if recorded is not None:
        log.warning("resuming the interrupted publish of run %s into %s", run_id, table.uri)
        return check_plan(recorded, run_id, plan_loc.uri)

    current = read_manifest(table)
    if current is not None and current.get("run_id") == run_id:
        raise InputError(f"{table.uri}: run {run_id} is already published; give each run its own run_id")
    files = _staged_files(stg)
    if not files and not allow_empty:
        raise InputError(f"{stg.uri}: no Parquet files staged; refusing to publish an empty table")
    rows = 0
    for f in files:
        try:
            rows += stg.call(lambda f=f: _num_rows(stg.fs, stg.join(f).path))
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{stg.join(f).uri}: not a readable Parquet file: {e}") from e
    if rows == 0 and not allow_empty:
        raise InputError(f"{stg.uri}: staged files hold 0 rows; refusing to publish an empty table")
    if verify is not None:
        tables = [_read_parquet(stg.fs, stg.join(f).path) for f in files]
        staged = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
        try:
            verify(staged)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{stg.uri}: staged table failed verification: {type(e).__name__}: {e}") from e
    moves = [[f, f"part-{run_id}-{i:05d}.parquet"] for i, f in enumerate(files)]
    plan = {"run_id": run_id, "rows": rows, "moves": moves}
    plan_loc.write_json(plan)
    return plan


def move_files(out: str | Location, staging: str | Location, plan: dict, storage: StorageConfig | None = None) -> None:
    """Step (b): moves the staged files to their final names (idempotent, so resumable)."""
    table, stg, run_id = _resolve(out, staging, storage, plan.get("run_id"))
    check_plan(plan, run_id, stg.join(PLAN).uri)
    fs = table.fs
    for src, dst in plan["moves"]:
        src_path, dst_path = stg.join(src).path, table.join(dst).path
        if table.s3:
            if table.call(lambda: fs.exists(src_path)):
                table.call(lambda: fs.mv(src_path, dst_path))
            elif not fs.exists(dst_path):
                raise InputError(f"{stg.uri}: staged file {src} is gone and was not moved to {dst}")
            continue
        try:
            fd = os.open(src_path, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data must be on disk before the manifest names it
            finally:
                os.close(fd)
            os.rename(src_path, dst_path)
        except FileNotFoundError:
            if not os.path.exists(dst_path):
                raise InputError(f"{stg.uri}: staged file {src} is gone and was not moved to {dst}") from None
    if not table.s3:
        fsync_dir(table.path)


def write_manifest(out: str | Location, plan: dict, manifest_extra: dict, storage: StorageConfig | None = None) -> dict:
    """Step (c): writes the manifest, atomically. After this the new table is what readers see."""
    table = locate(out, storage)
    manifest = {
        **manifest_extra,
        "files": [dst for _, dst in plan["moves"]],
        "rows": plan["rows"],
        "run_id": plan["run_id"],
        "published_at": _now(),
    }
    table.join(MANIFEST).write_json(manifest)
    if not table.s3:
        fsync_dir(table.path)
    return manifest


def clean_up(out: str | Location, manifest: dict, storage: StorageConfig | None = None) -> list[str]:
    """Step (d): deletes unlisted data files and every staging dir. Returns what it deleted.

    The table is committed already, so a failure here is logged, not raised: the next
    successful publish cleans up again. Only names from a listing of ``out`` are deleted, never
    names read from a file.
    """
    table = locate(out, storage)
    fs = table.fs
    keep = set(manifest["files"])
    deleted: list[str] = []
    try:
        fs.invalidate_cache()
        for e in table.children():
            name = e["name"]
            stale_tmp = name.startswith(f"{MANIFEST}.tmp-")  # from a crashed local write_json
            if (_ANY_PART.match(name) and name not in keep) or stale_tmp:
                fs.rm_file(table.join(name).path)
                deleted.append(name)
        stg_root = table.join(STAGING)
        if stg_root.exists():
            if table.s3:
                fs.rm(stg_root.path, recursive=True)
            else:
                shutil.rmtree(stg_root.path)
            deleted.append(STAGING)
    except Exception as e:  # noqa: BLE001 - committed; leftovers are only clutter
        log.warning("published %s, but cleaning up old files failed (next publish retries): %s", table.uri, e)
    return deleted


def publish(
    out: str | Location,
    staging: str | Location,
    manifest_extra: dict[str, Any] | None = None,
    storage: StorageConfig | None = None,
    verify: Callable[[pa.Table], None] | None = None,
    *,
    run_id: str | None = None,
    allow_empty: bool = False,
) -> dict:
    """Publishes the Parquet files staged in ``staging`` as the table at ``out``; returns the manifest.

    ``staging`` must be ``staging_dir(out, run_id)``; ``run_id`` defaults to its last component.
    ``manifest_extra`` is merged into the manifest (it may not set ``files``, ``rows``,
    ``run_id`` or ``published_at``). ``verify``, if given, is called with the whole staged table
    before anything moves; whatever it raises aborts the publish as an ``InputError`` and leaves
    the published table untouched. No staged files, or zero rows, is an ``InputError`` unless
    ``allow_empty``. The caller must hold a lock (``bert4rec.locks``) for ``out``: publish
    deletes other runs' staging dirs. See the module docstring for the steps and what a crash
    leaves.

    If a previous ``publish`` of the same staging dir crashed, this resumes its recorded plan
    (``verify`` is not run again: it ran before the plan was recorded). ``verify`` reads the
    whole staged table into memory; for big tables verify in the job and pass ``None``.
    """
    manifest_extra = dict(manifest_extra or {})
    table = locate(out, storage)
    clash = RESERVED_KEYS & manifest_extra.keys()
    if clash:
        raise InputError(f"{table.uri}: manifest_extra may not set {sorted(clash)}")
    table, stg, run_id = _resolve(table, staging, storage, run_id)
    plan = make_plan(table, stg, verify=verify, run_id=run_id, allow_empty=allow_empty)
    current = read_manifest(table)
    if current is not None and current.get("run_id") == plan["run_id"]:
        manifest = current  # a crash after the commit: only the cleanup is left to do
    else:
        move_files(table, stg, plan)
        manifest = write_manifest(table, plan, manifest_extra)
    deleted = clean_up(table, manifest)
    log.info("published %s: %d rows in %d files (run %s); removed %s", table.uri, manifest["rows"], len(manifest["files"]), manifest["run_id"], deleted)
    return manifest


