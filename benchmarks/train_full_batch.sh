#!/usr/bin/env bash
# One epoch of the reference trainer with the whole Fashion-MNIST training set (60,000
# image-caption pairs) as ONE contrastive batch, gradient-cached in micro-batches, on CPU.
# Records peak RSS and the run's metrics under benchmarks/results/train_full_batch_60000/.
#   usage: benchmarks/train_full_batch.sh [extra trainer flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=benchmarks/results/train_full_batch_60000
LOGS=$(mktemp -d)
mkdir -p "$OUT"
{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host_cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "nproc: $(nproc)"
  echo "mem_total: $(grep MemTotal /proc/meminfo | awk '{print $2, $3}')"
  echo "load_before: $(cat /proc/loadavg)"
  $PY -c 'import sys, torch, numpy; print("python:", sys.version.split()[0]); print("torch:", torch.__version__); print("numpy:", numpy.__version__)'
  echo "command: $PY -m clip_fast.train --device cpu --batch-size 60000 --micro-batch-size 1000 --epochs 1 --no-progress $*"
} > "$OUT/machine.txt"
/usr/bin/time -v $PY -m clip_fast.train --device cpu --batch-size 60000 --micro-batch-size 1000 \
  --epochs 1 --no-progress --logs-dir "$LOGS" --name full_batch "$@" 2> "$OUT/time.txt"
echo "load_after: $(cat /proc/loadavg)" >> "$OUT/machine.txt"
cp "$LOGS/full_batch/metrics.csv" "$LOGS/full_batch/log.txt" "$LOGS/full_batch/summary.json" "$OUT/"
grep -E "Maximum resident|Elapsed \(wall" "$OUT/time.txt" | tee -a "$OUT/machine.txt"
rm -rf "$LOGS"
