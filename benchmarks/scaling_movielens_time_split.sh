#!/usr/bin/env bash
# The length-scaling study on the bundled MovieLens sample under a protocol with many targets
# per user (issue 07, item 3): `time_split` (every behaviour after the 80% time quantile a
# validation or test target, every earlier one a training target; a quarter of the training
# targets kept, ~40K samples against DARE's 20K), so the long-history models have more than the
# last 19 targets of each user to learn from. Request layout (a target and its negative share
# one history), length-bucketed batches, 2 epochs, 3 seeds, one thread per run, two runs side
# by side. Evaluation batches of 256 requests: the default 4,096 at the full 2.7K history
# took DARE past 13 GB.
# Usage: [MODELS=stca,dare,din,longer,twin_hard LENGTHS=25,100,300,1000,full] \
#        benchmarks/scaling_movielens_time_split.sh WORKDIR
set -euo pipefail
W=${1:-/tmp/longrec-scaling-movielens-time-split}
L="${LONGREC:-.venv/bin/longrec}"
MODELS=${MODELS:-stca,dare,din,longer,twin_hard}
LENGTHS=${LENGTHS:-25,100,300,1000,full}
R=benchmarks/results/scaling-movielens-time-split
mkdir -p "$W" "$R"
[ -f "$W/data/meta.json" ] || $L prepare movielens \
  --input examples/data/movielens/ml-latest-small --out "$W/data" --protocol time_split \
  --min-len 50 --train-fraction 0.25 --quiet
SETS=(--set data.layout=request --set data.bucket=true --set data.eval_batch_size=256
      --set train.batch_size=128
      --set train.epochs=2 --set train.eval_every=100 --set train.lr=0.01
      --set train.threads=1 --set train.progress=false)
IFS=, read -ra ALL <<< "$MODELS"
run() {  # MODEL...: one study folder and table per model
  for m in "$@"; do
    $L bench scaling --data "$W/data" --out "$W/scaling-$m" --models "$m" \
      --lengths "$LENGTHS" --seeds 3 "${SETS[@]}"
    cp "$W/scaling-$m/table.md" "$R/$m.md"; cp "$W/scaling-$m/scaling.json" "$R/$m.json"
  done
}
# two lanes, the models dealt alternately
lane() { local i; for ((i = $1; i < ${#ALL[@]}; i += 2)); do run "${ALL[$i]}"; done; }
lane 0 &
lane 1 &
wait
# STCA with the request-time gap in its tokens (time_delta), the variant that stays flat
$L bench scaling --data "$W/data" --out "$W/scaling-stca-time" --models stca --lengths "$LENGTHS" \
  --seeds 3 "${SETS[@]}" --set model.params.time_delta=true
cp "$W/scaling-stca-time/table.md" "$R/stca-time.md"
cp "$W/scaling-stca-time/scaling.json" "$R/stca-time.json"
