#!/usr/bin/env bash
# `trainer train` fed by loader processes through the ring, `[run] prefetch` on and off, same
# shards and config, alternating runs: the step time and the fraction of it spent waiting for
# the batch, from each run's metrics.jsonl (the first WARM steps left out). A markdown table on
# stdout.
#
#   bash bench/prefetch_cpu.sh SHARDS [CONFIG] [-- extra trainer args, e.g. --set model.dim=32]
#
# Environment: BIN (where trainer and loader are; default target/debug), STEPS (40), WARM (5),
# ROUNDS (2), LOADERS (1), THREADS (1).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=$1
CONFIG=${2:-configs/tiny.toml}
shift $(($# < 2 ? $# : 2))
[ "${1:-}" = "--" ] && shift
BIN=${BIN:-target/debug}
STEPS=${STEPS:-40}
WARM=${WARM:-5}
ROUNDS=${ROUNDS:-2}
LOADERS=${LOADERS:-1}
THREADS=${THREADS:-1}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "| prefetch | round | step time (median, ms) | data wait (mean, %) | img/s (mean) |"
echo "|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
  for p in true false; do
    out="$TMP/$p-$round"
    "$BIN/trainer" train --config "$CONFIG" --shards "$SHARDS" --out "$out" --device cpu \
      --max-steps "$STEPS" --prefetch "$p" --loaders "$LOADERS" --threads "$THREADS" \
      --loader-bin "$BIN/loader" "$@" > "$out.log" 2>&1 || { cat "$out.log"; exit 1; }
    python3 - "$out/metrics.jsonl" "$WARM" "$p" "$round" <<'EOF'
import json, statistics, sys
path, warm, p, rnd = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
m = [json.loads(l) for l in open(path)]
t = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(m, m[1:])][warm:]
w = [x["data_wait_frac"] for x in m[warm + 1:]]
ips = [x["images_per_s"] for x in m[warm + 1:]]
print(f"| {p} | {rnd} | {1e3 * statistics.median(t):.1f} | {100 * statistics.mean(w):.2f} | {statistics.mean(ips):.1f} |")
EOF
  done
done
