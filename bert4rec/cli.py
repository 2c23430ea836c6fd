"""``bert4rec <command>``: flags and/or ``--config FILE.yaml`` -> a validated config -> one
library call. YAML keys mirror the flags (``--min-rating`` -> ``min_rating``; nested keys
for ``model:`` and ``storage:``); flags override the file.

Exit codes: 0 success, 2 invalid input or config (one line on stderr naming the field,
file or row), 1 a run that failed (the quality gate, a training failure, a failed output
check), also one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bert4rec import config as C
from bert4rec.io import InputError

STORAGE_FLAGS = [("--s3-endpoint-url", "storage.endpoint_url", str), ("--s3-region", "storage.region", str)]


def _flags(p: argparse.ArgumentParser, flags: list[tuple]) -> None:
    for flag, dest, typ, *help_ in flags:
        if typ is bool:
            p.add_argument(flag, dest=dest, action="store_const", const=True, default=argparse.SUPPRESS, help=help_[0] if help_ else None)
        else:
            p.add_argument(flag, dest=dest, type=typ, default=argparse.SUPPRESS, help=help_[0] if help_ else None)


COMMANDS: dict[str, tuple[type[BaseModel], list[tuple], str]] = {
    "generate": (C.GenerateConfig, [("--out", "out", str), ("--users", "users", int), ("--items", "items", int), ("--seed", "seed", int), ("--mean-length", "mean_length", int)], "write a synthetic interactions table"),
    "prepare": (
        C.PrepareConfig,
        [("--interactions", "interactions", str), ("--out", "out", str), ("--min-rating", "min_rating", float), ("--min-user-interactions", "min_user_interactions", int), ("--max-len", "max_len", int), ("--until", "until", str)],
        "interactions -> histories, vocabulary, stats",
    ),
    "train": (
        C.TrainConfig,
        [
            ("--data", "data", str), ("--out", "out", str), ("--epochs", "epochs", int), ("--workers", "workers", int), ("--gpu", "gpu", bool),
            ("--batch-size", "batch_size", int), ("--lr", "lr", float), ("--seed", "seed", int), ("--init-from", "init_from", str),
            ("--cpus-per-worker", "cpus_per_worker", float), ("--patience", "patience", int),
            ("--max-len", "model.max_len", int), ("--hidden", "model.hidden", int), ("--layers", "model.layers", int), ("--heads", "model.heads", int), ("--dropout", "model.dropout", float),
        ],
        "train BERT4Rec with Ray Train",
    ),
    "evaluate": (C.EvaluateConfig, [("--checkpoint", "checkpoint", str), ("--data", "data", str), ("--k", "k", int), ("--split", "split", str)], "leave-one-out metrics vs popularity"),
    "score": (
        C.ScoreConfig,
        [
            ("--checkpoint", "checkpoint", str), ("--histories", "histories", str), ("--out", "out", str), ("--k", "k", int), ("--batch-size", "batch_size", int),
            ("--actors", "actors", int), ("--cpus-per-actor", "cpus_per_actor", float), ("--threads-per-actor", "threads_per_actor", int),
            ("--gpu", "gpu", bool), ("--exclude", "exclude", str), ("--items", "items", str), ("--item-chunk-size", "item_chunk_size", int),
        ],
        "publish the top-k table of every user",
    ),
    "nightly": (
        C.NightlyConfig,
        [
            ("--date", "date", str, "run date YYYY-MM-DD (UTC); default today"), ("--interactions", "interactions", str), ("--out", "out", str),
            ("--epochs", "train.epochs", int), ("--workers", "train.workers", int), ("--gpu", "train.gpu", bool),
        ],
        "the nightly flow: prepare, train, gate, evaluate, score, publish, report",
    ),
}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def format_validation_error(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key (not a field of this command)" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"field '{field}': {msg}" + (f" (got {err['input']!r})" if err["type"] not in ("missing", "extra_forbidden") else ""))
    return f"invalid {source}: " + "; ".join(parts)


def load_config(model: type[BaseModel], path: str | None, overrides: dict[str, Any]) -> BaseModel:
    """YAML file (optional) + flag overrides -> a validated config; raises InputError."""
    base: dict = {}
    if path:
        try:
            with open(path) as f:
                base = yaml.safe_load(f) or {}
        except OSError as e:
            raise InputError(f"--config {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise InputError(f"--config {path}: not valid YAML: {e}") from e
        if not isinstance(base, dict):
            raise InputError(f"--config {path}: expected a mapping of keys, got {type(base).__name__}")
    try:
        return model.model_validate(_merge(base, _nest(overrides)))
    except ValidationError as e:
        raise InputError(format_validation_error(e, f"config{' ' + path if path else ''}")) from None


def _run(command: str, cfg: BaseModel) -> dict:
    # imported lazily: `bert4rec --help` and config errors stay instant
    if command == "generate":
        from bert4rec.synthetic import generate

        return generate(cfg.out, cfg.users, cfg.items, cfg.seed, storage=cfg.storage, chunk_users=cfg.chunk_users, mean_length=cfg.mean_length)
    if command == "prepare":
        from bert4rec.prepare import prepare

        return prepare(cfg)
    if command == "evaluate":
        from bert4rec.evaluate import evaluate

        return evaluate(cfg)
    init_ray()
    if command == "train":
        from bert4rec.train import train

        return train(cfg)
    if command == "score":
        from bert4rec.score import score

        return score(cfg)
    if command == "nightly":
        from bert4rec.nightly import nightly

        return nightly(cfg)
    raise AssertionError(command)


def init_ray() -> None:
    """Joins the cluster this process runs in (a Ray job, ``RAY_ADDRESS``), else starts a
    local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, logging_level=logging.WARNING)


def build_parser(extra: dict[str, tuple[type[BaseModel], list[tuple], str]] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bert4rec", description="BERT4Rec with Ray: generate, prepare, train, evaluate, score, nightly")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, flags, help_) in {**COMMANDS, **(extra or {})}.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", dest="_config", default=None, help="YAML file whose keys mirror the flags")
        _flags(p, flags + STORAGE_FLAGS)
    return parser


def main(argv: list[str] | None = None) -> int:
    commands = COMMANDS
    args = vars(build_parser().parse_args(argv))
    command, config_path = args.pop("command"), args.pop("_config")
    model = commands[command][0]
    try:
        cfg = load_config(model, config_path, args)
        result = _run(command, cfg)
    except InputError as e:
        print(f"bert4rec {command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a failed run still gets a one-line reason; the traceback went to the log
        logging.getLogger("bert4rec").debug("run failed", exc_info=True)
        print(f"bert4rec {command}: failed: {type(e).__name__}: {_root_cause(e)}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


def run_job(command: str, argv: list[str]) -> int:
    """What ``jobs/<command>.py`` runs: ``bert4rec <command> <argv>`` with the flow's stage
    messages (e.g. "scoring N users") in the job's log."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bert4rec").setLevel(logging.INFO)
    return main([command, *argv])


def _root_cause(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[-1] if msg else repr(e)


if __name__ == "__main__":
    sys.exit(main())
