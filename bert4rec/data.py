"""Pure data transforms: interactions -> time-ordered histories, vocabulary, leave-one-out
split, tokens, padding and Cloze masking. numpy/pyarrow/torch only; no Ray, no files.

Token convention (shared with the model): 0 = padding, 1..V = items in ascending
``item_id`` order, V+1 = [MASK].
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from bert4rec.io import InputError

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
# histories column: distinct item ids a user had before ``item_ids`` when ``max_len`` cut
# the history; never model input, always excluded from what the user is recommended
TRUNCATED_COLUMN = "truncated_item_ids"


def history_columns(names: list[str], use_ratings: bool) -> list[str]:
    """The histories columns (of ``names``) that ranking a user reads: user_id, item_ids,
    ratings when the model uses them, and the ids ``max_len`` cut, which are never
    recommended. Not the timestamps, which cost as much to decode as the rest."""
    optional = (["ratings"] if use_ratings else []) + [TRUNCATED_COLUMN]
    return ["user_id", "item_ids"] + [c for c in optional if c in names]


# MovieLens' ratings.csv spelling -> ours
COLUMN_ALIASES = {"userId": "user_id", "movieId": "item_id", "itemId": "item_id"}


# ---------------------------------------------------------------- interactions -> histories


# nanoseconds per unit: the canonical timestamp is int64 ns since 1970 UTC, which keeps the
# order of events within a second (or a millisecond) that coarser units would turn into ties
UNIT_NS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
# plausible event times: from 1970 up to (not including) 2100-01-01, in seconds
LATEST_S = 4_102_444_800
# "auto": a value below 1e11 reads as seconds (1e11 s is the year 5138; 1e11 ms is 1973),
# below 1e14 as ms, below 1e17 as us, the rest as ns
AUTO_BOUNDS = (1e11, 1e14, 1e17)
DECLARE = "declare the unit with timestamp_unit: s, ms, us or ns"


def validate_interactions(table: pa.Table, source: str, timestamp_unit: str = "auto") -> pa.Table:
    """Checks an interactions table and returns it with canonical names and types.

    Columns: ``user_id``, ``item_id`` (integers, no nulls), ``timestamp`` (integers in
    ``timestamp_unit``, or a timestamp/date type; nulls allowed, those rows are dropped and
    counted), optional ``rating``. The returned ``timestamp`` is int64 nanoseconds since 1970
    UTC; "auto" infers the unit of integers from their magnitude and refuses a table that
    mixes units. Times before 1970 or from 2100 on are refused. An empty table is returned
    as is (an empty partition is no error; an empty input as a whole is, in ``build_histories``).
    """
    names = [COLUMN_ALIASES.get(n, n) for n in table.column_names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{source}: column(s) {dup} appear more than once (columns: {table.column_names}); expected one each of {list(REQUIRED_COLUMNS)}")
    table = table.rename_columns(names)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{source}: missing column(s) {missing}; expected {list(REQUIRED_COLUMNS)} (+ optional rating), found {table.column_names}")
    columns = {}
    for name in ("user_id", "item_id"):
        columns[name] = int64_ids(table[name], name, source)
    columns["timestamp"] = timestamps_ns(table["timestamp"], timestamp_unit, source)
    if "rating" in table.column_names:
        r = table["rating"]
        if not (pa.types.is_integer(r.type) or pa.types.is_floating(r.type)):
            raise InputError(f"{source}: column 'rating' must be numeric, found {r.type}")
        columns["rating"] = r.cast(pa.float32())
    return pa.table(columns)


def int64_ids(col: pa.ChunkedArray | pa.Array, name: str, source: str, first_row: int | None = None) -> pa.Array:
    """An integer id column -> int64, or an InputError naming ``source``, the column and the
    first null, fractional or too large value. ``first_row``: the column holds the input's rows
    from this one on (a batch of a longer file), so rows are numbered from it and nulls are not
    counted."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offset = first_row or 0
    if pa.types.is_floating(col.type):
        v = col.to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isfinite(v) | (v != np.round(v)))
        where = f"; row {offset + int(bad[0])} is {v[bad[0]]}" if len(bad) else ""
        raise InputError(f"{source}: column {name!r} must be integer, found {col.type}{where}")
    if not pa.types.is_integer(col.type):
        raise InputError(f"{source}: column {name!r} must be integer, found {col.type}")
    if col.null_count:
        row = offset + first_true(pc.is_null(col))
        if first_row is None:
            raise InputError(f"{source}: column {name!r} has {col.null_count} null value(s), first at row {row}")
        raise InputError(f"{source}: column {name!r} has a null value at row {row}")
    row = _first_past_int64(col)
    if row is not None:
        raise InputError(f"{source}: column {name!r} row {offset + row} is {col[row].as_py()}, past the largest int64 id (2**63 - 1)")
    return col.cast(pa.int64())


def first_true(mask: pa.Array | pa.ChunkedArray) -> int:
    """Index of the first true value of a boolean array (-1 when none)."""
    return int(pc.index(mask, True).as_py())


def _first_past_int64(col: pa.Array) -> int | None:
    """Index of the first value of an integer array that int64 cannot hold (a uint64 past
    2**63 - 1), or None."""
    if col.type != pa.uint64() or not len(col):
        return None
    too_big = pc.greater(col, pa.scalar(2**63 - 1, pa.uint64()))
    return first_true(too_big) if pc.any(too_big).as_py() else None


def timestamps_ns(col: pa.ChunkedArray | pa.Array, unit: str, source: str) -> pa.Array:
    """A timestamp column -> int64 ns since 1970 UTC (nulls kept). Integers are in ``unit``
    ("auto": inferred from their magnitude, one unit per column); timestamp and date types
    carry their own. Raises InputError naming the first implausible or mixed-unit row."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    inferred = False
    declarable = pa.types.is_integer(col.type)
    if pa.types.is_timestamp(col.type):
        unit, col = col.type.unit, col.view(pa.int64())
    elif pa.types.is_date32(col.type):
        # days: ns per day, expressed as a multiple of a second
        col = pc.multiply(col.view(pa.int32()).cast(pa.int64()), 86_400)
        unit = "s"
    elif pa.types.is_date64(col.type):
        unit, col = "ms", col.view(pa.int64())
    elif pa.types.is_integer(col.type):
        row = _first_past_int64(col)
        if row is not None:
            raise InputError(f"{source}: column 'timestamp' row {row} is {col[row].as_py()}: not a time between 1970 and 2100 in any unit")
        col = col.cast(pa.int64())
    else:
        raise InputError(f"{source}: column 'timestamp' must be integers (seconds, ms, us or ns since 1970) or a timestamp, found {col.type}")
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
    v = pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if unit == "auto":
        inferred = True
        kind = np.searchsorted(np.array(AUTO_BOUNDS), v, side="right")  # 0 s, 1 ms, 2 us, 3 ns
        present = np.bincount(kind[valid], minlength=4)
        if (present > 0).sum() > 1:
            major = int(np.argmax(present))
            first = int(np.flatnonzero(valid & (kind == major))[0])
            odd = int(np.flatnonzero(valid & (kind != major))[0])
            u = list(UNIT_NS)
            raise InputError(
                f"{source}: column 'timestamp' mixes units: row {odd} is {v[odd]} ({UNIT_NAMES[u[kind[odd]]]}?) "
                f"while most values, e.g. row {first} = {v[first]}, read as {UNIT_NAMES[u[major]]}; {DECLARE}"
            )
        unit = list(UNIT_NS)[int(np.argmax(present))] if valid.any() else "s"
    per_s = 10**9 // UNIT_NS[unit]
    bad = valid & ((v < 0) | (v >= LATEST_S * per_s))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        how = f"read as {UNIT_NAMES[unit]} (inferred from its magnitude)" if inferred else f"in {UNIT_NAMES[unit]}"
        hint = f"; {DECLARE}" if declarable else ""
        raise InputError(f"{source}: column 'timestamp' row {row} is {v[row]}, {how}: not a time between 1970 and 2100{hint}")
    ns = v * UNIT_NS[unit]
    return pa.array(ns, pa.int64(), mask=~valid)


# columns of an events table as the history builder takes it (see ``event_table``)
ORDINAL = "ordinal"
PRIOR_CUT = "prior_cut"
PRIOR_TRUNCATED = "prior_truncated"
# ordinals of events carried over from a previous night's histories (and its pending
# events): below any ordinal of a newly read file, so that ties in time keep them first
CARRIED = -(2**62)
PENDING_CARRIED = -(2**61)
# an ordinal is (file index, row within file): rows per file up to 2**40
FILE_STRIDE = 2**40
COUNTERS = ("input_rows", "null_timestamp", "after_until_rows", "below_min_rating", "short_user_rows", "short_users", "truncated_rows", "users", "interactions", "new_users")


def with_ordinal(table: pa.Table, file_index: int) -> pa.Table:
    """A validated interactions table of the ``file_index``-th file (in sorted listing order)
    -> the builder's events table: ``ordinal`` = file index x 2**40 + row, which keeps ties in
    time in input order across files; ``rating`` always present (null without ratings) and
    the carry-over columns null, so that every file yields the same schema."""
    n = table.num_rows
    return pa.table(
        {
            "user_id": table["user_id"],
            "item_id": table["item_id"],
            "timestamp": table["timestamp"],
            "rating": table["rating"] if "rating" in table.column_names else pa.nulls(n, pa.float32()),
            ORDINAL: pa.array(np.arange(n, dtype=np.int64) + file_index * FILE_STRIDE),
            PRIOR_CUT: pa.nulls(n, pa.int64()),
            PRIOR_TRUNCATED: pa.nulls(n, pa.list_(pa.int64())),
        }
    )


def carried_events(histories: pa.Table, pending: bool = False) -> pa.Table:
    """A previous night's histories (or pending events) -> events again, for a merge with
    the new nights: item, time and rating of every event in their stored order (their
    ordinals keep it, below any new file's), and on each user's first event the number of
    events ``max_len`` cut before and their distinct ids (``truncated_item_ids``)."""
    items, offsets = list_column(histories, "item_ids")
    times, _ = list_column(histories, "timestamps")
    lengths = np.diff(offsets)
    n = len(items)
    users = np.repeat(histories["user_id"].to_numpy(), lengths)
    position = np.arange(n, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    first = np.zeros(n, bool)
    first[offsets[:-1][lengths > 0]] = True
    prior_cut = pa.nulls(n, pa.int64())
    prior_truncated = pa.nulls(n, pa.list_(pa.int64()))
    if TRUNCATED_COLUMN in histories.column_names and n:
        cut_ids = histories[TRUNCATED_COLUMN].combine_chunks()
        cut_n = histories["truncated_rows"].to_numpy() if "truncated_rows" in histories.column_names else np.zeros(len(lengths), np.int64)
        owner = np.repeat(np.arange(len(lengths)), lengths)[first]
        prior_cut = pa.array(np.where(first, np.repeat(cut_n, lengths), 0), pa.int64(), mask=~first)
        taken = cut_ids.take(pa.array(owner))
        # a list per first event, null elsewhere
        idx = np.full(n, -1, np.int64)
        idx[first] = np.arange(len(owner))
        prior_truncated = taken.take(pa.array(idx, mask=idx < 0))
    ratings = (
        pa.array(list_column(histories, "ratings")[0], pa.float32()) if "ratings" in histories.column_names else pa.nulls(n, pa.float32())
    )
    return pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "item_id": pa.array(items, pa.int64()),
            "timestamp": pa.array(times, pa.int64()),
            "rating": ratings,
            ORDINAL: pa.array(position + (PENDING_CARRIED if pending else CARRIED)),
            PRIOR_CUT: prior_cut,
            PRIOR_TRUNCATED: prior_truncated,
        }
    )


def build_partition(
    events: pa.Table,
    min_rating: float | None = None,
    min_user_interactions: int = 5,
    max_len: int | None = None,
    before_ns: int | None = None,
    with_ratings: bool = True,
) -> tuple[pa.Table, pa.Table, dict]:
    """Events (see :func:`with_ordinal`) of whole users -> ``(histories, pending, counters)``.

    histories: one row per user with at least ``min_user_interactions`` events, sorted by
    ``user_id``: ``item_ids``, ``timestamps`` (ns, oldest first, ties in ``ordinal`` order)
    [, ``ratings``]; with ``max_len`` the latest ``max_len`` events, ``truncated_item_ids``
    (distinct ids cut before them, with those cut on earlier nights) and ``truncated_rows``.
    pending: the events a later night may still need, one row per user, same columns less the
    truncation: users too short, and events after ``before_ns`` (dropped today, inside the
    window tomorrow). counters: what was dropped and why (the ``COUNTERS``); pure sums over
    users, so that counters of disjoint sets of users add up. No users is no error here.
    """
    c = dict.fromkeys(COUNTERS, 0)
    c["input_rows"] = events.num_rows
    if events.num_rows:
        # users none of whose events were carried over from an earlier night
        first = events.group_by("user_id").aggregate([(ORDINAL, "min")])[f"{ORDINAL}_min"]
        c["new_users"] = pc.sum(pc.greater_equal(first, 0)).as_py() or 0
    c["null_timestamp"] = events["timestamp"].null_count
    if c["null_timestamp"]:
        events = events.filter(pc.is_valid(events["timestamp"]))
    later = None
    if before_ns is not None:
        keep = pc.less(events["timestamp"], before_ns)
        later = events.filter(pc.invert(keep))
        c["after_until_rows"] = later.num_rows
        events = events.filter(keep)
    if min_rating is not None:
        keep = pc.fill_null(pc.greater_equal(events["rating"], min_rating), False)
        c["below_min_rating"] = events.num_rows - (pc.sum(keep).as_py() or 0)
        events = events.filter(keep)

    events = events.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), (ORDINAL, "ascending")])
    users = events["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.array([], dtype=np.int64)
    lengths = np.diff(np.r_[starts, len(users)])
    # events cut on earlier nights still count towards a user's length
    prior_cut = pc.fill_null(events[PRIOR_CUT], 0).to_numpy()
    prior_cut = np.add.reduceat(prior_cut, starts) if len(starts) else np.zeros(0, np.int64)

    keep_user = lengths + prior_cut >= min_user_interactions
    c["short_user_rows"] = int(lengths[~keep_user].sum())
    c["short_users"] = int((~keep_user).sum())
    short = _ranges(starts[~keep_user], lengths[~keep_user])
    starts, lengths, prior_cut = starts[keep_user], lengths[keep_user], prior_cut[keep_user]
    all_items = events["item_id"].to_numpy()
    columns: dict = {}
    if max_len is not None:
        # keep the most recent max_len items; what is cut stays known as seen
        cut = np.maximum(lengths - max_len, 0)
        c["truncated_rows"] = int(cut.sum())
        earlier = _earlier_cuts(events, starts, lengths)
        cut_items = np.concatenate([all_items[_ranges(starts, cut)], earlier[0]])
        owner_lengths = cut + earlier[1]
        # group each user's new and earlier cut ids together before taking distinct ones
        order = np.argsort(np.r_[np.repeat(np.arange(len(cut)), cut), np.repeat(np.arange(len(cut)), earlier[1])], kind="stable")
        columns[TRUNCATED_COLUMN] = distinct_per_user(cut_items[order], owner_lengths)
        columns["truncated_rows"] = pa.array(prior_cut + cut, pa.int64())
        starts, lengths = starts + cut, lengths - cut
    take = _ranges(starts, lengths)
    histories = _lists(events.take(pa.array(take)), lengths, with_ratings)
    for name, col in columns.items():
        histories = histories.append_column(name, col)
    c["users"], c["interactions"] = histories.num_rows, int(lengths.sum())

    pending = events.take(pa.array(short))
    if later is not None and later.num_rows:
        pending = pa.concat_tables([pending, later]).sort_by([("user_id", "ascending"), ("timestamp", "ascending"), (ORDINAL, "ascending")])
    pu = pending["user_id"].to_numpy()
    pstarts = np.flatnonzero(np.r_[True, pu[1:] != pu[:-1]]) if len(pu) else np.array([], dtype=np.int64)
    pending = _lists(pending, np.diff(np.r_[pstarts, len(pu)]), with_ratings)
    return histories, pending, c


def _earlier_cuts(events: pa.Table, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per kept user (``starts``/``lengths`` into the sorted events): the ids cut on earlier
    nights (their ``prior_truncated`` lists), flat, and how many per user."""
    col = events[PRIOR_TRUNCATED].combine_chunks()
    if col.null_count == len(col):
        return np.zeros(0, np.int64), np.zeros(len(starts), np.int64)
    owner = np.full(len(col), -1, np.int64)
    owner[_ranges(starts, lengths)] = np.repeat(np.arange(len(starts)), lengths)
    sizes = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
    flat = pc.list_flatten(col).to_numpy()
    flat_owner = np.repeat(owner, sizes)
    mine = flat_owner >= 0
    flat, flat_owner = flat[mine], flat_owner[mine]
    order = np.argsort(flat_owner, kind="stable")
    return flat[order], np.bincount(flat_owner, minlength=len(starts))


def _lists(events: pa.Table, lengths: np.ndarray, with_ratings: bool) -> pa.Table:
    """Sorted events, ``lengths`` consecutive rows per user -> one row per user."""
    starts = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64)
    offsets = pa.array(list_offsets(lengths))
    columns = {
        "user_id": pa.array(events["user_id"].to_numpy()[starts] if len(lengths) else np.zeros(0, np.int64), pa.int64()),
        "item_ids": pa.ListArray.from_arrays(offsets, events["item_id"].combine_chunks()),
        "timestamps": pa.ListArray.from_arrays(offsets, events["timestamp"].combine_chunks()),
    }
    if with_ratings:
        columns["ratings"] = pa.ListArray.from_arrays(offsets, events["rating"].combine_chunks().cast(pa.float32()))
    return pa.table(columns)


def list_offsets(lengths: np.ndarray) -> np.ndarray:
    """int32 list offsets for ``lengths``, summed in int64: a block whose lists hold more
    than 2**31 - 1 values in all is refused rather than wrapped around."""
    ends = np.cumsum(lengths, dtype=np.int64)
    if len(ends) and ends[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{int(ends[-1])} list values in one block: more than an int32 offset holds; use more partitions")
    return np.r_[0, ends].astype(np.int32)


def build_histories(
    table: pa.Table,
    min_rating: float | None = None,
    min_user_interactions: int = 5,
    max_len: int | None = None,
    before_ns: int | None = None,
) -> tuple[pa.Table, dict]:
    """Validated interactions (one table, in input order) -> histories, one row per user,
    sorted by ``user_id`` (see :func:`build_partition`). Ties in time keep their input order.
    The single-process form of what ``prepare`` runs per partition, and its reference.

    ``before_ns``: rows at or after this time (ns, see :func:`validate_interactions`) are dropped.

    Returns the histories and counts of what was dropped and why: every input row is either
    in a history or counted in one of the ``dropped`` ``*_rows``/``*_timestamp`` entries.
    """
    if table.num_rows == 0:
        raise InputError("the interactions table is empty")
    if min_rating is not None and "rating" not in table.column_names:
        raise InputError("--min-rating was given but the interactions have no 'rating' column")
    histories, _, c = build_partition(with_ordinal(table, 0), min_rating, min_user_interactions, max_len, before_ns, "rating" in table.column_names)
    stats = counters_to_stats(c, min_rating, max_len, before_ns)
    stats["items"] = int(len(np.unique(pc.list_flatten(histories["item_ids"]).to_numpy())))
    if histories.num_rows == 0:
        raise InputError(f"no user has at least {min_user_interactions} interactions after filtering: {stats['dropped']}")
    return histories, stats


def counters_to_stats(c: dict, min_rating: float | None, max_len: int | None, before_ns: int | None) -> dict:
    """Summed counters -> the stats layout of ``stats.json`` (a ``dropped`` entry per filter
    that was on); ``items`` is left to the caller (it is the vocabulary's size)."""
    dropped = {"null_timestamp": c["null_timestamp"]}
    if before_ns is not None:
        dropped["after_until_rows"] = c["after_until_rows"]
    if min_rating is not None:
        dropped["below_min_rating"] = c["below_min_rating"]
    dropped["short_user_rows"] = c["short_user_rows"]
    dropped["short_users"] = c["short_users"]
    if max_len is not None:
        dropped["truncated_rows"] = c["truncated_rows"]
    return {"input_rows": c["input_rows"], "dropped": dropped, "users": c["users"], "interactions": c["interactions"]}


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, start + length)`` for each pair, without a Python loop."""
    return np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum(), dtype=np.int64)


def distinct_per_user(items: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """Consecutive groups of ``lengths`` items -> one list per group of its distinct items,
    ascending (a list column of int64)."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    order = np.lexsort((items, owner))
    owner, items = owner[order], items[order]
    first = np.r_[True, (owner[1:] != owner[:-1]) | (items[1:] != items[:-1])] if len(items) else np.zeros(0, bool)
    owner, items = owner[first], items[first]
    counts = np.bincount(owner, minlength=len(lengths))
    offsets = pa.array(list_offsets(counts))
    return pa.ListArray.from_arrays(offsets, pa.array(items.astype(np.int64), pa.int64()))


def build_vocab(histories: pa.Table) -> pa.Table:
    """``item_id`` (ascending) -> ``token`` 1..V, with ``count``: interactions per item (popularity)."""
    items = pc.list_flatten(histories["item_ids"]).to_numpy()
    ids, counts = np.unique(items, return_counts=True)
    return pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "token": pa.array(np.arange(1, len(ids) + 1), pa.int32()),
            "count": pa.array(counts, pa.int64()),
        }
    )


# ---------------------------------------------------------------- ids -> tokens


def to_tokens(item_ids: np.ndarray, vocab_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps item ids to tokens through the sorted vocabulary ``vocab_ids`` (token = index + 1).

    Returns ``(tokens, known)``; unknown ids get token 0 and ``known`` False.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if len(vocab_ids) == 0:
        return np.zeros(len(item_ids), np.int64), np.zeros(len(item_ids), bool)
    idx = np.searchsorted(vocab_ids, item_ids)
    idx_c = np.minimum(idx, len(vocab_ids) - 1)
    known = vocab_ids[idx_c] == item_ids
    return np.where(known, idx_c + 1, 0).astype(np.int64), known


def rating_levels(ratings: np.ndarray | None, n: int, levels: int = 5) -> np.ndarray:
    """Star ratings -> embedding indices 1..levels (0 = unknown)."""
    if ratings is None:
        return np.zeros(n, np.int64)
    r = np.nan_to_num(np.asarray(ratings, np.float32), nan=0.0)
    return np.clip(np.rint(r), 0, levels).astype(np.int64)


def list_column(table: pa.Table | pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (flat values, offsets) as numpy, honouring slices."""
    col = table[name]
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


def pad_left(seqs: list[np.ndarray], length: int, dtype=np.int64) -> np.ndarray:
    """Right-aligns each sequence's last ``length`` values into a (B, length) array of zeros."""
    out = np.zeros((len(seqs), length), dtype=dtype)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[i, length - len(s) :] = s
    return out


def pad_seen(seen: list[np.ndarray]) -> np.ndarray:
    """Per-user seen items -> (B, longest) left-padded with 0, at least one column (0 is
    padding, never a rankable item), as ``rank_of_target`` and ``topk_excluding`` take them."""
    return pad_left(seen, max(1, max((len(s) for s in seen), default=1)))


# ---------------------------------------------------------------- leave-one-out


def split_point(split: str) -> int:
    """How many trailing items a split withholds from its input: train 2, val 1 (target is
    the second-to-last item), test 0 (target is the last item)."""
    return {"train": 2, "val": 1, "test": 0}[split]


def loo_examples(seqs: list[np.ndarray], split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Leave-one-out: for each full sequence, the input history and the target.

    test: input seq[:-1], target seq[-1]; val: input seq[:-2], target seq[-2].
    """
    cut = split_point(split)
    inputs = [s[: len(s) - 1 - cut] if cut else s[:-1] for s in seqs]
    targets = np.array([s[len(s) - 1 - cut] for s in seqs], dtype=np.int64)
    return inputs, targets


def inference_tokens(seqs: list[np.ndarray], max_len: int, mask_token: int) -> np.ndarray:
    """Appends [MASK] after each history (never overwriting its last item), keeping the
    last ``max_len - 1`` items: (B, max_len), left-padded."""
    return pad_left([np.r_[s[-(max_len - 1) :], mask_token] for s in seqs], max_len)


def inference_ratings(ratings: list[np.ndarray], max_len: int) -> np.ndarray:
    """Rating levels aligned with :func:`inference_tokens` (the [MASK] slot is unknown, 0)."""
    return pad_left([np.r_[r[-(max_len - 1) :], 0] for r in ratings], max_len)


# ---------------------------------------------------------------- Cloze masking


def mask_batch(
    tokens: torch.Tensor,
    mask_token: int,
    mask_prob: float,
    last_item_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cloze masking of a (B, T) left-padded batch of training sequences.

    Each item is replaced by [MASK] with probability ``mask_prob``; a share ``last_item_prob``
    of the sequences instead have their last item alone masked (that is what inference asks
    for). Every sequence gets at least one mask. Returns ``(inputs, labels)``: labels hold the
    true token at masked positions and 0 elsewhere, so the target never appears in the input.
    """
    is_item = tokens > 0
    rand = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    masked = (rand < mask_prob) & is_item
    last_only = torch.rand(tokens.shape[0], generator=generator, device=tokens.device) < last_item_prob
    last = torch.zeros_like(masked)
    last[:, -1] = is_item[:, -1]
    # sequences that drew no mask get their last item masked
    last_only = last_only | ~masked.any(dim=1)
    masked = torch.where(last_only[:, None], last, masked)
    inputs = torch.where(masked, torch.full_like(tokens, mask_token), tokens)
    labels = torch.where(masked, tokens, torch.zeros_like(tokens))
    return inputs, labels


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops the leading columns that are padding in every row of a left-padded batch.
    Positions count from the end, so the model's output is unchanged; the work shrinks."""
    tokens = batch["tokens"]
    used = (tokens != 0).any(dim=0)
    first = int(used.to(torch.int8).argmax()) if used.any() else tokens.shape[1] - 1
    return {k: v[:, first:] for k, v in batch.items()}


def length_chunks(tokens: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices of a left-padded (N, T) batch, shortest history first (ties in row order),
    in chunks of ``size``: rows of similar length together, so that trimming each chunk's
    shared padding (``trim_padding``) removes most of it. No rows, no chunks."""
    if len(tokens) == 0:
        return []
    return list(torch.argsort((tokens != 0).sum(dim=1), stable=True).split(size))


def length_buckets(batch: dict[str, torch.Tensor], batch_size: int, generator: torch.Generator | None = None) -> list[dict[str, torch.Tensor]]:
    """Splits a super-batch of N sequences into batches of similar length, in random order,
    each trimmed of shared padding: with short and long histories mixed, most of a (B, T)
    batch would otherwise be padding."""
    chunks = length_chunks(batch["tokens"], batch_size)
    perm = torch.randperm(len(chunks), generator=generator).tolist()
    return [trim_padding({k: v[chunks[i]] for k, v in batch.items()}) for i in perm]


# ---------------------------------------------------------------- deterministic user samples


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping arithmetic): a fixed 64-bit mix whose
    outputs look uniform and independent even for consecutive inputs."""
    z = np.asarray(x).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def user_hash(user_ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N,) uint64: a hash of each ``user_id`` under ``seed``, the same in every process."""
    key = splitmix64(np.array([seed % (1 << 64)], np.uint64))
    return splitmix64(np.asarray(user_ids, np.int64).view(np.uint64) ^ key)


def sample_mask(user_ids: np.ndarray, size: int | None, users: int, seed: int = 0) -> np.ndarray:
    """Which of ``user_ids`` fall in a deterministic sample of about ``size`` of ``users`` users
    in all: those whose :func:`user_hash` is below ``size / users`` of the hash range. Each
    user's membership depends on its id alone, never on files, batches or order; a larger
    ``size`` keeps every user of a smaller one. ``size`` None or >= ``users``: everyone."""
    ids = np.asarray(user_ids, np.int64)
    if size is None or size >= users:
        return np.ones(len(ids), bool)
    threshold = (size << 64) // users  # < 2**64: size < users
    return user_hash(ids, seed) < np.uint64(threshold)
