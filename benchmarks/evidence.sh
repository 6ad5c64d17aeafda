#!/usr/bin/env bash
# The model-quality evidence of BENCHMARKS.md (issues 02 and 03): long runs, meant for an idle
# machine. Usage: benchmarks/evidence.sh WORKDIR   (datasets and runs go under WORKDIR)
set -euo pipefail
W=${1:-/tmp/longrec-evidence}
L="${LONGREC:-.venv/bin/longrec}"
R=benchmarks/results
mkdir -p "$W" "$R"
Q=(--set train.progress=false)

# bundled real data, DARE protocol (Taobao: page views, --min-len lowered to 50 for 814 users)
$L prepare taobao --input examples/data/taobao/UserBehavior_head.csv --out "$W/taobao" \
  --protocol dare --behaviors pv --min-len 50 --on-bad-rows skip --overwrite --quiet
$L prepare movielens --input examples/data/movielens/ml-latest-small --out "$W/movielens" \
  --protocol dare --min-len 50 --overwrite --quiet

# issues 02 and 03: DARE's Table 1 family and TIN on the real samples (configs/demo.yaml:
# 3 epochs, batch 256); the TIN vs DIN vs DARE rows come from the same runs
$L compare --data "$W/taobao" --seeds 3 --config configs/demo.yaml --out "$R/compare-taobao" "${Q[@]}" \
  --models din,twin,twin_hard,twin_no_tr,twin_4e,eta,sdim,sim_hard,dare,tin
$L compare --data "$W/movielens" --seeds 3 --config configs/demo.yaml --out "$R/compare-movielens" "${Q[@]}" \
  --models din,twin,eta,dare,tin

# issue 03: the Tencent-stack ablation on synthetic multi-domain data with 3 target types
$L synth --out "$W/synth-abl-raw" --users 4000 --mean-len 500 --max-len 20000 --seed 7 --overwrite --quiet
$L prepare synth --input "$W/synth-abl-raw" --out "$W/synth-abl" --protocol impressions --overwrite --quiet
$L ablate --data "$W/synth-abl" --seeds 3 --out "$R/ablation" --config configs/synthetic.yaml \
  --set train.epochs=1 --set data.max_len=500 "${Q[@]}"

# issue 02: a synthetic dataset of >= 1M samples
$L synth --out "$W/synth-1m-raw" --users 52000 --mean-len 300 --max-len 20000 --seed 11 --overwrite --quiet
$L prepare synth --input "$W/synth-1m-raw" --out "$W/synth-1m" --protocol impressions --overwrite --quiet
$L compare --data "$W/synth-1m" --models din,twin,dare --seeds 1 --config configs/synthetic.yaml \
  --set train.epochs=1 --set train.batch_size=1024 --set train.eval_every=200 --set data.max_len=200 \
  --out "$R/compare-synth-1m" "${Q[@]}"

# issue 02: search cost by attention dim, and AUC / retrieval NDCG by dim on synthetic data
$L bench search --data "$W/synth-abl" --set train.epochs=1 --set data.max_len=500 --out "$R"
