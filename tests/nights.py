"""Two nights of interactions as dt= partitions, small enough to check by hand, made to exercise
an incremental prepare: ties across files, late events, users who cross the length threshold,
events after the night's date. Used by the prepare tests on disk and on S3."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

DAY_S = 86_400
D1 = 1_700_006_400  # 2023-11-15 00:00:00 UTC
SETTINGS = {"min_rating": 2.0, "min_user_interactions": 3, "max_len": 3}


def write_rows(path, rows):
    """rows: (user, item, timestamp in s or None, rating)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    u, i, t, r = zip(*rows)
    pq.write_table(pa.table({"user_id": pa.array(u, pa.int64()), "item_id": pa.array(i, pa.int64()), "timestamp": pa.array(t, pa.int64()), "rating": pa.array(r, pa.float64())}), path)


def write_night1(src):
    # user 1: a tie at D1+1 across files (file a before file b), a low rating, long enough to be cut;
    # user 2: short on night 1; user 3: a null time; user 4: an event after the night's date
    write_rows(src / "dt=2023-11-15" / "a.parquet", [(1, 10, D1 + 1, 5), (1, 20, D1 + 1, 4), (2, 10, D1 + 5, 3), (3, 30, None, 5), (3, 31, D1 + 2, 5), (1, 99, D1 + 3, 1)])
    write_rows(src / "dt=2023-11-15" / "b.parquet", [(1, 30, D1 + 1, 3), (1, 40, D1 + 2, 3), (3, 32, D1 + 3, 5), (3, 33, D1 + 4, 5), (4, 50, D1 + 2 * DAY_S, 5), (4, 51, D1 + 10, 5)])


def write_night2(src):
    # late events (before night 1's date), a tie with a night-1 event, user 2 crosses the
    # threshold, user 1 is cut again, user 4's event of the future now counts, a new user 5
    write_rows(src / "dt=2023-11-16" / "a.parquet", [(1, 60, D1 + 1, 5), (2, 11, D1 + 1, 3), (2, 12, D1 + DAY_S, 3), (1, 70, D1 + DAY_S + 5, 4), (4, 52, D1 + 11, 5), (5, 1, D1 + DAY_S, 5)])
    write_rows(src / "dt=2023-11-16" / "b.parquet", [(5, 2, D1 + DAY_S + 1, 5), (5, 3, D1 + DAY_S + 1, 5), (3, 34, D1 + DAY_S, 1)])
    # after night 2's date: a partition never read, and rows past the date inside one that is
    write_rows(src / "dt=2023-11-17" / "a.parquet", [(1, 80, D1 + 2 * DAY_S, 5)])
