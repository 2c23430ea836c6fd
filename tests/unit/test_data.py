"""Pure data transforms on tiny hand-written tables, exact expected values."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from bert4rec import data
from bert4rec.io import InputError


def _interactions(rows, with_rating=True):
    cols = list(zip(*rows))
    t = {"user_id": pa.array(cols[0], pa.int64()), "item_id": pa.array(cols[1], pa.int64()), "timestamp": pa.array(cols[2], pa.int64())}
    if with_rating:
        t["rating"] = pa.array(cols[3], pa.float32())
    return pa.table(t)


# user 2 has a tie at t=5 (items 30 then 10 in input order), user 1 is out of time order,
# user 3 is too short
TABLE = _interactions(
    [
        (2, 30, 5, 4.0),
        (1, 10, 3, 5.0),
        (2, 10, 5, 2.0),
        (1, 20, 1, 3.0),
        (3, 10, 1, 5.0),
        (1, 30, 2, 1.0),
        (2, 20, 9, 5.0),
        (2, 40, 1, 3.0),
    ]
)


def test_histories_are_time_ordered_with_stable_ties_and_short_users_dropped():
    hist, stats = data.build_histories(data.validate_interactions(TABLE, "t"), min_user_interactions=3)
    assert hist["user_id"].to_pylist() == [1, 2]
    assert hist["item_ids"].to_pylist() == [[20, 30, 10], [40, 30, 10, 20]]
    assert hist["ratings"].to_pylist() == [[3.0, 1.0, 5.0], [3.0, 4.0, 2.0, 5.0]]
    assert stats["dropped"] == {"null_timestamp": 0, "short_user_rows": 1, "short_users": 1}
    assert stats["input_rows"] == 8
    assert (stats["users"], stats["interactions"], stats["items"]) == (2, 7, 4)


def test_min_rating_and_truncation_keep_the_most_recent_items():
    hist, stats = data.build_histories(data.validate_interactions(TABLE, "t"), min_rating=3.0, min_user_interactions=3, max_len=2)
    # user 1 keeps 20 (3.0) and 10 (5.0): only 2 -> dropped; user 2 keeps 40, 30, 20 -> last 2
    assert hist["user_id"].to_pylist() == [2]
    assert hist["item_ids"].to_pylist() == [[30, 20]]
    assert stats["dropped"]["below_min_rating"] == 2
    assert stats["dropped"]["truncated_rows"] == 1


def test_truncation_lists_the_distinct_items_cut_before_the_kept_ones():
    t = _interactions([(1, i, ts, 5.0) for ts, i in enumerate([7, 3, 7, 9, 3, 4, 5, 6])] + [(2, 8, 1, 5.0), (2, 9, 2, 5.0), (2, 1, 3, 5.0)])
    hist, stats = data.build_histories(data.validate_interactions(t, "t"), min_user_interactions=3, max_len=3)
    assert hist["item_ids"].to_pylist() == [[4, 5, 6], [8, 9, 1]]
    # user 1's cut items 7, 3, 7, 9, 3: distinct and ascending; user 2 lost nothing
    assert hist[data.TRUNCATED_COLUMN].to_pylist() == [[3, 7, 9], []]
    assert hist[data.TRUNCATED_COLUMN].type == pa.list_(pa.int64())
    assert stats["dropped"]["truncated_rows"] == 5
    # without max_len nothing is cut and the column is not written
    hist, _ = data.build_histories(data.validate_interactions(t, "t"), min_user_interactions=3)
    assert data.TRUNCATED_COLUMN not in hist.column_names


def test_null_timestamps_are_dropped_and_counted():
    t = TABLE.set_column(2, "timestamp", pa.array([5, 3, 5, None, 1, 2, 9, 1], pa.int64()))
    hist, stats = data.build_histories(data.validate_interactions(t, "t"), min_user_interactions=2)
    assert stats["dropped"]["null_timestamp"] == 1
    assert hist["item_ids"].to_pylist()[0] == [30, 10]


@pytest.mark.parametrize(
    "table, message",
    [
        (TABLE.drop_columns(["item_id"]), "missing column(s) ['item_id']"),
        (TABLE.set_column(0, "user_id", pa.array(["a"] * 8)), "column 'user_id' must be integer, found string"),
        (TABLE.set_column(1, "item_id", pa.array([1, 2, None, 4, 5, 6, 7, 8], pa.int64())), "column 'item_id' has 1 null value(s), first at row 2"),
        (TABLE.set_column(2, "timestamp", pa.array(["x"] * 8)), "column 'timestamp' must be integers (seconds, ms, us or ns since 1970) or a timestamp, found string"),
        (TABLE.rename_columns(["user_id", "userId", "timestamp", "rating"]), "column(s) ['user_id'] appear more than once"),
        (TABLE.set_column(1, "item_id", pa.array([1.0, 2.0, 1.5, 4, 5, 6, 7, 8])), "column 'item_id' must be integer, found double; row 2 is 1.5"),
        (TABLE.set_column(1, "item_id", pa.array([1.0, 2.0, None, 4, 5, 6, 7, 8])), "column 'item_id' must be integer, found double; row 2 is nan"),
        (TABLE.set_column(0, "user_id", pa.array([1, 2, 3, 2**63, 1, 1, 1, 1], pa.uint64())), "column 'user_id' row 3 is 9223372036854775808, past the largest int64 id"),
        (TABLE.set_column(2, "timestamp", pa.array([1, None, 2**64 - 1, 1, 1, 2, 9, 1], pa.uint64())), "column 'timestamp' row 2 is 18446744073709551615: not a time between 1970 and 2100 in any unit"),
        (TABLE.set_column(2, "timestamp", pa.array([5, 3, -5, 1, 1, 2, 9, 1], pa.int64())), "column 'timestamp' row 2 is -5, read as seconds (inferred from its magnitude): not a time between 1970 and 2100; declare the unit"),
    ],
)
def test_bad_interactions_are_reported_by_field(table, message):
    with pytest.raises(InputError) as e:
        data.validate_interactions(table, "in.parquet")
    assert message in str(e.value)
    assert str(e.value).startswith("in.parquet:")


def test_movielens_csv_column_names_are_accepted():
    t = pa.table({"userId": [1], "movieId": [2], "rating": [4.0], "timestamp": [7]})
    assert data.validate_interactions(t, "ratings.csv").column_names == ["user_id", "item_id", "timestamp", "rating"]


def test_vocabulary_maps_sorted_item_ids_to_tokens_1_to_v_with_counts():
    hist, _ = data.build_histories(data.validate_interactions(TABLE, "t"), min_user_interactions=3)
    vocab = data.build_vocab(hist)
    assert vocab.to_pydict() == {"item_id": [10, 20, 30, 40], "token": [1, 2, 3, 4], "count": [2, 2, 2, 1]}
    tokens, known = data.to_tokens(np.array([40, 10, 99, 20, 5]), vocab["item_id"].to_numpy())
    assert tokens.tolist() == [4, 1, 0, 2, 0]
    assert known.tolist() == [True, True, False, True, False]


def test_pad_left_truncates_to_the_most_recent():
    out = data.pad_left([np.array([1, 2, 3, 4]), np.array([5]), np.array([], np.int64)], 3)
    assert out.tolist() == [[2, 3, 4], [0, 0, 5], [0, 0, 0]]


def test_pad_seen_pads_to_the_longest_list_with_at_least_one_column():
    seen = [np.array([4, 2]), np.array([], np.int64), np.array([7, 1, 3])]
    assert data.pad_seen(seen).tolist() == [[0, 4, 2], [0, 0, 0], [7, 1, 3]]
    assert data.pad_seen([np.array([], np.int64)] * 2).tolist() == [[0], [0]]


def test_leave_one_out_split():
    seqs = [np.array([1, 2, 3, 4, 5])]
    assert [x.tolist() for x in data.loo_examples(seqs, "test")[0]] == [[1, 2, 3, 4]]
    assert data.loo_examples(seqs, "test")[1].tolist() == [5]
    assert [x.tolist() for x in data.loo_examples(seqs, "val")[0]] == [[1, 2, 3]]
    assert data.loo_examples(seqs, "val")[1].tolist() == [4]


def test_inference_appends_mask_after_the_history_never_over_the_last_item():
    mask = 9
    out = data.inference_tokens([np.array([1, 2, 3, 4, 5]), np.array([7])], max_len=4, mask_token=mask)
    # keeps the last max_len - 1 = 3 items, then [MASK]
    assert out.tolist() == [[3, 4, 5, 9], [0, 0, 7, 9]]
    assert data.inference_ratings([np.array([5, 4, 3, 2, 1])], 4).tolist() == [[3, 2, 1, 0]]


def test_masking_never_leaks_the_target_and_masks_at_least_one_item():
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 2]])
    mask_token = 9
    for _ in range(50):
        inputs, labels = data.mask_batch(tokens, mask_token, mask_prob=0.3, last_item_prob=0.2, generator=g)
        masked = labels > 0
        assert masked.any(dim=1).all()
        # where masked: the input is [MASK] and the label the true item; elsewhere unchanged
        assert torch.equal(inputs[masked], torch.full_like(inputs[masked], mask_token))
        assert torch.equal(labels[masked], tokens[masked])
        assert torch.equal(inputs[~masked], tokens[~masked])
        # padding is never masked
        assert not masked[tokens == 0].any()


def test_last_item_only_masking():
    tokens = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    inputs, labels = data.mask_batch(tokens, 9, mask_prob=0.5, last_item_prob=1.0, generator=torch.Generator().manual_seed(1))
    assert inputs.tolist() == [[0, 1, 2, 9], [4, 5, 6, 9]]
    assert labels.tolist() == [[0, 0, 0, 3], [0, 0, 0, 7]]


def test_rating_levels():
    assert data.rating_levels(np.array([1.0, 4.6, np.nan, 5.0], np.float32), 4).tolist() == [1, 5, 0, 5]
    assert data.rating_levels(None, 2).tolist() == [0, 0]


def test_trim_padding_drops_only_shared_leading_padding():
    batch = {"tokens": torch.tensor([[0, 0, 0, 1, 2], [0, 0, 3, 4, 5]]), "ratings": torch.tensor([[0, 0, 0, 5, 4], [0, 0, 1, 2, 3]])}
    out = data.trim_padding(batch)
    assert out["tokens"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert out["ratings"].tolist() == [[0, 5, 4], [1, 2, 3]]


def test_length_chunks_order_rows_by_length_ties_in_row_order():
    # lengths 1, 4, 2, 4, 1
    tokens = torch.tensor([[0, 0, 0, 1], [1, 2, 3, 4], [0, 0, 5, 6], [7, 8, 9, 1], [0, 0, 0, 2]])
    assert [c.tolist() for c in data.length_chunks(tokens, 2)] == [[0, 4], [2, 1], [3]]
    assert [c.tolist() for c in data.length_chunks(tokens, 10)] == [[0, 4, 2, 1, 3]]
    assert data.length_chunks(tokens[:0], 2) == []


def test_length_buckets_group_similar_lengths_and_keep_every_row():
    tokens = torch.tensor([[0, 0, 0, 1], [1, 2, 3, 4], [0, 0, 5, 6], [7, 8, 9, 1], [0, 0, 0, 2]])
    batches = data.length_buckets({"tokens": tokens}, batch_size=2, generator=torch.Generator().manual_seed(0))
    rows = sorted(tuple(r[r > 0].tolist()) for b in batches for r in b["tokens"])
    assert rows == sorted(tuple(r[r > 0].tolist()) for r in tokens)
    widths = sorted(b["tokens"].shape[1] for b in batches)
    # lengths 1,1 | 2,4 | 4 -> widths 1, 4, 4
    assert widths == [1, 4, 4]


def test_an_empty_table_passes_validation_and_fails_building():
    # an empty partition among others is fine; an empty input as a whole is not
    empty = data.validate_interactions(TABLE.slice(0, 0), "in.parquet")
    assert empty.num_rows == 0 and empty.column_names == ["user_id", "item_id", "timestamp", "rating"]
    with pytest.raises(InputError, match="the interactions table is empty"):
        data.build_histories(empty)


S = 1_700_000_000  # 2023-11-14, in seconds


@pytest.mark.parametrize(
    "values, unit, expected_ns",
    [
        ([S, S + 1, None], "auto", [S * 10**9, (S + 1) * 10**9, None]),
        ([S * 1000, S * 1000 + 7], "auto", [S * 10**9, S * 10**9 + 7 * 10**6]),
        ([S * 10**6 + 3], "auto", [S * 10**9 + 3000]),
        ([S * 10**9 + 3], "auto", [S * 10**9 + 3]),
        ([S * 1000], "ms", [S * 10**9]),
        ([0, 5], "auto", [0, 5 * 10**9]),
        ([S], "s", [S * 10**9]),
    ],
)
def test_integer_timestamps_become_nanoseconds_in_their_unit(values, unit, expected_ns):
    out = data.timestamps_ns(pa.array(values, pa.int64()), unit, "t.parquet")
    assert out.type == pa.int64()
    assert out.to_pylist() == expected_ns


def test_timestamp_and_date_types_carry_their_unit():
    ms = pa.array([S * 1000 + 1, None], pa.timestamp("ms", tz="UTC"))
    assert data.timestamps_ns(ms, "auto", "t").to_pylist() == [S * 10**9 + 10**6, None]
    assert data.timestamps_ns(pa.array([1], pa.date32()), "s", "t").to_pylist() == [86_400 * 10**9]


@pytest.mark.parametrize(
    "values, unit, message",
    [
        (
            [S, S + 1, S * 1000, S + 2],
            "auto",
            "t.parquet: column 'timestamp' mixes units: row 2 is 1700000000000 (milliseconds?) while most values, e.g. row 0 = 1700000000, read as seconds; declare the unit with timestamp_unit: s, ms, us or ns",
        ),
        ([S * 1000, S * 10**6], "ms", "t.parquet: column 'timestamp' row 1 is 1700000000000000, in milliseconds: not a time between 1970 and 2100; declare"),
        ([S, S * 1000], "s", "t.parquet: column 'timestamp' row 1 is 1700000000000, in seconds: not a time between 1970 and 2100"),
        ([S, 5_000_000_000], "auto", "t.parquet: column 'timestamp' row 1 is 5000000000, read as seconds (inferred from its magnitude): not a time"),
        ([S, -1], "ns", "row 1 is -1, in nanoseconds: not a time between 1970 and 2100"),
    ],
)
def test_implausible_or_mixed_timestamps_are_refused_naming_the_row(values, unit, message):
    with pytest.raises(InputError) as e:
        data.timestamps_ns(pa.array(values, pa.int64()), unit, "t.parquet")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_millisecond_histories_keep_their_order_within_a_second():
    # the same second, out of order in the input: milliseconds decide, not input order
    t = pa.table({"user_id": [1, 1, 1], "item_id": [10, 20, 30], "timestamp": [S * 1000 + 900, S * 1000 + 100, S * 1000 + 500]})
    hist, _ = data.build_histories(data.validate_interactions(t, "t"), min_user_interactions=3)
    assert hist["item_ids"].to_pylist() == [[20, 30, 10]]


def test_every_dropped_row_is_counted_with_its_reason():
    day = 86_400 * 10**9
    rows = [
        (1, 10, 1 * day, 5.0),
        (1, 20, 2 * day, 5.0),
        (1, 30, 3 * day, 5.0),
        (1, 40, 4 * day, 5.0),
        (1, 50, 5 * day, 5.0),  # after the bound
        (1, 60, None, 5.0),  # null time
        (1, 70, 1 * day, 1.0),  # below min_rating
        (2, 10, 1 * day, 5.0),  # user 2: 2 rows, short
        (2, 20, 2 * day, 5.0),
        (2, 30, 6 * day, 5.0),  # after the bound
    ]
    cols = list(zip(*rows))
    t = pa.table({"user_id": pa.array(cols[0], pa.int64()), "item_id": pa.array(cols[1], pa.int64()), "timestamp": pa.array(cols[2], pa.int64()), "rating": pa.array(cols[3], pa.float32())})
    hist, stats = data.build_histories(t, min_rating=3.0, min_user_interactions=3, max_len=3, before_ns=5 * day)
    assert hist["item_ids"].to_pylist() == [[20, 30, 40]]
    assert stats["dropped"] == {
        "null_timestamp": 1,
        "after_until_rows": 2,
        "below_min_rating": 1,
        "short_user_rows": 2,
        "short_users": 1,
        "truncated_rows": 1,
    }
    rows_dropped = sum(v for k, v in stats["dropped"].items() if k != "short_users")
    assert stats["input_rows"] == 10 == stats["interactions"] + rows_dropped


def test_history_columns_are_what_ranking_reads_of_what_the_table_has():
    names = ["user_id", "item_ids", "timestamps", "ratings", data.TRUNCATED_COLUMN]
    assert data.history_columns(names, use_ratings=True) == ["user_id", "item_ids", "ratings", data.TRUNCATED_COLUMN]
    assert data.history_columns(names, use_ratings=False) == ["user_id", "item_ids", data.TRUNCATED_COLUMN]
    assert data.history_columns(["user_id", "item_ids", "timestamps"], use_ratings=True) == ["user_id", "item_ids"]
