#!/usr/bin/env bash
# The long-range synthetic study with the target type in the heads (BENCHMARKS.md, "Scaling
# with history length on synthetic long-range data"): DARE (with and without the type, with
# an attention sink) and STCA trained at history cuts 100, 1K and 10K on the 1,500-user set,
# DIN (softmax and raw-sum pooling) at 100 and 1K, plus the count probe. One seed; each run writes W/runs/NAME/metrics.json.
# Usage: benchmarks/long_range_typed.sh WORKDIR
set -euo pipefail
W=${1:-/tmp/longrec-long-range}
L="${LONGREC:-.venv/bin/longrec}"
R=benchmarks/results/scaling-synth-u1500-typed
mkdir -p "$W/runs" "$R"
if [ ! -f "$W/data/meta.json" ]; then
  $L synth --out "$W/raw" --users 1500 --mean-len 12000 --min-len 10000 --max-len 20000 \
    --candidates 8 --requests-per-user 6 --seed 5 --overwrite --quiet
  $L prepare synth --input "$W/raw" --out "$W/data" --protocol impressions --overwrite --quiet
fi
COMMON=(--set data.layout=request --set train.batch_size=16 --set train.epochs=2
        --set train.eval_every=100 --set train.lr=0.003 --set train.progress=false)
run() {  # NAME MODEL LEN [--set ...]
  local name=$1 model=$2 len=$3; shift 3
  [ -f "$W/runs/$name/metrics.json" ] || $L train --data "$W/data" --model "$model" \
    --out "$W/runs/$name" --overwrite "${COMMON[@]}" --set data.max_len="$len" "$@" >/dev/null
  cp "$W/runs/$name/metrics.json" "$R/$name.json"
}
run dare-untyped-L100 dare 100 --set model.type_dim=0
for len in 100 1000 10000; do
  run "dare-L$len" dare "$len"
  run "dare-sink-L$len" dare "$len" --set model.attention_sink=true
  run "stca-L$len" stca "$len"
done
for len in 100 1000; do  # DIN at 10K: ~30 min per run here
  run "din-L$len" din "$len"
  run "din-raw-L$len" din "$len" --set model.normalize=false
done
"${PYTHON:-.venv/bin/python}" benchmarks/synth_count_probe.py "$W/raw" 100 1000 10000 | tee "$R/count_probe.txt"
