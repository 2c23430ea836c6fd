"""Self-describing checkpoints: one directory holds everything needed to score.

    <checkpoint>/
      model.pt        weights (state_dict)
      optimizer.pt    optimizer + LR schedule state (training only, optional)
      config.json     {"model": BERT4RecConfig, "train": TrainConfig (storage removed)}
      vocab.parquet   item_id -> token, count (popularity)
      metadata.json   epoch, metrics, per-epoch history, model_version, created_at, format

``load(uri)`` takes a checkpoint directory or a training run's ``--out`` (then the
checkpoint with the best validation NDCG@10 in it), local or ``s3://``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io as _io
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bert4rec.config import StorageConfig
from bert4rec.io import InputError, _call, filesystem, is_s3
from bert4rec.model import BERT4Rec, BERT4RecConfig

FORMAT = "bert4rec-checkpoint/1"
BEST_METRIC = "val_ndcg@10"


@dataclass
class Loaded:
    uri: str
    model: BERT4Rec
    vocab: pa.Table
    metadata: dict
    config: dict
    optimizer_state: dict | None = None

    @property
    def vocab_ids(self) -> np.ndarray:
        return self.vocab["item_id"].to_numpy()

    @property
    def model_version(self) -> str:
        return self.metadata["model_version"]


def save(
    directory: str,
    model: BERT4Rec,
    vocab: pa.Table,
    metadata: dict,
    train_config: dict | None = None,
    optimizer_state: dict | None = None,
) -> dict:
    """Writes a checkpoint into a local ``directory``; returns the metadata written."""
    os.makedirs(directory, exist_ok=True)
    buf = _io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, buf)
    weights = buf.getvalue()
    with open(os.path.join(directory, "model.pt"), "wb") as f:
        f.write(weights)
    if optimizer_state is not None:
        torch.save(optimizer_state, os.path.join(directory, "optimizer.pt"))
    pq.write_table(vocab, os.path.join(directory, "vocab.parquet"))
    config = {"model": model.config.model_dump(mode="json"), "train": train_config}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    metadata = {
        **metadata,
        "format": FORMAT,
        "model_version": f"e{metadata.get('epoch', 0):04d}-{hashlib.sha256(weights).hexdigest()[:12]}",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    return metadata


def resolve(uri: str, storage: StorageConfig | None = None) -> str:
    """A checkpoint directory as is; a training run's output -> its best checkpoint."""
    fs, path = filesystem(uri, storage)
    if not _call(uri, lambda: fs.exists(path)):
        raise InputError(f"checkpoint {uri}: no such file or directory")
    if fs.exists(posixpath.join(path, "metadata.json")):
        return uri
    candidates = []
    for meta_path in fs.glob(posixpath.join(path, "**", "metadata.json")):
        try:
            meta = json.loads(fs.cat_file(meta_path))
        except (ValueError, OSError):
            continue
        if meta.get("format") != FORMAT:
            continue
        score = meta.get("metrics", {}).get(BEST_METRIC, float("-inf"))
        candidates.append((score, meta.get("epoch", 0), posixpath.dirname(meta_path)))
    if not candidates:
        raise InputError(f"checkpoint {uri}: not a checkpoint (no metadata.json) and no checkpoint found under it")
    best_dir = max(candidates)[2]
    return ("s3://" + best_dir) if is_s3(uri) else best_dir


def load(uri: str, storage: StorageConfig | None = None, with_optimizer: bool = False, map_location: str = "cpu") -> Loaded:
    """Loads the checkpoint at ``uri`` (see :func:`resolve`) with the model in eval mode."""
    uri = resolve(uri, storage)
    fs, path = filesystem(uri, storage)
    try:
        metadata = json.loads(fs.cat_file(posixpath.join(path, "metadata.json")))
        config = json.loads(fs.cat_file(posixpath.join(path, "config.json")))
        weights = fs.cat_file(posixpath.join(path, "model.pt"))
        vocab = pq.read_table(_io.BytesIO(fs.cat_file(posixpath.join(path, "vocab.parquet"))))
    except FileNotFoundError as e:
        raise InputError(f"checkpoint {uri}: incomplete, missing {posixpath.basename(str(e.filename or e))}") from e
    if metadata.get("format") != FORMAT:
        raise InputError(f"checkpoint {uri}: unknown format {metadata.get('format')!r}, expected {FORMAT!r}")
    # built on the meta device and given the stored tensors: no random initialisation to
    # throw away (seconds at a million items, paid by the driver and every scoring actor)
    with torch.device("meta"):
        model = BERT4Rec(BERT4RecConfig(**config["model"]))
    model.load_state_dict(torch.load(_io.BytesIO(weights), map_location=map_location, weights_only=True), assign=True)
    model.eval()
    optimizer_state = None
    if with_optimizer and fs.exists(posixpath.join(path, "optimizer.pt")):
        optimizer_state = torch.load(_io.BytesIO(fs.cat_file(posixpath.join(path, "optimizer.pt"))), map_location=map_location, weights_only=False)
    return Loaded(uri=uri, model=model, vocab=vocab, metadata=metadata, config=config, optimizer_state=optimizer_state)


def warm_start(model: BERT4Rec, vocab: pa.Table, source: Loaded) -> dict[str, Any]:
    """Initialises ``model`` from ``source``: every weight of the same shape is copied, and
    item embedding/bias rows are copied for the items both vocabularies share (new items keep
    their fresh initialisation). Raises InputError when the architectures differ."""
    src_state = source.model.state_dict()
    dst_state = model.state_dict()
    old_ids = source.vocab_ids
    new_ids = vocab["item_id"].to_numpy()
    common, new_idx, old_idx = np.intersect1d(new_ids, old_ids, assume_unique=True, return_indices=True)
    for name, value in dst_state.items():
        if name not in src_state:
            raise InputError(f"warm start from {source.uri}: it has no weight {name!r} (different architecture)")
        src = src_state[name]
        if name in ("item_emb.weight", "out_bias"):
            value[0] = src[0]
            value[-1] = src[-1]  # [MASK]
            value[torch.as_tensor(new_idx + 1)] = src[torch.as_tensor(old_idx + 1)]
        elif name == "pos_emb.weight" and src.shape != value.shape:
            # a different max_len: positions are counted from the end, so align the ends
            n = min(len(src), len(value))
            value[-n:] = src[-n:]
        elif src.shape == value.shape:
            value.copy_(src)
        else:
            raise InputError(f"warm start from {source.uri}: weight {name!r} is {tuple(src.shape)}, the model needs {tuple(value.shape)}")
    model.load_state_dict(dst_state)
    return {"from": source.uri, "shared_items": int(len(common)), "new_items": int(len(new_ids) - len(common))}
