"""Pydantic configs: one per command/job, each strict (``extra="forbid"``).

A command's flags and its ``--config FILE.yaml`` keys are the same names; flags override
the file. Validation errors name the field and what was expected.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bert4rec.io import StorageConfig
from bert4rec.model import BERT4RecConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateConfig(Strict):
    out: str
    users: int = Field(2000, gt=0)
    items: int = Field(500, gt=1)
    seed: int = 0
    mean_length: int = Field(40, ge=3)
    chunk_users: int = Field(50_000, gt=0)
    storage: StorageConfig = StorageConfig()


class PrepareSettings(Strict):
    min_rating: float | None = None
    min_user_interactions: int = Field(5, ge=3, description="leave-one-out needs >= 3 items")
    max_len: int | None = Field(
        None,
        gt=1,
        description="keep only the most recent items of each history (default: all); the ids cut are kept in truncated_item_ids and never recommended",
    )
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns"] = Field(
        "auto",
        description="unit of integer timestamps; auto infers it per file from the magnitude (~1.7e9 s, ~1.7e12 ms, ...) "
        "and refuses a file that mixes units. Either way a time before 1970 or from 2100 on is refused",
    )
    full: bool = Field(False, description="rebuild from every partition even when a previous night's prepared data could be merged into")


def _location(uri: str) -> str:
    """A URI as a comparable location: ``s3://bucket/key`` -> ``s3://bucket/key/``, a local
    path -> its absolute, resolved form with a trailing slash."""
    if uri.startswith(("s3://", "s3a://")):
        return "s3://" + uri.split("://", 1)[1].strip("/") + "/"
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.realpath(os.path.abspath(os.path.expanduser(uri))).rstrip("/") + "/"


def is_within(inner: str, outer: str) -> bool:
    """Whether ``inner`` is ``outer`` or a path below it (local paths resolved, S3 keys
    compared as prefixes at ``/`` boundaries: ``s3://b/x2`` is not within ``s3://b/x``)."""
    return _location(inner).startswith(_location(outer))


class PrepareConfig(PrepareSettings):
    interactions: str
    out: str
    until: dt.date | None = Field(None, description="keep interactions up to and including this date (UTC)")
    previous: str | None = Field(
        None,
        description="an earlier night's prepared data: only the dt= partitions after its until are read and merged into it "
        "(rebuilt from everything when it is missing, unreadable or prepared with other settings)",
    )
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _out_apart_from_interactions(self) -> "PrepareConfig":
        # from the next run on, prepare would read its own tables back as interactions
        if is_within(self.out, self.interactions):
            raise ValueError(f"out ({self.out}) is inside interactions ({self.interactions}); write the prepared data elsewhere")
        # prepare replaces <out>/histories after reading: it would delete its own input
        if is_within(self.interactions, self.out.rstrip("/") + "/histories"):
            raise ValueError(f"interactions ({self.interactions}) is inside out's histories, which prepare replaces; choose another out")
        return self


class TrainSettings(Strict):
    epochs: int = Field(50, gt=0)
    workers: int = Field(1, gt=0)
    gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    batch_size: int = Field(64, gt=0, description="per worker; the global batch is workers x batch_size")
    lr: float = Field(2e-3, gt=0, description="peak AdamW learning rate, after warmup_epochs of linear warmup")
    weight_decay: float = Field(0.01, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr x this")
    mask_prob: float = Field(0.2, gt=0, lt=1)
    last_item_mask_prob: float = Field(0.1, ge=0, le=1, description="share of sequences whose last item alone is masked")
    length_buckets: int = Field(8, ge=1, description="batches drawn together and grouped by length (less padding)")
    samples_per_epoch: int = Field(1, ge=1, description="passes over the training sequences per epoch, each with fresh masks (at least; see epoch_sequences)")
    epoch_sequences: int | None = Field(
        20_000,
        gt=0,
        description="sequences an epoch draws, all workers together: passes (each with fresh masks) repeat until an epoch "
        "has at least this many, so that an epoch is a training length, not a table size (none: samples_per_epoch passes)",
    )
    loss: Literal["auto", "full", "sampled"] = Field(
        "auto",
        description="full: softmax over the whole catalogue at every masked position; sampled: a sampled softmax with the "
        "logQ correction over sampled_negatives items (memory M x N instead of M x V); auto: sampled above 100,000 items",
    )
    sampled_negatives: int = Field(8192, gt=0, description="negatives of the sampled softmax, shared by a batch, drawn with replacement")
    sampling_alpha: float = Field(0.75, ge=0, le=1, description="the sampled softmax draws items with probability proportional to count ** alpha (0: uniform)")
    window_stride: int | None = Field(
        50,
        gt=0,
        description="histories longer than max_len also train on earlier windows, this many items apart (None: the latest max_len only)",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16: bf16 autocast for the forward pass (weights, optimizer and loss stay fp32); auto: bf16 on a GPU, "
        "fp32 on a CPU (where bf16 was slower at this model's sizes, AMX or not)",
    )
    weight_average: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="decay of an exponential moving average of the weights, updated every step (0: off); validation, "
        "checkpoints and scoring then use the average, and metrics add raw_val_ndcg@10 for the weights as trained",
    )
    seed: int = 0
    keep_checkpoints: int = Field(3, ge=1)
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the latest checkpoint")
    max_eval_users: int = Field(
        10_000,
        gt=0,
        description="per-epoch validation NDCG on at most this many users, a sample by a hash of user_id across all files (all users when fewer)",
    )
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="stop after the epoch that passes this much training time; the LR decay is fitted to end there",
    )
    patience: int | None = Field(None, gt=0, description="stop after this many epochs without a better val NDCG@10")
    cache_dataset: bool = Field(True, description="materialise training sequences once instead of re-reading per epoch")
    model: BERT4RecConfig = BERT4RecConfig()


class TrainConfig(TrainSettings):
    data: str = Field(description="what `bert4rec prepare` wrote")
    out: str
    init_from: str | None = Field(None, description="warm start: a checkpoint whose weights initialise the model")
    storage: StorageConfig = StorageConfig()


class EvaluateConfig(Strict):
    checkpoint: str
    data: str
    k: int = Field(10, gt=0)
    split: Literal["test", "val"] = "test"
    negatives: int = Field(100, gt=0, description="popularity-sampled negatives of the sampled protocol")
    max_users: int | None = Field(
        None,
        gt=0,
        description="evaluate a deterministic sample of about this many users, chosen by a hash of user_id across all files; none: every user",
    )
    batch_size: int = Field(256, gt=0, description="users per batch an evaluation actor ranks")
    actors: int = Field(1, gt=0, description="Ray Data actors that rank users, each loading the checkpoint once")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpu: bool = Field(False, description="one GPU per actor")
    seed: int = Field(0, description="seed of the user sample and of the sampled negatives")
    storage: StorageConfig = StorageConfig()


class ScoreSettings(Strict):
    k: int = Field(10, gt=0)
    batch_size: int = Field(512, gt=0)
    actors: int = Field(1, gt=0)
    gpu: bool = False
    cpus_per_actor: float = Field(1.0, gt=0)
    threads_per_actor: int | None = Field(
        None,
        gt=0,
        description="torch threads in each scoring actor (default: Ray's OMP_NUM_THREADS for the actor, i.e. its "
        "CPU reservation). More threads than reserved CPUs lets one actor use a whole small machine while Ray "
        "keeps a CPU for reading and writing",
    )
    exclude: str | None = Field(None, description="Parquet of item_id, or of user_id, item_id, never recommended")
    items: str | None = Field(None, description="Parquet of item_id, title, ...: titles ride along")
    item_chunk_size: int = Field(262_144, gt=0, description="top-k over the catalogue in chunks of this many items")
    sub_batch: int = Field(
        128,
        gt=0,
        description="users that go through the model together inside a batch, grouped by history length so that "
        "short histories are not padded to the longest; on a GPU, larger (up to batch_size) keeps it busy",
    )
    rows_per_file: int = Field(
        100_000,
        gt=0,
        description="users per output Parquet file, at least (the last file may hold fewer); blocks of batch_size users are joined to reach it",
    )


class ScoreConfig(ScoreSettings):
    checkpoint: str
    histories: str
    out: str
    storage: StorageConfig = StorageConfig()


class GateConfig(Strict):
    """The quality gate: a new model is published only if it clears both bars."""

    min_ndcg: float = Field(0.0, ge=0, le=1, description="validation NDCG@10 floor")
    max_drop: float = Field(0.2, ge=0, le=1, description="largest allowed relative drop vs the last published model")


class NightlyConfig(Strict):
    """``bert4rec nightly``: prepare -> train -> gate -> evaluate -> score -> publish -> report."""

    interactions: str = Field(description="a Parquet table or a dt=YYYY-MM-DD partitioned directory")
    out: str = Field(description="root of the published tables: <out>/dt=YYYY-MM-DD/, <out>/latest")
    date: dt.date | None = Field(None, description="the run date (UTC); default today")
    work: str | None = Field(None, description="prepared data and training runs; default <out>/_work")
    warm_start: Literal["auto", "never"] = Field("auto", description="auto: from the last published model when its architecture matches")
    lock_stale_after_s: float = Field(6 * 3600, gt=0)
    evaluate_users: int | None = Field(
        100_000,
        gt=0,
        description="test-split evaluation of the night on a deterministic hash sample of about this many users (none: every user)",
    )
    keep_nights: int = Field(
        3,
        ge=1,
        description="after a successful night, keep the work dirs (<work>/dt=*: prepared data, checkpoints) of the "
        "newest this many nights and delete older ones; the night whose model latest serves is always kept",
    )
    prepare: PrepareSettings = PrepareSettings()
    train: TrainSettings = TrainSettings()
    gate: GateConfig = GateConfig()
    score: ScoreSettings = ScoreSettings()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _outputs_apart_from_interactions(self) -> "NightlyConfig":
        # from the second night on, the tables written there would be read as interactions
        for name in ("out", "work"):
            value = getattr(self, name)
            if value is not None and is_within(value, self.interactions):
                raise ValueError(f"{name} ({value}) is inside interactions ({self.interactions}); keep outputs outside the interactions directory")
        return self

    @field_validator("date")
    @classmethod
    def _not_in_the_future(cls, value: dt.date | None) -> dt.date | None:
        # checked here too (nightly.run_date is the rule) so that the CLI refuses before Ray starts
        today = dt.datetime.now(dt.timezone.utc).date()
        if value is not None and value > today:
            raise ValueError(f"{value.isoformat()} is in the future (today is {today.isoformat()} UTC); run a date up to today")
        return value
