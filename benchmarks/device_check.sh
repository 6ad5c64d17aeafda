#!/usr/bin/env bash
# The GPU check (issue 09, item 5), one command, to run whenever a CUDA machine is at hand:
#   1. every registered model trains 20 steps on the CPU and on CUDA from the same weights and
#      batches (benchmarks/device_check.py): losses and first-step gradients must agree;
#   2. the same in CUDA bf16 against CUDA fp32;
#   3. training samples/s on the GPU: DARE (Taobao configuration: batch 2048, history 200) and
#      STCA at history 10,000 (d 64, 2 layers, 4 heads, request layout, 8 requests);
#   4. serving on the GPU: DARE and STCA, history 1K and 10K, 500 candidates, one client.
# Writes OUT/*.md|json; prints the tables. Without a GPU it says so and runs nothing.
# Usage: benchmarks/device_check.sh [OUT]
set -euo pipefail
OUT=${1:-/tmp/longrec-device-check}
L="${LONGREC:-.venv/bin/longrec}"
PY="${PYTHON:-.venv/bin/python}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "device check: no CUDA device here; nothing measured"; exit 0
fi
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0))" | tee "$OUT.device"
mkdir -p "$OUT"; mv "$OUT.device" "$OUT/device.txt"
[ -f "$OUT/taobao/meta.json" ] || $L prepare taobao --input examples/data/taobao/UserBehavior_head.csv \
  --out "$OUT/taobao" --protocol dare --min-len 50 --on-bad-rows skip --behaviors pv --quiet
if [ ! -f "$OUT/long/meta.json" ]; then
  $L synth --out "$OUT/long-raw" --users 64 --mean-len 12000 --min-len 10000 --max-len 20000 \
    --candidates 8 --requests-per-user 4 --seed 3 --format parquet --overwrite --quiet
  $L prepare synth --input "$OUT/long-raw" --out "$OUT/long" --protocol impressions --quiet
fi
"$PY" benchmarks/device_check.py "$OUT/taobao" --a cpu --b cuda | tee "$OUT/parity-cpu-cuda.md"
"$PY" benchmarks/device_check.py "$OUT/taobao" --a cuda --b cuda/bf16 | tee "$OUT/parity-bf16.md"
for p in fp32 bf16; do
  $L bench train --data "$OUT/taobao" --model dare --max-len 200 --batch-size 2048 --steps 20 \
    --set train.device=cuda --set train.precision=$p --out "$OUT/train-dare-$p.json"
  $L bench train --data "$OUT/long" --model stca --max-len 10000 --layout request --batch-size 8 \
    --steps 10 --set train.device=cuda --set train.precision=$p --set model.params.dim=64 \
    --set model.params.layers=2 --set model.params.heads=4 --out "$OUT/train-stca10k-$p.json"
done
$L bench serve --data "$OUT/long" --models dare,stca --lengths 1000,10000 --candidates 500 \
  --concurrency 1 --requests 30 --micro-batch 1 --device cuda --work "$OUT/serve-work" \
  --out "$OUT/serve"
