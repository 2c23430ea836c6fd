"""The learning-rate schedule and its fit to a time budget (pure functions, no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from bert4rec.train import WarmupCosine, budget_horizon


def test_warmup_then_cosine_to_the_floor():
    f = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    # half-way through the 10 decay steps: the middle of the cosine
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)


def test_no_warmup():
    f = WarmupCosine(warmup_steps=0, total_steps=2, min_ratio=0.0)
    assert [f(s) for s in range(3)] == pytest.approx([1.0, 0.5, 0.0])


def test_moved_end_survives_a_scheduler_round_trip():
    """LambdaLR stores a callable object's attributes, so a budget-moved end is resumed."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    f = WarmupCosine(0, 100, 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    f.total_steps = 10
    state = sched.state_dict()
    g = WarmupCosine(0, 100, 0.0)
    torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), g).load_state_dict(state)
    assert g.total_steps == 10
    assert g(5) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "epoch, epochs_run, elapsed, budget, max_epochs, expected",
    [
        (1, 1, 10.0, 100.0, 50, 10),  # 90 s left at 10 s an epoch: 9 more
        (5, 5, 50.0, 100.0, 50, 10),
        (5, 5, 50.0, 101.0, 50, 11),  # the epoch that passes the budget still runs
        (3, 3, 30.0, 1000.0, 50, 50),  # never past --epochs
        (4, 4, 120.0, 100.0, 50, 4),  # past the budget: this epoch is the last
        (7, 2, 20.0, 100.0, 50, 15),  # a resumed attempt: its own pace, from its own epoch
        (1, 1, 99.0, 100.0, 50, 2),  # a second left: one more epoch
    ],
)
def test_budget_horizon(epoch, epochs_run, elapsed, budget, max_epochs, expected):
    assert budget_horizon(epoch, epochs_run, elapsed, budget, max_epochs) == expected


def test_budget_horizon_is_where_the_decay_ends():
    steps = 7
    f = WarmupCosine(0, 50 * steps, 0.1)
    f.total_steps = budget_horizon(5, 5, 50.0, 100.0, 50) * steps
    assert f(10 * steps) == pytest.approx(0.1)
    assert math.isclose(f(5 * steps), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
