"""The driver's console on a real Ray: what workers put on the board comes out as lines, and
a progress bar that is not on a terminal ends with its totals."""

from __future__ import annotations

import io

import ray

from bert4rec import console


def test_worker_lines_and_the_last_progress_line_reach_a_plain_stream(ray_session):
    stream = io.StringIO()
    con = console.Console(stream=stream)
    try:
        with con.progress("scoring", 30):
            ray.get(con.board.say.remote("epoch 1/1: loss 1.0000"))
            ray.get([con.board.add.remote(10), con.board.add.remote(20)])
    finally:
        con.close()
        ray.kill(con.board)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "epoch 1/1: loss 1.0000"
    # the final line, printed however soon the bar closes after its last plain line
    assert lines[-1].startswith("scoring: 30/30 users (100%)  ") and lines[-1].endswith(" elapsed")
