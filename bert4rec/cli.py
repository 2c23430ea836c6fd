"""``bert4rec <command>``: flags and/or ``--config FILE.yaml`` -> a validated config -> one
library call. YAML keys mirror the flags (``--min-rating`` -> ``min_rating``; nested keys
for ``model:`` and ``storage:``); flags override the file.

Exit codes: 0 success, 2 invalid input or config (one line on stderr naming the field,
file or row), 1 a run that failed (the quality gate, a training failure, a failed output
check), also one line on stderr.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import json
import logging
import sys
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bert4rec import console

# bert4rec.io, bert4rec.config and what runs the commands are imported where they are used:
# they pull in torch (through the model config), and `bert4rec --help` should answer at once.

# (config class in bert4rec.config, one-line help); the configs are imported only for the
# command being run
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("GenerateConfig", "write a synthetic interactions table"),
    "prepare": ("PrepareConfig", "interactions -> histories, vocabulary, stats"),
    "train": ("TrainConfig", "train BERT4Rec with Ray Train"),
    "evaluate": ("EvaluateConfig", "leave-one-out metrics vs popularity"),
    "score": ("ScoreConfig", "publish the top-k table of every user"),
    "nightly": ("NightlyConfig", "the nightly flow: prepare, train, gate, evaluate, score, publish, report"),
}

# S3 settings keep the spelling the README has always used (--s3-endpoint-url, --s3-region)
# next to their dotted one (--storage.endpoint-url).
STORAGE_PREFIX = "s3-"


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag generated from one config field."""

    dest: str  # dotted path into the config, e.g. "model.hidden"
    options: tuple[str, ...]  # e.g. ("--model.hidden", "--hidden")
    kind: str  # "bool", "int", "float", "str", "date" or "choice"
    optional: bool  # accepts "none" for None
    choices: tuple | None
    help: str


def _leaf_type(annotation) -> tuple[str, bool, tuple | None]:
    """A field's annotation -> (kind, optional, choices)."""
    optional = False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        optional = True
        (annotation,) = [a for a in args if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return "choice", optional, typing.get_args(annotation)
    kinds = {bool: "bool", int: "int", float: "float", str: "str", dt.date: "date"}
    if annotation not in kinds:
        raise TypeError(f"no flag type for {annotation!r}")
    return kinds[annotation], optional, None


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, field in model.model_fields.items():
        if _is_model(field.annotation):
            out += _leaves(field.annotation, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", field))
    return out


def _help(field) -> str:
    text = field.description or ""
    if field.is_required():
        text += " (required)"
    else:
        text += f" (default: {field.get_default(call_default_factory=True)})"
    return text.strip().replace("%", "%%")


def config_flags(model: type[BaseModel]) -> list[Flag]:
    """Every leaf field of ``model`` as a flag: ``min_rating`` -> ``--min-rating``, nested
    ``model.hidden`` -> ``--model.hidden``. A nested field whose name occurs once in the whole
    config (and not at the top) also gets its short name (``--hidden``, nightly's ``--epochs``);
    storage fields get ``--s3-<name>``."""
    leaves = _leaves(model)
    top = {d for d, _ in leaves if "." not in d}
    nested = collections.Counter(d.rsplit(".", 1)[1] for d, _ in leaves if "." in d and not d.startswith("storage."))
    flags = []
    for dest, field in leaves:
        *parents, name = dest.split(".")
        options = ["--" + ".".join([*parents, name.replace("_", "-")])]
        if parents == ["storage"]:
            options.append("--" + STORAGE_PREFIX + name.replace("_", "-"))
        elif parents and nested[name] == 1 and name not in top:
            options.append("--" + name.replace("_", "-"))
        kind, optional, choices = _leaf_type(field.annotation)
        flags.append(Flag(dest, tuple(options), kind, optional, choices, _help(field)))
    return flags


def _converter(flag: Flag):
    base = {"int": int, "float": float}.get(flag.kind, str)

    def convert(text: str):
        if flag.optional and text.lower() in ("none", "null"):
            return None
        return base(text)

    convert.__name__ = flag.kind  # argparse names it in "invalid int value: 'x'"
    return convert


def _add_flags(p: argparse.ArgumentParser, flags: list[Flag]) -> None:
    for f in flags:
        if f.kind == "bool":
            p.add_argument(*f.options, dest=f.dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f.help)
            continue
        metavar = "{" + ",".join(map(str, f.choices)) + "}" if f.choices else f.kind.upper()
        if f.optional:
            metavar += "|none"
        choices = (*f.choices, *((None,) if f.optional else ())) if f.choices else None
        p.add_argument(*f.options, dest=f.dest, type=_converter(f), choices=choices, metavar=metavar, default=argparse.SUPPRESS, help=f.help)


def config_model(command: str) -> type[BaseModel]:
    """The pydantic config class of ``command``."""
    from bert4rec import config as C

    return getattr(C, COMMANDS[command][0])


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
    from bert4rec.io import InputError

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


def _run(command: str, cfg: BaseModel, verbose: bool) -> dict:
    # imported lazily: `bert4rec --help` and config errors stay instant
    if command == "generate":
        from bert4rec.synthetic import generate

        return generate(cfg.out, cfg.users, cfg.items, cfg.seed, storage=cfg.storage, chunk_users=cfg.chunk_users, mean_length=cfg.mean_length)
    # every other command runs on Ray, which each starts (console.ensure_ray) once its own
    # checks of the input have passed
    if command == "prepare":
        from bert4rec.prepare import prepare

        return prepare(cfg)
    if command == "evaluate":
        from bert4rec.evaluate import evaluate

        return evaluate(cfg)
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


class _Parser(argparse.ArgumentParser):
    # one line, like a config error, instead of argparse's usage block
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``bert4rec`` parser; only ``command``'s flags are generated (``"*"``: every
    command's), so that ``bert4rec --help`` does not import the configs."""
    parser = _Parser(prog="bert4rec", description="BERT4Rec with Ray: generate, prepare, train, evaluate, score, nightly", allow_abbrev=False)
    verbose = dict(action="store_true", dest="_verbose", help="show Ray's own console output and print a failed run's traceback")
    as_json = dict(action="store_true", dest="_json", help="print the whole result as JSON on stdout (default: a few lines)")
    parser.add_argument("--verbose", "-v", **verbose)
    parser.add_argument("--json", **as_json)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (_, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        if command in (name, "*"):
            p.add_argument("--config", dest="_config", metavar="FILE.yaml", default=None, help="YAML file whose keys mirror the flags (flags override it)")
            p.add_argument("--verbose", "-v", **{**verbose, "default": argparse.SUPPRESS})
            p.add_argument("--json", **{**as_json, "default": argparse.SUPPRESS})
            _add_flags(p, config_flags(config_model(name)))
    return parser


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """``bert4rec <command> [flags]``; returns the exit code."""
    return _main(sys.argv[1:] if argv is None else argv, job=False)


def run_job(command: str, argv: list[str]) -> int:
    """What ``jobs/<command>.py`` runs: ``bert4rec <command> <argv>``. The driver's stderr is
    the job's log: the flow's stage messages go there, and a failed run's traceback follows
    its one-line summary."""
    return _main([command, *argv], job=True)


def _main(argv: list[str], job: bool) -> int:
    try:
        args = vars(build_parser(_command_of(argv)).parse_args(argv))
    except SystemExit as e:  # --help (0) or a bad flag (2, one line already printed)
        return e.code if isinstance(e.code, int) else 2
    command, config_path, verbose, as_json = args.pop("command"), args.pop("_config"), args.pop("_verbose"), args.pop("_json")
    console.setup_logging(verbose)
    from bert4rec.io import InputError

    try:
        cfg = load_config(config_model(command), config_path, args)
        result = _run(command, cfg, verbose)
    except InputError as e:
        # one line, whatever the message holds (a YAML or Arrow error spans several)
        print(f"bert4rec {command}: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except Exception as e:
        if job or verbose:
            # the traceback first, the one-line summary last: Ray's job status message keeps only
            # the log's last lines, and an operator reads the end of a log first
            logging.getLogger("bert4rec").error("traceback of the failed run", exc_info=e)
            print(console.failure_line(command, e), file=sys.stderr, flush=True)
        else:
            print(console.failure_line(command, e, console.write_traceback(command, e)), file=sys.stderr)
        return 1
    finally:
        console.stop()
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print("\n".join(console.summary(command, result, getattr(cfg, "out", None))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
