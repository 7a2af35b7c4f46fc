#!/usr/bin/env bash
# The GPU check: ONE call on the lent GPU machine (CUDA 13 libraries, PyTorch, no Rust, no network).
#
#   0. .gpu/device-smoke: candle's CUDA backend against the CPU (values, gradients, matmul TFLOP/s);
#   1. CPU vs CUDA `trainer debug-step` on the same weights and batch (tiny config, then ViT-S/16 at a
#      small batch): losses and gradient norms compared by bench/compare_debug_step.py;
#   2. `trainer bench --device cuda --synthetic` at batch 64 and 128;
#   3. the PyTorch baseline (bench/pytorch_udi.py) at batch 64 and 128 (official-style), and the
#      "fast" PyTorch variant at 128;
#   4. one table (bench/gpu_table.py), also written to $OUT/summary.md and $OUT/summary.json.
#
# Expects the binary and configs in .gpu/ (made here by scripts/build-gpu-bundle.sh). From the
# development machine, with the device tool:  run(command="bash scripts/gpu-check.sh",
# carry=[".gpu"], timeout_s=540). Every step has its own time limit and the whole script stops
# starting new steps after $DEADLINE seconds, so the table always comes back; a failed step is a
# row marked failed with its log in $OUT, never an abort.
#
# Knobs (environment): BIN (.gpu/trainer), BATCHES ("64 128"), DEBUG_BATCH (4), DEADLINE (420),
# STEP_TIMEOUT (150), COMPARE_RTOL (2e-2), COMPARE_ATOL (1e-3), PYTHON (python3), FAST (1),
# BENCH_STEPS (10), BENCH_WARMUP (3),
# SKIP_DEBUG / SKIP_BENCH / SKIP_TORCH (0).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
BIN=${BIN:-.gpu/trainer}
CONFIGS=${CONFIGS:-.gpu/configs}
RES=${OUT:-$ROOT/target/gpu-results}
BATCHES=${BATCHES:-64 128}
DEBUG_BATCH=${DEBUG_BATCH:-4}
DEADLINE=${DEADLINE:-420}
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
PY=${PYTHON:-python3}
mkdir -p "$RES"
WORK=$(mktemp -d)
STEPS="$RES/steps.tsv"
printf 'step\trc\tseconds\n' > "$STEPS"

log() { echo "[gpu-check $(( $(date +%s) - START ))s] $*"; }

# run NAME LIMIT CMD...: stdout+stderr to $RES/NAME.log, status to steps.tsv; never aborts.
run() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - START) ))
  if [ "$left" -le 10 ]; then
    log "skip $name: past the ${DEADLINE}s deadline"
    printf '%s\tskipped\t0\n' "$name" >> "$STEPS"
    return 99
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name (limit ${limit}s): $*"
  local t0=$(date +%s) rc smi=""
  case $name in  # device memory as nvidia-smi sees it (caching allocators included), every 200 ms
    trainer-b*|pytorch-*)
      if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$RES/$name.smi" 2>/dev/null &
        smi=$!
      fi ;;
  esac
  timeout --kill-after=5 "$limit" "$@" > "$RES/$name.log" 2>&1
  rc=$?
  [ -n "$smi" ] && kill "$smi" 2>/dev/null
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS"
  [ "$rc" -ne 0 ] && { log "$name failed (rc $rc), last lines:"; tail -n 5 "$RES/$name.log"; }
  return $rc
}

# --- environment: where the CUDA 13 libraries are (cuda.md §5) -------------------------------
libdirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -e "$d/libcublas.so.13" ] && libdirs+=("$d")
done
torch_nv=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))' 2>/dev/null || true)
if [ -n "$torch_nv" ] && [ -d "$torch_nv" ]; then
  while IFS= read -r f; do libdirs+=("$(dirname "$f")"); done \
    < <(find "$torch_nv" -maxdepth 4 \( -name 'libcublas.so.13' -o -name 'libcurand.so.10' -o -name 'libcublasLt.so.13' \) 2>/dev/null | sort -u)
fi
LIBPATH=$(printf '%s\n' "${libdirs[@]}" | awk 'NF && !seen[$0]++' | paste -sd:)
export LD_LIBRARY_PATH="${LIBPATH}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUST_BACKTRACE=1
{
  echo "date: $(date -u)"
  echo "host: $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' 2>&1
  cat .gpu/BUILD-INFO 2>/dev/null
  echo "--- ldd $BIN"; ldd "$BIN" 2>&1
} > "$RES/env.txt"
cat "$RES/env.txt"
if [ ! -x "$BIN" ]; then
  log "no binary at $BIN: run scripts/build-gpu-bundle.sh on the development machine and carry .gpu"
fi

# --- 0. candle itself on the GPU (independent of the model code) -----------------------------
run device-smoke 90 .gpu/device-smoke cuda && tail -n 1 "$RES/device-smoke.log"

# The trainer CLI's flags, read from its --help (the brief's names, or main's at the time of writing).
has_flag() { "$BIN" "$1" --help 2>/dev/null | grep -q -- "$2"; }
DEBUG_DEVICE=0; has_flag debug-step "--device" && DEBUG_DEVICE=1
DEBUG_TENSORS=0; has_flag debug-step "--out-tensors" && DEBUG_TENSORS=1  # keep them out of $OUT
BENCH_ARGS=(--device cuda --json)
has_flag bench "--synthetic" && BENCH_ARGS+=(--synthetic)
if has_flag bench "--batch-size"; then BATCH_FLAG=--batch-size; else BATCH_FLAG=--batch; fi
has_flag bench "--steps" && BENCH_ARGS+=(--steps "${BENCH_STEPS:-10}")
has_flag bench "--warmup" && BENCH_ARGS+=(--warmup "${BENCH_WARMUP:-3}")
log "debug-step --device: $([ $DEBUG_DEVICE = 1 ] && echo yes || echo 'no (CPU only: no comparison possible)'); bench: $BATCH_FLAG ${BENCH_ARGS[*]}"

# --- 1. CPU vs CUDA debug-step ---------------------------------------------------------------
debug_compare() {  # NAME CONFIG
  local name=$1 cfg=$2 d="$WORK/$1"
  mkdir -p "$d"
  run "$name-init" 60 "$BIN" init-weights --config "$cfg" --out "$d/w.safetensors" || return
  run "$name-batch" 60 "$BIN" make-batch --config "$cfg" --synthetic --out "$d/b.safetensors" || return
  local dev_cpu=() dev_cuda=()
  [ "$DEBUG_DEVICE" = 1 ] && { dev_cpu=(--device cpu); dev_cuda=(--device cuda); }
  [ "$DEBUG_TENSORS" = 1 ] && { dev_cpu+=(--out-tensors "$d/cpu.safetensors"); dev_cuda+=(--out-tensors "$d/cuda.safetensors"); }
  run "$name-cpu" "$STEP_TIMEOUT" "$BIN" debug-step --config "$cfg" --weights "$d/w.safetensors" \
    --batch "$d/b.safetensors" --out "$RES/$name-cpu.json" "${dev_cpu[@]}"
  if [ "$DEBUG_DEVICE" != 1 ]; then
    echo "not compared: this trainer's debug-step has no --device flag" > "$RES/$name-compare.txt"
    return
  fi
  run "$name-cuda" "$STEP_TIMEOUT" "$BIN" debug-step --config "$cfg" --weights "$d/w.safetensors" \
    --batch "$d/b.safetensors" --out "$RES/$name-cuda.json" "${dev_cuda[@]}"
  if [ -s "$RES/$name-cpu.json" ] && [ -s "$RES/$name-cuda.json" ]; then
    "$PY" bench/compare_debug_step.py "$RES/$name-cpu.json" "$RES/$name-cuda.json" \
      --rtol "${COMPARE_RTOL:-2e-2}" --atol "${COMPARE_ATOL:-1e-3}" > "$RES/$name-compare.txt" 2>&1
    echo "compare rc $?" >> "$RES/$name-compare.txt"
    cat "$RES/$name-compare.txt"
  fi
}
if [ "${SKIP_DEBUG:-0}" != 1 ]; then
  debug_compare debug-tiny "$CONFIGS/tiny.toml"
  # ViT-S/16 at the paper's crop sizes and K, at a batch small enough for the CPU side.
  sed "s/^batch_size *=.*/batch_size = $DEBUG_BATCH/" "$CONFIGS/udi_vit_s16_in1k.toml" > "$WORK/vits-debug.toml"
  debug_compare debug-vits "$WORK/vits-debug.toml"
fi

# --- 2. trainer bench, 3. PyTorch baseline ---------------------------------------------------
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  for b in $BATCHES; do
    run "trainer-b$b" "$STEP_TIMEOUT" "$BIN" bench --config "$CONFIGS/udi_vit_s16_in1k.toml" \
      "$BATCH_FLAG" "$b" "${BENCH_ARGS[@]}"
  done
fi
if [ "${SKIP_TORCH:-0}" != 1 ]; then
  for b in $BATCHES; do
    run "pytorch-official-b$b" 120 "$PY" bench/pytorch_udi.py --batch "$b" --mode official --json
  done
  if [ "${FAST:-1}" = 1 ]; then
    b=$(echo "$BATCHES" | awk '{print $NF}')
    run "pytorch-fast-b$b" 120 "$PY" bench/pytorch_udi.py --batch "$b" --mode fast --json
  fi
fi

# --- 4. the table ----------------------------------------------------------------------------
"$PY" bench/gpu_table.py "$RES" | tee "$RES/summary.md"
log "done in $(( $(date +%s) - START ))s; results in $RES"
rm -rf "$WORK"
