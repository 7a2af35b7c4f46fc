#!/usr/bin/env bash
# The main job on a small embedded default (README line 1), on CPU, in a few minutes:
#   1. generate a small labelled dataset (10 classes of shapes/textures, train + val) and pack it;
#   2. k-NN of a randomly initialised network (the "before");
#   3. pretrain with configs/tiny.toml (its short-run schedule: 4 epochs = 248 steps of batch 16):
#      the trainer starts the loader processes, which fill a shared-memory ring; metrics go to
#      RUN/metrics.jsonl, checkpoints to RUN/checkpoints/;
#   4. k-NN and the linear probe of the pretrained teacher (the "after"), an attention-map
#      PNG, the training curves, a timm export.
# Knobs (environment): DEMO_OUT (default target/demo), DEMO_STEPS (default: the whole schedule),
# DEMO_LOADERS (loader processes, default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-deps.sh

OUT=${DEMO_OUT:-target/demo}
CONFIG=configs/tiny.toml
BIN=target/release

echo "== building release binaries (first time: several minutes)"
cargo build --release --locked -p shard-tool -p loader -p trainer

rm -rf "$OUT"
mkdir -p "$OUT"
echo "== generating and packing the dataset"
"$BIN/shard-tool" synth "$OUT/images/train" --classes 10 --per-class 100 --size 64 --seed 0
"$BIN/shard-tool" synth "$OUT/images/val" --classes 10 --per-class 30 --size 64 --seed 1
"$BIN/shard-tool" pack "$OUT/images/train" "$OUT/shards/train" --json > "$OUT/pack-train.json"
"$BIN/shard-tool" pack "$OUT/images/val" "$OUT/shards/val" --json > "$OUT/pack-val.json"

knn() { "$BIN/trainer" knn --train "$OUT/shards/train" --val "$OUT/shards/val" --json "$@"; }

# The linear probe in its quick cached mode (train features computed once, no train
# augmentation): the full protocol re-augments every epoch (drop --cached; much slower).
linear() {
  "$BIN/trainer" linear --train "$OUT/shards/train" --val "$OUT/shards/val" --cached \
    --epochs 100 --batch-size 64 --lr 0.2 --json "$@"
}

echo "== k-NN and linear probe before pretraining (random init)"
knn --random-init --config "$CONFIG" | tee "$OUT/knn-before.json"
linear --random-init --config "$CONFIG" > "$OUT/linear-before.json"

echo "== pretraining ($CONFIG)"
STEPS_ARG=()
[ -n "${DEMO_STEPS:-}" ] && STEPS_ARG=(--max-steps "$DEMO_STEPS")
"$BIN/trainer" train --config "$CONFIG" --shards "$OUT/shards/train" --out "$OUT/run" \
  --loaders "${DEMO_LOADERS:-1}" "${STEPS_ARG[@]}"

echo "== k-NN and linear probe after pretraining (teacher)"
knn --checkpoint "$OUT/run" | tee "$OUT/knn-after.json"
linear --checkpoint "$OUT/run" > "$OUT/linear-after.json"
# (a glob, not find | head: under pipefail the early close of the pipe would end the script)
VAL_IMAGES=("$OUT"/images/val/*/*)
"$BIN/trainer" attention --checkpoint "$OUT/run" --image "${VAL_IMAGES[0]}" --out "$OUT/attention.png"

"$BIN/trainer" plot "$OUT/run"
"$BIN/trainer" export --checkpoint "$OUT/run" --format timm --out "$OUT/backbone.safetensors"

top1() { sed -E 's/.*"top1":([0-9.]+).*/\1/' "$1" | awk '{printf "%.1f", $1}'; }
best() { sed -E 's/.*"best_top1":([0-9.]+).*/\1/' "$1" | awk '{printf "%.1f", $1}'; }
echo
echo "== summary"
b=$(top1 "$OUT/knn-before.json"); a=$(top1 "$OUT/knn-after.json")
echo "k-NN top-1 (k=20, T=0.07): random init $b% -> pretrained $a% ($(awk -v a="$a" -v b="$b" 'BEGIN{printf "%+.1f", a-b}') points)"
lb=$(best "$OUT/linear-before.json"); la=$(best "$OUT/linear-after.json")
echo "linear top-1 (cached, no train augmentation, best of 100 epochs): random init $lb% -> pretrained $la% ($(awk -v a="$la" -v b="$lb" 'BEGIN{printf "%+.1f", a-b}') points)"
echo "attention:   $OUT/attention.png"
echo "metrics:     $OUT/run/metrics.jsonl"
echo "curves:      $OUT/run/curves.png"
echo "checkpoints: $OUT/run/checkpoints/"
echo "timm export: $OUT/backbone.safetensors"
