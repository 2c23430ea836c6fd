"""``bert4rec prepare``: interactions (Parquet, MovieLens ``ratings.dat``/``ratings.csv``)
-> time-ordered histories, the item vocabulary and stats, written under ``--out``:

    <out>/histories/part-00000.parquet   user_id, item_ids (oldest first)[, ratings]
    <out>/vocab.parquet                  item_id, token (1..V), count
    <out>/stats.json                     users, items, interactions, dropped rows and why
"""

from __future__ import annotations

import datetime as dt
import io as _io
import re

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from bert4rec import data
from bert4rec.config import PrepareConfig, StorageConfig
from bert4rec.io import InputError, _call, filesystem, join, parquet_files, read_parquet, write_json, write_parquet

# several files even for mid-sized tables: Ray Data reads a file as one block, so files are
# what lets several scoring actors share the work
USERS_PER_FILE = 50_000
_PARTITION = re.compile(r"dt=(\d{4}-\d{2}-\d{2})")


def read_interactions(uri: str, storage: StorageConfig | None = None, until: dt.date | None = None) -> pa.Table:
    """Reads interactions from Parquet (a file, a directory, or a ``dt=YYYY-MM-DD``
    partitioned directory, of which only partitions up to ``until`` are read), or from
    MovieLens' ``ratings.dat`` (``::``-separated) or ``ratings.csv``."""
    fs, path = filesystem(uri, storage)
    if not _call(uri, lambda: fs.exists(path)):
        raise InputError(f"--interactions {uri}: no such file or directory")
    if path.endswith((".dat", ".csv")):
        raw = fs.cat_file(path)
        if path.endswith(".dat"):
            df = pd.read_csv(_io.BytesIO(raw), sep="::", engine="python", header=None, names=["user_id", "item_id", "rating", "timestamp"])
        else:
            df = pd.read_csv(_io.BytesIO(raw))
        return data.validate_interactions(pa.Table.from_pandas(df, preserve_index=False), uri)
    files = parquet_files(uri, storage)
    if until is not None:
        # date partitions after the run date are not read at all
        files = [f for f in files if not (m := _PARTITION.search(f)) or dt.date.fromisoformat(m.group(1)) <= until]
        if not files:
            raise InputError(f"--interactions {uri}: no partition on or before {until}")
    tables = []
    for f in files:
        src = ("s3://" + f) if uri.startswith("s3") else f
        tables.append(data.validate_interactions(read_parquet(src, storage), src))
    table = pa.concat_tables(tables, promote_options="permissive")
    if until is not None:
        end = int(dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), dt.timezone.utc).timestamp())
        table = table.filter(pc.fill_null(pc.less(table["timestamp"], end), True))
    return table


def prepare(cfg: PrepareConfig) -> dict:
    """Reads, validates and transforms everything first; writes only when all of it succeeded."""
    table = read_interactions(cfg.interactions, cfg.storage, cfg.until)
    histories, stats = data.build_histories(table, cfg.min_rating, cfg.min_user_interactions, cfg.max_len)
    vocab = data.build_vocab(histories)
    stats = {**stats, "source": cfg.interactions, "until": str(cfg.until) if cfg.until else None, "min_rating": cfg.min_rating, "min_user_interactions": cfg.min_user_interactions}

    hist_uri = join(cfg.out, "histories")
    fs, hist_path = filesystem(hist_uri, cfg.storage)
    if fs.exists(hist_path):
        fs.rm(hist_path, recursive=True)
    for i, start in enumerate(range(0, histories.num_rows, USERS_PER_FILE)):
        write_parquet(histories.slice(start, USERS_PER_FILE), join(hist_uri, f"part-{i:05d}.parquet"), cfg.storage)
    write_parquet(vocab, join(cfg.out, "vocab.parquet"), cfg.storage)
    write_json(stats, join(cfg.out, "stats.json"), cfg.storage)
    return {"out": cfg.out, **stats}
