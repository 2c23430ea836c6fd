"""Training: plain ``train_epoch``/``eval_epoch`` functions, a thin Ray Train loop around
them, and the ``TorchTrainer`` set-up.

    bert4rec train --data out/prepared --out out/train --epochs 20 --workers 2

The training sequences reach workers through Ray Data (``get_dataset_shard``); the
validation examples (a bounded sample) ride along as an object reference. Each epoch
reports loss and validation NDCG@10/HR@10 with a checkpoint; a rerun with the same
``--out`` resumes from the latest checkpoint, and ``FailureConfig`` restarts failed
workers from it.
"""

from __future__ import annotations

import json
import math
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bert4rec import checkpoint as ckpt_lib
from bert4rec import cluster
from bert4rec import console
from bert4rec import data
from bert4rec.config import TrainConfig
from bert4rec.io import InputError, arrow_filesystem, filesystem, join, parquet_files, read_json, read_parquet, write_json
from bert4rec.metrics import EvalSet, make_eval_set, model_ranks, popularity, popularity_ranks
from bert4rec.model import BERT4Rec, BERT4RecConfig, cloze_loss
from bert4rec.ranking import hr_ndcg_mrr

RUN_NAME = "train"


# ---------------------------------------------------------------- pure pieces


def training_rows(batch: pa.Table, vocab_ids: np.ndarray, max_len: int, use_ratings: bool, window_stride: int | None = None) -> dict[str, np.ndarray]:
    """Histories -> training sequences: each user's items minus the last two (held out for
    validation and test), the most recent ``max_len``, left-padded. Ray Data calls this.

    With ``window_stride``, a history longer than ``max_len`` also yields earlier windows of up
    to ``max_len`` items, ending ``window_stride``, ``2 x window_stride``, ... items before its
    end, until a window reaches its first item; otherwise those items are never trained on."""
    flat, offsets = data.list_column(batch, "item_ids")
    tokens, known = data.to_tokens(flat, vocab_ids)
    levels = None
    if use_ratings and "ratings" in batch.column_names:
        rflat, _ = data.list_column(batch, "ratings")
        levels = data.rating_levels(rflat, len(rflat))
    seqs, rseqs = [], []
    for i in range(len(offsets) - 1):
        sl = slice(offsets[i], offsets[i + 1])
        k = known[sl]
        s = tokens[sl][k][:-2]
        if len(s) == 0:
            continue
        r = levels[sl][k][:-2] if levels is not None else None
        for end in window_ends(len(s), max_len, window_stride):
            window = slice(max(0, end - max_len), end)
            seqs.append(s[window])
            if r is not None:
                rseqs.append(r[window])
    out = {"tokens": data.pad_left(seqs, max_len)}
    if levels is not None:
        out["ratings"] = data.pad_left(rseqs, max_len)
    return out


def window_ends(n: int, max_len: int, stride: int | None) -> list[int]:
    """Where the training windows of an ``n``-item sequence end (exclusive): ``n`` first, then
    every ``stride`` items back while the previous window did not reach the first item (a
    window keeps at least 2 items: one to mask, one for context)."""
    ends = [n]
    if stride is not None:
        while ends[-1] > max_len and ends[-1] - stride >= 2:
            ends.append(ends[-1] - stride)
    return ends


class WarmupCosine:
    """LambdaLR factor: linear warm-up, then cosine decay to ``min_ratio`` of the peak at
    ``total_steps``. A plain object, so that LambdaLR's state_dict carries ``total_steps``
    (which a time budget moves, see ``budget_horizon``) across a resume."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def budget_horizon(epoch: int, epochs_run: int, elapsed_s: float, budget_s: float, max_epochs: int) -> int:
    """The last epoch a time budget lets this run reach, so that the LR schedule can end there
    rather than be cut off mid-decay: ``epochs_run`` epochs (ending with ``epoch``) took
    ``elapsed_s``; training stops after the first epoch that ends past ``budget_s``."""
    remaining = budget_s - elapsed_s
    if remaining <= 0:
        return epoch
    per_epoch = elapsed_s / max(1, epochs_run)
    return min(max_epochs, epoch + max(1, math.ceil(remaining / max(per_epoch, 1e-9))))


def train_epoch(model, batches, optimizer, scheduler, cfg: TrainConfig, mask_token: int, generator: torch.Generator, device, autocast_dtype) -> tuple[float, int]:
    """One pass over ``batches`` of {"tokens": (B, T)[, "ratings"]} with fresh Cloze masks.
    Returns (mean loss, sequences seen)."""
    model.train()
    total, n_batches, n_seq = 0.0, 0, 0
    for batch in batches:
        tokens = batch["tokens"].long()
        inputs, labels = data.mask_batch(tokens, mask_token, cfg.mask_prob, cfg.last_item_mask_prob, generator)
        ratings = None
        if "ratings" in batch:
            # a masked item's rating would give the answer away
            ratings = torch.where(labels > 0, 0, batch["ratings"].long()).to(device, non_blocking=True)
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = cloze_loss(model, inputs, labels, ratings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        total += loss.item()
        n_batches += 1
        n_seq += len(tokens)
    return total / max(1, n_batches), n_seq


def eval_epoch(model: BERT4Rec, eval_set: EvalSet, device, k: int = 10) -> dict[str, float]:
    """Sums of NDCG@k / HR@k / reciprocal rank over ``eval_set`` (sums, so ranks can add them up)."""
    ranks, _ = model_ranks(model, eval_set, batch_size=512, device=device)
    m = hr_ndcg_mrr(ranks, k) if len(ranks) else {f"ndcg@{k}": 0.0, f"hr@{k}": 0.0, "mrr": 0.0}
    n = float(len(ranks))
    return {f"ndcg@{k}": m[f"ndcg@{k}"] * n, f"hr@{k}": m[f"hr@{k}"] * n, "mrr": m["mrr"] * n, "n": n}


def _slice_eval_set(e: EvalSet, rank: int, world: int) -> EvalSet:
    idx = np.arange(rank, len(e), world)
    return EvalSet(
        tokens=e.tokens[idx],
        ratings=e.ratings[idx] if e.ratings is not None else None,
        targets=e.targets[idx],
        seen=[e.seen[i] for i in idx],
        user_ids=e.user_ids[idx],
    )


# ---------------------------------------------------------------- the Ray Train loop


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**loop_config["train"])
    model_cfg = BERT4RecConfig(**loop_config["model"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    vocab: pa.Table = ray.get(loop_config["vocab_ref"])
    val_set = _slice_eval_set(ray.get(loop_config["val_ref"]), rank, world)

    torch.manual_seed(cfg.seed)
    model = BERT4Rec(model_cfg)
    start_epoch, history, attempts, state = 1, [], [], None
    resume = ray.train.get_checkpoint()
    warm = None
    if resume is not None:
        with resume.as_directory() as d:
            loaded = ckpt_lib.load(d, with_optimizer=True)
        model.load_state_dict(loaded.model.state_dict())
        start_epoch = loaded.metadata["epoch"] + 1
        history, attempts = loaded.metadata["history"], loaded.metadata["attempts"]
        state = loaded.optimizer_state
        warm = loaded.metadata.get("warm_start")
    elif loop_config.get("init_from"):
        warm = ckpt_lib.warm_start(model, vocab, ckpt_lib.load(loop_config["init_from"], cfg.storage))
    attempts = attempts + [start_epoch]

    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    # as in BERT: no weight decay on biases and LayerNorm gains
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay}, {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    steps = loop_config["steps_per_epoch"]
    schedule = WarmupCosine(int(cfg.warmup_epochs * steps), cfg.epochs * steps, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    shard = ray.train.get_dataset_shard("train")
    best = max((h["val_ndcg@10"] for h in history), default=float("-inf"))
    since_best = 0
    loop_start = time.time()
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + rank)
        losses, seqs = [], 0
        for _ in range(cfg.samples_per_epoch):
            supers = shard.iter_torch_batches(
                batch_size=cfg.batch_size * cfg.length_buckets,
                local_shuffle_buffer_size=4 * cfg.batch_size * cfg.length_buckets,
                local_shuffle_seed=cfg.seed + epoch,
                device="cpu",
            )
            batches = (b for s in supers for b in data.length_buckets(s, cfg.batch_size, gen))
            loss, n = train_epoch(model, batches, optimizer, scheduler, cfg, model_cfg.mask_token, gen, device, autocast_dtype)
            losses.append(loss)
            seqs += n
        train_s = time.time() - t0
        sums = eval_epoch(core, val_set, device)
        elapsed = time.time() - loop_start
        totals = torch.tensor([sums["ndcg@10"], sums["hr@10"], sums["mrr"], sums["n"], float(np.mean(losses)), float(seqs), elapsed], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(totals)
        n_val = max(1.0, totals[3].item())
        metrics = {
            "epoch": epoch,
            "loss": totals[4].item() / world,
            "val_ndcg@10": totals[0].item() / n_val,
            "val_hr@10": totals[1].item() / n_val,
            "val_mrr": totals[2].item() / n_val,
            "val_users": int(totals[3].item()),
            "train_sequences": int(totals[5].item()),
            "epoch_s": time.time() - t0,
            "train_s": train_s,
            "lr": scheduler.get_last_lr()[0],
        }
        history = history + [metrics]
        run_s = totals[6].item() / world  # training time so far, all-reduced: the same on every rank
        if rank == 0:
            # one progress line per epoch on the driver's console (workers' own output stays in
            # Ray's log files unless --verbose)
            console.say(
                f"epoch {epoch}/{cfg.epochs}: loss {metrics['loss']:.4f}  val ndcg@10 {metrics['val_ndcg@10']:.4f}  "
                f"hr@10 {metrics['val_hr@10']:.4f}  lr {metrics['lr']:.2e}  {metrics['epoch_s']:.1f}s "
                f"({run_s:.0f}s since start)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                ckpt_lib.save(
                    tmp,
                    core,
                    vocab,
                    metadata={
                        "epoch": epoch,
                        "metrics": metrics,
                        "history": history,
                        "attempts": attempts,
                        "warm_start": warm,
                        "val_popularity": loop_config["val_popularity"],
                        "data": cfg.data,
                    },
                    train_config=cfg.model_dump(mode="json", exclude={"storage"}),
                    optimizer_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}")
        if cfg.fail_after_epoch == epoch and start_epoch <= epoch and rank == 0:
            raise RuntimeError(f"injected failure after epoch {epoch} (fail_after_epoch)")
        if metrics["val_ndcg@10"] > best:
            best, since_best = metrics["val_ndcg@10"], 0
        else:
            since_best += 1
        if cfg.patience is not None and since_best >= cfg.patience:
            break
        # every rank sees the same elapsed time, so all of them stop together and move the
        # schedule's end alike
        if cfg.time_budget_s is not None:
            if run_s >= cfg.time_budget_s:
                break
            schedule.total_steps = budget_horizon(epoch, epoch - start_epoch + 1, run_s, cfg.time_budget_s, cfg.epochs) * steps


# ---------------------------------------------------------------- driver


def read_prepared(cfg_data: str, storage, max_users: int | None = None) -> tuple[pa.Table, pa.Table]:
    """Reads what ``prepare`` wrote: (vocab, the first ``max_users`` histories)."""
    vocab_uri, hist_uri = join(cfg_data, "vocab.parquet"), join(cfg_data, "histories")
    for uri in (vocab_uri, hist_uri):
        fs, path = filesystem(uri, storage)
        if not fs.exists(path):
            raise InputError(f"{cfg_data}: not a prepared data directory (missing {uri}; run `bert4rec prepare`)")
    vocab = read_parquet(vocab_uri, storage)
    fs, _ = filesystem(hist_uri, storage)
    parts, n = [], 0
    for f in parquet_files(hist_uri, storage):
        t = pq.read_table(f, filesystem=fs)
        parts.append(t)
        n += t.num_rows
        if max_users is not None and n >= max_users:
            break
    histories = pa.concat_tables(parts)
    for name in ("user_id", "item_ids"):
        if name not in histories.column_names:
            raise InputError(f"{hist_uri}: missing column {name!r}")
    return vocab, histories


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) a training run under ``cfg.out``; returns its summary."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    cluster.require_shared_storage({"data": cfg.data, "out": cfg.out, "init_from": cfg.init_from}, cfg.storage)
    # a bounded sample of users for per-epoch validation; sampled with a fixed seed
    vocab, sample = read_prepared(cfg.data, cfg.storage, max_users=cfg.max_eval_users * 4)
    model_cfg = cfg.model.model_copy(update={"num_items": len(vocab)})
    vocab_ids = vocab["item_id"].to_numpy()
    val_set = make_eval_set(sample, vocab_ids, "val", model_cfg.max_len, model_cfg.mask_token, model_cfg.use_ratings, cfg.max_eval_users, cfg.seed)
    pop = popularity(val_set, len(vocab))
    pop_ranks, _ = popularity_ranks(pop, val_set)
    val_popularity = hr_ndcg_mrr(pop_ranks, 10)

    hist_fs, hist_path = arrow_filesystem(join(cfg.data, "histories"), cfg.storage)
    ds = ray.data.read_parquet(hist_path, filesystem=hist_fs, file_extensions=["parquet"])
    ds = ds.map_batches(
        training_rows,
        batch_format="pyarrow",
        fn_kwargs={"vocab_ids": vocab_ids, "max_len": model_cfg.max_len, "use_ratings": model_cfg.use_ratings, "window_stride": cfg.window_stride},
    )
    if cfg.cache_dataset:
        ds = ds.materialize()
    train_rows = ds.count()
    per_worker = train_rows // cfg.workers
    if per_worker == 0:
        raise InputError(f"{cfg.data}: {train_rows} training sequences cannot feed {cfg.workers} workers")
    steps_per_epoch = math.ceil(per_worker / cfg.batch_size) * cfg.samples_per_epoch

    out_fs, out_path = arrow_filesystem(cfg.out, cfg.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "model": model_cfg.model_dump(mode="json"),
            "vocab_ref": ray.put(vocab),
            "val_ref": ray.put(val_set),
            "val_popularity": val_popularity,
            "steps_per_epoch": steps_per_epoch,
            "init_from": cfg.init_from,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=out_path,
            storage_filesystem=out_fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_ndcg@10",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": ds},
    )
    t0 = time.time()
    trainer.fit()
    best_uri = ckpt_lib.resolve(cfg.out, cfg.storage)
    # the summary needs the metadata only, not the weights
    best = read_json(join(best_uri, "metadata.json"), cfg.storage)
    summary = {
        "out": cfg.out,
        "best_checkpoint": best_uri,
        "best_epoch": best["epoch"],
        "best_metrics": best["metrics"],
        "val_popularity": val_popularity,
        "model_version": best["model_version"],
        "history": _history(cfg, best),
        "train_sequences": train_rows,
        "wall_s": round(time.time() - t0, 2),
    }
    write_json(summary, join(cfg.out, "summary.json"), cfg.storage)
    return summary


def _history(cfg: TrainConfig, best: dict) -> list[dict]:
    """The per-epoch history of the run's latest checkpoint (it extends every earlier one)."""
    fs, path = filesystem(join(cfg.out, RUN_NAME), cfg.storage)
    latest = sorted(fs.glob(path + "/epoch-*/metadata.json"))
    if not latest:
        return best["history"]
    return json.loads(fs.cat_file(latest[-1]))["history"]
