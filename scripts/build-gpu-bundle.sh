#!/usr/bin/env bash
# Builds the CUDA trainer on this (GPU-less) machine and puts what scripts/gpu-check.sh reads into
# .gpu/ (git-ignored, at most 64 MiB: the device tool's carry limit):
#   .gpu/trainer      release binary, `--features cuda`, debug info stripped; it dlopens the CUDA
#                     driver/cuBLAS/cuRAND at run time and links cudart statically
#   .gpu/configs/     the configs the check uses
#   .gpu/BUILD-INFO   commit, toolchain, size, sha256
# Then, with the device tool: run(command="bash scripts/gpu-check.sh", carry=[".gpu"], timeout_s=540)
#
# Cold: ~12 min on 2 cores (candle-kernels' PTX is ~2 of them); warm (target/cuda kept): ~1 min.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-deps.sh
bash scripts/cuda-toolchain.sh
# shellcheck disable=SC1090
source <(bash scripts/cuda-toolchain.sh --env)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
t0=$(date +%s)
cargo build --release --locked --features cuda -p trainer
echo "cuda release build: $(( $(date +%s) - t0 ))s" >&2

BIN="$CARGO_TARGET_DIR/release/trainer"
rm -rf .gpu
mkdir -p .gpu/configs
objcopy --strip-debug "$BIN" .gpu/trainer
cp configs/*.toml .gpu/configs/

# The binary must not need the CUDA runtime or libraries at load time (they are dlopened).
if objdump -p .gpu/trainer | grep -E 'NEEDED +lib(cudart|cuda|cublas|cublasLt|curand|nvrtc)\.' >&2; then
  echo "error: .gpu/trainer links a CUDA library at load time (see above); see vendor/README.md" >&2
  exit 1
fi
# It starts on this GPU-less machine (CPU fallback); `--device cuda` must explain itself, not panic.
.gpu/trainer --help > /dev/null

size=$(du -cb .gpu | tail -n 1 | cut -f1)
{
  echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!.gpu' || echo ' (+ uncommitted changes)')"
  echo "built: $(date -u +%FT%TZ) on $(hostname)"
  echo "rustc: $(rustc --version)"
  echo "nvcc: $("$NVCC" --version | tail -n 1)"
  echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION"
  echo "trainer bytes: $(stat -c %s .gpu/trainer) sha256: $(sha256sum .gpu/trainer | cut -d' ' -f1)"
  echo "needed: $(objdump -p .gpu/trainer | awk '/NEEDED/{print $2}' | paste -sd' ')"
} > .gpu/BUILD-INFO
cat .gpu/BUILD-INFO
limit=$(( 64 * 1024 * 1024 ))
if [ "$size" -gt "$limit" ]; then
  echo "error: .gpu is $size bytes, over the 64 MiB the device tool carries" >&2
  exit 1
fi
echo ".gpu: $(( size / 1024 / 1024 )) MiB; next: bash scripts/gpu-check.sh on the GPU machine (carry .gpu)" >&2
