"""The benchmark commands that ``benchmarks/gpu.sh`` runs parse: each script's own argument
parser accepts them, and ``quality.py``'s ``--set`` overrides make a valid TrainConfig. The
script runs only on a CUDA machine, so a flag renamed in a benchmark would otherwise surface
there first, in the few minutes a GPU is lent for."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import shlex

import pytest

from bert4rec.cli import load_config
from bert4rec.config import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
GPU_SH = ROOT / "benchmarks" / "gpu.sh"


def commands() -> list[tuple[str, list[str]]]:
    """(script name, its arguments) for every ``"$PY" benchmarks/<name>.py ...`` line."""
    found = []
    for line in GPU_SH.read_text().splitlines():
        m = re.search(r'"\$PY" benchmarks/(\w+)\.py(.*)$', line)
        if m:
            found.append((m.group(1), shlex.split(m.group(2).replace('"$RATINGS"', "/data/ratings.parquet"))))
    return found


def load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when the script runs (its helpers)
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_sh_runs_the_three_benchmarks():
    assert sorted(name for name, _ in commands()) == ["quality", "score_throughput", "train_throughput"]


@pytest.mark.parametrize("name,argv", commands(), ids=[name for name, _ in commands()])
def test_each_gpu_sh_command_parses(name, argv, monkeypatch):
    script = load(name, monkeypatch)
    args = script.parse_args(argv)
    if name == "train_throughput":
        assert args.device == "cuda"
    else:
        assert args.gpu
    if name == "quality":
        cfg = load_config(TrainConfig, None, {"data": "d", "out": "o", **script.train_overrides(args.set)})
        assert (cfg.batch_size, cfg.lr) == (256, 0.004)
    if name == "score_throughput":
        assert args.sub_batch == 1024
