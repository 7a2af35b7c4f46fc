#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler + headers + static cudart from PyPI wheels into ./.cuda/ (git-ignored),
# then prints the environment a `--features cuda` build needs. No GPU or driver is needed to build.
#
#   bash scripts/cuda-toolchain.sh            # install (idempotent, ~270 MiB, ~10 s)
#   source <(bash scripts/cuda-toolchain.sh --env)   # export CUDA_ROOT, NVCC, CUDA_COMPUTE_CAP, ...
#
# Exactly 13.0.x: its PTX (ISA 9.0) is JIT-compiled by every driver from 580 (CUDA 13.0) on; a newer
# nvcc would emit PTX that a 580 driver rejects.
# Five wheels make a working toolkit: nvcc alone lacks cicc (nvvm) and the crt/cccl headers that
# candle's kernels include.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$ROOT/.cuda"
CUDA_ROOT="$DIR/nvidia/cu13"
WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
        nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85)

print_env() {
  cat <<ENV
export CUDA_ROOT="$CUDA_ROOT"
export CUDA_HOME="$CUDA_ROOT"
export CUDA_PATH="$CUDA_ROOT"
export NVCC="$CUDA_ROOT/bin/nvcc"
export PATH="$CUDA_ROOT/bin:\$PATH"
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS=\${CUDAFORGE_THREADS:-$(nproc)}
ENV
}

if [ "${1:-}" = "--env" ]; then
  [ -x "$CUDA_ROOT/bin/nvcc" ] || { echo "echo 'CUDA toolchain missing: run bash scripts/cuda-toolchain.sh' >&2; false"; exit 1; }
  print_env
  exit 0
fi

if [ -x "$CUDA_ROOT/bin/nvcc" ] && [ -f "$CUDA_ROOT/lib/libcudart_static.a" ] \
   && [ -x "$CUDA_ROOT/nvvm/bin/cicc" ] && [ -f "$DIR/.installed" ] \
   && [ "$(cat "$DIR/.installed")" = "${WHEELS[*]}" ]; then
  echo "CUDA toolchain already in $CUDA_ROOT" >&2
else
  PY=""
  for p in python3 python; do command -v "$p" >/dev/null && { PY="$p"; break; }; done
  if [ -z "$PY" ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "installing python3-pip (needed to fetch the CUDA wheels)" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip
    PY=python3
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR"
  echo "installing ${WHEELS[*]} into $DIR" >&2
  pip_args=(install --quiet --disable-pip-version-check --no-deps --target "$DIR")
  if ! "$PY" -m pip "${pip_args[@]}" "${WHEELS[@]}" 2> "$DIR/pip.err"; then
    # Debian's system python refuses any pip install (PEP 668); --target only writes into $DIR.
    if grep -q externally-managed "$DIR/pip.err"; then
      "$PY" -m pip "${pip_args[@]}" --break-system-packages "${WHEELS[@]}"
    else
      cat "$DIR/pip.err" >&2
      exit 1
    fi
  fi
  [ -x "$CUDA_ROOT/bin/nvcc" ] || { echo "nvcc not found at $CUDA_ROOT/bin/nvcc after install" >&2; exit 1; }
  echo "${WHEELS[*]}" > "$DIR/.installed"
fi
"$CUDA_ROOT/bin/nvcc" --version | tail -n 2 >&2
echo "environment: source <(bash scripts/cuda-toolchain.sh --env)" >&2
