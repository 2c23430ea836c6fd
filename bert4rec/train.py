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

import copy
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import pyarrow as pa
import torch

from bert4rec import checkpoint as ckpt_lib
from bert4rec import cluster
from bert4rec import console
from bert4rec import data
from bert4rec.config import TrainConfig, TrainSettings
from bert4rec.io import InputError, ParquetFooters, arrow_filesystem, filesystem, join, parquet_dataset, parquet_footers, read_json, read_parquet, write_json
from bert4rec.metrics import EvalSet, make_eval_set, model_ranks, popularity, popularity_ranks, sampled_histories
from bert4rec.model import BERT4Rec, BERT4RecConfig, cloze_loss, negative_sampler, sampled_cloze_loss
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
        # plain ints and floats only: the checkpoint is read back with weights_only=True,
        # which refuses anything else (a numpy integer, say) in LambdaLR's state_dict
        self.warmup_steps, self.total_steps, self.min_ratio = int(warmup_steps), int(total_steps), float(min_ratio)

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


@dataclass(frozen=True)
class RunState:
    """What a run carries across a rerun or a worker restart, from its latest checkpoint."""

    next_epoch: int = 1
    history: list = field(default_factory=list)
    attempts: list = field(default_factory=list)
    since_best: int = 0  # epochs since the best validation NDCG@10 (patience)
    train_time_s: float = 0.0  # training time spent by every attempt so far (time budget)
    stopped: str | None = None  # why the run ended (STOP_REASONS); None while it may go on


STOP_REASONS = ("patience", "time_budget", "epochs")


def run_state(metadata: dict | None, where: str = "checkpoint metadata") -> RunState:
    """The state a run resumes with, from its latest checkpoint's metadata (None: a new run).
    Checkpoints written before ``since_best`` was stored get it from their history."""
    if metadata is None:
        return RunState()
    history = list(metadata.get("history", []))
    since_best = metadata.get("since_best")
    if since_best is None:
        scores = [h["val_ndcg@10"] for h in history]
        since_best = len(scores) - 1 - max(range(len(scores)), key=lambda i: (scores[i], -i)) if scores else 0
    stopped = metadata.get("stopped")
    if stopped is not None and stopped not in STOP_REASONS:
        raise InputError(f"{where}: 'stopped' must be one of {STOP_REASONS} or null, found {stopped!r}")
    return RunState(
        next_epoch=metadata["epoch"] + 1,
        history=history,
        attempts=list(metadata.get("attempts", [])),
        since_best=int(since_best),
        train_time_s=float(metadata.get("train_time_s", 0.0)),
        stopped=stopped,
    )


def stop_reason(epoch: int, since_best: int, train_time_s: float, cfg: TrainSettings) -> str | None:
    """Why training ends after ``epoch`` (one of STOP_REASONS), or None to go on."""
    if cfg.patience is not None and since_best >= cfg.patience:
        return "patience"
    if cfg.time_budget_s is not None and train_time_s >= cfg.time_budget_s:
        return "time_budget"
    if epoch >= cfg.epochs:
        return "epochs"
    return None


class EpochCallback(Protocol):
    """An extension point of :func:`train`, like a Lightning callback: ``on_epoch_end`` runs
    on every worker after each epoch's checkpoint is reported (to send metrics elsewhere,
    say). An exception fails the worker group, which Ray Train restarts from that checkpoint
    up to ``max_failures`` times. Callbacks travel to the workers pickled."""

    def on_epoch_end(self, epoch: int, metrics: dict, rank: int) -> None: ...


# a catalogue above this many items trains with the sampled softmax unless loss is "full"
FULL_SOFTMAX_MAX_ITEMS = 100_000


def uses_sampled_softmax(cfg: TrainSettings, num_items: int) -> bool:
    """Whether training uses the sampled softmax: ``loss: sampled``, or ``auto`` above
    :data:`FULL_SOFTMAX_MAX_ITEMS` items (where M x V logits and their gradients no longer
    fit or run fast)."""
    return cfg.loss == "sampled" or (cfg.loss == "auto" and num_items > FULL_SOFTMAX_MAX_ITEMS)


def loss_function(cfg: TrainSettings, counts: np.ndarray, device, generator: torch.Generator | None = None):
    """The Cloze loss ``(model, inputs, labels, ratings) -> loss`` that ``cfg`` asks for:
    the full softmax, or the sampled one with negatives drawn on ``device`` by popularity
    (``counts``: interactions per token, (V+2,)) to the power ``sampling_alpha``."""
    num_items = len(counts) - 2
    if not uses_sampled_softmax(cfg, num_items):
        return cloze_loss
    q, log_q = negative_sampler(torch.as_tensor(counts, dtype=torch.float64), cfg.sampled_negatives, cfg.sampling_alpha)
    q, log_q = q.to(device), log_q.to(device)

    def sampled(model, inputs, labels, ratings):
        negatives = torch.multinomial(q, cfg.sampled_negatives, replacement=True, generator=generator)
        return sampled_cloze_loss(model, inputs, labels, ratings, negatives, log_q)

    return sampled


def passes_per_epoch(train_rows: int, samples_per_epoch: int, epoch_sequences: int | None) -> int:
    """Passes over the ``train_rows`` training sequences that make one epoch: at least
    ``samples_per_epoch``, and enough to draw ``epoch_sequences`` sequences when set, so that
    an epoch is a length of training whatever the table's size."""
    if epoch_sequences is None or train_rows <= 0:
        return samples_per_epoch
    return max(samples_per_epoch, math.ceil(epoch_sequences / train_rows))


def autocast_dtype_for(precision: str, device) -> torch.dtype | None:
    """``TrainSettings.precision`` on ``device`` -> the autocast dtype (None: fp32). Auto is
    fp32 on a CPU: at the paper's width (64) bf16 autocast trained 14% slower than fp32 even
    on a CPU with AMX (benchmarks/README.md), the casts costing more than the small matmuls gain."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging), kept in a copy
    of the model. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` over the first
    updates, so the random initialisation is soon forgotten; ``updates`` resumes that count."""

    def __init__(self, model: torch.nn.Module, decay: float, updates: int = 0):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, updates

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        w = 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, p in zip(self.model.parameters(), model.parameters(), strict=True):
            avg.lerp_(p.detach(), w)


def train_epoch(
    model,
    batches,
    optimizer,
    scheduler,
    cfg: TrainConfig,
    mask_token: int,
    generator: torch.Generator,
    device,
    autocast_dtype,
    loss_fn=cloze_loss,
    average: WeightAverage | None = None,
) -> tuple[float, int]:
    """One pass over ``batches`` of {"tokens": (B, T)[, "ratings"]} with fresh Cloze masks,
    updating ``average`` (of the unwrapped model's weights) after every step.
    Returns (mean loss, sequences seen).

    Made for a GPU as much as a CPU: each batch is moved once and masked on the device
    (``generator`` must live there), and the loss is summed on the device and read once at
    the end, so that no step waits for the host."""
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n_batches, n_seq = 0, 0
    for batch in batches:
        tokens = batch["tokens"].to(device, non_blocking=True).long()
        inputs, labels = data.mask_batch(tokens, mask_token, cfg.mask_prob, cfg.last_item_mask_prob, generator)
        ratings = None
        if "ratings" in batch:
            # a masked item's rating would give the answer away
            ratings = torch.where(labels > 0, 0, batch["ratings"].to(device, non_blocking=True).long())
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(model, inputs, labels, ratings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update(model.module if hasattr(model, "module") else model)
        total += loss.detach()
        n_batches += 1
        n_seq += len(tokens)
    return total.item() / max(1, n_batches), n_seq


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
    autocast_dtype = autocast_dtype_for(cfg.precision, device)
    vocab: pa.Table = ray.get(loop_config["vocab_ref"])
    counts = np.r_[0, vocab["count"].to_numpy(), 0]  # interactions per token: the sampled softmax's q
    val_set = _slice_eval_set(ray.get(loop_config["val_ref"]), rank, world)

    torch.manual_seed(cfg.seed)
    model = BERT4Rec(model_cfg)
    run, state, warm = RunState(), None, None
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            loaded = ckpt_lib.load(d, with_optimizer=True)
        run = run_state(loaded.metadata)
        if run.stopped:
            return  # the run had ended (a restart after its last checkpoint): nothing to train
        state = loaded.optimizer_state
        # with a weight average the checkpoint's model is the average, and the weights as
        # trained ride with the optimizer's state
        model.load_state_dict(state["raw_model"] if "raw_model" in state else loaded.model.state_dict())
        warm = loaded.metadata.get("warm_start")
    elif loop_config.get("init_from"):
        warm = ckpt_lib.warm_start(model, vocab, ckpt_lib.load(loop_config["init_from"], cfg.storage))
    average = None
    if cfg.weight_average > 0:
        average = WeightAverage(model, cfg.weight_average, int(state.get("average_updates", 0)) if state else 0)
        if state is not None and "raw_model" in state:
            average.model.load_state_dict(loaded.model.state_dict())
    start_epoch, history, since_best = run.next_epoch, run.history, run.since_best
    attempts = run.attempts + [start_epoch]

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
    # the time budget covers every attempt: a rerun or a restarted worker group goes on
    # from the time its checkpoint recorded
    loop_start = time.time() - run.train_time_s
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.time()
        seed = cfg.seed * 1_000_003 + epoch * 1_009 + rank
        gen = torch.Generator().manual_seed(seed)  # batch order (on the host)
        device_gen = torch.Generator(device=device).manual_seed(seed)  # masks and negatives
        loss_fn = loss_function(cfg, counts, device, device_gen)
        losses, seqs = [], 0
        for _ in range(loop_config["passes"]):
            supers = shard.iter_torch_batches(
                batch_size=cfg.batch_size * cfg.length_buckets,
                local_shuffle_buffer_size=4 * cfg.batch_size * cfg.length_buckets,
                local_shuffle_seed=cfg.seed + epoch,
                device="cpu",
                prefetch_batches=2,
            )
            batches = (b for s in supers for b in data.length_buckets(s, cfg.batch_size, gen))
            loss, n = train_epoch(model, batches, optimizer, scheduler, cfg, model_cfg.mask_token, device_gen, device, autocast_dtype, loss_fn, average)
            losses.append(loss)
            seqs += n
        train_s = time.time() - t0
        served = average.model if average is not None else core  # what validation, checkpoints and scoring see
        sums = eval_epoch(served, val_set, device)
        raw_ndcg = eval_epoch(core, val_set, device)["ndcg@10"] if average is not None else 0.0
        elapsed = time.time() - loop_start
        totals = torch.tensor(
            [sums["ndcg@10"], sums["hr@10"], sums["mrr"], sums["n"], float(np.mean(losses)), float(seqs), raw_ndcg], dtype=torch.float64, device=device
        )
        # training time so far: the slowest rank's, the same on every rank after the reduce
        run_time = torch.tensor([elapsed], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(totals)
            torch.distributed.all_reduce(run_time, op=torch.distributed.ReduceOp.MAX)
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
        if average is not None:
            metrics["raw_val_ndcg@10"] = totals[6].item() / n_val
        history = history + [metrics]
        run_s = run_time.item()
        if metrics["val_ndcg@10"] > best:
            best, since_best = metrics["val_ndcg@10"], 0
        else:
            since_best += 1
        stopped = stop_reason(epoch, since_best, run_s, cfg)
        if stopped is None and cfg.time_budget_s is not None:
            # every rank sees the same elapsed time, so all of them move the schedule's end
            # alike; before the save, so that a resume continues on the same schedule
            schedule.total_steps = int(budget_horizon(epoch, epoch, run_s, cfg.time_budget_s, cfg.epochs) * steps)
        if rank == 0:
            # one progress line per epoch on the driver's console (workers' own output stays in
            # Ray's log files unless --verbose)
            console.say(
                f"epoch {epoch}/{cfg.epochs}: loss {metrics['loss']:.4f}  val ndcg@10 {metrics['val_ndcg@10']:.4f}  "
                + (f"(as trained {metrics['raw_val_ndcg@10']:.4f})  " if average is not None else "")
                + f"hr@10 {metrics['val_hr@10']:.4f}  lr {metrics['lr']:.2e}  {metrics['epoch_s']:.1f}s "
                f"({run_s:.0f}s since start)" + (f"; stopping ({stopped})" if stopped and stopped != "epochs" else "")
            )
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                trained = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                if average is not None:
                    trained.update(raw_model=core.state_dict(), average_updates=average.updates)
                ckpt_lib.save(
                    tmp,
                    served,
                    vocab,
                    metadata={
                        "epoch": epoch,
                        "metrics": metrics,
                        "history": history,
                        "attempts": attempts,
                        "since_best": since_best,
                        "train_time_s": run_s,
                        "stopped": stopped,
                        "train_rows": loop_config["train_rows"],
                        "warm_start": warm,
                        "val_popularity": loop_config["val_popularity"],
                        "data": cfg.data,
                    },
                    train_config=cfg.model_dump(mode="json", exclude={"storage"}),
                    optimizer_state=trained,
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}")
        for callback in loop_config["callbacks"]:
            callback.on_epoch_end(epoch, metrics, rank)
        if stopped:
            break


# ---------------------------------------------------------------- driver


class Prepared(NamedTuple):
    vocab: pa.Table
    histories: str  # URI
    footers: ParquetFooters  # the histories' files, schema and rows, from the one listing

    @property
    def users(self) -> int:
        return self.footers.rows

    @property
    def has_ratings(self) -> bool:
        return "ratings" in self.footers.schema.names


def read_prepared(cfg_data: str, storage) -> Prepared:
    """Checks what ``prepare`` wrote and reads its small parts (the vocabulary, the histories'
    schema and footers). The histories themselves stay where they are."""
    vocab_uri, hist_uri = join(cfg_data, "vocab.parquet"), join(cfg_data, "histories")
    for uri in (vocab_uri, hist_uri):
        fs, path = filesystem(uri, storage)
        if not fs.exists(path):
            raise InputError(f"{cfg_data}: not a prepared data directory (missing {uri}; run `bert4rec prepare`)")
    vocab = read_parquet(vocab_uri, storage)
    footers = parquet_footers(hist_uri, storage)
    names = footers.schema.names
    for name in ("user_id", "item_ids"):
        if name not in names:
            raise InputError(f"{hist_uri}: missing column {name!r}")
    return Prepared(vocab, hist_uri, footers)


READ_ROWS = 65_536  # histories per block read for training and for its validation sample


def read_sample(hist_uri: str, storage, max_users: int, users: int, seed: int, footers: ParquetFooters | None = None) -> pa.Table:
    """The histories of a deterministic sample of at most ``max_users`` of the ``users`` users,
    read from every file with Ray Data (:func:`bert4rec.metrics.sampled_histories`; of a sample
    that the hash lets grow past ``max_users``, the lowest hashes are kept), sorted by user_id.
    ``footers``: the table's, where the caller has listed it already (:func:`read_prepared`)."""
    import ray

    if footers is None:
        footers = parquet_footers(hist_uri, storage)
    columns = data.history_columns(footers.schema.names, use_ratings=True)
    ds = parquet_dataset(hist_uri, footers.files, storage, columns, READ_ROWS)
    ds = ds.map_batches(sampled_histories, batch_format="pyarrow", fn_kwargs={"max_users": max_users, "users": users, "seed": seed})
    parts = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not parts:
        raise InputError(f"{hist_uri}: no users to validate on")
    sample = pa.concat_tables(parts)
    if sample.num_rows > max_users:
        keep = np.argsort(data.user_hash(sample["user_id"].to_numpy(), seed), kind="stable")[:max_users]
        sample = sample.take(pa.array(keep))
    return sample.sort_by("user_id")


def train(cfg: TrainConfig, callbacks: Sequence[EpochCallback] = ()) -> dict:
    """Runs (or resumes) a training run under ``cfg.out``; returns its summary.

    A run that has ended (all epochs, ``patience`` or ``time_budget_s``) is not trained again:
    a rerun returns its summary. ``callbacks``: see :class:`EpochCallback`."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.time()
    cluster.require_shared_storage({"data": cfg.data, "out": cfg.out, "init_from": cfg.init_from}, cfg.storage)
    prepared = read_prepared(cfg.data, cfg.storage)
    vocab, hist_uri, users, has_ratings = prepared.vocab, prepared.histories, prepared.users, prepared.has_ratings
    model_cfg = cfg.model.settled(len(vocab), has_ratings)
    if model_cfg.use_ratings and not has_ratings:
        # caught here, on the driver: the workers would each fail inside DDP instead
        raise InputError(f"model.use_ratings is true, but the histories at {hist_uri} have no 'ratings' column; set model.use_ratings: false or prepare data with ratings")
    latest = latest_metadata(cfg)
    if latest is not None and run_state(latest, join(cfg.out, RUN_NAME)).stopped and "train_rows" in latest and isinstance(latest.get("val_popularity"), dict):
        # the run has ended: no workers to start (they would load the checkpoint and stop)
        return _summary(cfg, latest["val_popularity"], latest["train_rows"], t0)
    console.ensure_ray()
    # per-epoch validation on a bounded hash sample of users from every file: the same users
    # night after night, whatever the file layout (the first file holds the oldest ids only)
    sample = read_sample(hist_uri, cfg.storage, cfg.max_eval_users, users, cfg.seed, prepared.footers)

    vocab_ids = vocab["item_id"].to_numpy()
    val_set = make_eval_set(sample, vocab_ids, "val", model_cfg.max_len, model_cfg.mask_token, model_cfg.use_ratings)
    pop = popularity(val_set, len(vocab))
    pop_ranks, _ = popularity_ranks(pop, val_set)
    val_popularity = hr_ndcg_mrr(pop_ranks, 10)

    # the columns training_rows reads (not the timestamps, as costly to decode as the rest)
    columns = [c for c in ("user_id", "item_ids", "ratings") if c in prepared.footers.schema.names]
    ds = parquet_dataset(hist_uri, prepared.footers.files, cfg.storage, columns, READ_ROWS)
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
    passes = passes_per_epoch(train_rows, cfg.samples_per_epoch, cfg.epoch_sequences)
    steps_per_epoch = math.ceil(per_worker / cfg.batch_size) * passes

    out_fs, out_path = arrow_filesystem(cfg.out, cfg.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "model": model_cfg.model_dump(mode="json"),
            "vocab_ref": ray.put(vocab),
            "val_ref": ray.put(val_set),
            "val_popularity": val_popularity,
            "train_rows": train_rows,
            "steps_per_epoch": steps_per_epoch,
            "passes": passes,
            "init_from": cfg.init_from,
            "callbacks": list(callbacks),
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
    trainer.fit()
    return _summary(cfg, val_popularity, train_rows, t0)


def latest_metadata(cfg: TrainConfig) -> dict | None:
    """The metadata of the run's latest checkpoint (the one a resume starts from), checked;
    None before the first one."""
    fs, path = filesystem(join(cfg.out, RUN_NAME), cfg.storage)
    found = sorted(fs.glob(path + "/epoch-*/metadata.json"))
    if not found:
        return None
    where = found[-1]
    try:
        meta = json.loads(fs.cat_file(where))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: not valid JSON ({e})") from e
    return ckpt_lib.check_metadata(meta, where)


def _summary(cfg: TrainConfig, val_popularity: dict, train_rows: int, t0: float) -> dict:
    best_uri = ckpt_lib.resolve(cfg.out, cfg.storage)
    # the summary needs the metadata only, not the weights
    best = ckpt_lib.check_metadata(read_json(join(best_uri, "metadata.json"), cfg.storage), join(best_uri, "metadata.json"))
    latest = latest_metadata(cfg)
    summary = {
        "out": cfg.out,
        "best_checkpoint": best_uri,
        "best_epoch": best["epoch"],
        "best_metrics": best["metrics"],
        "val_popularity": val_popularity,
        "model_version": best["model_version"],
        # the latest checkpoint's history extends every earlier one
        "history": (latest or best).get("history", []),
        "stopped": (latest or best).get("stopped"),
        "train_sequences": train_rows,
        "wall_s": round(time.time() - t0, 2),
    }
    write_json(summary, join(cfg.out, "summary.json"), cfg.storage)
    return summary
