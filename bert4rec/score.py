"""Batch scoring: user histories -> the top-k table, published whole or not at all.

    bert4rec score --checkpoint out/train --histories out/prepared/histories --out out/recs

Pipeline (Ray Data, streaming):
    the histories' files, as the driver listed them -> blocks of batch_size users (io.parquet_dataset)
    [-> hash shuffle on user_id with a per-user --exclude too large for the driver]
    -> map_batches(featurize)            CPU tasks: ids -> tokens, truncate, append [MASK]
    -> map_batches(Scorer, actor pool)   model + top-k with seen/excluded items removed
    -> write_parquet(<out>/_staging/<run_id>)   dictionary-encoded where values repeat
then: verify one row per distinct input user -> move into <out> -> write <out>/_SUCCESS.
The driver checks the user ids of a table of up to DRIVER_CHECK_MAX_USERS users itself; a
larger table's are checked by a hash shuffle on the cluster (``check_users_on_cluster``), so
that the driver's memory does not grow with the table.

Pure pieces (``featurize``, ``score_batch``) are plain functions; ``Scorer`` is the thin
actor that loads the checkpoint once and calls them.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import math
import os
import socket
import time
import uuid
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from bert4rec import checkpoint as ckpt_lib
from bert4rec import cluster
from bert4rec import console, data, locks, publish
from bert4rec.config import ScoreConfig, StorageConfig
from bert4rec.io import InputError, ParquetFooters, arrow_filesystem, filesystem, input_error_in, join, parquet_dataset, parquet_footers, read_parquet
from bert4rec.model import BERT4Rec
from bert4rec.ranking import chunked_topk, topk_excluding

OUTPUT_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_ids", pa.list_(pa.int64())),
        ("scores", pa.list_(pa.float32())),
        ("fallback", pa.bool_()),
        ("model_version", pa.string()),
        # ms, not s: Parquet has no second unit, so a published "s" column reads back as "ms"
        ("generated_at", pa.timestamp("ms", tz="UTC")),
    ]
)


# ---------------------------------------------------------------- pure pieces


def featurize(
    batch: pa.Table,
    vocab_ids: np.ndarray,
    max_len: int,
    mask_token: int,
    use_ratings: bool,
    exclude_users: np.ndarray | None = None,
    exclude_tokens: np.ndarray | None = None,
) -> pa.Table:
    """Histories -> model inputs. Unknown item ids are dropped and counted.

    Returns columns ``user_id``, ``tokens`` (fixed-size lists of max_len), ``ratings`` (the
    same, when used), ``seen`` (list: every known token of the history plus the user's own
    excluded tokens) and ``unknown`` (the count of dropped ids).
    A user's own exclusions come from ``exclude_users``/``exclude_tokens`` (sorted by user, as
    the driver reads a small --exclude table) or from the batch's ``excluded_item_ids`` list
    column (item ids, as :func:`attach_exclusions` joins a large one). Items that
    ``prepare --max-len`` cut from a history (``truncated_item_ids``, when present) are seen too.
    """
    flat, offsets = data.list_column(batch, "item_ids")
    tokens, known = data.to_tokens(flat, vocab_ids)
    joined = None
    if EXCLUDED_COLUMN in batch.column_names:
        xflat, xoffsets = data.list_column(batch, EXCLUDED_COLUMN)
        xtokens, xknown = data.to_tokens(xflat, vocab_ids)
        joined = [t[k] for t, k in zip(np.split(xtokens, xoffsets[1:-1]), np.split(xknown, xoffsets[1:-1]))]
    earlier = None
    if data.TRUNCATED_COLUMN in batch.column_names:
        tflat, toffsets = data.list_column(batch, data.TRUNCATED_COLUMN)
        ttokens, _ = data.to_tokens(tflat, vocab_ids)
        # ids the model does not know (token 0) cannot be recommended: they are left out below
        earlier = np.split(ttokens, toffsets[1:-1])
    n = len(offsets) - 1
    seqs, seen, unknown = [], [], np.zeros(n, np.int64)
    levels = None
    if use_ratings and "ratings" in batch.column_names:
        rflat, _ = data.list_column(batch, "ratings")
        levels = data.rating_levels(rflat, len(rflat))
    rseqs = []
    users = batch["user_id"].to_numpy()
    for i in range(n):
        sl = slice(offsets[i], offsets[i + 1])
        k = known[sl]
        s = tokens[sl][k]
        unknown[i] = int((~k).sum())
        seqs.append(s)
        if levels is not None:
            rseqs.append(levels[sl][k])
        extra = np.zeros(0, np.int64)
        if joined is not None:
            extra = joined[i]
        elif exclude_users is not None and len(exclude_users):
            lo, hi = np.searchsorted(exclude_users, users[i], "left"), np.searchsorted(exclude_users, users[i], "right")
            extra = exclude_tokens[lo:hi]
        seen.append(np.r_[s, extra] if earlier is None else np.r_[s, extra, earlier[i][earlier[i] > 0]])
    # a list column, not a padded array: widths differ between batches
    seen_offsets = pa.array(np.r_[0, np.cumsum([len(x) for x in seen])].astype(np.int32))
    seen_values = pa.array(np.concatenate(seen) if seen else np.zeros(0, np.int64), pa.int64())
    columns = {
        "user_id": pa.array(users.astype(np.int64)),
        "tokens": _fixed(data.inference_tokens(seqs, max_len, mask_token)),
        "seen": pa.ListArray.from_arrays(seen_offsets, seen_values),
        "unknown": pa.array(unknown),
    }
    if levels is not None:
        columns["ratings"] = _fixed(data.inference_ratings(rseqs, max_len))
    return pa.table(columns)


def _fixed(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


def _unfixed(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    # a writable copy: torch will not wrap Arrow's read-only buffers without a warning
    return col.flatten().to_numpy().reshape(len(col), col.type.list_size).copy()


@torch.inference_mode()
def score_batch(
    model: BERT4Rec,
    tokens: torch.Tensor,
    seen: torch.Tensor,
    k: int,
    ratings: torch.Tensor | None = None,
    global_exclude: torch.Tensor | None = None,
    popularity: torch.Tensor | None = None,
    item_chunk_size: int = 262_144,
    autocast_dtype: torch.dtype | None = None,
    sub_batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) inputs ending in [MASK] -> (scores (B, k), tokens (B, k), fallback (B,)).

    Users with no known item (only [MASK] in the input) get the most popular unseen items,
    scored by their popularity, and are flagged. With ``sub_batch``, rows are scored in
    groups of similar history length, each trimmed of shared padding (same results, less
    work). Empty slots (fewer than k rankable items) are token 0 with score -inf.
    """
    num_items = model.config.num_items
    B = tokens.shape[0]
    if sub_batch is not None and B > sub_batch:
        # a batch of mixed histories would otherwise run every user at the longest length
        values = torch.empty((B, k), dtype=torch.float32, device=tokens.device)
        top = torch.empty((B, k), dtype=torch.int64, device=tokens.device)
        fallback = torch.empty(B, dtype=torch.bool, device=tokens.device)
        for idx in data.length_chunks(tokens, sub_batch):
            part = data.trim_padding({"tokens": tokens[idx], **({"ratings": ratings[idx]} if ratings is not None else {})})
            v, t, f = score_batch(model, part["tokens"], seen[idx], k, part.get("ratings"), global_exclude, popularity, item_chunk_size, autocast_dtype)
            values[idx], top[idx], fallback[idx] = v.float(), t, f
        return values, top, fallback
    extra = global_exclude.expand(B, -1) if global_exclude is not None and len(global_exclude) else None
    with torch.autocast(device_type=tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        h = model.last_hidden(tokens, ratings)  # (B, D)
    values, top = chunked_topk(h.float(), model.item_emb.weight.float(), model.out_bias.float(), k, seen, extra, num_items, item_chunk_size)
    fallback = (tokens[:, :-1] == 0).all(dim=1)
    if fallback.any() and popularity is not None:
        rows = fallback.nonzero().squeeze(1)
        fb_extra = extra[rows] if extra is not None else None
        pv, pt = topk_excluding(popularity.float().expand(len(rows), -1), k, seen[rows], fb_extra, num_items)
        values[rows], top[rows] = pv.to(values.dtype), pt
    return values, top, fallback


def to_rows(
    user_id: np.ndarray,
    values: np.ndarray,
    tokens: np.ndarray,
    fallback: np.ndarray,
    vocab_ids: np.ndarray,
    model_version: str,
    generated_at: dt.datetime,
    titles: np.ndarray | None = None,
) -> pa.Table:
    """Top-k tokens -> output rows; empty slots (token 0) are left out of the lists."""
    valid = tokens > 0
    lengths = valid.sum(1)
    offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
    flat_tokens = tokens[valid]
    columns = {
        "user_id": pa.array(user_id, pa.int64()),
        "item_ids": pa.ListArray.from_arrays(offsets, pa.array(vocab_ids[flat_tokens - 1], pa.int64())),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(values[valid].astype(np.float32))),
        "fallback": pa.array(fallback, pa.bool_()),
        "model_version": pa.array([model_version] * len(user_id), pa.string()),
        "generated_at": pa.array([generated_at] * len(user_id), OUTPUT_SCHEMA.field("generated_at").type),
    }
    schema = OUTPUT_SCHEMA
    if titles is not None:
        columns["titles"] = pa.ListArray.from_arrays(offsets, pa.array(titles[flat_tokens], pa.string()))
        schema = schema.append(pa.field("titles", pa.list_(pa.string())))
    return pa.table(columns, schema=schema)


def dictionary_columns(titles: bool) -> list[str]:
    """The output columns worth Parquet's dictionary encoding: the one model version, and item
    ids and titles, which repeat across users. Pyarrow's default tries every column, and on
    the scores and user ids (nearly all distinct) it costs ~15x the write for a larger file
    (100k users: 0.6 s and 6.1 MB against 0.04 s and 5.5 MB)."""
    return ["model_version", "item_ids.list.element"] + (["titles.list.element"] if titles else [])


# ---------------------------------------------------------------- the Ray actor


class Scorer:
    """Loads the checkpoint once per actor; each call scores one batch of featurized users."""

    def __init__(
        self,
        checkpoint_uri: str,
        storage: StorageConfig,
        k: int,
        item_chunk_size: int,
        use_gpu: bool,
        global_exclude: np.ndarray,
        titles: np.ndarray | None,
        generated_at: dt.datetime,
        threads: int | None = None,
        sub_batch: int | None = None,
    ):
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        loaded = ckpt_lib.load(checkpoint_uri, storage)
        self.model = loaded.model.to(self.device).eval()
        self.vocab_ids = loaded.vocab_ids
        self.model_version = loaded.model_version
        pop = np.zeros(self.model.config.vocab_size, np.float32)
        pop[1:-1] = loaded.vocab["count"].to_numpy()
        self.popularity = torch.as_tensor(pop, device=self.device)
        self.global_exclude = torch.tensor(np.array(global_exclude), dtype=torch.int64, device=self.device)
        self.k, self.item_chunk_size, self.titles, self.generated_at = k, item_chunk_size, titles, generated_at
        self.sub_batch = sub_batch
        self.autocast_dtype = torch.bfloat16 if use_gpu else None
        self.board = console.board()  # the driver's progress counter, when it has one

    def __call__(self, batch: pa.Table) -> pa.Table:
        dev = self.device
        seen_flat, seen_offsets = data.list_column(batch, "seen")
        seen = data.pad_seen(np.split(seen_flat, seen_offsets[1:-1]))
        ratings = torch.as_tensor(_unfixed(batch["ratings"]), device=dev) if "ratings" in batch.column_names else None
        values, top, fallback = score_batch(
            self.model,
            torch.as_tensor(_unfixed(batch["tokens"]), device=dev),
            torch.as_tensor(seen, device=dev),
            self.k,
            ratings,
            self.global_exclude,
            self.popularity,
            self.item_chunk_size,
            self.autocast_dtype,
            sub_batch=self.sub_batch,
        )
        user_id = batch["user_id"].to_numpy()
        rows = to_rows(user_id, values.float().cpu().numpy(), top.cpu().numpy(), fallback.cpu().numpy(), self.vocab_ids, self.model_version, self.generated_at, self.titles)
        _release_freed_memory()
        if self.board is not None:
            self.board.add.remote(len(user_id))
        return rows.append_column("unknown_items", batch["unknown"])


def _release_freed_memory() -> None:
    """glibc keeps memory freed by a long-lived actor's many mid-sized allocations; without
    this an actor's resident memory grows with every batch (measured: ~16 MiB per 512 users)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _LIBC = None


def user_side(batch: pa.Table, side: int) -> pa.Table:
    """A block of input histories (side 0) or of staged output rows (side 1) -> the columns
    that :func:`user_check_rows` compares: user_id, side, and the output's fallback and
    unknown_items counts (false and 0 on the input side)."""
    n = batch.num_rows
    return pa.table(
        {
            "user_id": batch["user_id"].cast(pa.int64()),
            "side": pa.array(np.full(n, side, np.int8)),
            "fallback": batch["fallback"] if "fallback" in batch.column_names else pa.array(np.zeros(n, bool)),
            "unknown_items": batch["unknown_items"].cast(pa.int64()) if "unknown_items" in batch.column_names else pa.array(np.zeros(n, np.int64)),
        }
    )


def user_check_rows(batch: pa.Table) -> pa.Table:
    """One hash partition of :func:`user_side` rows (every row of a user_id in the same
    partition) -> one row of counts: input rows, null and duplicated input ids, output rows,
    input users the output lacks, output rows beyond one per input user (null ids, ids the
    input lacks, repeats), the output's fallback users and unknown items, and the smallest id
    of each problem (-1: none)."""
    on_in, on_out = pc.equal(batch["side"], 0), pc.equal(batch["side"], 1)
    null = pc.is_null(batch["user_id"])
    nulls_in = int(pc.sum(pc.and_(null, on_in)).as_py() or 0)
    nulls_out = int(pc.sum(pc.and_(null, on_out)).as_py() or 0)
    uid = batch["user_id"].fill_null(0).to_numpy()
    keep = ~null.to_numpy(zero_copy_only=False)
    side = batch["side"].to_numpy()
    inp, out = np.sort(uid[keep & (side == 0)]), np.sort(uid[keep & (side == 1)])
    dup_in = np.unique(inp[1:][inp[1:] == inp[:-1]])
    missing = np.setdiff1d(inp, out)
    unexpected, repeats = np.setdiff1d(out, inp), out[1:][out[1:] == out[:-1]]

    def first(a: np.ndarray) -> int:
        return int(a.min()) if len(a) else -1

    return pa.table(
        {
            "input_rows": [len(inp) + nulls_in],
            "null_users": [nulls_in],
            "duplicated": [len(dup_in)],
            "first_duplicated": [first(dup_in)],
            "output_rows": [len(out) + nulls_out],
            "missing": [len(missing)],
            "first_missing": [first(missing)],
            "extra": [len(unexpected) + len(repeats) + nulls_out],
            "first_extra": [first(np.union1d(unexpected, repeats))],
            "fallback_users": [int(pc.sum(pc.filter(batch["fallback"], on_out)).as_py() or 0)],
            "unknown_items": [int(pc.sum(pc.filter(batch["unknown_items"], on_out)).as_py() or 0)],
        },
        schema=USER_CHECK_SCHEMA,
    )


USER_CHECK_SCHEMA = pa.schema(
    [(name, pa.int64()) for name in ("input_rows", "null_users", "duplicated", "first_duplicated", "output_rows", "missing", "first_missing", "extra", "first_extra", "fallback_users", "unknown_items")]
)


EXCLUDED_COLUMN = "excluded_item_ids"  # a user's own --exclude item ids, joined on the cluster


def history_side(batch: pa.Table) -> pa.Table:
    """A block of histories -> the rows :func:`attach_exclusions` takes: the same columns
    plus ``side`` 0 and a null ``excluded`` item id."""
    n = batch.num_rows
    return batch.append_column("side", pa.array(np.zeros(n, np.int8))).append_column("excluded", pa.nulls(n, pa.int64()))


def exclusion_side(batch: pa.Table, uri: str, storage: StorageConfig, columns: pa.Schema) -> Iterator[pa.Table]:
    """One --exclude file (``batch``: one row, its ``path``) -> rows shaped like
    :func:`history_side`'s (``columns``: the histories' columns, here all null) with ``side`` 1
    and the ``excluded`` item id. A null or out-of-range id is an InputError naming the file and its row."""
    fs, _ = filesystem(uri, storage)
    path = batch["path"][0].as_py()
    first = 0
    with fs.open(path, "rb") as handle:
        for rb in pq.ParquetFile(handle).iter_batches(batch_size=1 << 20, columns=["user_id", "item_id"]):
            users, items = (data.int64_ids(rb[name], name, f"--exclude {path}", first_row=first) for name in ("user_id", "item_id"))
            n = rb.num_rows
            rows = {field.name: pa.nulls(n, field.type) for field in columns}
            rows["user_id"] = users.cast(columns.field("user_id").type)
            rows["side"] = pa.array(np.ones(n, np.int8))
            rows["excluded"] = items
            first += n
            yield pa.table(rows)


def attach_exclusions(part: pa.Table) -> pa.Table:
    """One hash partition on user_id of :func:`history_side` and :func:`exclusion_side` rows
    -> its histories, each with the list of its user's excluded item ids (``excluded_item_ids``,
    null for none). Exclusions of users the histories lack are dropped."""
    on_hist = pc.equal(part["side"], 0)
    hist = part.filter(on_hist).drop_columns(["side", "excluded"])
    ex = part.filter(pc.invert(on_hist)).select(["user_id", "excluded"])
    grouped = ex.group_by("user_id", use_threads=False).aggregate([("excluded", "list")])
    lists = grouped["excluded_list"].take(pc.index_in(hist["user_id"], value_set=grouped["user_id"]))
    return hist.append_column(EXCLUDED_COLUMN, lists.cast(pa.list_(pa.int64())))


# ---------------------------------------------------------------- driver

# Up to this many input users the driver checks their ids itself (8 bytes a user, in
# milliseconds); above it a hash shuffle on the cluster does, so that the driver's memory
# does not grow with the table (check_users_on_cluster).
DRIVER_CHECK_MAX_USERS = 1_000_000
# users per partition of that shuffle: ~30 bytes a row from each side, ~120 MB a partition
USERS_PER_CHECK_PARTITION = 2_000_000
# Up to this many rows of per-user --exclude the driver reads them (16 bytes a row) and every
# featurize task gets a copy; a larger table joins the histories on the cluster, a hash shuffle
# on user_id of both (join_exclusions_on_cluster).
DRIVER_EXCLUDE_MAX_ROWS = 1_000_000
# histories per partition of that shuffle: ~1 KB a user at length 200, ~200 MB a partition
USERS_PER_EXCLUDE_PARTITION = 200_000


class HistoriesCheck(NamedTuple):
    footers: ParquetFooters  # the table's files, schema and rows, from its one listing
    ids: np.ndarray | None  # the sorted distinct user ids when the driver checked them; None: too many, the cluster checks

    @property
    def users(self) -> int:
        return self.footers.rows

    @property
    def schema(self) -> pa.Schema:
        return self.footers.schema

    @property
    def files(self) -> list[str]:
        return self.footers.files

    @property
    def has_ratings(self) -> bool:
        return "ratings" in self.schema.names


def check_histories(uri: str, storage: StorageConfig, max_driver_users: int | None = None) -> HistoriesCheck:
    """Schema checks, and the user_id checks (no nulls, one row per user) of a table of at
    most ``max_driver_users`` (default ``DRIVER_CHECK_MAX_USERS``), before anything runs.
    A larger table's users are left to :func:`check_users_on_cluster`."""
    footers = parquet_footers(uri, storage)
    schema = footers.schema
    for name, ok, expected in (
        ("user_id", lambda t: pa.types.is_integer(t), "an integer"),
        ("item_ids", lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type), "a list of integer item ids"),
    ):
        if name not in schema.names:
            raise InputError(f"--histories {uri}: missing column {name!r}; expected user_id and item_ids (a list in time order), found {schema.names}")
        if not ok(schema.field(name).type):
            raise InputError(f"--histories {uri}: column {name!r} must be {expected}, found {schema.field(name).type}")
    rows = footers.rows
    if rows > (DRIVER_CHECK_MAX_USERS if max_driver_users is None else max_driver_users):
        return HistoriesCheck(footers, None)
    users = data.int64_ids(read_parquet(uri, storage, columns=["user_id"])["user_id"], "user_id", f"--histories {uri}")
    u = np.sort(users.to_numpy())
    dup = u[1:][u[1:] == u[:-1]]
    if len(dup):
        raise InputError(duplicates_error(uri, len(np.unique(dup)), int(dup[0])))
    return HistoriesCheck(footers, u)


def duplicates_error(uri: str, duplicated: int, example: int) -> str:
    return f"--histories {uri}: {duplicated} duplicated user_id value(s), e.g. {example}; expected one row per user"


def output_check_error(rows: int, users: int, missing: int, extra: int) -> str:
    return f"output check failed: {rows} rows for {users} input users ({missing} missing, {extra} duplicated or unknown); nothing published"


def check_users_on_cluster(histories: str, storage: StorageConfig, users: int, staging: str | None = None) -> dict[str, int]:
    """The user checks for tables too large for the driver, as a Ray Data hash shuffle on
    user_id: the input's ids (and, given ``staging``, the scored rows) -> the sums of
    :func:`user_check_rows` over the partitions, with the smallest example id of each
    problem. The driver holds one row per partition."""
    import ray
    import ray.data
    from ray.data.context import ShuffleStrategy

    def side(uri: str, n: int, columns: list[str]):
        fs, path = arrow_filesystem(uri, storage)
        ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"]).select_columns(columns)
        return ds.map_batches(user_side, batch_format="pyarrow", fn_kwargs={"side": n})

    ds = side(histories, 0, ["user_id"])
    if staging is not None:
        ds = ds.union(side(staging, 1, ["user_id", "fallback", "unknown_items"]))
    n = max(1, math.ceil(users / USERS_PER_CHECK_PARTITION))
    # a partition must reach user_check_rows whole: no splitting of shuffle outputs
    ds.context.target_max_block_size = None
    if n == 1:
        ds.context.shuffle_strategy = ShuffleStrategy.HASH_SHUFFLE  # starts in ~1 s, not ~10
    ds = ds.repartition(n, keys=["user_id"]).map_batches(user_check_rows, batch_size=None, batch_format="pyarrow")
    parts = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    rows = pa.concat_tables(parts) if parts else USER_CHECK_SCHEMA.empty_table()
    sums = {name: int(pc.sum(rows[name]).as_py() or 0) for name in USER_CHECK_SCHEMA.names if not name.startswith("first_")}
    for name in ("duplicated", "missing", "extra"):
        found = pc.filter(rows[f"first_{name}"], pc.greater_equal(rows[f"first_{name}"], 0))
        sums[f"first_{name}"] = int(pc.min(found).as_py()) if len(found) else -1
    return sums


def check_cpu_reservation(cfg: ScoreConfig, cluster_cpus: float) -> None:
    """The actors hold their CPUs for the whole run and reading and writing tasks need one more.
    When the actors fit but leave less than one CPU, they start and the read never does: the
    run waits forever. (More than the cluster has is left to Ray: an autoscaler may add nodes.)"""
    reserved = cfg.actors * cfg.cpus_per_actor
    if cluster_cpus - 1 < reserved <= cluster_cpus:
        raise InputError(
            f"actors x cpus_per_actor = {cfg.actors} x {cfg.cpus_per_actor:g} = {reserved:g} CPUs leaves less than one "
            f"of the cluster's {cluster_cpus:g} CPUs for reading and writing; lower actors or cpus_per_actor "
            "(threads_per_actor sets torch threads independently of the reservation)"
        )


class Exclusions(NamedTuple):
    """--exclude, as item ids (:func:`read_exclusions`) or as tokens (:meth:`to_tokens`)."""

    global_items: np.ndarray  # what nobody is recommended
    users: np.ndarray | None  # per-user exclusions read by the driver: users ...
    items: np.ndarray | None  # ... and their items
    files: list[str] | None  # per-user exclusions too many for the driver: their files, joined on the cluster

    def to_tokens(self, vocab_ids: np.ndarray) -> "Exclusions":
        """Ids -> tokens, unknown items dropped; global tokens distinct, per-user rows sorted by user."""
        tokens, known = data.to_tokens(self.global_items, vocab_ids)
        global_tokens = np.unique(tokens[known])
        if self.users is None:
            return Exclusions(global_tokens, None, None, self.files)
        tokens, known = data.to_tokens(self.items, vocab_ids)
        users = self.users[known]
        order = np.argsort(users, kind="stable")
        return Exclusions(global_tokens, users[order], tokens[known][order], self.files)


def read_exclusions(uri: str | None, storage: StorageConfig, max_driver_rows: int | None = None) -> Exclusions:
    """--exclude -> the global item ids, or the per-user pairs of a table of at most
    ``max_driver_rows`` rows (default ``DRIVER_EXCLUDE_MAX_ROWS``). A larger per-user table is
    left to the cluster: only its schema and its footers' row counts are read here."""
    empty = np.zeros(0, np.int64)
    if uri is None:
        return Exclusions(empty, None, None, None)
    footers = parquet_footers(uri, storage)
    schema = footers.schema
    for name in ("item_id", "user_id"):
        if name == "user_id" and name not in schema.names:
            continue
        if name not in schema.names or not pa.types.is_integer(schema.field(name).type):
            found = schema.field(name).type if name in schema.names else "no such column"
            raise InputError(f"--exclude {uri}: column {name!r} must be integer ids (item_id, optionally with user_id), found {found}")
    per_user = "user_id" in schema.names
    if per_user and footers.rows > (DRIVER_EXCLUDE_MAX_ROWS if max_driver_rows is None else max_driver_rows):
        return Exclusions(empty, None, None, footers.files)
    t = read_parquet(uri, storage, columns=["user_id", "item_id"] if per_user else ["item_id"])
    ids = {name: data.int64_ids(t[name], name, f"--exclude {uri}").to_numpy() for name in t.column_names}
    if not per_user:
        return Exclusions(ids["item_id"], None, None, None)
    return Exclusions(empty, ids["user_id"], ids["item_id"], None)


def join_exclusions_on_cluster(ds, exclude: str, files: list[str], storage: StorageConfig, columns: pa.Schema, users: int):
    """Histories ``ds`` (``columns``) -> the same rows, each with its user's excluded item ids
    (:func:`attach_exclusions`), by a Ray Data hash shuffle on user_id of the histories and
    the per-user --exclude ``files`` read in tasks. The driver holds neither table."""
    import ray.data

    ex = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        exclusion_side, batch_size=1, batch_format="pyarrow", fn_kwargs={"uri": exclude, "storage": storage, "columns": columns}
    )
    both = ds.map_batches(history_side, batch_format="pyarrow").union(ex)
    both.context.target_max_block_size = None  # a partition must reach attach_exclusions whole
    n = max(1, math.ceil(users / USERS_PER_EXCLUDE_PARTITION))
    return both.repartition(n, keys=["user_id"]).map_batches(attach_exclusions, batch_size=None, batch_format="pyarrow")


def read_titles(uri: str | None, storage: StorageConfig, vocab_ids: np.ndarray) -> np.ndarray | None:
    """--items -> titles aligned with tokens (index 0 and unknown items: None)."""
    if uri is None:
        return None
    t = read_parquet(uri, storage, columns=None)
    if "item_id" not in t.column_names or "title" not in t.column_names:
        raise InputError(f"--items {uri}: expected columns 'item_id' and 'title', found {t.column_names}")
    titles = np.full(len(vocab_ids) + 2, None, dtype=object)
    tokens, known = data.to_tokens(t["item_id"].to_numpy(zero_copy_only=False), vocab_ids)
    titles[tokens[known]] = np.asarray(t["title"].to_pylist(), dtype=object)[known]
    return titles


def score(cfg: ScoreConfig, manifest_extra: dict | None = None, scorer_cls: type[Scorer] = Scorer) -> dict:
    """Scores every user of ``cfg.histories`` and publishes the table at ``cfg.out``;
    ``manifest_extra`` is added to its manifest. ``scorer_cls`` is the actor class: ``Scorer``
    or a subclass taking the same arguments (to count or log batches, say); it travels to
    the actors pickled."""

    cluster.require_shared_storage({"checkpoint": cfg.checkpoint, "histories": cfg.histories, "out": cfg.out}, cfg.storage)
    timings: dict[str, float] = {}
    t0 = time.time()
    exclude = read_exclusions(cfg.exclude, cfg.storage)
    if exclude.files is not None:  # read by tasks on any node
        cluster.require_shared_storage({"exclude": cfg.exclude}, cfg.storage)
    loaded = ckpt_lib.load(cfg.checkpoint, cfg.storage)
    mc = loaded.model.config
    if cfg.k > mc.num_items:
        raise InputError(f"--k {cfg.k} is larger than the catalogue of {mc.num_items} items in {loaded.uri}")
    hist = check_histories(cfg.histories, cfg.storage)
    vocab_ids = loaded.vocab_ids
    exclusions = exclude.to_tokens(vocab_ids)
    titles = read_titles(cfg.items, cfg.storage, vocab_ids)
    import ray

    console.ensure_ray()  # the check below needs the cluster's size
    check_cpu_reservation(cfg, ray.cluster_resources().get("CPU", 0.0))
    if hist.ids is None:
        found = check_users_on_cluster(cfg.histories, cfg.storage, hist.users)
        if found["null_users"]:
            raise InputError(f"--histories {cfg.histories}: {found['null_users']} null user_id value(s)")
        if found["duplicated"]:
            raise InputError(duplicates_error(cfg.histories, found["duplicated"], found["first_duplicated"]))
    timings["validate_s"] = time.time() - t0

    # one writer per output: a second run of the same --out waits for nothing and fails fast
    owner = f"score {socket.gethostname()}:{os.getpid()} {uuid.uuid4().hex[:8]}"
    with locks.lock(join(cfg.out, "_lock"), owner, cfg.storage):
        return _score_and_publish(cfg, loaded, hist, exclusions, titles, timings, t0, manifest_extra, scorer_cls)


def _score_and_publish(cfg, loaded, hist, exclusions, titles, timings, t0, manifest_extra, scorer_cls) -> dict:
    import ray
    import ray.data

    mc = loaded.model.config
    vocab_ids = loaded.vocab_ids
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    staging = publish.staging_dir(cfg.out, run_id)
    generated_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    columns = data.history_columns(hist.schema.names, mc.use_ratings)
    t1 = time.time()
    # batch-sized blocks: every actor takes a share, and the last one does not run alone
    ds = parquet_dataset(cfg.histories, hist.files, cfg.storage, columns, cfg.batch_size)
    if exclusions.files is not None:
        ds = join_exclusions_on_cluster(ds, cfg.exclude, exclusions.files, cfg.storage, pa.schema([hist.schema.field(c) for c in columns]), hist.users)
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)  # the shuffle's partitions are large
    ds = ds.map_batches(
        featurize,
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        # On CPU, the same reservation as the actor's lets Ray Data fuse featurize into the actor
        # (no separate tasks competing for the CPUs the actors leave free); on GPU it runs in CPU
        # tasks that feed the GPU actors.
        **({} if cfg.gpu else {"num_cpus": cfg.cpus_per_actor}),
        fn_kwargs={
            "vocab_ids": vocab_ids,
            "max_len": mc.max_len,
            "mask_token": mc.mask_token,
            "use_ratings": mc.use_ratings,
            "exclude_users": exclusions.users,
            "exclude_tokens": exclusions.items,
        },
    )
    ds = ds.map_batches(
        scorer_cls,
        fn_constructor_kwargs={
            "checkpoint_uri": loaded.uri,
            "storage": cfg.storage,
            "k": cfg.k,
            "item_chunk_size": cfg.item_chunk_size,
            "use_gpu": cfg.gpu,
            "global_exclude": exclusions.global_items,
            "titles": titles,
            "generated_at": generated_at,
            "threads": cfg.threads_per_actor,
            "sub_batch": cfg.sub_batch,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        # one batch running and one waiting per actor: enough to hide the hand-over, and no
        # queue left on one actor while another has nothing to do at the end
        compute=ray.data.ActorPoolStrategy(size=cfg.actors, max_tasks_in_flight_per_actor=2),
        num_gpus=1 if cfg.gpu else 0,
        num_cpus=cfg.cpus_per_actor,
    )
    out_fs, staging_path = arrow_filesystem(staging, cfg.storage)
    # a bad --exclude row found in a task reaches the user as our one-line InputError
    ds.context.raise_original_map_exception = True
    with console.progress("scoring", hist.users):
        try:
            # scoring runs in blocks of batch_size users; consumers would rather read few large files
            ds.write_parquet(staging_path, filesystem=out_fs, min_rows_per_file=cfg.rows_per_file, use_dictionary=dictionary_columns(titles is not None))
        except Exception as e:
            raise input_error_in(e) or e
    timings["score_s"] = time.time() - t1

    t2 = time.time()
    if hist.ids is not None:
        # the cluster's per-partition comparison, on the whole table at once
        staged = read_parquet(staging, cfg.storage, columns=["user_id", "fallback", "unknown_items"])
        found = user_check_rows(pa.concat_tables([user_side(pa.table({"user_id": hist.ids}), 0), user_side(staged, 1)])).to_pylist()[0]
    else:
        found = check_users_on_cluster(cfg.histories, cfg.storage, hist.users, staging)
    if found["missing"] or found["extra"] or found["output_rows"] != hist.users:
        _discard(staging, cfg.storage)
        raise RuntimeError(output_check_error(found["output_rows"], hist.users, found["missing"], found["extra"]))
    counts = {"input_users": hist.users, "fallback_users": found["fallback_users"], "unknown_items": found["unknown_items"]}
    timings["verify_s"] = time.time() - t2
    timings["total_s"] = time.time() - t0
    manifest = publish.publish(
        cfg.out,
        staging,
        {
            **counts,
            "k": cfg.k,
            "model_version": loaded.model_version,
            "checkpoint": loaded.uri,
            "generated_at": generated_at.isoformat(),
            "timings": {k: round(v, 3) for k, v in timings.items()},
            **(manifest_extra or {}),
        },
        storage=cfg.storage,
    )
    return {"out": cfg.out, **manifest}


def _discard(staging: str, storage: StorageConfig) -> None:
    fs, path = filesystem(staging, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
