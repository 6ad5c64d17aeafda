#!/usr/bin/env bash
# The length-scaling study on the bundled MovieLens sample (issue 07, item 3): DARE protocol,
# the demo budget (configs/demo.yaml: 3 epochs, batch 256, lr 0.01), 3 seeds, history cuts from
# very short (25) to the full history (2.7K), one thread per run.
# Usage: [MODELS=stca,dare,din] benchmarks/scaling_movielens.sh WORKDIR
set -euo pipefail
W=${1:-/tmp/longrec-scaling-movielens}
L="${LONGREC:-.venv/bin/longrec}"
MODELS=${MODELS:-stca,dare,din}
R=benchmarks/results/scaling-movielens-demo
mkdir -p "$W" "$R"
[ -f "$W/data/meta.json" ] || $L prepare movielens --input examples/data/movielens/ml-latest-small \
  --out "$W/data" --protocol dare --min-len 50 --quiet
$L bench scaling --data "$W/data" --out "$W/scaling" --models "$MODELS" \
  --lengths 25,50,100,300,1000,full --seeds 3 \
  --set train.epochs=3 --set train.batch_size=256 --set train.eval_every=50 --set train.lr=0.01 \
  --set train.threads=1 --set train.progress=false
cp "$W/scaling/table.md" "$R/table.md"; cp "$W/scaling/scaling.json" "$R/scaling.json"
cp "$W/scaling/scaling.png" "$R/scaling.png" 2>/dev/null || true
