#!/usr/bin/env bash
# torch.profiler over training steps of DARE, Stacked TIN, STCA and LONGER at history 200, 1,000
# and 10,000 (BENCHMARKS.md "Where the time goes", issue 06): top operators by self time and
# the matrix products' achieved GFLOP/s, one JSON per (model, length) plus table.md.
# Usage: benchmarks/profiles.sh DATASET [MODELS]   (DATASET: prepared, with long histories,
# e.g. the suite's .cache/bench/suite/prepared from `make bench`).
# Sizes: batch 2048 at 200, 512 at 1,000; at 10,000 the request layout with 16 requests
# (every target of a request shares its history), 2 timed + 2 profiled steps.
set -euo pipefail
D=${1:?usage: benchmarks/profiles.sh DATASET [MODELS]}
MODELS=${2:-dare,stacked_tin,stca,longer}
L="${LONGREC:-.venv/bin/longrec}"
R=benchmarks/results/profiles
mkdir -p "$R"
for m in ${MODELS//,/ }; do
  for spec in 200:2048:pointwise 1000:512:pointwise 10000:16:request; do
    IFS=: read -r len bs layout <<<"$spec"
    out="$R/$m-$len.json"
    [ -s "$out" ] && continue
    echo "== $m history $len batch $bs ($layout)"
    $L bench train --data "$D" --model "$m" --max-len "$len" --batch-size "$bs" \
      --layout "$layout" --steps 2 --profile 2 --out "$out" >/dev/null || echo "!! $m $len failed"
  done
done
.venv/bin/python - "$R" <<'PY'
import json, sys
from pathlib import Path
lines = ["| model | history × batch | ms/step | GEMM share, GFLOP/s | top self-time operators |",
         "|---|---|---:|---:|---|"]
for f in sorted(Path(sys.argv[1]).glob("*.json"), key=lambda p: (p.stem.rsplit("-", 1)[0], int(p.stem.rsplit("-", 1)[1]))):
    r = json.loads(f.read_text()); p = r["profile"]
    top = ", ".join(f"{t['op']} {t['share']:.0%}" for t in p["top"][:5])
    lines.append(f"| {r['model']} | {r['max_len']:,} × {r['batch_size']} {r['layout']} | {p['ms_per_step']:,.0f} "
                 f"| {p['gemm_share']:.0%}, {p['gemm_gflops']:.0f} | {top} |")
Path(sys.argv[1], "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
