"""Locks on the local filesystem: exclusive, released, stale ones taken over, races."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from bert4rec.io import locate
from bert4rec.locks import LocalLock, LockHeld, lock


def test_lock_is_exclusive_and_released(tmp_path):
    uri = str(tmp_path / "_locks" / "dt=2026-11-24.lock")
    with lock(uri, "run-A") as held:
        assert held["owner"] == "run-A"
        assert json.loads(Path(uri).read_text())["token"] == held["token"]
        with pytest.raises(LockHeld) as e:
            with lock(uri, "run-B"):
                pass
        assert e.value.holder == "run-A"
        assert e.value.since == held["acquired_at"]
        assert str(e.value).startswith(f"{uri} is locked by 'run-A' since {held['acquired_at']}")
        assert isinstance(e.value, RuntimeError)
        with pytest.raises(LockHeld):  # not re-entrant either
            with lock(uri, "run-A"):
                pass
    assert not os.path.exists(uri)
    with lock(uri, "run-B"):
        pass
    assert os.listdir(tmp_path / "_locks") == []


def test_lock_released_after_exception(tmp_path):
    uri = str(tmp_path / "_locks" / "x.lock")
    with pytest.raises(ZeroDivisionError):
        with lock(uri, "run-A"):
            1 / 0
    assert not os.path.exists(uri)
    with lock(uri, "run-B") as held:
        assert held["owner"] == "run-B"


def test_stale_lock_is_taken_over(tmp_path):
    uri = str(tmp_path / "_locks" / "x.lock")
    os.makedirs(tmp_path / "_locks")
    old = {"owner": "dead-run", "token": "t0", "acquired_at": "2026-11-23T00:00:00+00:00", "acquired_at_epoch": time.time() - 7 * 3600}
    with open(uri, "w") as f:
        json.dump(old, f)
    with lock(uri, "run-B") as held:
        assert json.loads(Path(uri).read_text())["token"] == held["token"]
    assert os.listdir(tmp_path / "_locks") == []

    # the same age is fresh under a longer staleness limit
    with open(uri, "w") as f:
        json.dump(old, f)
    with pytest.raises(LockHeld, match="locked by 'dead-run' since 2026-11-23T00:00:00"):
        with lock(uri, "run-B", stale_after_s=8 * 3600):
            pass


def test_unreadable_lock_file_ages_by_mtime(tmp_path):
    uri = str(tmp_path / "x.lock")
    open(uri, "w").close()  # a run that died between creating the lock and writing it
    with pytest.raises(LockHeld, match="unknown"):
        with lock(uri, "run-B"):
            pass
    os.utime(uri, (time.time() - 7 * 3600,) * 2)
    with lock(uri, "run-B"):
        pass
    assert not os.path.exists(uri)


def test_lock_taken_over_meanwhile_is_not_deleted(tmp_path):
    uri = str(tmp_path / "x.lock")
    with lock(uri, "run-A"):
        with open(uri, "w") as f:  # another run judged us stale and took over
            json.dump({"owner": "run-B", "token": "other"}, f)
    assert json.loads(Path(uri).read_text())["owner"] == "run-B"


def test_lock_race(tmp_path):
    uri = str(tmp_path / "x.lock")
    barrier, won, lost = threading.Barrier(16), [], []

    def contender(i):
        barrier.wait()
        try:
            with lock(uri, f"run-{i}"):
                won.append(i)
                time.sleep(0.2)
        except LockHeld:
            lost.append(i)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 15


def test_lock_takes_a_location(tmp_path):
    loc = locate(str(tmp_path)).join("_locks", "x.lock")
    handle = lock(loc, "run-A")
    assert isinstance(handle, LocalLock)
    with handle as held:
        assert json.loads(Path(loc.path).read_text())["owner"] == held["owner"] == "run-A"
    assert not os.path.exists(loc.path)
