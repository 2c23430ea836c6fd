"""``bert4rec evaluate``: leave-one-out metrics of a checkpoint next to the popularity baseline.

    bert4rec evaluate --checkpoint out/train --data out/prepared --actors 2

Pipeline (Ray Data, streaming; the driver never holds per-user data):
    the histories' files (io.parquet_dataset) -> hash sample of users (``max_users``)
    -> map_batches(popularity_rows)             per-batch popularity counts, summed on the driver
    -> map_batches(Evaluator, actor pool)       model + popularity ranks -> per-batch exact sums
then the sums are added up and turned into the metrics. ``evaluate_in_process`` computes the
same figures in this process, from the same pure functions: the reference.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from bert4rec import checkpoint as ckpt_lib
from bert4rec import data
from bert4rec import cluster, console
from bert4rec.config import EvaluateConfig, StorageConfig
from bert4rec.io import InputError, parquet_dataset, read_parquet
from bert4rec.metrics import FAMILIES, SUM_KEYS, add_sums, eval_sums, make_eval_set, popularity, popularity_rows, report_from_sums, sampled_histories
from bert4rec.train import read_prepared

# ---------------------------------------------------------------- pure pieces


def sums_row(sums: dict[str, dict[str, int]], rows: int, users: int) -> dict[str, np.ndarray]:
    """One batch's sums as a one-row table: ``<family>.<key>`` columns, plus ``rows`` read
    and ``users`` evaluated (the rest were skipped: their target is unknown)."""
    out = {"rows": np.array([rows], np.int64), "users": np.array([users], np.int64)}
    for family, s in sums.items():
        for key in SUM_KEYS:
            out[f"{family}.{key}"] = np.array([s[key]], np.int64)
    return out


def result(sums: dict[str, dict[str, int]], rows: int, k: int, split: str, loaded) -> dict:
    """Summed ranks -> the JSON ``bert4rec evaluate`` prints."""
    if sums["full"]["users"] == 0:
        raise InputError(f"no user to evaluate: none of the {rows} sampled users has a {split} target the checkpoint knows")
    return {
        **report_from_sums(sums["full"], sums["sampled"], k),
        "split": split,
        "checkpoint": loaded.uri,
        "model_version": loaded.model_version,
        "skipped_users": rows - sums["full"]["users"],
        "popularity": report_from_sums(sums["pop_full"], sums["pop_sampled"], k),
    }


# ---------------------------------------------------------------- the Ray actor


class Evaluator:
    """Loads the checkpoint once per actor; each call ranks one batch of histories and
    returns its sums (one row)."""

    def __init__(self, checkpoint_uri: str, storage: StorageConfig, counts: np.ndarray, cfg: dict, use_gpu: bool):
        self.device = torch.device("cuda" if use_gpu else "cpu")
        loaded = ckpt_lib.load(checkpoint_uri, storage)
        self.model = loaded.model.to(self.device).eval()
        self.vocab_ids = loaded.vocab_ids
        self.counts, self.cfg = counts, EvaluateConfig(**cfg)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        cfg, mc = self.cfg, self.model.config
        e = make_eval_set(batch, self.vocab_ids, cfg.split, mc.max_len, mc.mask_token, mc.use_ratings)
        sums = eval_sums(self.model, e, self.counts, cfg.negatives, cfg.seed, cfg.k, cfg.batch_size, self.device)
        return sums_row(sums, batch.num_rows, len(e))


# ---------------------------------------------------------------- driver


def evaluate(cfg: EvaluateConfig) -> dict:
    """Full ranking (seen items excluded) and the sampled protocol, for the model and for
    the most-popular baseline, over the hash sample of about ``max_users`` users (default:
    all); popularity is counted on the sampled users' input histories only. Runs on Ray
    Data actors; the driver adds up per-batch sums."""
    import ray
    import ray.data

    cluster.require_shared_storage({"checkpoint": cfg.checkpoint, "data": cfg.data}, cfg.storage)
    loaded = ckpt_lib.load(cfg.checkpoint, cfg.storage)
    prepared = read_prepared(cfg.data, cfg.storage)
    hist_uri, users = prepared.histories, prepared.users
    mc = loaded.model.config
    console.ensure_ray()
    columns = data.history_columns(prepared.footers.schema.names, mc.use_ratings)
    ds = parquet_dataset(hist_uri, prepared.footers.files, cfg.storage, columns, cfg.batch_size)
    ds = ds.map_batches(sampled_histories, batch_format="pyarrow", fn_kwargs={"max_users": cfg.max_users, "users": users, "seed": cfg.seed})

    # pass 1: popularity over the sampled users' input histories, summed block by block
    counts = np.zeros(mc.num_items + 2, np.int64)
    pop = ds.map_batches(
        popularity_rows,
        batch_format="pyarrow",
        fn_kwargs={"vocab_ids": loaded.vocab_ids, "split": cfg.split, "max_len": mc.max_len, "mask_token": mc.mask_token},
    )
    for b in pop.iter_batches(batch_format="numpy", batch_size=None):
        np.add.at(counts, b["token"], b["count"])

    # pass 2: ranks on the actors, whose per-batch sums come back as one row each
    # (a sample of users leaves small blocks: batch-sized ones again let every actor take a share)
    ranked = ds.repartition(target_num_rows_per_block=cfg.batch_size).map_batches(
        Evaluator,
        fn_constructor_kwargs={
            "checkpoint_uri": loaded.uri,
            "storage": cfg.storage,
            "counts": counts,
            "cfg": cfg.model_dump(mode="json"),
            "use_gpu": cfg.gpu,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_gpus=1 if cfg.gpu else 0,
        num_cpus=cfg.cpus_per_actor,
    )
    sums = {name: add_sums({}, {}) for name in FAMILIES}
    rows = 0
    for b in ranked.iter_batches(batch_format="numpy", batch_size=None):
        rows += int(b["rows"].sum())
        for name in FAMILIES:
            # Python ints: the limb sums of many batches may pass int64
            batch_sums = {key: sum(int(v) for v in b[f"{name}.{key}"]) for key in SUM_KEYS}
            sums[name] = add_sums(sums[name], batch_sums)
    return result(sums, rows, cfg.k, cfg.split, loaded)


def evaluate_in_process(cfg: EvaluateConfig) -> dict:
    """The same figures as :func:`evaluate`, computed here from every sampled history at once
    (the reference the distributed path is tested against; for small tables only)."""
    loaded = ckpt_lib.load(cfg.checkpoint, cfg.storage)
    prepared = read_prepared(cfg.data, cfg.storage)
    hist_uri, users = prepared.histories, prepared.users
    mc = loaded.model.config
    histories = sampled_histories(read_parquet(hist_uri, cfg.storage, columns=data.history_columns(prepared.footers.schema.names, mc.use_ratings)), cfg.max_users, users, cfg.seed)
    e = make_eval_set(histories, loaded.vocab_ids, cfg.split, mc.max_len, mc.mask_token, mc.use_ratings)
    counts = popularity(e, mc.num_items)
    device = "cuda" if cfg.gpu else "cpu"
    sums = eval_sums(loaded.model.to(device), e, counts, cfg.negatives, cfg.seed, cfg.k, cfg.batch_size, device)
    return result(sums, histories.num_rows, cfg.k, cfg.split, loaded)

