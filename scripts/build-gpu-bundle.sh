#!/usr/bin/env bash
# Builds the CUDA trainer (no GPU needed: the CUDA libraries are loaded at run time) and puts what
# scripts/gpu-check.sh reads into .gpu/ (git-ignored; at most BUNDLE_MAX_MIB, default 64 MiB, so
# that it stays quick to copy to a GPU machine):
#   .gpu/trainer      release binary, `--features cuda`, debug info stripped; it dlopens the CUDA
#                     driver/cuBLAS/cuRAND at run time and links cudart statically
#   .gpu/device-smoke trainer/examples/device_smoke.rs: candle itself on the GPU vs the CPU
#   .gpu/loader, .gpu/shard-tool  release builds (symbols stripped) for the check's end-to-end run
#   .gpu/configs/     the configs the check uses
#   .gpu/BUILD-INFO   commit, toolchain, size, sha256
# Then, on the GPU machine, from a checkout holding this .gpu/: bash scripts/gpu-check.sh
#
# Cold: ~12 min on 2 cores (candle-kernels' PTX is ~2 of them); warm (target/cuda kept): ~1 min.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-deps.sh
bash scripts/cuda-toolchain.sh
# shellcheck disable=SC1090
source <(bash scripts/cuda-toolchain.sh --env)
unset CANDLE_KERNELS_CHECK_ONLY   # that mode cannot link (vendor/README.md)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
t0=$(date +%s)
sources=$(bash scripts/source-hash.sh)
cargo build --release --locked --features cuda -p trainer --bins --example device_smoke
cargo build --release --locked -p loader -p shard-tool --bins
echo "cuda release build: $(( $(date +%s) - t0 ))s" >&2

rm -rf .gpu
mkdir -p .gpu/configs
cp configs/*.toml .gpu/configs/
objcopy --strip-debug "$CARGO_TARGET_DIR/release/examples/device_smoke" .gpu/device-smoke
for b in loader shard-tool; do objcopy --strip-all "$CARGO_TARGET_DIR/release/$b" ".gpu/$b"; done
if [ -x "$CARGO_TARGET_DIR/release/trainer" ]; then
  objcopy --strip-debug "$CARGO_TARGET_DIR/release/trainer" .gpu/trainer
else
  echo "warning: the trainer crate has no \`trainer\` binary yet; bundling device-smoke only" >&2
fi
for b in .gpu/trainer .gpu/device-smoke; do
  [ -e "$b" ] || continue
  # Must not need the CUDA runtime or libraries at load time (they are dlopened on first use).
  if objdump -p "$b" | grep -E 'NEEDED +lib(cudart|cuda|cublas|cublasLt|curand|nvrtc)\.' >&2; then
    echo "error: $b links a CUDA library at load time (see above); see vendor/README.md" >&2
    exit 1
  fi
done
# Both must start here, GPU or not: the CPU fallback, and (without a GPU) a clear error for `--device cuda`.
.gpu/device-smoke cpu > /dev/null
if .gpu/device-smoke cuda > /dev/null 2> .gpu/no-gpu.txt; then
  echo "note: this machine has a usable GPU" >&2
else
  grep -q -- "--device cuda:" .gpu/no-gpu.txt || { cat .gpu/no-gpu.txt >&2; exit 1; }
fi
rm -f .gpu/no-gpu.txt
[ -e .gpu/trainer ] && .gpu/trainer --help > /dev/null

size=$(du -cb .gpu | tail -n 1 | cut -f1)
{
  echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!.gpu' || echo ' (+ uncommitted changes)')"
  echo "sources: $sources"
  echo "built: $(date -u +%FT%TZ) on $(hostname)"
  echo "rustc: $(rustc --version)"
  echo "nvcc: $("$NVCC" --version | tail -n 1)"
  echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION"
  for b in .gpu/trainer .gpu/device-smoke .gpu/loader .gpu/shard-tool; do
    [ -e "$b" ] || continue
    echo "$b: $(stat -c %s "$b") bytes, sha256 $(sha256sum "$b" | cut -d' ' -f1)"
    echo "  needs: $(objdump -p "$b" | awk '/NEEDED/{print $2}' | paste -sd' ')"
  done
} > .gpu/BUILD-INFO
cat .gpu/BUILD-INFO
# The hash names what was built only if nothing changed while cargo ran.
if [ "$(bash scripts/source-hash.sh)" != "$sources" ]; then
  echo "error: the sources changed while the bundle was built; run scripts/build-gpu-bundle.sh again" >&2
  sed -i 's/^sources: .*/sources: changed while building/' .gpu/BUILD-INFO   # gpu-check refuses it
  exit 1
fi
limit=$(( ${BUNDLE_MAX_MIB:-64} * 1024 * 1024 ))
if [ "$size" -gt "$limit" ]; then
  echo "error: .gpu is $size bytes, over BUNDLE_MAX_MIB=${BUNDLE_MAX_MIB:-64} MiB" >&2
  exit 1
fi
echo ".gpu: $(( size / 1024 / 1024 )) MiB; next: bash scripts/gpu-check.sh on the GPU machine (copy .gpu/ there with the checkout)" >&2
