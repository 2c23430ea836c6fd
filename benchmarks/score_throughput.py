"""Scoring throughput (users/s) and peak memory: the Ray Data pipeline vs a bare PyTorch loop.

    .venv/bin/python benchmarks/score_throughput.py                       # 200k users, 20k items
    .venv/bin/python benchmarks/score_throughput.py --memory-scaling      # 100k vs 1M users
    .venv/bin/python benchmarks/score_throughput.py --catalogue 1000000   # 1M items, 2k users
    .venv/bin/python benchmarks/score_throughput.py --gpu                 # ScoreConfig(gpu=True)

Reduced sizes for a small machine (what benchmarks/README.md reports; the scaling run uses
length 50 so that 200k users take minutes, not half an hour, on 2 busy cores):

    .venv/bin/python benchmarks/score_throughput.py --users 20000
    .venv/bin/python benchmarks/score_throughput.py --users 100000 --rounds 5   # five alternated pairs, median ratio
    .venv/bin/python benchmarks/score_throughput.py --memory-scaling --scaling-users 20000,200000 --max-len 50 --mean-len 20
    .venv/bin/python benchmarks/score_throughput.py --memory-scaling --scaling-users 20000,200000 --max-len 50 --mean-len 20 \
        --ray-env MALLOC_MMAP_THRESHOLD_=1048576
    .venv/bin/python benchmarks/score_throughput.py --catalogue 1000000 --catalogue-users 2000

Data: ``bert4rec.synthetic.generate`` (``--users`` users, ``--items`` items, lengths
geometric with mean ``--mean-len``, capped at ``--max-len``) then ``bert4rec.prepare.prepare``,
cached under ``--workdir`` (delete it to regenerate). Model: an untrained ``BERT4Rec`` (hidden
64, 2 layers, 2 heads, max_len ``--max-len`` by default) whose vocabulary is the whole
catalogue (item ids 1..items, counts from the data), saved with ``bert4rec.checkpoint.save``;
scores of an untrained model cost exactly what a trained one's do.

Paths, each run in a fresh child process whose whole process tree (the child, and for Ray its
GCS, raylet, workers and actors) the parent samples every ``--sample-s`` seconds:

  ray   ``ray.init(address="local", num_cpus=--cpus)`` then
        ``bert4rec.score.score(ScoreConfig(..., batch_size, actors, cpus_per_actor, threads_per_actor, gpu))``:
        read_parquet -> batch-sized blocks -> featurize + Scorer actors -> write_parquet -> verify
        -> publish. Its time is the ``score()`` call: Ray's start-up is excluded, and so (timed
        and printed apart, ``--cold`` to include it) is a tiny Ray Data job that starts Ray Data's
        cluster-wide helper actors, as training has done before scoring in a nightly run; the
        scoring actors' start-up is included.
  bare  one process, no Ray: pyarrow reads the same Parquet files in batches of --batch-size,
        ``featurize`` then a ``Scorer`` instance called directly (the very code the actors run:
        ``score_batch`` + ``to_rows``), rows written to one Parquet file with the same
        encodings as ``score()``'s (``dictionary_columns``). The ceiling. Torch
        uses its default thread count here (all cores; ``--bare-threads`` to change it), while
        Ray gives each actor ``OMP_NUM_THREADS`` = its ``cpus_per_actor`` (so 1 thread by default)
        unless ``--threads-per-actor`` sets the actor's torch threads.

CPU s: CPU seconds (user + system) of every process of the child's tree over its whole run
(start-up included; the last sampling period of each process is missed), summed; on a shared
machine users per CPU-second is steadier than users/s. Memory: the peak over samples of the tree's summed PSS (proportional set size: shared pages,
e.g. the object store and torch's libraries mapped by every worker, split between the
processes that map them) and of its summed RSS (counts shared pages once per process, so it
over-states a many-process tree). psutil is used where installed, else /proc is parsed.

Modes: default = throughput (ray vs bare, ratio, target >= 0.9x; ``--rounds N`` alternates N
pairs and prints the median ratio, steadier than one pair on a shared machine);
``--memory-scaling``: the ray path at each of ``--scaling-users`` sizes (target: peak grows
<= 20% from the smallest to the largest); ``--catalogue N``: an N-item catalogue scored for
``--catalogue-users`` users with chunked top-k (``--item-chunk-size``), ray and bare.

``--ray-env KEY=VALUE`` sets an environment variable in every Ray worker, to try a remedy
without changing library code: ``--ray-env MALLOC_MMAP_THRESHOLD_=1048576`` stops the
scoring actor's glibc heap from growing with every batch (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from statistics import median

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--max-len", type=int, default=200, help="longest history and the model's max_len")
    p.add_argument("--mean-len", type=int, default=40, help="mean history length of the generator")
    p.add_argument("--batch-size", type=int, default=4096, help="ScoreConfig.batch_size (and the bare loop's)")
    # defaults: configs/score.yaml's (two one-thread actors) on CPU; one actor per GPU with --gpu
    p.add_argument("--actors", type=int, default=None, help="ScoreConfig.actors (default 2; 1 with --gpu)")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="ScoreConfig.cpus_per_actor (default 0.5; 1 with --gpu)")
    p.add_argument("--threads-per-actor", type=int, default=None, help="ScoreConfig.threads_per_actor (default 1; unset with --gpu)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="ray.init(num_cpus=...)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--item-chunk-size", type=int, default=262_144)
    p.add_argument("--sub-batch", type=int, default=None, help="ScoreConfig.sub_batch, and the bare loop's (default: ScoreConfig's; on a GPU, try the batch size)")
    p.add_argument("--rows-per-file", type=int, default=100_000, help="ScoreConfig.rows_per_file")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--bare-threads", type=int, default=0, help="torch threads of the bare loop (0: torch's default, all cores)")
    p.add_argument("--gpu", action="store_true", help="ScoreConfig(gpu=True); the bare loop on cuda too")
    p.add_argument(
        "--ray-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for every Ray worker (ray.init runtime_env), e.g. MALLOC_MMAP_THRESHOLD_=1048576; repeatable",
    )
    p.add_argument("--cold", action="store_true", help="time the ray path without first starting Ray Data's cluster-wide helper actors")
    p.add_argument("--object-store-mib", type=int, default=None, help="ray.init(object_store_memory=...)")
    p.add_argument("--memory-scaling", action="store_true", help="peak memory of the ray path at each --scaling-users")
    p.add_argument("--scaling-users", default="100000,1000000")
    p.add_argument("--catalogue", type=int, default=None, metavar="ITEMS", help="score an ITEMS-item catalogue")
    p.add_argument("--catalogue-users", type=int, default=2000)
    p.add_argument("--paths", default="ray,bare", help="which paths to run in throughput/catalogue modes")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the paths this many times, alternated (ray, bare, ray, bare, ...), and print each round's ratio and the median: "
        "on a shared machine one pair can be 10%% off either way",
    )
    p.add_argument("--sample-s", type=float, default=0.5, help="memory sampling period")
    p.add_argument("--workdir", default="/tmp/bert4rec-bench", help="generated data, checkpoints and outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["ray", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--ckpt-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.sub_batch is None:
        from bert4rec.config import ScoreSettings

        args.sub_batch = ScoreSettings.model_fields["sub_batch"].default
    if args.actors is None:
        args.actors = 1 if args.gpu else 2
    if args.cpus_per_actor is None:
        args.cpus_per_actor = 1.0 if args.gpu else 0.5
    if args.threads_per_actor is None and not args.gpu:
        args.threads_per_actor = 1
    return args


# ---------------------------------------------------------------- data and model


def ensure_data(args, users: int, items: int) -> str:
    """Generated interactions -> prepared histories, cached by their parameters."""
    d = os.path.join(args.workdir, f"data-u{users}-i{items}-L{args.max_len}-m{args.mean_len}-s{args.seed}")
    if not os.path.exists(os.path.join(d, "DONE")):
        from bert4rec.config import PrepareConfig
        from bert4rec.prepare import prepare
        from bert4rec.synthetic import generate

        shutil.rmtree(d, ignore_errors=True)
        t0 = time.time()
        generate(os.path.join(d, "raw"), users=users, items=items, seed=args.seed, max_length=args.max_len, mean_length=args.mean_len)
        t1 = time.time()
        stats = prepare(PrepareConfig(interactions=os.path.join(d, "raw"), out=os.path.join(d, "prepared")))
        shutil.rmtree(os.path.join(d, "raw"))
        print(f"  generated {users:,} users / {items:,} items ({stats['interactions']:,} interactions) in {t1 - t0:.0f} s, prepared in {time.time() - t1:.0f} s -> {d}", flush=True)
        open(os.path.join(d, "DONE"), "w").close()
    return d


def ensure_checkpoint(args, d: str, items: int) -> str:
    """An untrained model over the whole catalogue, saved once per model layout: the directory
    name carries a digest of the state-dict names and shapes, so a changed model.py gets a
    fresh checkpoint instead of a stale one."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from bert4rec import checkpoint
    from bert4rec.model import BERT4Rec, BERT4RecConfig

    torch.manual_seed(args.seed)
    mc = BERT4RecConfig(num_items=items, max_len=args.max_len, hidden=args.hidden, layers=args.layers, heads=args.heads)
    model = BERT4Rec(mc)
    layout = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()) + mc.model_dump_json()
    ckpt = os.path.join(d, "ckpt-" + hashlib.sha1(layout.encode()).hexdigest()[:10])
    if not os.path.exists(os.path.join(ckpt, "metadata.json")):
        seen = pq.read_table(os.path.join(d, "prepared", "vocab.parquet"))
        counts = np.zeros(items + 1, np.int64)
        counts[seen["item_id"].to_numpy()] = seen["count"].to_numpy()
        vocab = pa.table(
            {
                "item_id": pa.array(np.arange(1, items + 1), pa.int64()),
                "token": pa.array(np.arange(1, items + 1), pa.int32()),
                "count": pa.array(counts[1:], pa.int64()),
            }
        )
        checkpoint.save(ckpt, model, vocab, metadata={"epoch": 0, "metrics": {}, "note": "untrained, for benchmarks"})
    return ckpt


# ---------------------------------------------------------------- process-tree memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                s = f.read()
        except OSError:
            continue
        pid = int(stat.split("/")[2])
        ppid = int(s[s.rfind(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(pid)
    return kids


def _proc_mem_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB from /proc (PSS = RSS where smaps_rollup is missing)."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
        return rss, pss
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return rss, rss


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds (0 where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        fields = s[s.rfind(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _proc_label(pid: int) -> str:
    """A process's role for the CPU breakdown: its title (Ray names workers ``ray::Scorer`` etc.)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        title = first.split()[0]
        cut = title.rfind(")") + 1  # drop the method: ray::Actor.method, ray::MapWorker(...).__init__
        dot = title.find(".", cut)
        return title if dot < 0 else title[:dot]
    name = os.path.basename(first)
    if name.startswith("python"):
        for a in argv[1:]:
            a = a.decode(errors="replace")
            if a.endswith(".py"):
                return os.path.basename(a)
    return name


def _relabel(labels: dict[int, str], pid: int) -> None:
    """Keeps the most telling title seen: a worker runs as ``ray::IDLE`` between tasks."""
    label = _proc_label(pid)
    named = label.startswith("ray::") and label != "ray::IDLE"
    if pid not in labels or (named and not (labels[pid].startswith("ray::") and labels[pid] != "ray::IDLE")):
        labels[pid] = label


def tree_memory_mib(root: int, cpu: dict[int, float] | None = None, labels: dict[int, str] | None = None) -> tuple[float, float, int]:
    """(summed RSS, summed PSS, processes) of ``root`` and all its descendants; ``cpu``, when
    given, is updated with each process's CPU seconds so far, and ``labels`` with its role."""
    try:
        import psutil

        try:
            procs = [psutil.Process(root)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return 0.0, 0.0, 0
        rss = pss = 0
        for p in procs:
            try:
                if cpu is not None:
                    t = p.cpu_times()
                    cpu[p.pid] = max(cpu.get(p.pid, 0.0), t.user + t.system)
                if labels is not None:
                    _relabel(labels, p.pid)
                full = p.memory_full_info()
                rss += full.rss
                pss += getattr(full, "pss", full.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return rss / (1 << 20), pss / (1 << 20), len(procs)
    except ImportError:
        pass
    kids = _children_map()
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(kids.get(pid, []))
    rss = pss = 0
    for pid in seen:
        r, p = _proc_mem_kib(pid)
        rss, pss = rss + r, pss + p
        if cpu is not None:
            cpu[pid] = max(cpu.get(pid, 0.0), _proc_cpu_s(pid))
        if labels is not None:
            _relabel(labels, pid)
    return rss / 1024, pss / 1024, len(seen)


def run_child(args, argv: list[str], path: str, data_dir: str, users: int, ckpt: str) -> dict:
    """Runs one path in a fresh child; samples its process tree until it exits."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", path, "--data-dir", data_dir, "--ckpt-dir", ckpt, "--users", str(users)]
    log = os.path.join(args.workdir, f"child-{path}.log")
    t0 = time.time()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        peak = {"rss": 0.0, "pss": 0.0, "procs": 0}
        cpu: dict[int, float] = {}
        labels: dict[int, str] = {}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                rss, pss, n = tree_memory_mib(proc.pid, cpu, labels)
                peak["rss"], peak["pss"], peak["procs"] = max(peak["rss"], rss), max(peak["pss"], pss), max(peak["procs"], n)
                stop.wait(args.sample_s)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        out, _ = proc.communicate()
        stop.set()
        th.join()
    wall = time.time() - t0
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{path} child failed (rc={proc.returncode}), log {log}:\n{tail}")
    res = json.loads(out.strip().splitlines()[-1])
    by_role: dict[str, float] = {}
    for pid, s in cpu.items():
        by_role[labels.get(pid, "?")] = by_role.get(labels.get(pid, "?"), 0.0) + s
    return {**res, "cpu_by_role": dict(sorted(by_role.items(), key=lambda kv: -kv[1])), "peak_rss_mib": peak["rss"], "peak_pss_mib": peak["pss"], "max_procs": peak["procs"], "child_wall_s": wall, "tree_cpu_s": sum(cpu.values())}


# ---------------------------------------------------------------- the two paths (children)


def child_ray(args) -> dict:
    import ray

    from bert4rec.config import ScoreConfig
    from bert4rec.score import score

    d = args.data_dir
    out = os.path.join(args.workdir, f"out-ray-{os.path.basename(d)}")
    shutil.rmtree(out, ignore_errors=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kw = {"object_store_memory": args.object_store_mib << 20} if args.object_store_mib else {}
    if args.ray_env:
        kw["runtime_env"] = {"env_vars": dict(e.split("=", 1) for e in args.ray_env)}
    ray.init(address="local", num_cpus=args.cpus, num_gpus=1 if args.gpu else 0, include_dashboard=False, logging_level="WARNING", log_to_driver=False, **kw)
    cfg = ScoreConfig(
        checkpoint=args.ckpt_dir,
        histories=os.path.join(d, "prepared", "histories"),
        out=out,
        k=args.k,
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        threads_per_actor=args.threads_per_actor,
        gpu=args.gpu,
        item_chunk_size=args.item_chunk_size,
        sub_batch=args.sub_batch,
        rows_per_file=args.rows_per_file,
    )
    warm = 0.0
    if not args.cold:
        # Ray Data's cluster-wide helpers (stats and autoscaling-coordinator actors, a worker
        # with ray.data imported) start on a cluster's first Ray Data job; in a nightly run
        # training has started them before scoring begins. Timed separately.
        import ray.data

        t = time.perf_counter()
        ray.data.range(8).map_batches(lambda b: b).materialize()
        warm = time.perf_counter() - t
    t0 = time.perf_counter()
    manifest = score(cfg)
    wall = time.perf_counter() - t0
    ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)
    return {"path": "ray", "users": manifest["input_users"], "rows": manifest["rows"], "wall_s": wall, "ray_data_warmup_s": warm, "timings": manifest.get("timings", {})}


def child_bare(args) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from bert4rec.config import StorageConfig
    from bert4rec.score import Scorer, dictionary_columns, featurize

    if args.bare_threads:
        torch.set_num_threads(args.bare_threads)
    d = args.data_dir
    out = os.path.join(args.workdir, f"out-bare-{os.path.basename(d)}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ckpt = args.ckpt_dir
    t0 = time.perf_counter()
    # the checkpoint is loaded once, by the Scorer, as in an actor
    scorer = Scorer(
        ckpt, StorageConfig(), args.k, args.item_chunk_size, args.gpu, np.zeros(0, np.int64), None,
        dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
        sub_batch=args.sub_batch,
    )
    mc = scorer.model.config
    kw = {"vocab_ids": scorer.vocab_ids, "max_len": mc.max_len, "mask_token": mc.mask_token, "use_ratings": mc.use_ratings}
    users = 0
    writer = None
    for f in sorted(glob.glob(os.path.join(d, "prepared", "histories", "*.parquet"))):
        for rb in pq.ParquetFile(f).iter_batches(batch_size=args.batch_size, columns=["user_id", "item_ids"]):
            rows = scorer(featurize(pa.Table.from_batches([rb]), **kw))
            if writer is None:
                writer = pq.ParquetWriter(os.path.join(out, "part-00000.parquet"), rows.schema, use_dictionary=dictionary_columns(False))
            writer.write_table(rows)
            users += rows.num_rows
    if writer is not None:
        writer.close()
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"path": "bare", "users": users, "rows": users, "wall_s": wall, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- parent


def _line(name: str, r: dict) -> str:
    t = r.get("timings", {})
    extra = (
        f"  (score() phases: validate {t.get('validate_s', 0):.1f} s, pipeline {t.get('score_s', 0):.1f} s, verify {t.get('verify_s', 0):.1f} s; "
        f"untimed Ray Data warm-up before it: {r.get('ray_data_warmup_s', 0):.1f} s)"
        if t
        else f"  (torch threads {r.get('threads')})"
    )
    return (
        f"| {name:<5} | {r['users']:>9,} | {r['wall_s']:>8.1f} | {r['users'] / r['wall_s']:>8,.0f} | {r['tree_cpu_s']:>7.0f} | "
        f"{r['peak_pss_mib']:>13,.0f} | {r['peak_rss_mib']:>13,.0f} | {r['max_procs']:>5} |{extra}"
    )


HEADER = (
    "| path  |     users |   time s |  users/s |  CPU s  | peak PSS MiB  | peak RSS MiB  | procs |\n"
    "|-------|-----------|----------|----------|---------|---------------|---------------|-------|"
)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        res = child_ray(args) if args.child == "ray" else child_bare(args)
        print(json.dumps(res))
        return 0
    import torch

    os.makedirs(args.workdir, exist_ok=True)
    # the children get the same flags minus the mode switches (they only run one path)
    base = [a for a in argv if a not in ("--memory-scaling",)]
    load = os.getloadavg()
    mode = "memory-scaling" if args.memory_scaling else ("catalogue" if args.catalogue else "throughput")
    print(
        f"mode={mode} batch_size={args.batch_size} actors={args.actors} cpus_per_actor={args.cpus_per_actor} threads_per_actor={args.threads_per_actor} "
        f"ray num_cpus={args.cpus} bare_threads={args.bare_threads or torch.get_num_threads()} gpu={args.gpu} k={args.k} item_chunk_size={args.item_chunk_size:,} "
        f"model: hidden={args.hidden} layers={args.layers} heads={args.heads} max_len={args.max_len}; "
        f"cores={os.cpu_count()} torch={torch.__version__}" + (f"; ray worker env: {' '.join(args.ray_env)}" if args.ray_env else "")
    )
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)

    if args.memory_scaling:
        sizes = [int(s) for s in args.scaling_users.split(",")]
        results = []
        for n in sizes:
            d = ensure_data(args, n, args.items)
            results.append(run_child(args, base, "ray", d, n, ensure_checkpoint(args, d, args.items)))
            print(f"  ray {n:,} users: {results[-1]['wall_s']:.1f} s, peak PSS {results[-1]['peak_pss_mib']:,.0f} MiB", flush=True)
        print(f"\nitems={args.items:,} mean_len={args.mean_len} max_len={args.max_len}\n" + HEADER)
        for r in results:
            print(_line("ray", r))
        a, b = results[0], results[-1]
        print(
            f"\npeak memory {sizes[0]:,} -> {sizes[-1]:,} users ({sizes[-1] / sizes[0]:.0f}x): "
            f"PSS {100 * (b['peak_pss_mib'] / a['peak_pss_mib'] - 1):+.1f}%, RSS {100 * (b['peak_rss_mib'] / a['peak_rss_mib'] - 1):+.1f}% (target <= +20%)"
        )
    else:
        users = args.catalogue_users if args.catalogue else args.users
        items = args.catalogue if args.catalogue else args.items
        d = ensure_data(args, users, items)
        ckpt = ensure_checkpoint(args, d, items)
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        rounds = []
        for i in range(args.rounds):
            results = {}
            for path in paths:
                results[path] = run_child(args, base, path, d, users, ckpt)
                print(f"  {path}: {results[path]['wall_s']:.1f} s" + (f" (round {i + 1} of {args.rounds})" if args.rounds > 1 else ""), flush=True)
            rounds.append(results)
        print(f"\nusers={users:,} items={items:,} mean_len={args.mean_len} max_len={args.max_len}\n" + HEADER)
        for results in rounds:
            for path, r in results.items():
                print(_line(path, r))
        for i, results in enumerate(rounds):
            for path, r in results.items():
                print(f"CPU s by process ({path}" + (f", round {i + 1}" if args.rounds > 1 else "") + "): " + ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_by_role"].items() if v >= 0.5))
        if "ray" in paths and "bare" in paths:
            ratios = []
            for results in rounds:
                a, b = results["ray"], results["bare"]
                ratios.append((a["users"] / a["wall_s"]) / (b["users"] / b["wall_s"]))
                print(
                    f"\nray / bare throughput: {ratios[-1]:.2f}x (target >= 0.9x); "
                    f"ray pipeline phase alone: {(a['users'] / max(a['timings'].get('score_s', a['wall_s']), 1e-9)) / (b['users'] / b['wall_s']):.2f}x; "
                    f"users per CPU-second ray/bare: {(a['users'] / a['tree_cpu_s']) / (b['users'] / b['tree_cpu_s']):.2f}x; "
                    f"peak PSS ray/bare: {a['peak_pss_mib'] / b['peak_pss_mib']:.1f}x"
                )
            if len(ratios) > 1:
                print(f"\nray / bare over {len(ratios)} rounds: " + ", ".join(f"{x:.2f}x" for x in ratios) + f"; median {median(ratios):.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
