#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU (the CUDA 13 cuBLAS/cuRAND libraries; PyTorch and
# timm for the baseline and export rows; no Rust and no network needed).
#
#   0. .gpu/device-smoke: candle's CUDA backend against the CPU (values, gradients, matmul TFLOP/s);
#      `trainer kernel-check --device cuda`: every fused kernel (LayerNorm, bias add, bias+GELU,
#      attention softmax, teacher softmax, soft cross-entropy: forward and backward; multi-tensor
#      AdamW+EMA; per-parameter squared gradient norms; gradient accumulation; flash attention on the global and local crops' token counts, forward and
#      backward) against its CPU reference at ViT-S shapes, plus composed-vs-fused timings;
#   1. CPU vs CUDA `trainer debug-step` on the same weights and batch (tiny config, then ViT-S/16 at a
#      small batch): the CPU runs f32 with composed ops (the reference), CUDA runs f32+fused (tight
#      tolerance: checks the kernels end to end) and bf16 (bf16 tolerance); compared by
#      bench/compare_debug_step.py;
#   2. `trainer bench --device cuda` with the explicit engine (hand-written backward over flat
#      buffers) and the autograd engine, bf16+fused, at batch 128, 64 and 256, and the explicit
#      engine with composed instead of flash attention (`--kernels fused-no-flash`) and keeping
#      its block activations instead of recomputing them (`--keep-activations`) at 128 (the
#      CUDA debug-step of both engines is compared with the CPU reference in step 1);
#   3. the PyTorch baseline (bench/pytorch_udi.py) at batch 128 and 64 (official-style), and the
#      "fast" PyTorch variant (SDPA, bf16, fused AdamW, torch.compile) at 128;
#   4. speed without learning means nothing: the demo's labelled set trained on the GPU with each
#      engine, k-NN top-1 at random init and after training; then the whole system on the GPU: `shard-tool synth` + `pack` (448-px JPEGs), `trainer train --device cuda`
#      for E2E_STEPS steps fed by two `loader` processes over the shared-memory ring (images/s and
#      data-wait fraction from metrics.jsonl, batches prefetched on a copy stream), the same start
#      without prefetch (first loss bit for bit, data wait side by side), `trainer export`, and
#      timm loading the export (strict) and running it;
#   4b. the same training through `trainer launch --gpus 1` (NCCL at world size 1): the all-reduce
#      time per step;
#   5. one table (bench/gpu_table.py): summary.md in the results (and $OUT/summary.md).
#   Logs and JSON go to target/gpu-results/; with OUT=DIR set, they are packed into
#   $OUT/gpu-results.tgz instead, refreshed after each step, so a run cut short keeps them.
#   The steps run in the order of what they answer: correctness basics (kernel-check, tiny
#   debug-step), the speed goal (both engines and both PyTorch modes at batch 128), learning, the
#   whole system (e2e), then the ViT-S debug-step, the profile, NCCL and the other batch sizes, so
#   a run cut by the deadline still answers the main questions.
#
# Expects the binaries and configs in .gpu/ (made by scripts/build-gpu-bundle.sh, on this machine
# or on another Linux machine and copied here with the checkout). Run from the repository root:
#   bash scripts/gpu-check.sh            (or OUT=DIR bash scripts/gpu-check.sh)
# GPU_CHECK_DEVICE=cpu is the dry run, anywhere: every step with the same commands and flags on
# the CPU at small shapes (a sed-made small ViT instead of ViT-S, kernel-check --shapes tiny),
# with the binaries of BINDIR (default: cargo's debug dir) and configs/; PyTorch/timm steps are
# marked skipped when they cannot be imported. It catches plumbing slips before a GPU run.
# Every step has its own time limit and the whole script stops
# starting new steps after $DEADLINE seconds, so the table always comes back; a failed step is a
# row marked failed with its log in the results, never an abort.
#
# Knobs (environment): GPU_CHECK_DEVICE (cuda; cpu: the dry run), BINDIR (.gpu: trainer, loader,
# shard-tool, device-smoke), BIN ($BINDIR/trainer), CONFIGS (.gpu/configs),
# TRAINER_RUNS ("bf16:fused:128:explicit bf16:fused:128:autograd …" =
# precision:kernels:batch[:engine]), TORCH_BATCHES ("128 64"), DEBUG_BATCH (4),
# DEADLINE (540), STEP_TIMEOUT (150), AB (0; 1: pool/event A/B rows), PROFILE (1: a --profile row),
# KCHECK_REPS (10), SKIP_SMOKE / SKIP_TINY / SKIP_E2E / SKIP_NCCL (0), COMPARE_RTOL (2e-2), COMPARE_ATOL (1e-3), BF16_ENTROPY_RTOL (5e-2) for bf16,
# F32_RTOL (1e-3), F32_ATOL (1e-4) for f32, PYTHON (python3), FAST (1), BENCH_STEPS (10),
# BENCH_WARMUP (3), KCHECK_BATCH (32), KCHECK_SHAPES (vits), SKIP_KCHECK / SKIP_DEBUG / SKIP_BENCH /
# SKIP_TORCH / SKIP_LEARN (0), LEARN_PER_CLASS (100), E2E_PER_CLASS (64), E2E_STEPS (30),
# E2E_NOPREFETCH_STEPS (10), NCCL_STEPS (20), E2E_LOADERS (2), E2E_THREADS (7), E2E_ENGINE (explicit),
# GPU_CHECK_STALE_OK (0; 1: run a bundle whose recorded source hash differs from this checkout's).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
DEV=${GPU_CHECK_DEVICE:-cuda}
case $DEV in
  cuda) ;;
  cpu)  # the dry run's sizes: seconds per step on 2 cores
    : "${BINDIR:=${CARGO_TARGET_DIR:-target}/debug}" "${CONFIGS:=configs}" "${KCHECK_SHAPES:=tiny}" \
      "${KCHECK_BATCH:=2}" "${KCHECK_REPS:=1}" "${DEBUG_BATCH:=2}" "${BENCH_STEPS:=1}" \
      "${BENCH_WARMUP:=1}" "${TORCH_BATCHES:=4 2}" "${LEARN_PER_CLASS:=4}" "${E2E_PER_CLASS:=2}" \
      "${E2E_STEPS:=3}" "${E2E_NOPREFETCH_STEPS:=2}" "${NCCL_STEPS:=2}" "${E2E_THREADS:=1}" ;;
  *) echo "GPU_CHECK_DEVICE must be cuda or cpu, not $DEV" >&2; exit 2 ;;
esac
BINDIR=${BINDIR:-.gpu}
BIN=${BIN:-$BINDIR/trainer}
SMOKE=$BINDIR/device-smoke
[ -e "$SMOKE" ] || [ ! -e "$BINDIR/examples/device_smoke" ] || SMOKE=$BINDIR/examples/device_smoke  # cargo's layout
CONFIGS=${CONFIGS:-.gpu/configs}
RES=$ROOT/target/gpu-results
# gpu_table.py reads every *-compare.txt and summary file in RES: a previous run's must not show
# up as this run's rows (kept beside it as gpu-results.prev).
[ -z "${OUT:-}" ] && [ -d "$RES" ] && rm -rf "$RES.prev" && mv "$RES" "$RES.prev"
[ -n "${OUT:-}" ] && RES=$(mktemp -d)
RUNS=${TRAINER_RUNS:-bf16:fused:128:explicit bf16:fused:128:autograd bf16:fused-no-flash:128:explicit bf16:fused:64:explicit bf16:fused:256:explicit bf16:fused:64:autograd bf16:fused:256:autograd}
# The dry run's default: the same rows at batches 4, 2 and 8 instead of 128, 64 and 256.
[ "$DEV" = cpu ] && [ -z "${TRAINER_RUNS:-}" ] && RUNS=$(sed 's/:128:/:4:/g; s/:64:/:2:/g; s/:256:/:8:/g' <<< "$RUNS")
TRAINER_RUNS=$RUNS
TORCH_BATCHES=${TORCH_BATCHES:-${BATCHES:-128 64}}
DEBUG_BATCH=${DEBUG_BATCH:-4}
DEADLINE=${DEADLINE:-540}
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
PY=${PYTHON:-python3}
mkdir -p "$RES"
WORK=$(mktemp -d)
STEPS="$RES/steps.tsv"
printf 'step\trc\tseconds\n' > "$STEPS"
# ViT-S/16 on the GPU; in the dry run the same file with a small ViT's sizes (patch 16, SRS, K).
VITS_CONFIG=$CONFIGS/udi_vit_s16_in1k.toml
if [ "$DEV" = cpu ]; then
  sed -e 's/^batch_size *=.*/batch_size = 2/; s/^global_size *=.*/global_size = 64/' \
    -e 's/^local_size *=.*/local_size = 32/; s/^n_local *=.*/n_local = 2/; s/^dim *=.*/dim = 32/' \
    -e 's/^depth *=.*/depth = 2/; s/^heads *=.*/heads = 2/; s/^head_hidden *=.*/head_hidden = 64/' \
    -e 's/^head_bottleneck *=.*/head_bottleneck = 16/; s/^out_dim *=.*/out_dim = 256/' \
    "$VITS_CONFIG" > "$WORK/vits-small.toml"
  VITS_CONFIG=$WORK/vits-small.toml
  # A key renamed in the ViT-S file would leave ViT-S sizes here: hours on a CPU, so stop.
  n=$(grep -cE '^(batch_size = 2|global_size = 64|local_size = 32|n_local = 2|dim = 32|depth = 2|heads = 2|head_hidden = 64|head_bottleneck = 16|out_dim = 256)$' "$VITS_CONFIG")
  [ "$n" = 10 ] || { echo "dry run: only $n of 10 ViT-S sizes replaced in $VITS_CONFIG" >&2; exit 2; }
fi

log() { echo "[gpu-check $(( $(date +%s) - START ))s] $*"; }
# skip NAME WHY: a step not run: a row marked skipped, the reason in its log.
skip() {
  log "skip $1: $2"
  printf '%s\tskipped\t0\n' "$1" >> "$STEPS"
  echo "skipped: $2" > "$RES/$1.log"
}
# has_py MODULE: the GPU machine must have PyTorch (its rows fail without it); the dry run skips
# those steps where MODULE does not import.
has_py() { [ "$DEV" != cpu ] || "$PY" -c "import $1" > /dev/null 2>&1; }
# The results so far as one tarball in $OUT, so a run cut short still returns everything.
pack_results() {
  [ -n "${OUT:-}" ] && tar czf "$OUT/gpu-results.tgz.part" -C "$RES" . 2>/dev/null \
    && mv "$OUT/gpu-results.tgz.part" "$OUT/gpu-results.tgz"
  return 0
}

# run NAME LIMIT CMD...: stdout+stderr to $RES/NAME.log, status to steps.tsv; never aborts.
run() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - START) ))
  if [ "$left" -le 10 ]; then
    skip "$name" "past the ${DEADLINE}s deadline"
    return 99
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name (limit ${limit}s): $*"
  local t0=$(date +%s) rc smi=""
  case $name in  # device memory as nvidia-smi sees it (caching allocators included), every 200 ms
    trainer-*|pytorch-*|e2e-train)
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
  pack_results
  return $rc
}

# --- environment: where the CUDA 13 libraries are (system CUDA, or PyTorch's wheels) -------------------------------
libdirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -e "$d/libcublas.so.13" ] && libdirs+=("$d")
done
torch_nv=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))' 2>/dev/null || true)
if [ -n "$torch_nv" ] && [ -d "$torch_nv" ]; then
  while IFS= read -r f; do libdirs+=("$(dirname "$f")"); done \
    < <(find "$torch_nv" -maxdepth 4 \( -name 'libcublas.so.13' -o -name 'libcurand.so.10' -o -name 'libcublasLt.so.13' -o -name 'libnccl.so.2' \) 2>/dev/null | sort -u)
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
  echo "device: $DEV"
  cat "$BINDIR/BUILD-INFO" 2>/dev/null
  echo "--- ldd $BIN"; ldd "$BIN" 2>&1
} > "$RES/env.txt"
cat "$RES/env.txt"
if [ ! -x "$BIN" ]; then
  log "no binary at $BIN: run scripts/build-gpu-bundle.sh (here, or on another Linux machine and copy .gpu/ here)"
fi
# A bundle built from other sources would be measured as this checkout's code: stop, unless told.
built_from=$(sed -n 's/^sources: //p' "$BINDIR/BUILD-INFO" 2>/dev/null)
if [ -n "$built_from" ] && [ "$built_from" != "$(bash scripts/source-hash.sh)" ]; then
  if [ "${GPU_CHECK_STALE_OK:-0}" = 1 ]; then
    log "warning: $BINDIR was built from other sources than this checkout (GPU_CHECK_STALE_OK=1: going on)"
  else
    echo "error: $BINDIR was built from other sources than this checkout: rebuild it (scripts/build-gpu-bundle.sh) or set GPU_CHECK_STALE_OK=1" >&2
    exit 2
  fi
fi

# --- 0. candle itself on the GPU (independent of the model code), then our kernels ----------
[ "${SKIP_SMOKE:-0}" != 1 ] && run device-smoke 90 "$SMOKE" "$DEV" && tail -n 1 "$RES/device-smoke.log"
if [ "${SKIP_KCHECK:-0}" != 1 ]; then
  run kernel-check 150 "$BIN" kernel-check --device "$DEV" --shapes "${KCHECK_SHAPES:-vits}" \
    --batch-size "${KCHECK_BATCH:-32}" --reps "${KCHECK_REPS:-10}" --json
  grep -E '^\||kernel-check|KERNELS' "$RES/kernel-check.log" | head -n 60
fi

# The trainer CLI's flags, read from its --help.
has_flag() { "$BIN" "$1" --help 2>/dev/null | grep -q -- "$2"; }
BENCH_ARGS=(--device "$DEV" --json)
if has_flag bench "--batch-size"; then BATCH_FLAG=--batch-size; else BATCH_FLAG=--batch; fi
has_flag bench "--steps" && BENCH_ARGS+=(--steps "${BENCH_STEPS:-10}")
has_flag bench "--warmup" && BENCH_ARGS+=(--warmup "${BENCH_WARMUP:-3}")

# --- 1. CPU (f32, composed: the reference) vs CUDA debug-step --------------------------------
# debug_prepare NAME CONFIG: weights, batch and the CPU reference report.
debug_prepare() {
  local name=$1 cfg=$2 d="$WORK/$1"
  mkdir -p "$d"
  run "$name-init" 60 "$BIN" init-weights --config "$cfg" --out "$d/w.safetensors" || return 1
  run "$name-batch" 60 "$BIN" make-batch --config "$cfg" --synthetic --out "$d/b.safetensors" || return 1
  run "$name-cpu" "$STEP_TIMEOUT" "$BIN" debug-step --config "$cfg" --weights "$d/w.safetensors" \
    --batch "$d/b.safetensors" --out "$RES/$name-cpu.json" --out-tensors "$d/cpu.safetensors" \
    --device cpu --precision f32 --kernels candle --engine autograd
}
# debug_cuda NAME CONFIG PRECISION KERNELS ENGINE: one CUDA variant (CPU in the dry run) compared
# with the CPU reference.
debug_cuda() {
  local name=$1 cfg=$2 prec=$3 kern=$4 eng=$5 d="$WORK/$1" v="$1-$DEV-$3-$4-$5" rtol atol own=()
  if [ "$prec" = f32 ]; then rtol=${F32_RTOL:-1e-3}; atol=${F32_ATOL:-1e-4}
  else
    rtol=${COMPARE_RTOL:-2e-2}; atol=${COMPARE_ATOL:-1e-3}
    # The teacher entropies are the values most sensitive to bf16: the logits' rounding enters
    # their softmax ×1/τ_t (25), over a few rows at these batches. The composed bf16 step is
    # 2.2 % off the f32 reference on [cls] in the dry run, the flash one 3.4 %.
    own=(--key-rtol "teacher_entropy=${BF16_ENTROPY_RTOL:-5e-2}")
  fi
  run "$v" "$STEP_TIMEOUT" "$BIN" debug-step --config "$cfg" --weights "$d/w.safetensors" \
    --batch "$d/b.safetensors" --out "$RES/$v.json" --out-tensors "$d/$v.safetensors" \
    --device "$DEV" --precision "$prec" --kernels "$kern" --engine "$eng" || return
  if [ -s "$RES/$name-cpu.json" ] && [ -s "$RES/$v.json" ]; then
    "$PY" bench/compare_debug_step.py "$RES/$name-cpu.json" "$RES/$v.json" \
      --rtol "$rtol" --atol "$atol" "${own[@]}" > "$RES/$v-compare.txt" 2>&1
    echo "compare rc $?" >> "$RES/$v-compare.txt"
    echo "== $v vs CPU f32: $(grep -E '^(PASS|FAIL|MISMATCHED)' "$RES/$v-compare.txt")"
  fi
}
# bench_trainer PRECISION:KERNELS:BATCH[:ENGINE] [NAME-SUFFIX [EXTRA ARGS...]]
bench_trainer() {
  local prec kern b eng suffix=${2:-} eng_args=()
  IFS=: read -r prec kern b eng <<< "$1"
  shift; shift || true
  [ -n "$eng" ] && eng_args=(--engine "$eng")
  run "trainer-$prec-$kern${eng:+-$eng}$suffix-b$b" "$STEP_TIMEOUT" "$BIN" bench --config "$VITS_CONFIG" \
    "$BATCH_FLAG" "$b" "${BENCH_ARGS[@]}" --precision "$prec" --kernels "$kern" "${eng_args[@]}" "$@"
}
torch_run() {  # MODE BATCH [NAME-SUFFIX [EXTRA ARGS...]]
  local mode=$1 b=$2 suffix=${3:-}
  shift 2; shift || true
  has_py torch || { skip "pytorch-$mode$suffix-b$b" "no torch in $PY"; return 0; }
  [ "$DEV" = cpu ] && set -- --tiny --device cpu --steps 1 --warmup 1 "$@"
  run "pytorch-$mode$suffix-b$b" 180 "$PY" bench/pytorch_udi.py --batch "$b" --mode "$mode" --json "$@"
}

if [ "${SKIP_DEBUG:-0}" != 1 ] && [ "${SKIP_TINY:-0}" != 1 ]; then
  if debug_prepare debug-tiny "$CONFIGS/tiny.toml"; then
    debug_cuda debug-tiny "$CONFIGS/tiny.toml" f32 fused explicit
    debug_cuda debug-tiny "$CONFIGS/tiny.toml" bf16 fused explicit
    debug_cuda debug-tiny "$CONFIGS/tiny.toml" f32 fused autograd
    debug_cuda debug-tiny "$CONFIGS/tiny.toml" bf16 fused autograd
  fi
fi

# --- 2./3. the headline pair first: our bf16+fused bench and PyTorch at the largest batch ------
runs=($TRAINER_RUNS)
tb=($TORCH_BATCHES)
[ "${SKIP_BENCH:-0}" != 1 ] && bench_trainer "${runs[0]}"
[ "${SKIP_TORCH:-0}" != 1 ] && torch_run official "${tb[0]}"
[ "${SKIP_BENCH:-0}" != 1 ] && bench_trainer "${runs[1]}"
[ "${SKIP_TORCH:-0}" != 1 ] && [ "${FAST:-1}" = 1 ] && torch_run fast "${tb[0]}" -compile --compile
# The first run again keeping the blocks' LayerNorm/GELU outputs instead of recomputing them in
# the backward (fewer bytes moved, more memory held): which default is the faster one.
[ "${SKIP_BENCH:-0}" != 1 ] && bench_trainer "${runs[0]}" -keep --keep-activations

# --- 4a. learning: the demo's labelled set, tiny config, each engine on the GPU, k-NN before/after
learn() {
  local d="$WORK/learn" e
  mkdir -p "$d"
  run learn-synth 60 sh -c "$BINDIR/shard-tool synth $d/img/train --classes 10 --per-class ${LEARN_PER_CLASS:-100} --size 64 --seed 0 &&
    $BINDIR/shard-tool synth $d/img/val --classes 10 --per-class 30 --size 64 --seed 1 &&
    $BINDIR/shard-tool pack $d/img/train $d/train && $BINDIR/shard-tool pack $d/img/val $d/val" || return
  run learn-knn-init 60 "$BIN" knn --random-init --config "$CONFIGS/tiny.toml" --train "$d/train" \
    --val "$d/val" --device "$DEV" --json
  for e in explicit autograd; do
    run "learn-train-$e" "$STEP_TIMEOUT" "$BIN" train --config "$CONFIGS/tiny.toml" --shards "$d/train" \
      --out "$d/run-$e" --device "$DEV" --engine "$e" --loader-bin "$BINDIR/loader" --loaders 2 --threads 7 || continue
    run "learn-knn-$e" 60 "$BIN" knn --checkpoint "$d/run-$e" --train "$d/train" --val "$d/val" \
      --device "$DEV" --json
  done
}
if [ "${SKIP_LEARN:-0}" != 1 ] && [ -x "$BINDIR/loader" ] && [ -x "$BINDIR/shard-tool" ]; then learn; fi

# --- 4. the whole system: shards -> 2 loader processes -> ring -> trainer on CUDA -> export -> timm
e2e() {
  local d="$WORK/e2e" ck
  mkdir -p "$d"
  run e2e-synth 60 "$BINDIR/shard-tool" synth "$d/img" --classes 10 --per-class "${E2E_PER_CLASS:-64}" --size 448 || return
  run e2e-pack 60 "$BINDIR/shard-tool" pack "$d/img" "$d/shards" || return
  run e2e-train "$STEP_TIMEOUT" "$BIN" train --config "$VITS_CONFIG" \
    --shards "$d/shards" --out "$d/run" --max-steps "${E2E_STEPS:-30}" --device "$DEV" \
    --engine "${E2E_ENGINE:-explicit}" --loader-bin "$BINDIR/loader" --loaders "${E2E_LOADERS:-2}" \
    --threads "${E2E_THREADS:-7}" --prefetch true
  cp "$d/run/metrics.jsonl" "$RES/e2e-metrics.jsonl" 2>/dev/null
  "$PY" - "$RES/e2e-metrics.jsonl" "${DEV^^}" > "$RES/e2e-summary.txt" 2>&1 <<'PYEOF'
import json, os, sys
p = sys.argv[1]
rows = [json.loads(l) for l in open(p) if l.strip().startswith("{")] if os.path.exists(p) else []
if not rows:  # one line for the table, not a traceback
    print("e2e: no steps in metrics.jsonl (see e2e-train.log)")
    sys.exit(0)
steady = rows[len(rows) // 3:] or rows
mean = lambda k: sum(r.get(k, 0.0) for r in steady) / len(steady)
print(f"e2e: {len(rows)} steps on {sys.argv[2]} fed by loader processes; steady (last {len(steady)}): "
      f"{mean('images_per_s'):.0f} img/s, data wait {100 * mean('data_wait_frac'):.1f} %, "
      f"first loss {rows[0].get('loss', float('nan')):.4f}, last loss {rows[-1].get('loss', float('nan')):.4f}")
PYEOF
  cat "$RES/e2e-summary.txt"
  # The same start without prefetch (batches uploaded synchronously on the training thread): the
  # first step's loss (before any update; the forward has no atomics) must be the same bits.
  run e2e-train-noprefetch "$STEP_TIMEOUT" "$BIN" train --config "$VITS_CONFIG" \
    --shards "$d/shards" --out "$d/run-noprefetch" --max-steps "${E2E_NOPREFETCH_STEPS:-10}" \
    --device "$DEV" --engine "${E2E_ENGINE:-explicit}" --loader-bin "$BINDIR/loader" \
    --loaders "${E2E_LOADERS:-2}" --threads "${E2E_THREADS:-7}" --prefetch false
  cp "$d/run-noprefetch/metrics.jsonl" "$RES/e2e-noprefetch-metrics.jsonl" 2>/dev/null
  "$PY" - "$RES/e2e-metrics.jsonl" "$RES/e2e-noprefetch-metrics.jsonl" > "$RES/e2e-prefetch.txt" 2>&1 <<'PYEOF'
import json, os, sys
on, off = ([json.loads(l) for l in open(p) if l.strip().startswith("{")] if os.path.exists(p) else []
           for p in sys.argv[1:3])
if not on or not off:
    print("prefetch on vs off: not compared, no steps from "
          + " and ".join(n for n, r in (("e2e-train", on), ("e2e-train-noprefetch", off)) if not r))
    sys.exit(0)
mean = lambda rows, k: sum(r.get(k, 0.0) for r in rows[len(rows) // 3:]) / max(1, len(rows) - len(rows) // 3)
same = on[0].get("loss") == off[0].get("loss")
print(f"prefetch on vs off: first loss {on[0].get('loss')!r} vs {off[0].get('loss')!r} "
      f"({'same bits' if same else 'DIFFERENT'}); data wait {100 * mean(on, 'data_wait_frac'):.1f} % vs "
      f"{100 * mean(off, 'data_wait_frac'):.1f} %, {mean(on, 'images_per_s'):.0f} vs {mean(off, 'images_per_s'):.0f} img/s")
PYEOF
  cat "$RES/e2e-prefetch.txt"
  # The export needs a checkpoint: the prefetch run's, or the other one's when that run failed.
  ck=$(ls -d "$d"/run/checkpoints/step-* 2>/dev/null | tail -n 1)
  [ -n "$ck" ] || ck=$(ls -d "$d"/run-noprefetch/checkpoints/step-* 2>/dev/null | tail -n 1)
  [ -n "$ck" ] || return
  run e2e-export 60 "$BIN" export --checkpoint "$ck" --format timm --out "$d/backbone.safetensors" || return
  has_py timm || { skip e2e-timm "no timm in $PY"; return; }
  # The dry run's small ViT, as timm arguments.
  local kw='{}'
  [ "$DEV" = cpu ] && kw='{"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64}'
  run e2e-timm 90 "$PY" - "$d/backbone.safetensors" "$kw" <<'PYEOF'
import json, sys, timm, torch
from safetensors.torch import load_file
sd = load_file(sys.argv[1])
kw = json.loads(sys.argv[2])
m = timm.create_model("vit_small_patch16_224", reg_tokens=1, num_classes=0, pretrained=False, **kw)
print("load_state_dict(strict=True):", m.load_state_dict(sd, strict=True))
m.eval()
with torch.no_grad():
    s = kw.get("img_size", 224)
    f = m(torch.randn(2, 3, s, s))
print("timm features", tuple(f.shape), "finite", bool(torch.isfinite(f).all()), "std", float(f.std()))
PYEOF
  grep -E 'load_state_dict|timm features' "$RES/e2e-timm.log"
}
if [ "${SKIP_E2E:-0}" != 1 ] && [ -x "$BINDIR/loader" ] && [ -x "$BINDIR/shard-tool" ]; then e2e; fi

# --- 2b. where the time goes: the device settings of trainer::device::tune switched back one at
# a time (A/B against the run above), then one profiled run (every forward stage synchronised).
if [ "${SKIP_BENCH:-0}" != 1 ] && [ "${AB:-0}" = 1 ]; then
  UDI_CUDA_POOL_RELEASE=1 bench_trainer "${runs[0]}" -poolrelease
  UDI_CUDA_EVENTS=1 bench_trainer "${runs[0]}" -events
fi
if [ "${SKIP_BENCH:-0}" != 1 ] && [ "${PROFILE:-1}" = 1 ]; then
  bench_trainer "${runs[0]}" -profile --profile
  grep -h '^|' "$RES"/trainer-*-profile-b*.log 2>/dev/null | head -n 40
fi

# ViT-S/16 at the paper's crop sizes and K, at a batch small enough for the CPU side.
if [ "${SKIP_DEBUG:-0}" != 1 ]; then
  sed "s/^batch_size *=.*/batch_size = $DEBUG_BATCH/" "$VITS_CONFIG" > "$WORK/vits-debug.toml"
  if debug_prepare debug-vits "$WORK/vits-debug.toml"; then
    debug_cuda debug-vits "$WORK/vits-debug.toml" bf16 fused explicit
    debug_cuda debug-vits "$WORK/vits-debug.toml" bf16 fused-no-flash explicit
    debug_cuda debug-vits "$WORK/vits-debug.toml" f32 fused explicit
  fi
fi


# --- 4b. data-parallel training at world size 1: the same run through `trainer launch`, so the
# gradient and centre all-reduce go through NCCL; its time per step against the step time.
nccl() {
  local d="$WORK/e2e"
  [ -d "$d/shards" ] || return
  run nccl-world1 "$STEP_TIMEOUT" "$BIN" launch --gpus 1 -- train \
    --config "$VITS_CONFIG" --shards "$d/shards" --out "$d/run-nccl" \
    --max-steps "${NCCL_STEPS:-20}" --device "$DEV" --engine explicit --loader-bin "$BINDIR/loader" \
    --loaders "${E2E_LOADERS:-2}" --threads "${E2E_THREADS:-7}"
  { grep -E '^all-reduce:' "$RES/nccl-world1.log" || echo "all-reduce: no result (see nccl-world1.log)"; } \
    | sed 's/^/NCCL world size 1 (launch --gpus 1): /' | tee "$RES/nccl-summary.txt"
}
if [ "${SKIP_NCCL:-0}" != 1 ] && [ "${SKIP_E2E:-0}" != 1 ] && [ -x "$BINDIR/loader" ]; then nccl; fi


if [ "${SKIP_BENCH:-0}" != 1 ]; then
  for r in "${runs[@]:2}"; do bench_trainer "$r"; done
fi
if [ "${SKIP_TORCH:-0}" != 1 ]; then
  for b in "${tb[@]:1}"; do torch_run official "$b"; done
fi

# --- 5. the table ----------------------------------------------------------------------------
"$PY" bench/gpu_table.py "$RES" | tee "$RES/summary.md"
[ -n "${OUT:-}" ] && cp "$RES/summary.md" "$OUT/summary.md"
pack_results
log "done in $(( $(date +%s) - START ))s; results in $RES"
rm -rf "$WORK"
[ -n "${OUT:-}" ] && rm -rf "$RES"
# Failed steps are rows in the table, not the exit status (without OUT the line above returned 1).
exit 0
