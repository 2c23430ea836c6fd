"""The whole pipeline at growing sizes: generate -> prepare -> train (short) -> evaluate -> score.

    .venv/bin/python benchmarks/scale.py --users 250000,1000000,4000000            # the target sizes
    .venv/bin/python benchmarks/scale.py --users 2000 --items 500 --workdir /tmp/b4r-scale   # a smoke run

Per size: ``bert4rec.synthetic.generate`` (``--events`` events per user on average, streamed in
chunks of ``--chunk-users``), ``bert4rec.prepare.prepare``, ``bert4rec.train.train`` for
``--epochs`` passes over a hash sample of ``--train-users`` users (20,000; CPU training costs the
same per sequence at any table size, and the sample keeps the stage short), ``bert4rec.evaluate.evaluate`` on the test split, ``bert4rec.score.score``,
all in this process (the driver) on one local Ray started once with ``--cpus`` CPUs and an
explicit ``--object-store-gb`` object store, under ``--workdir/<users>/``.

Per stage it prints the wall time, the time per 1M users, and memory as PSS (proportional set
size, from ``/proc/<pid>/smaps_rollup``): the object store's pages are mapped by every worker
that reads from it, so RSS counts them once per worker and PSS splits them between the
mappers. A thread samples every ``--sample-s`` seconds:

  driver    this process's PSS (its peak over the stage); also its peak RSS (VmHWM, reset
            before each stage) as a cross-check that sampling missed no spike
  other     every other process under this one (Ray's GCS, raylet, dashboard, workers,
            training workers, scoring actors): each one's peak PSS over the stage; the
            largest of them and its name (``ray::RayTrainWorker`` ...). Processes alive
            during the stage count, idle ones too: an actor pool of the previous size's
            scoring can still hold its memory while the next size generates

Then the ratios the targets need: the driver's peak (the largest over the stages) at the
largest size over the smallest, and per stage the time per user at each size relative to the
smallest (1.0 = linear). ``--json FILE`` writes every figure. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _proc import peak_rss_mib, reset_peak_rss  # noqa: E402

STAGES = ("generate", "prepare", "train", "evaluate", "score")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", default="250000,1000000", help="comma-separated sizes (4000000 takes ~1.5 hours on 2 CPUs)")
    p.add_argument("--events", type=int, default=40, help="mean events per user")
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--chunk-users", type=int, default=50_000, help="generate writes one file per this many users")
    p.add_argument("--workdir", default="/tmp/b4r-scale")
    p.add_argument("--keep", action="store_true", help="keep each size's files (default: delete after the size)")
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--object-store-gb", type=float, default=2.0)
    p.add_argument("--gpu", action="store_true", help="train and score on GPUs (one per training worker / actor)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument(
        "--train-users", type=int, default=20_000,
        help="train on a hash sample of this many users (0: all): CPU training is per sequence, so a fixed sample "
        "keeps the stage's compute constant and shows the feeding path's time and memory; evaluate and score run on every user",
    )
    p.add_argument("--train-workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256, help="per training worker")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--evaluate-users", type=int, default=None, help="evaluate a hash sample of this many users, as the nightly run does (default: every user)")
    p.add_argument("--actors", type=int, default=None, help="scoring actors (default: CPUs - 1, or 1 per GPU with --gpu)")
    p.add_argument("--score-batch-size", type=int, default=2048)
    p.add_argument("--sample-s", type=float, default=0.5)
    p.add_argument("--json", default=None, help="write every figure to this file")
    return p.parse_args(argv)


# ---------------------------------------------------------------- memory sampling (/proc)


def pss_mib(pid: int) -> float | None:
    """A process's PSS in MiB, or None when it is gone or not readable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def descendants(root: int) -> list[int]:
    """Every process under ``root`` (children, their children, ...), from /proc/*/stat."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                s = f.read()
        except OSError:
            continue
        kids.setdefault(int(s[s.rfind(")") + 2 :].split()[1]), []).append(int(entry))
    found, todo = [], list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(kids.get(pid, []))
    return found


def process_name(pid: int) -> str:
    """Ray's process title (``ray::Scorer``, ``ray::RayTrainWorker``, ``raylet``, ...)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            first = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "?"
    if not first.startswith("ray::"):
        return os.path.basename(first)
    title = first.split()[0]
    cut = title.rfind(")") + 1  # drop the method: ray::MapWorker(...).submit -> ray::MapWorker(...)
    dot = title.find(".", cut)
    return title if dot < 0 else title[:dot]


class Sampler:
    """Peak PSS of this process and of each process under it, between ``start`` and ``stop``."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self.driver = 0.0
        self.others: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        me = os.getpid()
        while True:
            self.driver = max(self.driver, pss_mib(me) or 0.0)
            for pid in descendants(me):
                pss = pss_mib(pid)
                if pss is None:
                    continue
                if pss > self.others.get(pid, 0.0):
                    self.others[pid] = pss
                    name = process_name(pid)
                    # a Ray worker is ray::IDLE between tasks: keep the name of its busy moment
                    if pid not in self.names or name not in ("ray::IDLE", "?"):
                        self.names[pid] = name
            if self._stop.wait(self.period_s):
                return

    def start(self) -> None:
        self.driver, self.others, self.names = 0.0, {}, {}
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        top = max(self.others, key=self.others.get, default=None)
        return {
            "driver_pss_mib": round(self.driver, 1),
            "other_max_pss_mib": round(self.others[top], 1) if top else 0.0,
            "other_max_name": self.names.get(top, "-") if top else "-",
            "others_sum_of_peaks_pss_mib": round(sum(self.others.values()), 1),
        }


# ---------------------------------------------------------------- the pipeline


def write_sample(prepared: str, out: str, sample_users: int, users: int) -> None:
    """A prepared directory of a hash sample of the users (the same vocabulary), written by Ray
    Data tasks: the driver does not read the histories. Training reads no stats.json, and the
    full table's would misstate the sample, so there is none."""
    import ray.data

    from bert4rec.metrics import sampled_histories

    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(prepared, "vocab.parquet"), os.path.join(out, "vocab.parquet"))
    ds = ray.data.read_parquet(os.path.join(prepared, "histories"), file_extensions=["parquet"])
    ds.map_batches(sampled_histories, batch_format="pyarrow", fn_kwargs={"max_users": sample_users, "users": users}).write_parquet(os.path.join(out, "histories"))


def stage_configs(args, users: int, root: str):
    """The five stages of one size as (name, zero-argument callable)."""
    from bert4rec.config import EvaluateConfig, PrepareConfig, ScoreConfig, TrainConfig
    from bert4rec.evaluate import evaluate
    from bert4rec.prepare import prepare
    from bert4rec.score import score
    from bert4rec.synthetic import generate
    from bert4rec.train import train

    raw, prepared, run, recs = (os.path.join(root, name) for name in ("raw", "prepared", "train", "recs"))
    model = {"max_len": args.max_len, "hidden": args.hidden, "layers": 2, "heads": 2}
    actors = args.actors or (1 if args.gpu else max(1, args.cpus - 1))
    state: dict = {}

    def do_train():
        data = prepared
        if args.train_users and args.train_users < users:
            data = os.path.join(root, "train-sample")
            write_sample(prepared, data, args.train_users, users)
        state["summary"] = train(
            TrainConfig(
                data=data, out=run, epochs=args.epochs, workers=args.train_workers, gpu=args.gpu,
                batch_size=args.batch_size, warmup_epochs=0, epoch_sequences=None, model=model,
            )
        )
        return {"sequences": state["summary"]["train_sequences"]}

    return [
        ("generate", lambda: generate(raw, users=users, items=args.items, mean_length=args.events, chunk_users=args.chunk_users)),
        ("prepare", lambda: prepare(PrepareConfig(interactions=raw, out=prepared, max_len=args.max_len))),
        ("train", do_train),
        ("evaluate", lambda: evaluate(EvaluateConfig(checkpoint=state["summary"]["best_checkpoint"], data=prepared, max_users=args.evaluate_users))),
        (
            "score",
            lambda: score(
                ScoreConfig(
                    checkpoint=state["summary"]["best_checkpoint"], histories=os.path.join(prepared, "histories"), out=recs,
                    actors=actors, cpus_per_actor=1, threads_per_actor=1, gpu=args.gpu, batch_size=args.score_batch_size,
                )
            ),
        ),
    ]


def run_size(args, users: int, sampler: Sampler) -> list[dict]:
    root = os.path.join(args.workdir, str(users))
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    for name, fn in stage_configs(args, users, root):
        baseline = reset_peak_rss()
        sampler.start()
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        mem = sampler.stop()
        row = {
            "users": users, "stage": name, "wall_s": round(wall, 2), "s_per_1m_users": round(wall / users * 1e6, 2),
            **mem, "driver_peak_rss_mib": round(peak_rss_mib(), 1), "driver_rss_baseline_mib": round(baseline, 1),
        }
        rows.append(row)
        print(line(row), flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return rows


HEADER = f"{'users':>9} {'stage':<9} {'wall s':>8} {'s/1M users':>10} {'driver PSS':>10} {'driver RSS':>10} {'max other PSS':>13}  other process"


def line(r: dict) -> str:
    return (
        f"{r['users']:>9} {r['stage']:<9} {r['wall_s']:>8.1f} {r['s_per_1m_users']:>10.1f} {r['driver_pss_mib']:>10.0f} "
        f"{r['driver_peak_rss_mib']:>10.0f} {r['other_max_pss_mib']:>13.0f}  {r['other_max_name']}"
    )


def ratios(rows: list[dict]) -> dict:
    """Driver peak growth from the smallest to the largest size; time per user per stage
    relative to the smallest size (1.0 = linear in users)."""
    sizes = sorted({r["users"] for r in rows})
    small, large = sizes[0], sizes[-1]
    driver = {u: max(r["driver_pss_mib"] for r in rows if r["users"] == u) for u in sizes}
    per_user = {s: {u: next(r["s_per_1m_users"] for r in rows if r["users"] == u and r["stage"] == s) for u in sizes} for s in STAGES}
    return {
        "smallest": small,
        "largest": large,
        "driver_peak_pss_mib": driver,
        "driver_peak_growth": round(driver[large] / driver[small], 3) if driver[small] else None,
        "time_per_user_vs_smallest": {s: {u: round(v[u] / v[small], 3) if v[small] else None for u in sizes} for s, v in per_user.items()},
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = [int(u) for u in args.users.split(",")]
    import ray

    from bert4rec import console

    os.makedirs(args.workdir, exist_ok=True)
    ray.init(
        address="local", num_cpus=args.cpus, num_gpus=None if args.gpu else 0, object_store_memory=int(args.object_store_gb * 1024**3),
        include_dashboard=False, logging_level="WARNING", log_to_driver=False,
    )
    console.quiet_ray_data(False)
    sampler = Sampler(args.sample_s)
    print(f"# {args.items} items, {args.events} events/user, {args.cpus} CPUs, object store {args.object_store_gb:g} GiB, memory in MiB", flush=True)
    print(HEADER, flush=True)
    rows = []
    for users in sizes:
        rows += run_size(args, users, sampler)
    ray.shutdown()
    result = {"args": vars(args), "rows": rows, "ratios": ratios(rows)}
    r = result["ratios"]
    print("\ndriver peak PSS (largest over stages): " + ", ".join(f"{u}: {v:.0f} MiB" for u, v in r["driver_peak_pss_mib"].items()))
    print(f"driver peak growth {r['smallest']} -> {r['largest']} users: x{r['driver_peak_growth']}")
    print("time per user relative to the smallest size (1.0 = linear):")
    for stage, by_size in r["time_per_user_vs_smallest"].items():
        print(f"  {stage:<9} " + "  ".join(f"{u}: {v}" for u, v in by_size.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
