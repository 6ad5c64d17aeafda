#!/usr/bin/env bash
# Before/after of a code change on this noisy VM: `longrec bench train` with the code of two
# commits, interleaved (base, new, base, new, ...) so that machine drift hits both alike.
#
#   benchmarks/ab_commits.sh BASE_COMMIT NEW_COMMIT ROUNDS -- BENCH_TRAIN_ARGS...
#   e.g. benchmarks/ab_commits.sh 3d708fc HEAD 3 -- --data prep100m --model dare \
#            --max-len 200 --batch-size 2048 --steps 10
#
# Each commit is checked out into a temporary git worktree and imported through PYTHONPATH
# (the project's .venv supplies the dependencies). Prints: commit round train/s infer/s.
set -euo pipefail
[ $# -ge 4 ] && [ "$4" = "--" ] || { echo "usage: $0 BASE NEW ROUNDS -- ARGS..." >&2; exit 2; }
base=$1 new=$2 rounds=$3
shift 4
root=$(git rev-parse --show-toplevel)
py="$root/.venv/bin/python"
tmp=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$tmp/base" >/dev/null 2>&1 || true;
      git -C "$root" worktree remove --force "$tmp/new" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git -C "$root" worktree add -q --detach "$tmp/base" "$base"
git -C "$root" worktree add -q --detach "$tmp/new" "$new"
for round in $(seq 1 "$rounds"); do
  for side in base new; do
    # one extension build per side: a shared cache would rebuild at every switch
    out=$(PYTHONPATH="$tmp/$side/src" TORCH_EXTENSIONS_DIR="$tmp/$side-ext" \
      "$py" -m longrec bench train "$@" 2>/dev/null)
    echo "$side round $round $(echo "$out" | "$py" -c \
      'import json, sys; d = json.load(sys.stdin); print(d["train_samples_per_s"], d["infer_samples_per_s"])')"
  done
done
