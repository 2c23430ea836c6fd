"""Synthetic interactions with sequential structure a recommender can learn.

The catalogue (depends only on ``seed`` and ``items``):

* popularity is Zipf-like (exponent ``ZIPF_EXPONENT``) over a random permutation of the ids;
* items are split into ``TASTES`` balanced taste clusters;
* every item has ``SUCCESSORS`` likely successors, mostly in its own cluster, drawn
  popularity-weighted, taken with fixed decreasing probabilities.

Each user has a mixture over ``USER_TASTES`` clusters. Their first item comes from that
mixture; after it, with probability ``P_TRANSITION`` the next item is a successor of the
previous one, otherwise a fresh draw from the mixture (popularity-weighted inside a cluster).
An item seen in the last ``REPEAT_WINDOW`` steps is redrawn (a few times), so repeats are
rare and immediate repeats never happen. Ratings are higher in the user's favourite cluster.

Repeat avoidance pushes users from the popular items they have already seen to the tail, so
the realised popularity is flatter than the nominal Zipf law, the more so the smaller the
catalogue: with exponent 1, the top 10% of items hold about 33% of the interactions with 500
items and about 73% with 20,000.

Randomness per user comes from a counter-based hash of ``(seed, user, step, stream)``: the
rows of a user are the same whatever chunk they are generated in, and whole chunks are
generated with array operations (one loop step per sequence position, not per user).
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from bert4rec.config import StorageConfig

SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("item_id", pa.int64()),
        pa.field("timestamp", pa.int64()),
        pa.field("rating", pa.float32()),
    ]
)

ZIPF_EXPONENT = 1.0
TASTES = 20
USER_TASTES = 3
SUCCESSORS = 6
# Steep enough that the first successor is a clear favourite, flat enough that the rest matter.
SUCCESSOR_PROBS = np.array([0.36, 0.24, 0.16, 0.11, 0.08, 0.05])
# Successors are drawn with popularity ** this. Below 1 spreads successor lists over the tail;
# 1 already leaves the bigram model several times better than most-popular.
SUCCESSOR_POP_EXPONENT = 1.0
P_SAME_CLUSTER = 0.85
P_TRANSITION = 0.65
REPEAT_WINDOW = 200
# Redraws before falling back to a uniform draw; each attempt uses 4 hash streams below _S_FALLBACK.
ATTEMPTS = 8
# mean stars of an item in the user's favourite taste, in another of their tastes, elsewhere
RATING_FAVOURITE, RATING_TASTE, RATING_OTHER = 4.2, 3.6, 2.9
START_TIME = 1_577_836_800  # 2020-01-01T00:00:00Z
START_SPAN_S = 4 * 365 * 86_400
MEAN_GAP_S = 6 * 3600

# Hash streams: each random decision of a step has its own stream number.
_STREAMS_PER_STEP = 64
_S_MODE, _S_SUCC, _S_TASTE, _S_ITEM = 0, 1, 2, 3  # + 4 * attempt
_S_FALLBACK, _S_GAP, _S_RATING, _S_RATING_2, _S_UNIFORM_TASTE, _S_UNIFORM_ITEM = 40, 41, 42, 43, 44, 45
# Per-user (not per-step) draws use step -1.
_S_LENGTH, _S_START, _S_TASTE_PICK, _S_TASTE_WEIGHT = 0, 1, 10, 20  # + taste slot

assert 4 * ATTEMPTS <= _S_FALLBACK

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class _Catalogue:
    items: int
    clusters: int
    cluster_of: np.ndarray  # (items,) int32: cluster of each 0-based item
    members: np.ndarray  # (items,) int32: items sorted by cluster
    member_key: np.ndarray  # (items,) float64: cluster + within-cluster popularity CDF
    cluster_end: np.ndarray  # (clusters,) int64: end of each cluster in ``members``
    cluster_size: np.ndarray  # (clusters,) int64
    successors: np.ndarray  # (items, SUCCESSORS) int32


# SplitMix64's finaliser: a strong 64-bit mixer, so consecutive counters give independent bits.
def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _user_keys(seed: int, users: np.ndarray) -> np.ndarray:
    base = np.uint64(((seed % (1 << 64)) * _GOLDEN + 0x632BE59BD9B4E019) & _M64)
    with np.errstate(over="ignore"):
        return _mix(_mix(users.astype(np.uint64) * np.uint64(_GOLDEN) + base))


# A pure function of (key, step, stream), so any subset of users can be drawn for in any order.
def _uniform(keys: np.ndarray, step: int | np.ndarray, stream: int) -> np.ndarray:
    if isinstance(step, np.ndarray):
        counter = (step.astype(np.int64) + 1) * _STREAMS_PER_STEP + stream + 1
        offset = counter.astype(np.uint64) * np.uint64(_GOLDEN)
    else:
        offset = np.uint64((((step + 1) * _STREAMS_PER_STEP + stream + 1) * _GOLDEN) & _M64)
    with np.errstate(over="ignore"):
        z = _mix(keys + offset)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ``key`` is cluster + within-cluster CDF, so one searchsorted samples every row's own cluster.
def _sample_in_cluster(cat: _Catalogue, key: np.ndarray, cluster: np.ndarray, u: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(key, cluster + u, side="right")
    # c + u can round up to c + 1 when u is within an ulp of 1
    pos = np.minimum(pos, cat.cluster_end[cluster] - 1)
    return cat.members[pos]


def _build_catalogue(seed: int, items: int) -> _Catalogue:
    rng = np.random.default_rng(np.random.SeedSequence([seed % (1 << 64), items, 0x5EC]))
    clusters = max(1, min(TASTES, items // 10))
    popularity = np.empty(items, dtype=np.float64)
    popularity[rng.permutation(items)] = 1.0 / np.arange(1, items + 1, dtype=np.float64) ** ZIPF_EXPONENT
    # a permutation modulo K gives balanced clusters, each with a random mix of popularity ranks
    cluster_of = (rng.permutation(items) % clusters).astype(np.int32)
    members = np.argsort(cluster_of, kind="stable").astype(np.int32)
    sizes = np.bincount(cluster_of, minlength=clusters).astype(np.int64)
    cluster_end = np.cumsum(sizes).astype(np.int64)

    def keys_for(weights: np.ndarray) -> np.ndarray:
        w = weights[members]
        cum = np.cumsum(w)
        before = np.repeat(np.concatenate([[0.0], cum[cluster_end[:-1] - 1]]), sizes)
        total = np.repeat(cum[cluster_end - 1], sizes) - before
        cdf = (cum - before) / total
        cdf[cluster_end - 1] = 1.0
        return np.repeat(np.arange(clusters, dtype=np.float64), sizes) + cdf

    member_key = keys_for(popularity)
    cat = _Catalogue(items, clusters, cluster_of, members, member_key, cluster_end, sizes, np.empty((0, 0), np.int32))

    succ_key = keys_for(popularity**SUCCESSOR_POP_EXPONENT)
    own = np.repeat(cluster_of[:, None], SUCCESSORS, axis=1)
    other = (own + rng.integers(1, max(clusters, 2), size=own.shape)) % clusters
    target = np.where(rng.random(own.shape) < P_SAME_CLUSTER, own, other)
    successors = _sample_in_cluster(cat, succ_key, target.ravel(), rng.random(target.size)).reshape(target.shape)
    self_ = np.arange(items, dtype=np.int32)[:, None]
    for _ in range(8):
        clash = successors == self_
        if not clash.any():
            break
        rows, cols = np.nonzero(clash)
        successors[rows, cols] = _sample_in_cluster(cat, succ_key, target[rows, cols], rng.random(rows.size))
    # Only reachable by extreme bad luck (clusters have >= 10 items): a neighbouring id.
    rows, cols = np.nonzero(successors == self_)
    successors[rows, cols] = (rows + 1) % items
    return _Catalogue(items, clusters, cluster_of, members, member_key, cluster_end, sizes, successors.astype(np.int32))


# generate_chunk callers (tests, notebooks) make many calls for one catalogue; generate builds its
# own so that a large catalogue is not pinned in memory after it returns.
_catalogue = functools.lru_cache(maxsize=2)(_build_catalogue)


def generate_chunk(
    first_user: int,
    n_users: int,
    items: int,
    seed: int = 0,
    min_length: int = 5,
    max_length: int = 200,
    mean_length: int = 40,
) -> pa.Table:
    """Rows of users ``first_user .. first_user + n_users - 1`` (1-based ids).

    Deterministic in ``(seed, items, user)`` and the length parameters: a user's rows do not
    depend on which chunk they are generated in. Rows are grouped by user, in time order.
    """
    _check(n_users, items, min_length, max_length)
    if first_user < 1:
        raise ValueError(f"first_user must be >= 1, got {first_user}")
    return _generate_chunk(_catalogue(seed, items), first_user, n_users, seed, min_length, max_length, mean_length)


def _check(users: int, items: int, min_length: int, max_length: int) -> None:
    if users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    if items < 2:
        raise ValueError(f"items must be >= 2 (no immediate repeats), got {items}")
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length} and {max_length}")


def _pick_taste(tastes: np.ndarray, cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    slot = np.minimum((u[:, None] >= cdf).sum(axis=1), USER_TASTES - 1)
    return tastes[np.arange(len(slot)), slot]


def _generate_chunk(
    cat: _Catalogue,
    first_user: int,
    n_users: int,
    seed: int,
    min_length: int,
    max_length: int,
    mean_length: int,
) -> pa.Table:
    user_ids = np.arange(first_user, first_user + n_users, dtype=np.int64)
    keys = _user_keys(seed, user_ids)

    # Lengths: min_length + geometric, mean ~ mean_length before clipping at max_length.
    p = 1.0 / max(1.0, mean_length - min_length + 1.0)
    if p >= 1.0:
        lengths = np.full(n_users, min_length, dtype=np.int64)
    else:
        u = _uniform(keys, -1, _S_LENGTH)
        extra = np.floor(np.log1p(-u) / np.log1p(-p))
        lengths = np.minimum(min_length + extra, max_length).astype(np.int64)

    # Taste mixtures: USER_TASTES clusters with Dirichlet(1) weights (normalised exponentials).
    picks = np.stack([_uniform(keys, -1, _S_TASTE_PICK + j) for j in range(USER_TASTES)], axis=1)
    tastes = np.minimum((picks * cat.clusters).astype(np.int64), cat.clusters - 1)
    u = np.stack([_uniform(keys, -1, _S_TASTE_WEIGHT + j) for j in range(USER_TASTES)], axis=1)
    weights = -np.log1p(-u) + 1e-12
    taste_cdf = np.cumsum(weights, axis=1)
    taste_cdf /= taste_cdf[:, -1:]
    favourite = tastes[np.arange(n_users), np.argmax(weights, axis=1)]

    # Generate longest-first so that the users still active at step t are a prefix.
    order = np.argsort(-lengths, kind="stable")
    s_keys, s_len, s_tastes, s_cdf = keys[order], lengths[order], tastes[order], taste_cdf[order]
    max_len = int(s_len[0]) if n_users else 0
    active_at = np.searchsorted(-s_len, -np.arange(max_len), side="right")  # users with length > t
    hist = np.zeros((n_users, max_len), dtype=np.int32)
    succ_cdf = np.cumsum(SUCCESSOR_PROBS / SUCCESSOR_PROBS.sum())

    for t in range(max_len):
        m = int(active_at[t])
        lo = max(0, t - REPEAT_WINDOW)
        # first attempt on a slice (views, no copies): most users are done after it
        rows: slice | np.ndarray = slice(0, m)
        chosen = np.zeros(m, dtype=np.int32)
        for a in range(ATTEMPTS):
            k = s_keys[rows]
            base = 4 * a
            cluster = _pick_taste(s_tastes[rows], s_cdf[rows], _uniform(k, t, _S_TASTE + base))
            cand = _sample_in_cluster(cat, cat.member_key, cluster, _uniform(k, t, _S_ITEM + base))
            if t == 0:
                chosen[rows] = cand
                break
            use_succ = _uniform(k, t, _S_MODE + base) < P_TRANSITION
            j = np.minimum(np.searchsorted(succ_cdf, _uniform(k, t, _S_SUCC + base), side="right"), SUCCESSORS - 1)
            cand = np.where(use_succ, cat.successors[hist[rows, t - 1], j], cand)
            chosen[rows] = cand
            seen = (hist[rows, lo:t] == cand[:, None]).any(axis=1)
            rows = np.arange(m)[seen] if a == 0 else rows[seen]
            if rows.size == 0:
                break
        if t > 0 and rows.size:
            # Out of attempts, usually because the popular items of the user's tastes are all
            # seen: one uniform draw from the tastes finds the unseen tail. A repeat after that
            # is tolerated, an immediate one is not.
            k = s_keys[rows]
            cluster = _pick_taste(s_tastes[rows], s_cdf[rows], _uniform(k, t, _S_UNIFORM_TASTE))
            size = cat.cluster_size[cluster]
            pick = np.minimum((_uniform(k, t, _S_UNIFORM_ITEM) * size).astype(np.int64), size - 1)
            cand = cat.members[cat.cluster_end[cluster] - size + pick]
            fresh = ~(hist[rows, lo:t] == cand[:, None]).any(axis=1)
            chosen[rows[fresh]] = cand[fresh]
            rows = rows[~fresh]
            prev = hist[rows, t - 1]
            same = chosen[rows] == prev
            if same.any():
                rows, prev = rows[same], prev[same]
                u = _uniform(s_keys[rows], t, _S_FALLBACK)
                shift = 1 + np.minimum((u * (cat.items - 1)).astype(np.int64), cat.items - 2)
                chosen[rows] = ((prev.astype(np.int64) + shift) % cat.items).astype(np.int32)
        hist[:m, t] = chosen

    inv = np.empty_like(order)
    inv[order] = np.arange(n_users)
    hist = hist[inv]
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    item0 = hist[mask].astype(np.int64)
    row_user = np.repeat(np.arange(n_users), lengths)
    pos = np.broadcast_to(np.arange(max_len), hist.shape)[mask]
    row_keys = keys[row_user]

    gap_u = _uniform(row_keys, pos, _S_GAP)
    gaps = 1 + np.floor(-np.log1p(-gap_u) * MEAN_GAP_S).astype(np.int64)
    start = START_TIME + np.floor(_uniform(keys, -1, _S_START) * START_SPAN_S).astype(np.int64)
    ends = np.cumsum(lengths)
    csum = np.cumsum(gaps)
    before = np.concatenate([[0], csum[ends[:-1] - 1]]) if n_users else np.zeros(0, np.int64)
    timestamps = start[row_user] + csum - np.repeat(before, lengths)

    item_cluster = cat.cluster_of[item0]
    in_mix = (tastes[row_user] == item_cluster[:, None]).any(axis=1)
    is_fav = favourite[row_user] == item_cluster
    mean = np.where(is_fav, RATING_FAVOURITE, np.where(in_mix, RATING_TASTE, RATING_OTHER))
    # triangular noise on [-2.2, 2.2] (sd 0.9): all five stars occur, mostly 3-5 as in real data
    noise = (_uniform(row_keys, pos, _S_RATING) + _uniform(row_keys, pos, _S_RATING_2) - 1.0) * 2.2
    ratings = np.clip(np.rint(mean + noise), 1, 5).astype(np.float32)

    return pa.Table.from_arrays(
        [
            pa.array(user_ids[row_user], pa.int64()),
            pa.array(item0 + 1, pa.int64()),
            pa.array(timestamps, pa.int64()),
            pa.array(ratings, pa.float32()),
        ],
        schema=SCHEMA,
    )


_PART = re.compile(r"^part-(\d{5,})\.parquet$")


def generate(
    out: str,
    users: int,
    items: int,
    seed: int = 0,
    storage: StorageConfig | None = None,
    chunk_users: int = 50_000,
    min_length: int = 5,
    max_length: int = 200,
    mean_length: int = 40,
) -> dict[str, int]:
    """Writes ``users`` users' interactions under directory ``out`` as ``part-NNNNN.parquet``.

    One file per ``chunk_users`` users, streamed so memory is bounded by a chunk. Part files
    left in ``out`` by an earlier, larger run are removed, so ``out`` reads back as exactly
    this data set. Returns ``{"users", "items", "interactions", "files"}``.
    """
    # imported here so generating chunks does not need the config/model stack (and torch)
    from bert4rec import io as bio

    _check(users, items, min_length, max_length)
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be >= 1, got {chunk_users}")
    fs, path = bio.filesystem(out, storage)
    if bio.storage_call(out, lambda: fs.isfile(path)):
        raise bio.InputError(f"--out {out}: is a file; generate writes a directory of part-*.parquet files")
    bio.storage_call(out, lambda: fs.makedirs(path, exist_ok=True))
    cat = _build_catalogue(seed, items)
    join = posixpath.join if bio.is_s3(out) else os.path.join
    interactions = 0
    files = 0
    for first in range(1, users + 1, chunk_users):
        n = min(chunk_users, users - first + 1)
        table = _generate_chunk(cat, first, n, seed, min_length, max_length, mean_length)
        pq.write_table(table, join(path, f"part-{files:05d}.parquet"), filesystem=fs, compression="zstd")
        interactions += table.num_rows
        files += 1
    for p in fs.ls(path, detail=False):
        m = _PART.match(p.rstrip("/").rsplit("/", 1)[-1])
        if m and int(m.group(1)) >= files:
            fs.rm(p)
    return {"users": users, "items": items, "interactions": interactions, "files": files}
