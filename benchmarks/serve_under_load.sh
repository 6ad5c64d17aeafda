#!/usr/bin/env bash
# Serving under load (issue 08, item 9): DARE, history 1,000, 100 candidates, 1 and 16 clients,
# micro-batching off (1) and on (8), cold and warm user cache; the clients run in a separate
# process (longrec.bench.load). Three rounds, because this VM's speed drifts between minutes.
# Usage: benchmarks/serve_under_load.sh [WORKDIR]
set -euo pipefail
W=${1:-/tmp/longrec-serve-load}
L="${LONGREC:-.venv/bin/longrec}"
PY="${PYTHON:-.venv/bin/python}"
R=benchmarks/results/serve-under-load
mkdir -p "$W" "$R"
# 64 users with 1.2K-12K behaviours each
[ -f "$W/raw/manifest.json" ] || $L synth --out "$W/raw" --users 64 --mean-len 2000 --min-len 1200 \
  --max-len 12000 --seed 3 --quiet
[ -f "$W/data/meta.json" ] || $L prepare synth --input "$W/raw" --out "$W/data" --protocol impressions --quiet
for round in 1 2 3; do
  $L bench serve --data "$W/data" --models dare --lengths 1000 --candidates 100 \
    --concurrency 1,16 --requests 4000 --micro-batch 1,8 --work "$W/work" --out "$W/round$round" 2>/dev/null
  cp "$W/round$round/serve.json" "$R/round$round.json"
done
$PY - "$R" <<'PY'
import json, statistics, sys
from pathlib import Path
rounds = [json.loads(p.read_text())["rows"] for p in sorted(Path(sys.argv[1]).glob("round*.json"))]
keys = ("cache", "micro_batch", "concurrency")
print("| cache | micro-batch | clients | req/s (median, min-max) | p50 ms | p99 ms (median, max) | req/forward | non-2xx |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for row in rounds[0]:
    if row["candidates"] != 100:
        continue
    same = [r for rows in rounds for r in rows if all(r.get(k) == row.get(k) for k in (*keys, "candidates"))]
    rps = [r["requests_per_s"] for r in same]
    p99 = [r["p99_ms"] for r in same]
    rpf = row.get("requests_per_forward") or "-"
    print(f"| {row['cache']} | {row['micro_batch']} | {row['concurrency']} | "
          f"{statistics.median(rps):.0f} ({min(rps):.0f}-{max(rps):.0f}) | "
          f"{statistics.median(r['p50_ms'] for r in same):.1f} | "
          f"{statistics.median(p99):.1f} ({max(p99):.1f}) | {rpf} | {sum(r['non_2xx'] for r in same)} |")
PY
