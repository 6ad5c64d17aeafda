#!/usr/bin/env bash
# The long-range synthetic study with a signal attention can reach (issue 07, items 3 and 4):
# labels from the single most relevant behaviour (`relevance_pool=max`) instead of the summed
# relevance, histories of 10-20K behaviours, 8 ads per request. Trains STCA and DARE at history
# cuts 100, 1K and 10K and DIN at 100 and 1K (3 seeds each, `longrec bench scaling`), STCA with
# Beta training lengths (mean 1K, up to 10K) evaluated at 1K, 2K, 4K and 10K, and runs the truth
# probe (what the generator's own relevance allows within the last L behaviours).
# Usage: [USERS=1200 JOBS=2] benchmarks/long_range_max.sh WORKDIR
set -euo pipefail
W=${1:-/tmp/longrec-long-range-max}
L="${LONGREC:-.venv/bin/longrec}"
PY="${PYTHON:-.venv/bin/python}"
USERS=${USERS:-1200}
R=benchmarks/results/long-range-max-u$USERS
mkdir -p "$W" "$R"
if [ ! -f "$W/data/meta.json" ]; then
  $L synth --out "$W/raw" --users "$USERS" --mean-len 12000 --min-len 10000 --max-len 20000 \
    --candidates 8 --requests-per-user 6 --seed 5 --format parquet --overwrite --quiet \
    --set relevance_pool=max --set relevance_gain=4
  $L prepare synth --input "$W/raw" --out "$W/data" --protocol impressions --overwrite --quiet
fi
"$PY" benchmarks/synth_truth_probe.py "$W/raw" 25 50 100 300 1000 2000 4000 10000 | tee "$R/truth_probe.md"
SETS=(--set data.layout=request --set train.batch_size=16 --set train.epochs=2
      --set train.eval_every=100 --set train.lr=0.003 --set train.threads=1 --set train.progress=false)
scaling() {  # OUT MODELS LENGTHS [--set ...]
  local out=$1 models=$2 lengths=$3; shift 3
  $L bench scaling --data "$W/data" --out "$W/$out" --models "$models" --lengths "$lengths" \
    --seeds 3 "${SETS[@]}" "$@"
  cp "$W/$out/table.md" "$R/$out.md"; cp "$W/$out/scaling.json" "$R/$out.json"
}
extrapolation() {  # NAME [--set ...]
  local name=$1; shift
  for seed in 1 2 3; do
    run="$W/extrapolation/$name-s$seed"
    [ -f "$run/metrics.json" ] || $L train --data "$W/data" --model stca --out "$run" --overwrite \
      "${SETS[@]}" --set train.seed=$seed --set data.max_len=10000 --set data.train_lengths=beta \
      --set data.train_mean_len=1000 --set data.bucket=true "$@" > /dev/null
    for len in 1000 2000 4000 10000; do
      f="$R/extrapolation-$name-s$seed-L$len.json"
      [ -s "$f" ] || { $L eval --run "$run" --split test --max-len $len > "$f.tmp" && mv "$f.tmp" "$f"; }
    done
  done
}
# two jobs at a time, one thread each (a 2-core machine)
( scaling scaling-stca stca 100,1000,10000; extrapolation stca-beta1k ) &
( scaling scaling-dare dare 100,1000,10000; scaling scaling-din din 100,1000 ) &
wait
# the hard (category) search retrieves every same-category behaviour wherever it sits
scaling scaling-twin-hard twin_hard 100,1000,10000
# STCA with the request-time gap in its tokens (BENCHMARKS.md ran 10K with one seed)
TIME=(--set model.params.time_delta=true)
scaling scaling-stca-time stca 100,1000,10000 "${TIME[@]}"
extrapolation stca-time-beta1k "${TIME[@]}"
