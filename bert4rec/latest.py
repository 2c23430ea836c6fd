"""The ``latest`` pointer: which dated table consumers read, moved only forward.

``ROOT/latest`` is ``{"path": "dt=2026-11-24", "date": "2026-11-24", "run_id": ..., "updated_at": ...}``
(``path`` is a table directory directly under ``ROOT``). It is replaced atomically (local:
temporary file + ``os.replace``; S3: one PUT), so readers see the old pointer or the new one.

``advance_latest(ROOT, "dt=D", owner)`` is what the nightly run calls: it moves ``latest`` to
``dt=D`` only when ``D`` is on or after the date ``latest`` points to, so a backfill of an
older date publishes its own table and leaves ``latest`` alone, and a rerun of the date
``latest`` points to keeps it there (with the new ``run_id``). The read-compare-write runs
under ``ROOT/_locks/latest.lock``, so two nights of different dates finishing together cannot
move it backwards. ``write_latest`` sets the pointer unconditionally: an operator's rollback.

The pointer is read from storage and untrusted: ``read_latest`` refuses one whose ``path`` is
not ``dt=YYYY-MM-DD`` with a one-line ``InputError`` naming the file.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time

from bert4rec.config import StorageConfig
from bert4rec.io import InputError, Location, locate
from bert4rec.locks import LockHeld, lock
from bert4rec.publish import MANIFEST, read_manifest

log = logging.getLogger(__name__)

LATEST = "latest"
# held for the few requests of a read-compare-write; a holder dead for longer is gone
LATEST_LOCK_STALE_S = 300.0
LATEST_LOCK_WAIT_S = 60.0

_PARTITION = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")


def partition_date(name: str) -> dt.date | None:
    """The date of a partition directory name ``dt=YYYY-MM-DD``, or None for any other name
    (including impossible dates such as ``dt=2026-02-30``)."""
    m = _PARTITION.match(name) if isinstance(name, str) else None
    if not m:
        return None
    try:
        return dt.date.fromisoformat(m.group(1))
    except ValueError:
        return None


def _check_partition(value: str, source: str) -> dt.date:
    day = partition_date(value)
    if day is None:
        raise InputError(f"{source}: latest must name a table directory dt=YYYY-MM-DD under the root, got {value!r}")
    return day


def read_latest(root: str | Location, storage: StorageConfig | None = None) -> dict | None:
    """The ``latest`` pointer under ``root``, or ``None`` if there is none. A pointer that is
    not JSON, or whose ``path`` is not ``dt=YYYY-MM-DD``, is an ``InputError``."""
    loc = locate(root, storage).join(LATEST)
    pointer = loc.read_json(default=None)
    if pointer is None:
        return None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("path"), str):
        raise InputError(f"{loc.uri}: not a latest pointer (needs 'path')")
    _check_partition(pointer["path"], loc.uri)
    return pointer


def write_latest(root: str | Location, value: str, storage: StorageConfig | None = None, *, require_published: bool = True) -> dict:
    """Atomically points ``<root>/latest`` at the table ``<root>/<value>`` (``value`` is
    ``dt=YYYY-MM-DD``), whatever it pointed to before: for an operator's rollback. Jobs call
    ``advance_latest``, which never moves it backwards.

    With ``require_published`` (the default) the target must have a manifest. Returns the
    pointer ``{"path", "date", "run_id", "updated_at"}``.
    """
    base = locate(root, storage)
    day = _check_partition(value, base.uri)
    manifest = read_manifest(base.join(value))
    if require_published and manifest is None:
        raise InputError(f"cannot point {base.join(LATEST).uri} at {base.join(value).uri}: no published table there (no {MANIFEST} manifest)")
    pointer = {
        "path": value,
        "date": day.isoformat(),
        "run_id": manifest.get("run_id") if manifest else None,
        "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    base.join(LATEST).write_json(pointer)
    return pointer


def moves_forward(current: dict | None, value: str) -> bool:
    """Whether ``latest`` may move from ``current`` (a checked pointer, or None) to ``value``:
    only to the same date or a later one."""
    return current is None or _check_partition(value, "latest") >= _check_partition(current["path"], "latest")


def advance_latest(root: str | Location, value: str, owner: str, storage: StorageConfig | None = None) -> tuple[bool, dict]:
    """Points ``<root>/latest`` at ``value`` (``dt=YYYY-MM-DD``) unless it points to a later
    date. Returns ``(moved, pointer)``: the new pointer, or the newer one left in place.

    Holds ``<root>/_locks/latest.lock`` while it reads, compares and writes; waits up to
    ``LATEST_LOCK_WAIT_S`` for another run to let go of it.
    """
    base = locate(root, storage)
    deadline = time.monotonic() + LATEST_LOCK_WAIT_S
    while True:
        try:
            with lock(base.join("_locks", "latest.lock"), owner, stale_after_s=LATEST_LOCK_STALE_S):
                current = read_latest(base)
                if not moves_forward(current, value):
                    return False, current
                return True, write_latest(base, value)
        except LockHeld:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
