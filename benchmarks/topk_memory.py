"""Time and peak memory of chunked top-k vs the unchunked path (full score matrix).

    python benchmarks/topk_memory.py [--items 1000000] [--batch 256] [--dim 64]
                                     [--chunk 65536] [--k 10] [--reps 3] [--device cpu]

Each path runs in its own fresh child process (peak RSS is a per-process high-water
mark, so measuring two paths in one process would hide the smaller one). The child
builds the random inputs, resets the peak-RSS mark (Linux ``/proc/self/clear_refs``;
elsewhere it falls back to ``resource.getrusage(...).ru_maxrss``), runs the path once,
reads the peak RSS (VmHWM) and reports peak minus the RSS before the run: the extra
memory the path needed on top of the inputs. On CUDA the same is done with
``torch.cuda.max_memory_allocated``. Times: the first run, then median and best of
``--reps`` runs (best is the most robust figure on a shared machine).

Paths:
  unchunked  scores = addmm(bias, hidden, W.T)  (B x N) then topk_excluding(scores)
  chunked    chunked_topk(hidden, W, bias, chunk_size=--chunk)

Both get the same exclusions (a 200-item left-padded history per user plus 20 extra
ids), and the child prints a digest of the tokens so the parent can check that the
two paths return the same top-k.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bert4rec.ranking import chunked_topk, topk_excluding  # noqa: E402
from _proc import peak_rss_mib, reset_peak_rss  # benchmarks/ is sys.path[0] when a script runs

HISTORY = 200
EXTRA = 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000, help="number of items V (N = V + 2 tokens)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=65536)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--reps", type=int, default=3, help="timed runs per path (median reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["unchunked", "chunked"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_inputs(args, device):
    g = torch.Generator().manual_seed(args.seed)
    n_tokens = args.items + 2
    hidden = torch.randn(args.batch, args.dim, generator=g)
    weight = torch.empty(n_tokens, args.dim).normal_(generator=g).div_(args.dim**0.5)
    bias = torch.randn(n_tokens, generator=g) * 0.01
    exclude = torch.randint(1, args.items + 1, (args.batch, HISTORY), generator=g)
    lengths = torch.randint(1, HISTORY + 1, (args.batch, 1), generator=g)
    exclude[torch.arange(HISTORY).unsqueeze(0) < HISTORY - lengths] = 0  # left padding
    extra = torch.randint(1, args.items + 1, (args.batch, EXTRA), generator=g)
    return [t.to(device) for t in (hidden, weight, bias, exclude, extra)]


def run_child(args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    hidden, weight, bias, exclude, extra = make_inputs(args, device)

    def once():
        if args.child == "unchunked":
            scores = torch.addmm(bias, hidden, weight.T)
            out = topk_excluding(scores, args.k, exclude, extra, args.items)
            del scores
        else:
            out = chunked_topk(hidden, weight, bias, args.k, exclude, extra, args.items, args.chunk)
        if cuda:
            torch.cuda.synchronize()
        return out

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated() / (1 << 20)
    else:
        base = reset_peak_rss()
    t0 = time.perf_counter()
    values, tokens = once()
    times = [time.perf_counter() - t0]
    peak = (torch.cuda.max_memory_allocated() / (1 << 20)) if cuda else peak_rss_mib()
    for _ in range(args.reps - 1):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    tok = tokens.cpu().contiguous().numpy()
    return {
        "path": args.child,
        "first_s": times[0],
        "median_s": statistics.median(times),
        "best_s": min(times),
        "base_mib": base,
        "delta_mib": peak - base,
        "tokens_digest": hashlib.sha1(tok.tobytes()).hexdigest()[:12],
        "tokens": tok.tolist(),
        "values": values.float().cpu().tolist(),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0

    n_tokens = args.items + 2
    full_mib = args.batch * n_tokens * 4 / (1 << 20)
    chunk_mib = args.batch * min(args.chunk, args.items) * 4 / (1 << 20)
    print(
        f"items={args.items:,} batch={args.batch} dim={args.dim} k={args.k} chunk={args.chunk:,} "
        f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(f"one (B x N) fp32 score matrix = {full_mib:,.0f} MiB; one (B x chunk) block = {chunk_mib:,.0f} MiB")
    results = {}
    for path in ("unchunked", "chunked"):
        cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--child", path]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{path}: child failed (rc={proc.returncode})\n{proc.stderr[-2000:]}")
            results[path] = None
            continue
        results[path] = json.loads(proc.stdout.strip().splitlines()[-1])

    what = "peak GPU alloc" if args.device.startswith("cuda") else "peak RSS"
    print()
    print(f"| path      | first run s | median s | best s | {what} delta MiB | tokens sha1  |")
    print("|-----------|-------------|----------|--------|" + "-" * (len(what) + 12) + "|--------------|")
    for path, r in results.items():
        if r is None:
            print(f"| {path:<9} | failed |")
            continue
        print(
            f"| {path:<9} | {r['first_s']:>11.3f} | {r['median_s']:>8.3f} | {r['best_s']:>6.3f} | "
            f"{r['delta_mib']:>{len(what) + 10},.0f} | {r['tokens_digest']} |"
        )
    a, b = results.get("unchunked"), results.get("chunked")
    if a and b:
        same_tokens = a["tokens"] == b["tokens"]
        same_values = a["values"] == b["values"]
        rows_diff = sum(x != y for x, y in zip(a["tokens"], b["tokens"]))
        print()
        print(
            f"same top-{args.k} tokens: {same_tokens} (rows differing: {rows_diff}/{args.batch}); "
            f"same values: {same_values}; memory ratio unchunked/chunked: "
            f"{a['delta_mib'] / max(b['delta_mib'], 1e-9):.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
