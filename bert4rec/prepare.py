"""``bert4rec prepare``: interactions (Parquet, MovieLens ``ratings.dat``/``ratings.csv``)
-> time-ordered histories, the item vocabulary and stats, written under ``--out``:

    <out>/histories/part-00000.parquet   user_id, item_ids (oldest first)[, ratings]
    <out>/vocab.parquet                  item_id, token (1..V), count
    <out>/stats.json                     users, items, interactions, dropped rows and why
"""

from __future__ import annotations

import csv
import datetime as dt
import re

import pyarrow as pa
import pyarrow.csv as pacsv

from bert4rec import data
from bert4rec.config import PrepareConfig, StorageConfig
from bert4rec.io import InputError, exists, filesystem, join, parquet_files, read_parquet, write_json, write_parquet

# several files even for mid-sized tables: Ray Data reads a file as one block, so files are
# what lets several scoring actors share the work
USERS_PER_FILE = 50_000
_PARTITION = re.compile(r"dt=(\d{4}-\d{2}-\d{2})")
DAT_FIELDS = ("user_id", "item_id", "rating", "timestamp")
_DAT_TYPES = {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
# the integer columns of a ratings.csv, in any of the spellings validate_interactions accepts
_CSV_INT_COLUMNS = ("user_id", "item_id", "timestamp", *data.COLUMN_ALIASES)


def read_interactions(uri: str, storage: StorageConfig | None = None, until: dt.date | None = None, timestamp_unit: str = "auto") -> pa.Table:
    """Reads interactions from Parquet (a file, a directory, or a ``dt=YYYY-MM-DD``
    partitioned directory, of which only partitions up to ``until`` are read), or from
    MovieLens' ``ratings.dat`` (``::``-separated) or ``ratings.csv``. Rows after ``until``
    inside the files read are kept: ``data.build_histories`` drops and counts them."""
    fs, path = filesystem(uri, storage)
    if not exists(uri, storage):
        raise InputError(f"--interactions {uri}: no such file or directory")
    if path.endswith((".dat", ".csv")):
        raw = fs.cat_file(path)
        table = read_dat(raw, uri) if path.endswith(".dat") else read_csv(raw, uri)
        table = data.validate_interactions(table, uri, timestamp_unit)
    else:
        files = parquet_files(uri, storage)
        if until is not None:
            # date partitions after the run date are not read at all
            files = [f for f in files if not (m := _PARTITION.search(f)) or dt.date.fromisoformat(m.group(1)) <= until]
            if not files:
                raise InputError(f"--interactions {uri}: no partition on or before {until}")
        tables = []
        for f in files:
            src = ("s3://" + f) if uri.startswith("s3") else f
            tables.append(data.validate_interactions(read_parquet(src, storage), src, timestamp_unit))
        table = pa.concat_tables(tables, promote_options="permissive")
    if table.num_rows == 0:
        raise InputError(f"--interactions {uri}: the interactions table is empty (no rows in any file)")
    return table


def _first_bad_line(lines: list[str], split, names: list[str], ints: set[str], first_line: int, uri: str) -> None:
    """Raises the InputError for the first of ``lines`` that ``split`` cuts into the wrong
    number of fields or that has a non-integer in an ``ints`` column; returns if none has."""
    for n, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        fields = split(line)
        if len(fields) != len(names):
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise InputError(f"{uri}: line {n}: expected {len(names)} fields ({', '.join(names)}), found {len(fields)}: {shown!r}")
        for name, value in zip(names, fields):
            # an empty field is a null, which validate_interactions reports (ids) or counts (times)
            if name in ints and value.strip() and not re.fullmatch(r"\s*[-+]?\d+\s*", value):
                raise InputError(f"{uri}: line {n}: {name} {value!r} is not an integer")
            if name == "rating" and value.strip():
                try:
                    float(value)
                except ValueError:
                    raise InputError(f"{uri}: line {n}: rating {value!r} is not a number") from None


def read_dat(raw: bytes, uri: str) -> pa.Table:
    """MovieLens ``ratings.dat``: ``user::item::rating::timestamp`` per line, no header.
    A malformed line is an InputError naming the file and its line number (1-based)."""
    # "::" as one tab: the fast CSV reader takes single-character delimiters only
    text = raw.replace(b"\t", b" ").replace(b"::", b"\t")
    try:
        return pacsv.read_csv(
            pa.py_buffer(text),
            read_options=pacsv.ReadOptions(column_names=list(DAT_FIELDS)),
            parse_options=pacsv.ParseOptions(delimiter="\t"),
            convert_options=pacsv.ConvertOptions(column_types=_DAT_TYPES),
        )
    except pa.ArrowInvalid as e:
        lines = raw.decode("utf-8", errors="replace").splitlines()
        _first_bad_line(lines, lambda line: line.split("::"), list(DAT_FIELDS), {"user_id", "item_id", "timestamp"}, 1, uri)
        raise InputError(f"{uri}: cannot read as user::item::rating::timestamp lines: {str(e).splitlines()[0]}") from e


def read_csv(raw: bytes, uri: str) -> pa.Table:
    """A ``ratings.csv`` with a header (MovieLens' ``userId,movieId,rating,timestamp`` or our
    column names). A malformed line is an InputError naming the file and its line number
    (the header is line 1)."""
    text = raw.decode("utf-8", errors="replace").splitlines()
    header = next(csv.reader(text[:1]), [])
    ints = {c for c in header if c in _CSV_INT_COLUMNS}
    try:
        return pacsv.read_csv(pa.py_buffer(raw), convert_options=pacsv.ConvertOptions(column_types={c: pa.int64() for c in ints}))
    except pa.ArrowInvalid as e:
        _first_bad_line(text[1:], lambda line: next(csv.reader([line])), header, ints, 2, uri)
        raise InputError(f"{uri}: cannot read as CSV: {str(e).splitlines()[0]}") from e


def prepare(cfg: PrepareConfig) -> dict:
    """Reads, validates and transforms everything first; writes only when all of it succeeded."""
    table = read_interactions(cfg.interactions, cfg.storage, cfg.until, cfg.timestamp_unit)
    # events on the run date are kept: the bound is the next midnight (UTC), exclusive
    before_ns = None
    if cfg.until is not None:
        before_ns = int(dt.datetime.combine(cfg.until + dt.timedelta(days=1), dt.time(), dt.timezone.utc).timestamp()) * data.UNIT_NS["s"]
    histories, stats = data.build_histories(table, cfg.min_rating, cfg.min_user_interactions, cfg.max_len, before_ns=before_ns)
    vocab = data.build_vocab(histories)
    stats = {
        **stats,
        "source": cfg.interactions,
        "until": str(cfg.until) if cfg.until else None,
        "min_rating": cfg.min_rating,
        "min_user_interactions": cfg.min_user_interactions,
        "max_len": cfg.max_len,
        "timestamp_unit": cfg.timestamp_unit,
    }

    hist_uri = join(cfg.out, "histories")
    fs, hist_path = filesystem(hist_uri, cfg.storage)
    if fs.exists(hist_path):
        fs.rm(hist_path, recursive=True)
    for i, start in enumerate(range(0, histories.num_rows, USERS_PER_FILE)):
        write_parquet(histories.slice(start, USERS_PER_FILE), join(hist_uri, f"part-{i:05d}.parquet"), cfg.storage)
    write_parquet(vocab, join(cfg.out, "vocab.parquet"), cfg.storage)
    write_json(stats, join(cfg.out, "stats.json"), cfg.storage)
    return {"out": cfg.out, **stats}
