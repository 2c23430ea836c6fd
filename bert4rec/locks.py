"""Locks: one writer at a time per output, on local disk or S3.

``with lock(ROOT + "/_locks/dt=2026-11-24.lock", owner="score run 1234"):`` creates the lock
object with exclusive-create semantics, so two runs for the same output never interleave:

* local (``LocalLock``): ``os.open(path, O_CREAT | O_EXCL | O_WRONLY)``;
* S3 (``S3Lock``): a GET to see whether it exists, then a conditional PUT (``If-None-Match: *``,
  honoured by AWS S3 since 2024 and by moto; other S3-compatible servers vary), so that of
  racing writers exactly one succeeds and the others get 412; then a read-back to check that it
  holds our token. On a server that rejects the condition with ``NotImplemented`` (or silently
  ignores it) this degrades to a best-effort check-then-PUT + read-back: two writers racing
  within one round trip could then both believe they hold the lock.

A lock held by someone else raises ``LockHeld`` naming the holder and since when, unless it is
older than ``stale_after_s`` (default 6 h, by the ``acquired_at_epoch`` written in it, else the
file's modification time), or was taken on this host by a process that is gone (a killed run):
then it is taken over (local: rename the stale file away and check it was the one we judged
stale; S3: PUT with ``If-Match: <stale ETag>``). The lock is released (deleted, only if it is
still ours: S3 uses ``DeleteObject`` with ``If-Match: <our ETag>``) when the block exits,
exception or not. There is no heartbeat: choose ``stale_after_s`` longer than the longest run.

Errors meant for the user are ``bert4rec.io.InputError`` or ``LockHeld``, one line, naming the
path.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import socket
import time
import uuid

from bert4rec.config import StorageConfig
from bert4rec.io import fsync_dir, InputError, Location, locate

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER_S = 6 * 3600


class LockHeld(RuntimeError):
    """The lock is held by another, live (not stale) owner."""

    def __init__(self, uri: str, holder: str, since: str, age_s: float | None = None):
        self.uri, self.holder, self.since, self.age_s = uri, holder, since, age_s
        age = f", {age_s / 60:.0f} min ago" if age_s is not None else ""
        super().__init__(
            f"{uri} is locked by {holder!r} since {since}{age}; "
            "if that run is dead, wait for the lock to go stale or delete the lock file"
        )


def lock(
    target: str | Location, owner: str, storage: StorageConfig | None = None, stale_after_s: float = DEFAULT_STALE_AFTER_S
) -> "LocalLock | S3Lock":
    """The lock ``target`` (e.g. ``<root>/_locks/dt=2026-11-24.lock``), to hold in a ``with`` block.

    Entering yields the lock's content (``owner``, ``token``, ``acquired_at``, ``host``,
    ``pid``) and raises ``LockHeld`` if another owner holds it and it is younger than
    ``stale_after_s``; an older one is taken over. The lock is deleted on exit (if it is still
    ours), exception or not. Not re-entrant: the same owner acquiring it twice gets ``LockHeld``
    too.
    """
    loc = locate(target, storage)
    return (S3Lock if loc.s3 else LocalLock)(loc, owner, stale_after_s)


def _payload(uri: str, owner: str) -> dict:
    if not owner:
        raise InputError(f"{uri}: lock owner must be a non-empty string")
    return {
        "owner": owner,
        "token": uuid.uuid4().hex,
        "acquired_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "acquired_at_epoch": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _release_quietly(handle: "LocalLock | S3Lock") -> None:
    try:
        handle.release()
    except Exception as e:  # noqa: BLE001 - don't hide the block's own error or outcome
        log.warning(
            "%s: could not release the lock (%s: %s); delete it by hand or wait %.0f s",
            handle.uri, type(e).__name__, e, handle.stale_after_s,
        )


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


class LocalLock:
    """A lock file on local disk, created with ``O_EXCL``."""

    def __init__(self, loc: Location, owner: str, stale_after_s: float = DEFAULT_STALE_AFTER_S):
        self.uri = loc.uri
        self.path = loc.path
        self.payload = _payload(loc.uri, owner)
        self.stale_after_s = stale_after_s

    def __enter__(self) -> dict:
        self.acquire()
        return self.payload

    def __exit__(self, *exc) -> None:
        _release_quietly(self)

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
            fsync_dir(os.path.dirname(self.path))
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


class S3Lock:
    """A lock object on S3, created with a conditional PUT (``create``)."""

    def __init__(self, loc: Location, owner: str, stale_after_s: float = DEFAULT_STALE_AFTER_S):
        self.loc = loc
        self.uri = loc.uri
        self.fs = loc.fs
        self.bucket, self.key, _ = self.fs.split_path(loc.path)
        self.payload = _payload(loc.uri, owner)
        self.stale_after_s = stale_after_s
        self.etag: str | None = None

    def __enter__(self) -> dict:
        self.acquire()
        return self.payload

    def __exit__(self, *exc) -> None:
        _release_quietly(self)

    def _s3(self, op: str, **kwargs):
        from fsspec.asyn import sync

        return self.loc.call(lambda: sync(self.fs.loop, self.fs._call_s3, op, Bucket=self.bucket, Key=self.key, **kwargs))

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

    def put(self, data: bytes, **cond) -> str:
        """PUTs the lock object (with S3 conditions such as ``IfMatch``); returns its ETag."""
        return self._s3("put_object", Body=data, ContentType="application/json", **cond)["ETag"]

    def create(self, data: bytes) -> str:
        """PUTs the lock object only if there is none (``If-None-Match: *``); returns its ETag.

        Raises ``FileExistsError`` when another run created it first. The tests override this
        with a plain PUT to exercise the check-then-put path servers without the condition get.
        """
        return self.put(data, IfNoneMatch="*")

    def acquire(self) -> None:
        data = json.dumps(self.payload, indent=2).encode()
        for _ in range(5):
            # Look first even though the PUT below is conditional: a server that silently ignored
            # If-None-Match would otherwise overwrite a live lock; this way it degrades to
            # check-then-put with a one-round-trip race window.
            seen = self._get()
            if seen is None:
                try:
                    etag = self.create(data)
                except FileExistsError:
                    continue  # another run created it first: look at who holds it
                except OSError as e:
                    if not _not_implemented(e):
                        raise
                    log.warning("%s: server does not support conditional PUT; using check-then-put", self.uri)
                    etag = self.put(data)
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
                etag = self.put(data, IfMatch=held_etag)
            except FileNotFoundError:
                continue
            except OSError as e:
                if _precondition_failed(e):
                    continue
                if not _not_implemented(e):
                    raise
                etag = self.put(data)
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
