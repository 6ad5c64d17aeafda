#!/usr/bin/env bash
# Issue 02's speed goal, end to end: DARE at the Taobao configuration (embedding 16, history
# 200, top-k 20, batch 2048) must train at >= 37,000 and infer at >= 100,000 samples/s on this
# 2-core machine, at 200K items and with 4M-item tables (here a 6.2M-item vocabulary).
#
#   benchmarks/dare_speed_goal.sh WORKDIR [ROUNDS] [STEPS]
#
# Makes the two Taobao-format datasets of BENCHMARKS.md in WORKDIR if they are not there yet
# (about 10 minutes and 5 GB; the CSVs are deleted once prepared), then runs `longrec bench
# train` ROUNDS times (default 5) for each configuration, interleaved so that the VM's speed
# swings hit every configuration alike, and prints each run and each configuration's min,
# median and max. One run is STEPS (default 30) timed steps after 3 warm-up steps.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 WORKDIR [ROUNDS] [STEPS]" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
work=$1 rounds=${2:-5} steps=${3:-30}
longrec="$root/.venv/bin/longrec" py="$root/.venv/bin/python"
# the C++ kernels where `make kernels` built them (else they build on first use)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}
mkdir -p "$work"
cd "$work"

make_dataset() {  # name, synth arguments...
  local name=$1
  shift
  [ -f "$name/meta.json" ] && return
  "$longrec" synth --out "$name-raw" "$@"
  "$py" -c "from pathlib import Path; from longrec.bench.data import synth_as_taobao; \
synth_as_taobao(Path('$name-raw'), Path('$name.csv'))"
  "$longrec" prepare taobao --input "$name.csv" --out "$name" --protocol dare --behaviors pv
  rm -rf "$name-raw" "$name.csv"
}
# 200K items: the 100M-row dataset of "Data preparation at full scale"
make_dataset prep100m --users 200000 --mean-len 500 --max-len 50000 --seed 1
# 6.2M items, Zipf 0.8: a batch touches ~291K distinct items
make_dataset prep4m --users 60000 --mean-len 500 --max-len 20000 --items 4000000 \
  --content-items 3000000 --zipf 0.8 --seed 2

configs=(
  "prep100m adam"
  "prep100m rowwise_adagrad"
  "prep4m rowwise_adagrad"
  "prep4m rowwise_adam"
  "prep4m adam"
)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "# $(date -u +%FT%TZ) $(git -C "$root" rev-parse --short HEAD) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for round in $(seq 1 "$rounds"); do
  for c in "${configs[@]}"; do
    set -- $c
    out=$("$longrec" bench train --data "$1" --model dare --max-len 200 --batch-size 2048 \
      --steps "$steps" --set "train.embed_optimizer=$2" 2>/dev/null)
    line="$1 $2 $(echo "$out" | "$py" -c \
      'import json, sys; d = json.load(sys.stdin); print(d["train_samples_per_s"], d["infer_samples_per_s"])')"
    echo "round $round $line"
    echo "$line" >>"$log"
  done
done
"$py" - "$log" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    data, opt, train, infer = line.split()
    runs.setdefault((data, opt), []).append((int(train), int(infer)))
print("\n| data | train.embed_optimizer | training samples/s min / median / max | "
      "inference samples/s min / median / max |\n|---|---|---|---|")
for (data, opt), rs in runs.items():
    t, i = [r[0] for r in rs], [r[1] for r in rs]
    fmt = lambda v: f"{min(v):,} / {int(statistics.median(v)):,} / {max(v):,}"
    print(f"| {data} | {opt} | {fmt(t)} | {fmt(i)} |")
EOF
