"""Publishing a table so that readers never see a partial one.

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

**Writers** (one at a time per ``OUT``: hold ``lock(...)`` for the whole run):

1. write the Parquet files into ``staging_dir(OUT, run_id)`` = ``OUT/_staging/<run_id>``;
2. run their own checks on the staged data (``publish(verify=...)`` can run one more on the
   staged table before anything moves);
3. ``publish(OUT, staging, manifest_extra)`` which

   a. lists the staged files, sums their row counts from the Parquet footers, refuses an empty
      table unless ``allow_empty=True``, and records the plan (file -> new name) in
      ``<staging>/_publish.json``;
   b. moves each staged file to ``OUT/part-<run_id>-NNNNN.parquet`` (local: ``os.rename``,
      after fsyncing it; S3: copy + delete);
   c. writes the new ``OUT/_SUCCESS`` atomically (local: temporary file + ``os.replace``;
      S3: a single PUT) -- **the commit point**;
   d. deletes the ``part-*.parquet`` files in ``OUT`` that the new manifest does not list (the
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
switch a ``latest`` pointer.

``latest`` pointer
------------------

``write_latest(ROOT, "dt=2026-11-24")`` atomically replaces ``ROOT/latest`` with
``{"path": "dt=2026-11-24", "date": "2026-11-24", "run_id": ..., "updated_at": ...}``
(``path`` is relative to ``ROOT``; by default the target must already be published).
``read_latest(ROOT)`` returns it, or ``None``.

Locks
-----

``with lock(ROOT + "/_locks/dt=2026-11-24.lock", owner="score run 1234"):`` creates the lock
object with exclusive-create semantics, so two runs for the same output never interleave:

* local: ``os.open(path, O_CREAT | O_EXCL | O_WRONLY)``;
* S3: a GET to see whether it exists, then a conditional PUT (``If-None-Match: *``, honoured by
  AWS S3 since 2024 and by moto; other S3-compatible servers vary), so that of racing writers
  exactly one succeeds and the others get 412; then a read-back to check that it holds our
  token. On a
  server that rejects the condition with ``NotImplemented`` (or silently ignores it) this
  degrades to a best-effort check-then-PUT + read-back: two writers racing within one round
  trip could then both believe they hold the lock.

A lock held by someone else raises ``LockHeld`` naming the holder and since when, unless it is
older than ``stale_after_s`` (default 6 h, by the ``acquired_at_epoch`` written in it, else the
file's modification time), or was taken on this host by a process that is gone (a killed run):
then it is taken over (local: rename the stale file away and check it
was the one we judged stale; S3: PUT with ``If-Match: <stale ETag>``). The lock is released
(deleted, only if it is still ours: S3 uses ``DeleteObject`` with ``If-Match: <our ETag>``) when
the block exits, exception or not. There is no heartbeat: choose ``stale_after_s`` longer than
the longest run.

Errors meant for the user are ``bert4rec.io.InputError`` or ``LockHeld``, one line, naming the
path.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bert4rec.config import StorageConfig
from bert4rec.io import InputError, _call, filesystem, is_s3, write_json
from bert4rec.io import join as ujoin

log = logging.getLogger(__name__)

MANIFEST = "_SUCCESS"
STAGING = "_staging"
LATEST = "latest"
PLAN = "_publish.json"
RESERVED_KEYS = frozenset({"files", "rows", "run_id", "published_at"})

# False makes the S3 lock create its object with a plain PUT (the best-effort check, PUT, read
# back) even where the server supports If-None-Match; the tests use it to exercise that path.
S3_CONDITIONAL_WRITES = True

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,127}$")
_PART = re.compile(r"^part-.+-\d{5,}\.parquet$")
_DATE = re.compile(r"(?:^|/)dt=(\d{4}-\d{2}-\d{2})(?:/|$)")


class LockHeld(RuntimeError):
    """The lock is held by another, live (not stale) owner."""

    def __init__(self, uri: str, holder: str, since: str, age_s: float | None = None):
        self.uri, self.holder, self.since, self.age_s = uri, holder, since, age_s
        age = f", {age_s / 60:.0f} min ago" if age_s is not None else ""
        super().__init__(
            f"{uri} is locked by {holder!r} since {since}{age}; "
            "if that run is dead, wait for the lock to go stale or delete the lock file"
        )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _join(s3: bool, *parts: str) -> str:
    return posixpath.join(*parts) if s3 else os.path.join(*parts)


def _fspath(uri: str) -> str:
    """What ``bert4rec.io.filesystem(uri)[1]`` returns, without building a filesystem."""
    if is_s3(uri):
        return uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


def _fs(uri: str, storage: StorageConfig | None, fs=None):
    """``fs`` if given (one S3 client per operation: building one costs ~0.1 s), else a new one."""
    return fs if fs is not None else filesystem(uri, storage)[0]


def _write_json(fs, uri: str, obj: Any, storage: StorageConfig | None) -> None:
    """``bert4rec.io.write_json`` (atomic), reusing ``fs`` on S3 where a single PUT is atomic."""
    if is_s3(uri):
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        _call(uri, lambda: fs.pipe_file(_fspath(uri), data))
    else:
        write_json(obj, uri, storage)


def _read_parquet(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file. Through a file object: on S3 ~4x fewer requests than
    ``pq.read_table(path, filesystem=fs)``, which runs dataset discovery first."""
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read(columns=columns)


def _num_rows(fs, path: str) -> int:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _rel(base: str, path: str) -> str:
    return path[len(base) :].lstrip("/")


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise InputError(f"bad run_id {run_id!r}: use letters, digits and . _ = - (at most 128)")
    return run_id


def staging_dir(out: str, run_id: str) -> str:
    """``<out>/_staging/<run_id>``: where a run writes its files before ``publish``."""
    _check_run_id(run_id)
    return ujoin(out, STAGING, run_id)


# --------------------------------------------------------------------------- manifests


def read_manifest(out: str, storage: StorageConfig | None = None) -> dict | None:
    """The manifest of the table at ``out``, or ``None`` when nothing is published there."""
    return _read_manifest(filesystem(out, storage)[0], out)


_ABSENT = object()


def _read_json(fs, uri: str, path: str, corrupt: str) -> Any:
    """The JSON value at ``path``, or ``_ABSENT`` if there is no such file; ``corrupt``
    prefixes the error for a file that is not JSON."""
    try:
        data = _call(uri, lambda: fs.cat_file(path))
    except FileNotFoundError:
        return _ABSENT
    try:
        return json.loads(data)
    except ValueError as e:
        raise InputError(f"{corrupt}: {e}") from e


def _read_manifest(fs, out: str) -> dict | None:
    manifest = _read_json(fs, out, _join(is_s3(out), _fspath(out), MANIFEST), f"{out}: corrupt {MANIFEST} manifest")
    if manifest is _ABSENT:
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list) or "rows" not in manifest:
        raise InputError(f"{out}: {MANIFEST} is not a table manifest (needs 'files' and 'rows')")
    return manifest


def published_files(out: str, storage: StorageConfig | None = None) -> list[str]:
    """The URIs of the files the manifest at ``out`` lists (e.g. for ``ray.data.read_parquet``)."""
    manifest = read_manifest(out, storage)
    if manifest is None:
        raise InputError(f"no published table at {out} (no {MANIFEST} manifest)")
    return [ujoin(out, f) for f in manifest["files"]]


def read_table(out: str, storage: StorageConfig | None = None, columns: list[str] | None = None) -> pa.Table:
    """Reads exactly the files that ``out``'s manifest lists, as one table.

    If a listed file vanishes mid-read because a new table was published meanwhile, the
    manifest is read again and the read retried. A published empty table with no files reads
    as a table with no columns.
    """
    fs, path = filesystem(out, storage)
    s3 = is_s3(out)
    last_run = object()
    for _attempt in range(4):
        manifest = _read_manifest(fs, out)
        if manifest is None:
            raise InputError(f"no published table at {out} (no {MANIFEST} manifest)")
        if manifest.get("run_id") == last_run:
            break  # same table as last attempt: the file really is missing
        last_run = manifest.get("run_id")
        try:
            tables = [
                _call(out, lambda f=f: _read_parquet(fs, _join(s3, path, f), columns))
                for f in manifest["files"]
            ]
        except FileNotFoundError:
            fs.invalidate_cache()
            continue
        except (pa.ArrowInvalid, KeyError) as e:
            raise InputError(f"{out}: cannot read published Parquet: {e}") from e
        if not tables:
            return pa.table({})
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
        if table.num_rows != manifest["rows"]:
            raise InputError(f"{out}: manifest says {manifest['rows']} rows but its files hold {table.num_rows}")
        return table
    raise InputError(f"{out}: a file listed in {MANIFEST} (run {last_run}) is missing")


# --------------------------------------------------------------------------- publish


def _staged_files(fs, stg_path: str) -> list[str]:
    """Staged Parquet files, as paths relative to the staging dir, sorted."""
    if not fs.exists(stg_path):
        return []
    files = []
    for p in fs.find(stg_path):
        rel = _rel(stg_path, p)
        if p.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in rel.split("/")):
            files.append(rel)
    return sorted(files)


def _plan(
    out: str,
    staging: str,
    storage: StorageConfig | None,
    verify: Callable[[pa.Table], None] | None,
    run_id: str | None,
    allow_empty: bool,
    fs=None,
) -> dict:
    """Step (a): checks the staged files and records which file gets which name.

    Returns the plan; resumes the one a crashed ``publish`` left in the staging dir.
    """
    fs = _fs(out, storage, fs)
    out_path, stg_path = _fspath(out), _fspath(staging)
    s3 = is_s3(out)
    if is_s3(staging) != s3:
        raise InputError(f"staging {staging} and output {out} must be on the same storage")
    run_id = _check_run_id(run_id or posixpath.basename(stg_path.rstrip("/")))
    if stg_path != _join(s3, out_path, STAGING, run_id):
        raise InputError(f"staging dir must be staging_dir(out, run_id) = {staging_dir(out, run_id)}, got {staging}")

    plan_path = _join(s3, stg_path, PLAN)
    try:
        plan = json.loads(_call(staging, lambda: fs.cat_file(plan_path)))
        log.warning("resuming the interrupted publish of run %s into %s", run_id, out)
        return plan
    except FileNotFoundError:
        pass

    current = _read_manifest(fs, out)
    if current is not None and current.get("run_id") == run_id:
        raise InputError(f"{out}: run {run_id} is already published; give each run its own run_id")
    files = _call(staging, lambda: _staged_files(fs, stg_path))
    if not files and not allow_empty:
        raise InputError(f"{staging}: no Parquet files staged; refusing to publish an empty table")
    rows = 0
    for f in files:
        try:
            rows += _call(staging, lambda f=f: _num_rows(fs, _join(s3, stg_path, f)))
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{_join(s3, staging, f)}: not a readable Parquet file: {e}") from e
    if rows == 0 and not allow_empty:
        raise InputError(f"{staging}: staged files hold 0 rows; refusing to publish an empty table")
    if verify is not None:
        tables = [_read_parquet(fs, _join(s3, stg_path, f)) for f in files]
        table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
        try:
            verify(table)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{staging}: staged table failed verification: {type(e).__name__}: {e}") from e
    moves = [[f, f"part-{run_id}-{i:05d}.parquet"] for i, f in enumerate(files)]
    plan = {"run_id": run_id, "rows": rows, "moves": moves}
    _write_json(fs, ujoin(staging, PLAN), plan, storage)
    return plan


def _move(out: str, staging: str, plan: dict, storage: StorageConfig | None, fs=None) -> None:
    """Step (b): moves the staged files to their final names (idempotent, so resumable)."""
    fs = _fs(out, storage, fs)
    out_path, stg_path = _fspath(out), _fspath(staging)
    s3 = is_s3(out)
    for src, dst in plan["moves"]:
        src_path, dst_path = _join(s3, stg_path, src), _join(s3, out_path, dst)
        if s3:
            if _call(out, lambda: fs.exists(src_path)):
                _call(out, lambda: fs.mv(src_path, dst_path))
            elif not fs.exists(dst_path):
                raise InputError(f"{staging}: staged file {src} is gone and was not moved to {dst}")
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
                raise InputError(f"{staging}: staged file {src} is gone and was not moved to {dst}") from None
    if not s3:
        _fsync_dir(out_path)


def _commit(out: str, plan: dict, manifest_extra: dict, storage: StorageConfig | None, fs=None) -> dict:
    """Step (c): writes the manifest, atomically. After this the new table is what readers see."""
    manifest = {
        **manifest_extra,
        "files": [dst for _, dst in plan["moves"]],
        "rows": plan["rows"],
        "run_id": plan["run_id"],
        "published_at": _now(),
    }
    s3 = is_s3(out)
    _write_json(_fs(out, storage, fs), ujoin(out, MANIFEST), manifest, storage)
    if not s3:
        _fsync_dir(_fspath(out))
    return manifest


def _cleanup(out: str, manifest: dict, storage: StorageConfig | None, fs=None) -> list[str]:
    """Step (d): deletes unlisted data files and every staging dir. Returns what it deleted.

    The table is committed already, so a failure here is logged, not raised: the next
    successful publish cleans up again.
    """
    fs, out_path = _fs(out, storage, fs), _fspath(out)
    s3 = is_s3(out)
    keep = set(manifest["files"])
    deleted: list[str] = []
    try:
        fs.invalidate_cache()
        for p in fs.ls(out_path, detail=False):
            name = posixpath.basename(p.rstrip("/"))
            stale_tmp = name.startswith(f"{MANIFEST}.tmp-")  # from a crashed local write_json
            if (_PART.match(name) and name not in keep) or stale_tmp:
                if s3:
                    fs.rm_file(p)
                else:
                    os.unlink(p)
                deleted.append(name)
        stg_root = _join(s3, out_path, STAGING)
        if fs.exists(stg_root):
            if s3:
                fs.rm(stg_root, recursive=True)
            else:
                shutil.rmtree(stg_root)
            deleted.append(STAGING)
    except Exception as e:  # noqa: BLE001 - committed; leftovers are only clutter
        log.warning("published %s, but cleaning up old files failed (next publish retries): %s", out, e)
    return deleted


def publish(
    out: str,
    staging: str,
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
    ``allow_empty``. The caller must hold ``lock`` for ``out``: publish deletes other runs'
    staging dirs. See the module docstring for the steps and what a crash leaves.

    If a previous ``publish`` of the same staging dir crashed, this resumes its recorded plan
    (``verify`` is not run again: it ran before the plan was recorded). ``verify`` reads the
    whole staged table into memory; for big tables verify in the job and pass ``None``.
    """
    manifest_extra = dict(manifest_extra or {})
    clash = RESERVED_KEYS & manifest_extra.keys()
    if clash:
        raise InputError(f"{out}: manifest_extra may not set {sorted(clash)}")
    fs = filesystem(out, storage)[0]
    plan = _plan(out, staging, storage, verify, run_id, allow_empty, fs)
    current = _read_manifest(fs, out)
    if current is not None and current.get("run_id") == plan["run_id"]:
        manifest = current  # a crash after the commit: only the cleanup is left to do
    else:
        _move(out, staging, plan, storage, fs)
        manifest = _commit(out, plan, manifest_extra, storage, fs)
    deleted = _cleanup(out, manifest, storage, fs)
    log.info("published %s: %d rows in %d files (run %s); removed %s", out, manifest["rows"], len(manifest["files"]), manifest["run_id"], deleted)
    return manifest


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- latest pointer


def write_latest(root: str, value: str, storage: StorageConfig | None = None, *, require_published: bool = True) -> dict:
    """Atomically points ``<root>/latest`` at the table ``<root>/<value>`` (e.g. ``"dt=2026-11-24"``).

    The pointer is ``{"path": value, "date": "2026-11-24" or None, "run_id", "updated_at"}``;
    ``date`` comes from a ``dt=YYYY-MM-DD`` component of ``value``. With ``require_published``
    (the default) the target must have a manifest. Returns the pointer.
    """
    value = value.strip("/")
    if not value or value.startswith(".") or ".." in value.split("/") or "://" in value:
        raise InputError(f"{root}: latest must name a directory relative to the root, got {value!r}")
    target = ujoin(root, value)
    fs = filesystem(root, storage)[0]
    manifest = _read_manifest(fs, target)
    if require_published and manifest is None:
        raise InputError(f"cannot point {root}/{LATEST} at {target}: no published table there (no {MANIFEST} manifest)")
    m = _DATE.search(value)
    pointer = {
        "path": value,
        "date": m.group(1) if m else None,
        "run_id": manifest.get("run_id") if manifest else None,
        "updated_at": _now(),
    }
    _write_json(fs, ujoin(root, LATEST), pointer, storage)
    return pointer


def read_latest(root: str, storage: StorageConfig | None = None) -> dict | None:
    """The ``latest`` pointer under ``root``, or ``None`` if there is none."""
    fs, path = filesystem(root, storage)
    pointer = _read_json(fs, root, _join(is_s3(root), path, LATEST), f"{root}/{LATEST}: corrupt pointer")
    if pointer is _ABSENT:
        return None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("path"), str):
        raise InputError(f"{root}/{LATEST}: not a latest pointer (needs 'path')")
    return pointer


# --------------------------------------------------------------------------- lock


@contextmanager
def lock(
    uri: str, owner: str, storage: StorageConfig | None = None, stale_after_s: float = 6 * 3600
) -> Iterator[dict]:
    """Holds the lock ``uri`` (e.g. ``<root>/_locks/dt=2026-11-24.lock``) for the ``with`` block.

    Yields the lock's content (``owner``, ``token``, ``acquired_at``, ``host``, ``pid``). Raises
    ``LockHeld`` if another owner holds it and it is younger than ``stale_after_s``; an older
    one is taken over. The lock is deleted on exit (if it is still ours), exception or not.
    Not re-entrant: the same owner acquiring it twice gets ``LockHeld`` too.
    """
    if not owner:
        raise InputError(f"{uri}: lock owner must be a non-empty string")
    payload = {
        "owner": owner,
        "token": uuid.uuid4().hex,
        "acquired_at": _now(),
        "acquired_at_epoch": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    if is_s3(uri):
        handle = _S3Lock(uri, storage, payload, stale_after_s)
    else:
        handle = _LocalLock(uri, payload, stale_after_s)
    handle.acquire()
    try:
        yield payload
    finally:
        try:
            handle.release()
        except Exception as e:  # noqa: BLE001 - don't hide the block's own error or outcome
            log.warning("%s: could not release the lock (%s: %s); delete it by hand or wait %.0f s", uri, type(e).__name__, e, stale_after_s)


def _parse_lock(data: bytes | None) -> dict | None:
    try:
        obj = json.loads(data) if data else None
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _age(held: dict | None, fallback_epoch: float) -> float:
    """Seconds since the lock was taken: from its content, else from the storage's mtime."""
    started = held.get("acquired_at_epoch") if held else None
    if not isinstance(started, (int, float)):
        started = fallback_epoch
    return max(0.0, time.time() - started)


def _holder_gone(held: dict | None) -> bool:
    """True when the lock was taken on this host by a process that no longer runs (a killed
    run): such a lock is stale whatever its age."""
    if not held or held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _held_error(uri: str, held: dict | None, age: float) -> LockHeld:
    holder = str(held.get("owner", "?")) if held else "unknown (unreadable lock file)"
    since = str(held.get("acquired_at", "?")) if held else "?"
    return LockHeld(uri, holder, since, age)


class _LocalLock:
    def __init__(self, uri: str, payload: dict, stale_after_s: float):
        self.uri = uri
        self.path = _fspath(uri)
        self.payload = payload
        self.stale_after_s = stale_after_s

    def _read(self, path: str) -> tuple[dict | None, os.stat_result] | None:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                return _parse_lock(f.read()), st
        except FileNotFoundError:
            return None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        data = json.dumps(self.payload, indent=2).encode()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                seen = self._read(self.path)
                if seen is None:
                    continue  # released meanwhile: try again
                held, st = seen
                age = _age(held, st.st_mtime)
                if age < self.stale_after_s and not _holder_gone(held):
                    raise _held_error(self.uri, held, age) from None
                self._take_over(held, st, age)
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(os.path.dirname(self.path))
            return
        raise InputError(f"{self.uri}: could not take the lock (it keeps changing hands)")

    def _take_over(self, held: dict | None, st: os.stat_result, age: float) -> None:
        """Moves the stale lock out of the way, making sure it is the one we judged stale."""
        grave = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        moved = self._read(grave)
        if moved is not None and (moved[1].st_ino, moved[1].st_mtime_ns) != (st.st_ino, st.st_mtime_ns):
            # someone else took the stale lock over first and we moved *their* fresh lock: put it back
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
            os.unlink(grave)
            raise _held_error(self.uri, moved[0], _age(moved[0], moved[1].st_mtime))
        os.unlink(grave)
        log.warning("%s: took over a stale lock of %r (%.0f s old)", self.uri, held and held.get("owner"), age)

    def release(self) -> None:
        seen = self._read(self.path)
        if seen is None or not seen[0] or seen[0].get("token") != self.payload["token"]:
            log.warning("%s: lock is no longer ours at release (taken over as stale?); leaving it", self.uri)
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _S3Lock:
    def __init__(self, uri: str, storage: StorageConfig | None, payload: dict, stale_after_s: float):
        self.uri = uri
        self.fs, self.path = filesystem(uri, storage)
        self.bucket, self.key, _ = self.fs.split_path(self.path)
        self.payload = payload
        self.stale_after_s = stale_after_s
        self.etag: str | None = None

    def _s3(self, op: str, **kwargs):
        from fsspec.asyn import sync

        return _call(self.uri, lambda: sync(self.fs.loop, self.fs._call_s3, op, Bucket=self.bucket, Key=self.key, **kwargs))

    def _get(self) -> tuple[dict | None, str, float] | None:
        """(content, ETag, last-modified epoch) of the lock object, or None if there is none."""
        try:
            r = self._s3("get_object")
        except FileNotFoundError:
            return None
        from fsspec.asyn import sync

        body = sync(self.fs.loop, r["Body"].read)
        r["Body"].close()
        return _parse_lock(body), r["ETag"], r["LastModified"].timestamp()

    def _put(self, data: bytes, **cond) -> str:
        return self._s3("put_object", Body=data, ContentType="application/json", **cond)["ETag"]

    def acquire(self) -> None:
        data = json.dumps(self.payload, indent=2).encode()
        for _ in range(5):
            # Look first even though the PUT below is conditional: a server that silently ignored
            # If-None-Match would otherwise overwrite a live lock; this way it degrades to
            # check-then-put with a one-round-trip race window.
            seen = self._get()
            if seen is None:
                try:
                    etag = self._put(data, IfNoneMatch="*") if S3_CONDITIONAL_WRITES else self._put(data)
                except FileExistsError:
                    continue  # another run created it first: look at who holds it
                except OSError as e:
                    if not _not_implemented(e):
                        raise
                    log.warning("%s: server does not support conditional PUT; using check-then-put", self.uri)
                    etag = self._put(data)
                if self._still_ours():
                    self.etag = etag
                    return
                continue
            held, held_etag, mtime = seen
            age = _age(held, mtime)
            if age < self.stale_after_s and not _holder_gone(held):
                raise _held_error(self.uri, held, age)
            try:
                # replace exactly the object we judged stale; a concurrent taker makes this fail
                etag = self._put(data, IfMatch=held_etag)
            except FileNotFoundError:
                continue
            except OSError as e:
                if _precondition_failed(e):
                    continue
                if not _not_implemented(e):
                    raise
                etag = self._put(data)
            if self._still_ours():
                log.warning("%s: took over a stale lock of %r (%.0f s old)", self.uri, held and held.get("owner"), age)
                self.etag = etag
                return
        raise InputError(f"{self.uri}: could not take the lock (it keeps changing hands)")

    def _still_ours(self) -> bool:
        seen = self._get()
        return seen is not None and bool(seen[0]) and seen[0].get("token") == self.payload["token"]

    def release(self) -> None:
        try:
            self._s3("delete_object", IfMatch=self.etag)
            return
        except FileNotFoundError:
            log.warning("%s: lock was already gone at release", self.uri)
            return
        except OSError as e:
            if _precondition_failed(e):
                log.warning("%s: lock is no longer ours at release (taken over as stale?); leaving it", self.uri)
                return
            if not _not_implemented(e):
                raise
        if self._still_ours():  # no conditional delete: check, then delete
            self._s3("delete_object")


def _error_code(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    response = getattr(cause, "response", None) or getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _precondition_failed(e: OSError) -> bool:
    return _error_code(e) in ("PreconditionFailed", "412") or (e.errno == errno.EINVAL and "pre-condition" in str(e))


def _not_implemented(e: OSError) -> bool:
    return _error_code(e) in ("NotImplemented", "501") or "NotImplemented" in str(e)
