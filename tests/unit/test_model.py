"""BERT4Rec shapes and invariants on a tiny config (2 layers, d=8)."""

import pytest
import torch
from pydantic import ValidationError

from bert4rec.model import BERT4Rec, BERT4RecConfig, cloze_loss

CFG = BERT4RecConfig(num_items=10, max_len=6, hidden=8, layers=2, heads=2, dropout=0.1, attn_dropout=0.1)


def test_tokens_and_shapes():
    assert (CFG.vocab_size, CFG.mask_token) == (12, 11)
    model = BERT4Rec(CFG).eval()
    tokens = torch.tensor([[0, 0, 3, 4, 11, 5], [1, 2, 3, 4, 5, 11]])
    assert model.encode(tokens).shape == (2, 6, 8)
    # logits only at the two [MASK] positions
    assert model(tokens).shape == (2, 12)
    assert model.last_hidden(tokens).shape == (2, 8)


def test_output_layer_is_tied_to_the_item_embedding():
    model = BERT4Rec(CFG)
    h = torch.randn(3, 8)
    assert torch.allclose(model.logits(h), h @ model.item_emb.weight.T + model.out_bias)
    names = [n for n, _ in model.named_parameters()]
    assert not any("decoder" in n or n.startswith("out.weight") for n in names)


def test_left_padding_does_not_change_the_prediction():
    torch.manual_seed(0)
    model = BERT4Rec(CFG).eval()
    short = torch.tensor([[3, 4, 11]])
    padded = torch.tensor([[0, 0, 0, 3, 4, 11]])
    with torch.no_grad():
        assert torch.allclose(model.last_hidden(short), model.last_hidden(padded), atol=1e-5)


@pytest.mark.parametrize("layers, norm_first, ratings", [(1, True, False), (2, True, True), (3, False, True), (2, False, False)])
def test_last_hidden_runs_the_final_layer_for_the_last_position_only(layers, norm_first, ratings):
    torch.manual_seed(layers)
    c = CFG.model_copy(update={"layers": layers, "norm_first": norm_first, "use_ratings": ratings, "hidden": 16, "heads": 4})
    model = BERT4Rec(c).eval()
    tokens = torch.tensor([[0, 0, 3, 4, 9, 11], [1, 2, 3, 4, 5, 11], [0, 0, 0, 0, 0, 11]])
    r = torch.tensor([[0, 0, 5, 1, 3, 0], [2, 2, 4, 4, 1, 0], [0] * 6]) if ratings else None
    with torch.no_grad():
        full = model.encode(tokens, r)[:, -1]
        last = model.last_hidden(tokens, r)
    assert last.shape == (3, 16)
    assert torch.allclose(last, full, atol=1e-6, rtol=0)
    assert model.encode(tokens, r, last_only=True).shape == (3, 1, 16)


def test_ratings_embedding_changes_the_output_only_when_enabled():
    torch.manual_seed(0)
    model = BERT4Rec(CFG.model_copy(update={"use_ratings": True})).eval()
    tokens = torch.tensor([[1, 2, 3, 11]])
    with torch.no_grad():
        a = model.last_hidden(tokens, torch.tensor([[5, 5, 5, 0]]))
        b = model.last_hidden(tokens, torch.tensor([[1, 1, 1, 0]]))
    assert not torch.allclose(a, b)


def test_cloze_loss_is_finite_and_backpropagates():
    torch.manual_seed(0)
    model = BERT4Rec(CFG)
    inputs = torch.tensor([[0, 1, 11, 3], [4, 11, 6, 11]])
    labels = torch.tensor([[0, 0, 2, 0], [0, 5, 0, 7]])
    loss = cloze_loss(model, inputs, labels)
    loss.backward()
    assert torch.isfinite(loss)
    # an untrained model is close to uniform over the 12 tokens
    assert abs(loss.item() - torch.log(torch.tensor(12.0)).item()) < 0.5
    assert model.item_emb.weight.grad is not None


def test_config_checks():
    with pytest.raises(ValidationError, match="divisible by heads"):
        BERT4RecConfig(hidden=10, heads=3)
    with pytest.raises(ValidationError, match="extra"):
        BERT4RecConfig(hiden=8)


def test_initial_weight_scales():
    """Embeddings start at BERT's std 0.02 (padding row zero); linear layers at Xavier scale,
    so that at a small width the attention and feed-forward branches are not near zero."""
    torch.manual_seed(0)
    c = BERT4RecConfig(num_items=5000, max_len=50, hidden=64, layers=2, heads=2)
    model = BERT4Rec(c)
    emb = model.item_emb.weight
    assert torch.equal(emb[0], torch.zeros(64))
    assert abs(emb[1:].std().item() - 0.02) < 0.003  # truncated at 2 std: ~0.88 x 0.02
    assert emb.abs().max().item() <= 0.04
    for layer in model.layers:
        for lin in (layer.attn.qkv, layer.attn.proj, layer.ff[0], layer.ff[2]):
            fan_out, fan_in = lin.weight.shape
            assert lin.weight.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.05)
            assert torch.equal(lin.bias, torch.zeros(fan_out))


def test_sampled_loss_over_every_item_equals_the_full_softmax_over_items():
    # every item drawn once with uniform q: log(N q) = log(V / V) = 0, and the sampled softmax
    # is exactly the full softmax over items 1..V (accidental hits removed)
    from bert4rec.model import negative_sampler, sampled_cloze_loss

    torch.manual_seed(0)
    model = BERT4Rec(CFG).eval()
    inputs = torch.tensor([[0, 1, 11, 3], [4, 11, 6, 11]])
    labels = torch.tensor([[0, 0, 2, 0], [0, 5, 0, 7]])
    q, log_q = negative_sampler(torch.ones(12), 10, alpha=0.0)
    assert q[0] == 0 and q[11] == 0 and torch.allclose(q[1:11], torch.full((10,), 0.1))
    assert torch.allclose(log_q[1:11], torch.zeros(10), atol=1e-6)
    sampled = sampled_cloze_loss(model, inputs, labels, None, torch.arange(1, 11), log_q)
    logits = model(inputs, None, labels > 0)[:, 1:11]
    full = torch.nn.functional.cross_entropy(logits, labels[labels > 0] - 1)
    assert sampled.item() == pytest.approx(full.item(), abs=1e-5)


def test_sampled_loss_logq_and_gradients():
    from bert4rec.model import negative_sampler, sampled_cloze_loss

    counts = torch.tensor([0, 8, 4, 2, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float)
    q, log_q = negative_sampler(counts, 4, alpha=1.0)
    assert q.tolist()[:6] == pytest.approx([0, 0.5, 0.25, 0.125, 0.0625, 0.0625])
    assert log_q[1].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # log(4 x 0.5)
    model = BERT4Rec(CFG)
    inputs = torch.tensor([[0, 1, 11, 3]])
    labels = torch.tensor([[0, 0, 2, 0]])
    negatives = torch.multinomial(q, 4, replacement=True, generator=torch.Generator().manual_seed(0))
    loss = sampled_cloze_loss(model, inputs, labels, None, negatives, log_q)
    loss.backward()
    assert torch.isfinite(loss) and model.item_emb.weight.grad is not None


@pytest.mark.parametrize(
    ("requested", "has_ratings", "expected"),
    [(None, True, True), (None, False, False), (True, True, True), (False, True, False), (True, False, True)],
)
def test_settled_config_takes_num_items_and_ratings_from_the_data(requested, has_ratings, expected):
    settled = BERT4RecConfig(use_ratings=requested).settled(num_items=42, has_ratings=has_ratings)
    assert (settled.num_items, settled.use_ratings) == (42, expected)
    assert settled.model_dump(exclude={"num_items", "use_ratings"}) == BERT4RecConfig().model_dump(exclude={"num_items", "use_ratings"})


def test_changes_from_a_trained_config_leave_out_what_the_data_settles():
    trained = BERT4RecConfig(hidden=32, use_ratings=None).settled(num_items=10, has_ratings=True)
    assert BERT4RecConfig(hidden=32).changes_from(trained) == []  # ratings left to the data
    assert BERT4RecConfig(hidden=32, use_ratings=True).changes_from(trained) == []
    assert BERT4RecConfig(hidden=32, use_ratings=False).changes_from(trained) == ["use_ratings"]
    assert BERT4RecConfig(hidden=64, layers=3).changes_from(trained) == ["hidden", "layers"]
    # dropout is training, not architecture: the weights warm-start under any rate
    assert BERT4RecConfig(hidden=32, dropout=0.3, attn_dropout=0.2).changes_from(trained) == []
