"""Retention of the nightly work directories: which ``<work>/dt=*`` to delete, and deleting them.

Each night leaves ``<work>/dt=D/`` (the prepared data and the training run, checkpoints with
optimizer state included), which nothing reads once a newer night has published. After a
successful night the nightly run keeps the newest ``keep_nights`` of them and deletes the rest,
except:

* the current night's (never deleted by its own run, even when it is a backfill of an old date);
* the one whose model ``latest`` serves (its manifest's ``checkpoint`` lies under
  ``<work>/dt=X/``): the next night warm-starts from it;
* any night whose date lock ``<out>/_locks/dt=X.lock`` exists: a run of that date is in progress.

Only directories whose names parse as ``dt=YYYY-MM-DD`` are candidates; anything else under
``<work>`` is left alone. The choice is the pure ``work_to_prune``; ``prune_work`` lists and
deletes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable

from bert4rec.io import Location, fs_path, is_s3
from bert4rec.latest import partition_date

log = logging.getLogger(__name__)


def work_to_prune(names: Iterable[str], keep_nights: int, current: str, protected: Collection[str] = ()) -> list[str]:
    """The work directory names to delete, oldest first: every ``dt=YYYY-MM-DD`` name beyond the
    newest ``keep_nights``, except ``current`` and the ``protected`` ones."""
    dated = sorted(((day, name) for name in names if (day := partition_date(name)) is not None), reverse=True)
    newest = {name for _, name in dated[:keep_nights]}
    return sorted(name for _, name in dated if name not in newest and name != current and name not in protected)


def night_of(uri: str | None, work_root: Location) -> str | None:
    """The ``dt=YYYY-MM-DD`` directory of ``work_root`` that ``uri`` (a checkpoint URI read
    from a manifest) lies in, or None when it lies elsewhere."""
    if not isinstance(uri, str) or not uri or is_s3(uri) != work_root.s3:
        return None
    path, root = fs_path(uri), work_root.path.rstrip("/")
    sep = "/" if work_root.s3 else os.sep
    if not path.startswith(root + sep):
        return None
    first = path[len(root) + 1 :].split(sep, 1)[0]
    return first if partition_date(first) is not None else None


def running_nights(locks: Location) -> set[str]:
    """The dates (``dt=YYYY-MM-DD``) whose lock file exists under ``locks``."""
    names = (e["name"] for e in locks.children())
    return {n[: -len(".lock")] for n in names if n.endswith(".lock") and partition_date(n[: -len(".lock")]) is not None}


def prune_work(work_root: Location, keep_nights: int, current: str, protected: Collection[str] = ()) -> list[str]:
    """Deletes the work directories ``work_to_prune`` picks; returns their names."""
    names = [e["name"] for e in work_root.children() if e["type"] == "directory"]
    doomed = work_to_prune(names, keep_nights, current, protected)
    for name in doomed:
        target = work_root.join(name)
        log.info("retention: deleting %s (keeping the newest %d nights)", target.uri, keep_nights)
        work_root.call(lambda: work_root.fs.rm(target.path, recursive=True))
    return doomed
