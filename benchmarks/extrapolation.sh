#!/usr/bin/env bash
# Length extrapolation (issue 04; docs/models.md, "STCA"): STCA trained on short histories (Beta
# lengths with mean ~1K, or a fixed 1K cut) and evaluated at 1K, 2K, 4K and 10K behaviours, on
# synthetic data whose label depends on relevant behaviours far back (8 ads per request,
# histories >= 10K).
# Usage: [USERS=400 REQUESTS=3 EPOCHS=3] benchmarks/extrapolation.sh WORKDIR [SEEDS]
set -euo pipefail
W=${1:-/tmp/longrec-extrapolation}
SEEDS=${2:-1 2}
L="${LONGREC:-.venv/bin/longrec}"
USERS=${USERS:-400} REQUESTS=${REQUESTS:-3} EPOCHS=${EPOCHS:-3}
R=benchmarks/results/extrapolation-u$USERS
mkdir -p "$W" "$R"
if [ ! -f "$W/data/meta.json" ]; then
  $L synth --out "$W/raw" --users "$USERS" --mean-len 12000 --min-len 10000 --max-len 20000 \
    --candidates 8 --requests-per-user "$REQUESTS" --seed 5 --overwrite --quiet
  $L prepare synth --input "$W/raw" --out "$W/data" --protocol impressions --overwrite --quiet
fi
COMMON=(--set data.layout=request --set train.batch_size=16 --set train.epochs=$EPOCHS
        --set train.eval_every=40 --set train.lr=0.003 --set train.progress=false)
declare -A VARIANT=(
  [beta-mean1k]="--set data.max_len=10000 --set data.train_lengths=beta --set data.train_mean_len=1000 --set data.bucket=true"
  [fixed-1k]="--set data.max_len=1000"
)
for name in "${!VARIANT[@]}"; do
  for seed in $SEEDS; do
    run="$W/runs/$name-seed$seed"
    [ -f "$run/metrics.json" ] || $L train --data "$W/data" --model stca --out "$run" --overwrite \
      "${COMMON[@]}" --set train.seed=$seed ${VARIANT[$name]}
    for len in 1000 2000 4000 10000; do
      f="$R/$name-seed$seed-$len.json"
      [ -s "$f" ] || $L eval --run "$run" --split test --max-len $len > "$f.tmp" && mv "$f.tmp" "$f"
    done
  done
done
