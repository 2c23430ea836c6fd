"""Histories -> training sequences (the last two items held out), with and without windows."""

import numpy as np
import pyarrow as pa
import pytest

from bert4rec.train import training_rows, window_ends

VOCAB = np.arange(10, 200, 10)  # item 10 -> token 1, 20 -> 2, ...


def _histories(*seqs, ratings=None):
    cols = {"user_id": pa.array(range(len(seqs)), pa.int64()), "item_ids": pa.array([list(s) for s in seqs], pa.list_(pa.int64()))}
    if ratings is not None:
        cols["ratings"] = pa.array(ratings, pa.list_(pa.float32()))
    return pa.table(cols)


@pytest.mark.parametrize(
    "n, max_len, stride, expected",
    [
        (5, 4, None, [5]),
        (3, 4, 2, [3]),  # fits: one window
        (4, 4, 2, [4]),
        (9, 4, 4, [9, 5]),  # 5..9 and 1..5: the second reaches the first item
        (10, 4, 4, [10, 6, 2]),
        (9, 4, 2, [9, 7, 5, 3]),  # overlapping
        (7, 4, 6, [7]),  # a window of 1 item is not kept
        (8, 4, 6, [8, 2]),
    ],
)
def test_window_ends(n, max_len, stride, expected):
    assert window_ends(n, max_len, stride) == expected


def test_latest_window_only_by_default():
    h = _histories([10, 20, 30, 40, 50, 60, 70], [10, 20, 30])
    rows = training_rows(h, VOCAB, max_len=3, use_ratings=False)
    # user 0: items minus the last two = tokens 1..5, the latest 3; user 1: token 1, left-padded
    assert rows["tokens"].tolist() == [[3, 4, 5], [0, 0, 1]]
    assert "ratings" not in rows


def test_windows_cover_the_whole_history_with_ratings():
    h = _histories([10, 20, 30, 40, 50, 60, 70, 80, 90], [10, 20, 30, 40], ratings=[[1, 2, 3, 4, 5, 1, 2, 3, 4], [5, 4, 3, 2]])
    rows = training_rows(h, VOCAB, max_len=3, use_ratings=True, window_stride=3)
    # user 0 trains on tokens 1..7: windows end at 7, 4 and 1 would leave 1 item -> dropped
    assert rows["tokens"].tolist() == [[5, 6, 7], [2, 3, 4], [0, 1, 2]]
    assert rows["ratings"].tolist() == [[5, 1, 2], [2, 3, 4], [0, 5, 4]]


def test_unknown_items_are_dropped_before_windowing():
    h = _histories([10, 999, 20, 30, 40, 50])
    rows = training_rows(h, VOCAB, max_len=2, use_ratings=False, window_stride=2)
    # known tokens 1 2 3 4 5, minus the last two -> 1 2 3; windows end at 3 and 1 (dropped)
    assert rows["tokens"].tolist() == [[2, 3]]
