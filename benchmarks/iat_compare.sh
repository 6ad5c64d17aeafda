#!/bin/bash
# The IAT two-stage recipe (docs/iat.md) under the demo protocol, one dataset and seed:
#   benchmarks/iat_compare.sh DATA OUT SEED
# trains iat_source_user (user-time order), builds its tokens, trains iat on them and prints
# the test AUC (BENCHMARKS.md, "The end-to-end models on real data").
set -euo pipefail
data=$1; out=$2; seed=$3
L=${LONGREC:-longrec}
C=(--config configs/demo.yaml --set train.seed=$seed --set train.threads=1)
mkdir -p "$out"
$L train --data "$data" --model iat_source_user --set data.order=user_time "${C[@]}" --out "$out/src"
$L iat tokens --source-run "$out/src" --out "$out/tokens"
$L train --data "$data" --model iat --set data.token_store="$out/tokens" "${C[@]}" --out "$out/iat"
python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('iat test AUC %.4f' % m['test']['auc'])" "$out/iat/metrics.json"
