"""Scoring's one-row-per-user checks at growing sizes: on the driver against on the cluster.

    .venv/bin/python benchmarks/user_check.py                                # 1M, 4M and 10M users
    .venv/bin/python benchmarks/user_check.py --users 100000 --workdir /tmp/b4r-uc   # a smoke run

Per size it writes histories of ``--users`` users (user_id and a one-item list, in files of
50,000 users as ``prepare`` writes them) and a staged output with the same users in another
order (user_id, fallback, unknown_items, files of 100,000 rows as scoring writes them), then
times, in this process (the driver) on one local Ray:

  driver   ``score.check_histories`` with no size limit: the driver reads and sorts every
           input user id (the check that ``score`` makes up to ``DRIVER_CHECK_MAX_USERS``
           users; the output side, which it also reads, is not included)
  cluster  ``score.check_users_on_cluster`` of input and output: a Ray Data hash shuffle on
           user_id, one row of counts per partition back on the driver

and, for a per-user ``--exclude`` table of ``--exclusions-per-user`` rows a user (item ids
1..1000, files of 1M rows):

  exclude driver   ``score.read_exclusions`` with no size limit, then ``to_tokens``: the driver
                   reads every (user, item) pair, maps it to tokens and sorts it (what ``score`` does up to ``DRIVER_EXCLUDE_MAX_ROWS``
                   rows)
  exclude cluster  ``score.join_exclusions_on_cluster`` of the histories and that table,
                   consumed by a count of rows and joined ids: the Ray Data hash shuffle
                   that ``score`` runs above it

and prints the wall time and the driver's peak RSS above its level before the check
(VmHWM, reset before each check). Linux only for the memory figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from _proc import peak_rss_mib, reset_peak_rss  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", default="1000000,4000000,10000000", help="comma-separated sizes")
    p.add_argument("--workdir", default="/tmp/b4r-user-check")
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--object-store-gb", type=float, default=2.0)
    p.add_argument("--exclusions-per-user", type=int, default=2, help="rows of the per-user --exclude table per user (0: skip)")
    return p.parse_args(argv)


def write_tables(root: str, users: int) -> tuple[str, str]:
    """Histories and a staged output of ``users`` users (ids spread over 0..4 x users)."""
    rng = np.random.default_rng(users)
    ids = np.sort(rng.choice(4 * users, size=users, replace=False)).astype(np.int64)
    hist, staged = os.path.join(root, "histories"), os.path.join(root, "staged")
    os.makedirs(hist)
    os.makedirs(staged)
    for i, start in enumerate(range(0, users, 50_000)):
        part = ids[start : start + 50_000]
        items = pa.ListArray.from_arrays(pa.array(np.arange(len(part) + 1, dtype=np.int32)), pa.array(np.ones(len(part), np.int64)))
        pq.write_table(pa.table({"user_id": part, "item_ids": items}), os.path.join(hist, f"part-{i:05d}.parquet"))
    shuffled = rng.permutation(ids)
    for i, start in enumerate(range(0, users, 100_000)):
        part = shuffled[start : start + 100_000]
        pq.write_table(
            pa.table({"user_id": part, "fallback": np.zeros(len(part), bool), "unknown_items": np.zeros(len(part), np.int64)}),
            os.path.join(staged, f"part-{i:05d}.parquet"),
        )
    return hist, staged


def write_exclusions(root: str, hist: str, per_user: int) -> str:
    """A per-user --exclude table: ``per_user`` random items (1..1000) for every user of ``hist``."""
    ex = os.path.join(root, "exclude")
    os.makedirs(ex)
    ids = pq.read_table(hist, columns=["user_id"])["user_id"].to_numpy()
    rng = np.random.default_rng(len(ids))
    users = np.repeat(ids, per_user)
    items = rng.integers(1, 1001, size=len(users))
    for i, start in enumerate(range(0, len(users), 1_000_000)):
        pq.write_table(pa.table({"user_id": users[start : start + 1_000_000], "item_id": items[start : start + 1_000_000]}), os.path.join(ex, f"part-{i:05d}.parquet"))
    return ex


def joined_counts(hist: str, ex: str, storage, users: int) -> tuple[int, int]:
    """(rows, joined exclusion ids) of score's cluster join, summed from one row per block."""
    import pyarrow.compute as pc
    import ray.data

    from bert4rec.io import parquet_files, parquet_schema
    from bert4rec.score import EXCLUDED_COLUMN, join_exclusions_on_cluster

    ds = ray.data.read_parquet(hist, file_extensions=["parquet"])
    joined = join_exclusions_on_cluster(ds, ex, parquet_files(ex, storage), storage, parquet_schema(hist, storage), users)

    def count(b: pa.Table) -> pa.Table:
        return pa.table({"rows": [b.num_rows], "ids": [int(pc.sum(pc.list_value_length(b[EXCLUDED_COLUMN])).as_py() or 0)]})

    t = pa.concat_tables(ray.get(joined.map_batches(count, batch_size=None, batch_format="pyarrow").to_arrow_refs()))
    return int(pc.sum(t["rows"]).as_py()), int(pc.sum(t["ids"]).as_py())


def measure(fn) -> tuple[float, float, object]:
    base = reset_peak_rss()
    t = time.time()
    result = fn()
    return time.time() - t, peak_rss_mib() - base, result


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import ray

    from bert4rec import console
    from bert4rec.config import StorageConfig
    from bert4rec.score import check_histories, check_users_on_cluster, read_exclusions

    ray.init(
        address="local", num_cpus=args.cpus, num_gpus=0, object_store_memory=int(args.object_store_gb * 1024**3),
        include_dashboard=False, logging_level="WARNING", log_to_driver=False,
    )
    console.quiet_ray_data(False)
    storage = StorageConfig()
    print(f"# {args.cpus} CPUs, object store {args.object_store_gb:g} GiB; time in s, driver peak above its start in MiB", flush=True)
    print(
        f"{'users':>11} {'driver s':>9} {'driver MiB':>11} {'cluster s':>10} {'cluster MiB':>12}"
        f" | {'exclude rows':>12} {'driver s':>9} {'driver MiB':>11} {'cluster s':>10} {'cluster MiB':>12}",
        flush=True,
    )
    rows = []
    for users in (int(u) for u in args.users.split(",")):
        root = os.path.join(args.workdir, str(users))
        shutil.rmtree(root, ignore_errors=True)
        hist, staged = write_tables(root, users)
        d_s, d_mib, checked = measure(lambda: check_histories(hist, storage, max_driver_users=users))
        c_s, c_mib, found = measure(lambda: check_users_on_cluster(hist, storage, users, staged))
        assert checked.users == users and len(checked.ids) == users
        expected = {"input_rows": users, "output_rows": users, "null_users": 0, "duplicated": 0, "missing": 0, "extra": 0}
        assert {k: found[k] for k in expected} == expected, found
        row = {"users": users, "driver_s": d_s, "driver_mib": d_mib, "cluster_s": c_s, "cluster_mib": c_mib}
        line = f"{users:>11,} {d_s:>9.2f} {d_mib:>11.0f} {c_s:>10.2f} {c_mib:>12.0f}"
        if args.exclusions_per_user:
            ex = write_exclusions(root, hist, args.exclusions_per_user)
            n = users * args.exclusions_per_user
            vocab_ids = np.arange(1, 1001, dtype=np.int64)
            xd_s, xd_mib, read = measure(lambda: read_exclusions(ex, storage, max_driver_rows=n).to_tokens(vocab_ids))
            xc_s, xc_mib, counts = measure(lambda: joined_counts(hist, ex, storage, users))
            assert len(read.users) == n and counts == (users, n), (len(read.users), counts)
            del read
            row.update(exclude_rows=n, exclude_driver_s=xd_s, exclude_driver_mib=xd_mib, exclude_cluster_s=xc_s, exclude_cluster_mib=xc_mib)
            line += f" | {n:>12,} {xd_s:>9.2f} {xd_mib:>11.0f} {xc_s:>10.2f} {xc_mib:>12.0f}"
        print(line, flush=True)
        rows.append(row)
        shutil.rmtree(root, ignore_errors=True)
    ray.shutdown()
    return rows


if __name__ == "__main__":
    main()
