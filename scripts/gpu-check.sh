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
  local t0=$(date +%s) rc
  timeout --kill-after=5 "$limit" "$@" > "$RES/$name.log" 2>&1
  rc=$?
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

# --- 1. CPU vs CUDA debug-step ---------------------------------------------------------------
debug_compare() {  # NAME CONFIG
  local name=$1 cfg=$2 d="$WORK/$1"
  mkdir -p "$d"
  run "$name-init" 60 "$BIN" init-weights --config "$cfg" --out "$d/w.safetensors" || return
  run "$name-batch" 60 "$BIN" make-batch --config "$cfg" --synthetic --out "$d/b.safetensors" || return
  run "$name-cpu" "$STEP_TIMEOUT" "$BIN" debug-step --config "$cfg" --weights "$d/w.safetensors" \
    --batch "$d/b.safetensors" --out "$RES/$name-cpu.json" --device cpu
  run "$name-cuda" "$STEP_TIMEOUT" "$BIN" debug-step --config "$cfg" --weights "$d/w.safetensors" \
    --batch "$d/b.safetensors" --out "$RES/$name-cuda.json" --device cuda
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
      --synthetic --batch "$b" --device cuda --json
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
