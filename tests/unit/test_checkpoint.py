"""A checkpoint round trip without Ray: the loaded model is the saved one, ready to use."""

import numpy as np
import pyarrow as pa
import torch

from bert4rec import checkpoint as ckpt_lib
from bert4rec.model import BERT4Rec, BERT4RecConfig, cloze_loss

CFG = BERT4RecConfig(num_items=5, max_len=4, hidden=8, layers=1, heads=2, use_ratings=True)
VOCAB = pa.table({"item_id": pa.array([10, 20, 30, 40, 50], pa.int64()), "token": pa.array([1, 2, 3, 4, 5], pa.int32()), "count": pa.array([5, 4, 3, 2, 1], pa.int64())})


def test_loaded_weights_equal_the_saved_ones_and_train(tmp_path):
    torch.manual_seed(0)
    model = BERT4Rec(CFG)
    meta = ckpt_lib.save(str(tmp_path / "c"), model, VOCAB, {"epoch": 2, "metrics": {"val_ndcg@10": 0.5}})
    loaded = ckpt_lib.load(str(tmp_path / "c"))
    assert loaded.metadata["epoch"] == 2 and loaded.model_version == meta["model_version"]
    assert loaded.vocab_ids.tolist() == [10, 20, 30, 40, 50]
    assert not loaded.model.training
    saved, got = model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == got.keys()
    for name in saved:
        assert got[name].device.type == "cpu", name
        assert torch.equal(saved[name], got[name]), name
    assert all(p.requires_grad for p in loaded.model.parameters())
    tokens = torch.tensor([[1, 2, 6, 4]])
    ratings = torch.tensor([[5, 3, 0, 1]])
    model.eval()
    assert torch.equal(model(tokens, ratings), loaded.model(tokens, ratings))
    # it trains: every parameter gets a gradient
    loaded.model.train()
    cloze_loss(loaded.model, tokens, torch.tensor([[0, 0, 3, 0]]), ratings).backward()
    assert all(p.grad is not None for p in loaded.model.parameters())
    assert np.isfinite(loaded.model.item_emb.weight.grad.numpy()).all()
