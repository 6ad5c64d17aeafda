#!/usr/bin/env bash
# Quality and speed of the embedding tables' optimisers at full scale: DARE (Taobao
# configuration) trained for one epoch on a prepared dataset with each `train.embed_optimizer`,
# test metrics at the best validation checkpoint.
#
#   benchmarks/embed_optimizers.sh DATA OUT [OPTIMIZERS...] [-- EXTRA --set ARGS]
#
# e.g. benchmarks/embed_optimizers.sh prep4m results/opt4m adam rowwise_adam rowwise_adagrad
# (DATA from benchmarks/dare_speed_goal.sh). Prints one line per optimiser: test AUC, GAUC,
# logloss, training samples/s (whole run, validation excluded) and wall time.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 DATA OUT [OPTIMIZERS...] [-- --set k=v ...]" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
data=$1 out=$2
shift 2
opts=() extra=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
[ $# -gt 0 ] && shift && extra=("$@")
[ ${#opts[@]} -gt 0 ] || opts=(adam rowwise_adam rowwise_adagrad)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}
mkdir -p "$out"
for opt in "${opts[@]}"; do
  start=$(date +%s)
  "$root/.venv/bin/longrec" train --data "$data" --model dare --out "$out/$opt" --overwrite \
    --config "$root/configs/dare_taobao.yaml" --set train.epochs=1 --set train.progress=false \
    --set "train.embed_optimizer=$opt" "${extra[@]}" >"$out/$opt.log" 2>&1
  "$root/.venv/bin/python" - "$out/$opt/metrics.json" "$opt" "$(($(date +%s) - start))" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
t, r = m["test"], m["train"]
print(f"{sys.argv[2]:16s} test AUC {t['auc']:.4f} GAUC {t['gauc']:.4f} logloss {t['logloss']:.4f}"
      f" | {r['samples_per_s']:,.0f} training samples/s, best step {r['best_step']} of"
      f" {r['steps']}, wall {sys.argv[3]} s")
PY
done
