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
import pickle
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import ValidationError

from bert4rec.config import StorageConfig
from bert4rec.io import InputError, filesystem, is_s3, storage_call
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
    if not storage_call(uri, lambda: fs.exists(path)):
        raise InputError(f"checkpoint {uri}: no such file or directory")
    if fs.exists(posixpath.join(path, "metadata.json")):
        return uri
    candidates = []
    for meta_path in fs.glob(posixpath.join(path, "**", "metadata.json")):
        # a torn or foreign metadata.json is not a candidate; one chosen is checked again by load
        try:
            meta = check_metadata(json.loads(fs.cat_file(meta_path)), meta_path)
        except (ValueError, OSError, UnicodeDecodeError):
            continue
        score = meta["metrics"].get(BEST_METRIC)
        score = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else float("-inf")
        candidates.append((score, meta["epoch"], posixpath.dirname(meta_path)))
    if not candidates:
        raise InputError(f"checkpoint {uri}: not a checkpoint (no metadata.json) and no checkpoint found under it")
    best_dir = max(candidates)[2]
    return ("s3://" + best_dir) if is_s3(uri) else best_dir


def load(uri: str, storage: StorageConfig | None = None, with_optimizer: bool = False, map_location: str = "cpu") -> Loaded:
    """Loads the checkpoint at ``uri`` (see :func:`resolve`) with the model in eval mode.

    Every file is untrusted: tensors are read with ``weights_only=True`` (no pickled code
    runs), and a file that is unreadable or disagrees with the others raises one InputError
    naming it."""
    uri = resolve(uri, storage)
    fs, path = filesystem(uri, storage)

    def read(name: str) -> bytes:
        try:
            return storage_call(uri, lambda: fs.cat_file(posixpath.join(path, name)))
        except FileNotFoundError as e:
            raise InputError(f"checkpoint {uri}: incomplete, missing {name}") from e

    metadata = check_metadata(_json(uri, "metadata.json", read("metadata.json")), f"checkpoint {uri}: metadata.json")
    config = _json(uri, "config.json", read("config.json"))
    model_cfg = _model_config(uri, config)
    weights = _tensors(uri, "model.pt", read("model.pt"), map_location)
    try:
        vocab = pq.read_table(_io.BytesIO(read("vocab.parquet")))
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"checkpoint {uri}: vocab.parquet is not a readable Parquet file ({type(e).__name__}: {_first_line(e)})") from e
    check_vocab(vocab, model_cfg.num_items, f"checkpoint {uri}: vocab.parquet")
    # built without the model's own initialisation, which the stored tensors replace (seconds
    # at a million items, paid by the driver and every scoring actor). Not on the meta device:
    # the first random draw there imports torch._dynamo, a second of every process's start.
    model = BERT4Rec(model_cfg, init_weights=False)
    check_state_dict(weights, model.state_dict(), f"checkpoint {uri}: model.pt")
    model.load_state_dict(weights, assign=True)
    model.eval()
    optimizer_state = None
    if with_optimizer and storage_call(uri, lambda: fs.exists(posixpath.join(path, "optimizer.pt"))):
        optimizer_state = _tensors(uri, "optimizer.pt", read("optimizer.pt"), map_location)
    return Loaded(uri=uri, model=model, vocab=vocab, metadata=metadata, config=config, optimizer_state=optimizer_state)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def _json(uri: str, name: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"checkpoint {uri}: {name} is not valid JSON ({_first_line(e)})") from e


def _model_config(uri: str, config: Any) -> BERT4RecConfig:
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise InputError(f"checkpoint {uri}: config.json must be an object with a 'model' object, found {type(config).__name__}")
    try:
        model_cfg = BERT4RecConfig(**config["model"])
    except (ValidationError, TypeError) as e:
        detail = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(model)'}: {err['msg']}" for err in e.errors()) if isinstance(e, ValidationError) else str(e)
        raise InputError(f"checkpoint {uri}: config.json has an invalid model config: {detail}") from None
    if model_cfg.num_items is None:
        raise InputError(f"checkpoint {uri}: config.json has no model.num_items")
    return model_cfg


def _tensors(uri: str, name: str, raw: bytes, map_location: str) -> dict:
    """``torch.load`` of plain data only: a pickle that would build any other object (run
    code) is refused, as is a truncated or corrupt file."""
    try:
        obj = torch.load(_io.BytesIO(raw), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph that suggests weights_only=False; keep the one line
        # that says what the file holds
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it pickles {found.group(1)}" if found else _first_line(e)
        raise InputError(f"checkpoint {uri}: {name} refused: not plain tensors, loading it could run code ({what})") from None
    except Exception as e:  # noqa: BLE001 - zip, pickle and torch raise many types for a damaged file
        raise InputError(f"checkpoint {uri}: {name} is damaged or not a torch file ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise InputError(f"checkpoint {uri}: {name} must hold a dict, found {type(obj).__name__}")
    return obj


METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "epoch": (int,),
    "model_version": (str,),
    "metrics": (dict,),
}
OPTIONAL_METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "history": (list,),
    "attempts": (list,),
    "since_best": (int,),
    "train_time_s": (int, float),
    "stopped": (str, type(None)),
    "train_rows": (int,),
}


def check_metadata(metadata: Any, where: str) -> dict:
    """``metadata.json`` as a dict whose known keys have their types (InputError otherwise)."""
    if not isinstance(metadata, dict):
        raise InputError(f"{where}: expected a JSON object, found {type(metadata).__name__}")
    if metadata.get("format") != FORMAT:
        raise InputError(f"{where}: unknown format {metadata.get('format')!r}, expected {FORMAT!r}")
    for key, types in {**METADATA_TYPES, **OPTIONAL_METADATA_TYPES}.items():
        if key not in metadata and key not in METADATA_TYPES:
            continue
        value = metadata.get(key)
        if key not in metadata or isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise InputError(f"{where}: field {key!r} must be {expected}, found {value!r}"[:300])
    return metadata


def check_vocab(vocab: pa.Table, num_items: int, where: str) -> None:
    """The vocabulary matches the weights: ``num_items`` rows, integer item ids strictly
    increasing (tokens are looked up by binary search), tokens exactly 1..V, counts present."""
    for name in ("item_id", "token", "count"):
        if name not in vocab.column_names:
            raise InputError(f"{where}: missing column {name!r}; expected item_id, token, count, found {vocab.column_names}")
        if not pa.types.is_integer(vocab.schema.field(name).type):
            raise InputError(f"{where}: column {name!r} must be integers, found {vocab.schema.field(name).type}")
        if vocab[name].null_count:
            raise InputError(f"{where}: column {name!r} has {vocab[name].null_count} null value(s)")
    if vocab.num_rows != num_items:
        raise InputError(f"{where}: {vocab.num_rows} items, but the model's item embedding is for num_items={num_items}")
    ids = vocab["item_id"].to_numpy()
    bad = np.flatnonzero(ids[1:] <= ids[:-1])
    if len(bad):
        i = int(bad[0]) + 1
        raise InputError(f"{where}: item_id must be strictly increasing, row {i} has {int(ids[i])} after {int(ids[i - 1])}")
    tokens = vocab["token"].to_numpy()
    wrong = np.flatnonzero(tokens != np.arange(1, len(tokens) + 1))
    if len(wrong):
        i = int(wrong[0])
        raise InputError(f"{where}: token must be 1..{num_items} in row order, row {i} has {int(tokens[i])} (expected {i + 1})")


def check_state_dict(weights: dict, expected: dict, where: str) -> None:
    """The stored tensors are exactly the model's: same names, tensors of the same shapes."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(k for k in weights if k not in expected)
    if missing or unexpected:
        parts = ([f"missing {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")] if missing else []) + (
            [f"unexpected {[str(k) for k in unexpected[:5]]}" + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")] if unexpected else []
        )
        raise InputError(f"{where}: weights do not match the model config: {'; '.join(parts)}")
    for name, want in expected.items():
        got = weights[name]
        if not isinstance(got, torch.Tensor):
            raise InputError(f"{where}: weight {name!r} is a {type(got).__name__}, expected a tensor")
        if tuple(got.shape) != tuple(want.shape):
            raise InputError(f"{where}: weight {name!r} is {tuple(got.shape)}, the model config needs {tuple(want.shape)}")


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
