"""The pieces of a training step that need no Ray: epoch length, the loss choice, one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bert4rec.config import TrainConfig
from bert4rec.model import BERT4Rec, BERT4RecConfig, cloze_loss
from bert4rec.train import FULL_SOFTMAX_MAX_ITEMS, WarmupCosine, WeightAverage, autocast_dtype_for, loss_function, passes_per_epoch, train_epoch, uses_sampled_softmax


@pytest.mark.parametrize(
    "rows, samples, sequences, expected",
    [(3000, 1, None, 1), (3000, 4, None, 4), (3000, 1, 20_000, 7), (6690, 1, 20_000, 3), (50_000, 1, 20_000, 1), (3000, 8, 20_000, 8), (0, 2, 20_000, 2)],
)
def test_an_epoch_is_a_number_of_sequences_in_whole_passes(rows, samples, sequences, expected):
    assert passes_per_epoch(rows, samples, sequences) == expected


def test_the_sampled_softmax_is_chosen_by_config_and_by_catalogue_size():
    auto, full, sampled = (TrainConfig(data="d", out="o", loss=x) for x in ("auto", "full", "sampled"))
    assert not uses_sampled_softmax(auto, FULL_SOFTMAX_MAX_ITEMS)
    assert uses_sampled_softmax(auto, FULL_SOFTMAX_MAX_ITEMS + 1)
    assert not uses_sampled_softmax(full, 10 * FULL_SOFTMAX_MAX_ITEMS)
    assert uses_sampled_softmax(sampled, 10)
    assert loss_function(full, np.ones(12), torch.device("cpu")) is cloze_loss


@pytest.mark.parametrize(("loss", "autocast"), [("full", None), ("sampled", None), ("full", torch.bfloat16), ("sampled", torch.bfloat16)])
def test_a_pass_trains_and_reports_its_mean_loss(loss, autocast):
    # bf16 autocast runs on any CPU (emulated where it has no bf16 units), so both precisions are tested here
    torch.manual_seed(0)
    mc = BERT4RecConfig(num_items=30, max_len=8, hidden=16, layers=1, heads=2, dropout=0.0, attn_dropout=0.0)
    cfg = TrainConfig(data="d", out="o", loss=loss, sampled_negatives=16, batch_size=4, model=mc)
    model = BERT4Rec(mc)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(1, 100, 0.1))
    gen = torch.Generator().manual_seed(1)
    # one repeated pattern: the loss must fall
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]] * 4)
    fn = loss_function(cfg, np.r_[0, np.arange(1, 31), 0], torch.device("cpu"), gen)
    first, n = train_epoch(model, [{"tokens": tokens}] * 3, optimizer, scheduler, cfg, mc.mask_token, gen, torch.device("cpu"), autocast, fn)
    assert n == 12 and np.isfinite(first)
    for _ in range(10):
        last, _ = train_epoch(model, [{"tokens": tokens}] * 3, optimizer, scheduler, cfg, mc.mask_token, gen, torch.device("cpu"), autocast, fn)
    assert last < first


@pytest.mark.parametrize(
    ("precision", "device", "expected"),
    [("auto", "cpu", None), ("auto", "cuda", torch.bfloat16), ("fp32", "cpu", None), ("fp32", "cuda", None), ("bf16", "cpu", torch.bfloat16), ("bf16", "cuda", torch.bfloat16)],
)
def test_precision_auto_is_bf16_autocast_on_a_gpu_only(precision, device, expected):
    assert autocast_dtype_for(precision, torch.device(device)) == expected


def test_the_weight_average_warms_its_decay_up_and_leaves_the_model_alone():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(model, decay=0.9)
    assert not average.model.training and not average.model.weight.requires_grad
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update(model)  # decay min(0.9, 2 / 11): 0 + (1 - 2/11) x (1 - 0)
    assert average.model.weight.item() == pytest.approx(9 / 11)
    average.update(model)  # decay min(0.9, 3 / 12) = 0.25
    assert average.model.weight.item() == pytest.approx(9 / 11 + 0.75 * (1 - 9 / 11))
    assert model.weight.item() == 1.0 and average.updates == 2
    # past the warm-up the configured decay holds, and a resumed count goes on from where it was
    late = WeightAverage(torch.nn.Linear(1, 1, bias=False), 0.9, updates=1000)
    late.model.weight.fill_(0.0)
    late.update(model)
    assert late.model.weight.item() == pytest.approx(0.1) and late.updates == 1001


def test_a_pass_updates_the_weight_average_once_per_step():
    torch.manual_seed(0)
    mc = BERT4RecConfig(num_items=30, max_len=8, hidden=16, layers=1, heads=2, dropout=0.0, attn_dropout=0.0)
    cfg = TrainConfig(data="d", out="o", batch_size=4, model=mc)
    model = BERT4Rec(mc)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, 0.99)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(1, 100, 0.1))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]] * 4)
    train_epoch(model, [{"tokens": tokens}] * 5, optimizer, scheduler, cfg, mc.mask_token, gen, torch.device("cpu"), None, cloze_loss, average)
    assert average.updates == 5
    trained, averaged = model.state_dict(), average.model.state_dict()
    w = "item_emb.weight"
    # the average has moved from the start, but less far than the weights as trained
    assert not torch.equal(averaged[w], start[w])
    assert (averaged[w] - start[w]).norm() < (trained[w] - start[w]).norm()
