#!/usr/bin/env bash
# Training / inference samples/s per model at history 200 and 1,000 (BENCHMARKS.md, issue 02).
# Usage: benchmarks/train_speed.sh DATASET [MODELS]   DATASET: a prepared dataset with long
# histories, e.g. the 100M-row Taobao-format one of BENCHMARKS.md "Data preparation".
# Batches are built before timing, so the figures are the models', not the loader's.
set -euo pipefail
D=${1:?usage: benchmarks/train_speed.sh DATASET [MODELS]}
MODELS=${2:-din,sim_hard,sim_soft,eta,sdim,twin,twin_hard,twin_4e,dare,tin,stacked_tin,dsi_tin,stca,longer}
L="${LONGREC:-.venv/bin/longrec}"
R=benchmarks/results/train-speed
mkdir -p "$R"
for m in ${MODELS//,/ }; do
  for spec in 200:2048 1000:512; do
    len=${spec%%:*} bs=${spec##*:}
    out="$R/$m-$len.json"
    [ -s "$out" ] && continue
    echo "== $m history $len batch $bs"
    $L bench train --data "$D" --model "$m" --max-len "$len" --batch-size "$bs" --steps 10 \
      --out "$out" || echo "!! $m $len failed"
  done
done
.venv/bin/python - "$R" <<'PY'
import json, sys
from pathlib import Path
rows = {}
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    rows.setdefault(r["model"], {})[r["max_len"]] = r
lines = ["| model | train 200 | infer 200 | train 1,000 | infer 1,000 |", "|---|---:|---:|---:|---:|"]
for m, by in rows.items():
    cell = lambda n, k: f"{by[n][k]:,.0f}" if n in by else "-"
    lines.append(f"| {m} | {cell(200, 'train_samples_per_s')} | {cell(200, 'infer_samples_per_s')} "
                 f"| {cell(1000, 'train_samples_per_s')} | {cell(1000, 'infer_samples_per_s')} |")
Path(sys.argv[1], "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
