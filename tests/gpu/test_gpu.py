"""GPU path: bf16 autocast training on a GPU worker and GPU scoring actors. Skipped without CUDA."""

import numpy as np
import pytest
import torch

from bert4rec import checkpoint, data
from bert4rec.config import ScoreConfig, TrainConfig
from bert4rec.publish import read_table
from tests.conftest import TINY_MODEL, TINY_TRAIN

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_ray(tmp_path_factory):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, num_gpus=1, object_store_memory=2 * 1024**3, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_train_and_score_on_gpu(gpu_ray, synthetic_data, tmp_path):
    from bert4rec.score import score
    from bert4rec.train import train

    out = str(tmp_path / "run")
    summary = train(TrainConfig(data=synthetic_data["prepared"], out=out, epochs=3, workers=1, gpu=True, model=TINY_MODEL, **{**TINY_TRAIN, "cpus_per_worker": 1}))
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert summary["best_metrics"]["val_ndcg@10"] > summary["val_popularity"]["ndcg@10"]

    recs = str(tmp_path / "recs")
    manifest = score(ScoreConfig(checkpoint=out, histories=synthetic_data["histories"], out=recs, k=10, gpu=True, batch_size=256))
    table = read_table(recs).to_pydict()
    assert manifest["rows"] == manifest["input_users"] == len(set(table["user_id"]))

    # GPU (bf16 autocast) scores agree with the fp32 CPU model on the top item for most users
    loaded = checkpoint.load(out)
    import pyarrow.parquet as pq

    h = pq.read_table(synthetic_data["histories"]).slice(0, 50)
    flat, offsets = data.list_column(h, "item_ids")
    tokens, _ = data.to_tokens(flat, loaded.vocab_ids)
    seqs = [tokens[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    x = torch.as_tensor(data.inference_tokens(seqs, loaded.model.config.max_len, loaded.model.config.mask_token))
    with torch.no_grad():
        logits = loaded.model.logits(loaded.model.last_hidden(x))
    for i, s in enumerate(seqs):
        logits[i, s] = -float("inf")
    logits[:, 0] = logits[:, -1] = -float("inf")
    cpu_top = loaded.vocab_ids[logits.argmax(1).numpy() - 1]
    by_user = dict(zip(table["user_id"], table["item_ids"]))
    gpu_top = np.array([by_user[u][0] for u in h["user_id"].to_pylist()])
    assert (cpu_top == gpu_top).mean() >= 0.9
