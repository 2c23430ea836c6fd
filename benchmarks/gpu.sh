#!/usr/bin/env bash
# The GPU checks in one run, on a CUDA machine with this package installed (pip install -e ".[dev,bench]"):
#
#   RATINGS=/path/to/ml-1m/ratings.parquet bash benchmarks/gpu.sh
#
# 1. the GPU test tier (tests/gpu: bf16 training on a GPU worker, GPU scoring actors);
# 2. training sequences/s with bf16 autocast, ours against the Hugging Face loop (train_throughput.py);
# 3. time to validation NDCG@10 0.15 on MovieLens-1M users <= 2999 (quality.py --gpu, 5-minute budget),
#    skipped when RATINGS is unset;
# 4. scoring users/s at 20k items and L=200, the Ray Data pipeline against a bare loop (score_throughput.py --gpu).
# Each step's figures are printed as it ends, and the summary table again at the end. Meant to finish in
# under 8 minutes on one H100/H200; every step has its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
summary=()
step() {  # step NAME SECONDS CMD...: runs CMD with a limit, keeps its log, records pass/fail
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-18s rc=%-3s %4ss' "$name" "$rc" $((SECONDS - t0)))")
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
step gpu-tests 150 "$PY" -m pytest tests/gpu -q -m gpu -p no:cacheprovider
step train-speed 90 "$PY" benchmarks/train_throughput.py --device cuda --batch 256 --steps 20 --variants ours/mix+buckets,hf/mix+buckets
if [[ -n "${RATINGS:-}" ]]; then
  # the GPU cluster configs' batch and learning rate (not yet tuned on a GPU)
  step ml1m-quality 330 "$PY" benchmarks/quality.py --ratings "$RATINGS" --gpu --workers 1 --minutes 4 --set batch_size=256 --set lr=0.004
fi
step score-speed 150 "$PY" benchmarks/score_throughput.py --gpu --users 200000 --items 20000 --max-len 200 --sub-batch 1024
echo
echo "=== summary (logs in $OUT)"
printf '%s\n' "${summary[@]}"
grep -h "seq/s\|users/s\|first >= 0.15\|test (full" "$OUT"/*.log 2>/dev/null | head -40
