#!/usr/bin/env bash
# Runs trainer/tests/cuda_source_on_cpu.rs (udi_kernels.cu on the CPU under the CUDA emulation)
# with the kernels built under a sanitizer: thread (the default: data races, e.g. a missing
# barrier), address (out-of-bounds global or shared memory) or undefined.
#   bash scripts/cuda-emu-sanitize.sh [thread|address|undefined] [test name filter]
# The Rust test binary is not instrumented; the sanitizer's runtime is preloaded so that the
# instrumented kernel library can be loaded into it. Any report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-thread}
shift || true
cxx=${CXX:-c++}
case "$mode" in
  thread) rt=libtsan.so ;;
  address) rt=libasan.so ;;
  undefined) rt= ;;
  *) echo "usage: $0 [thread|address|undefined] [filter]" >&2; exit 2 ;;
esac
bin=$(cargo test --locked -p trainer --test cuda_source_on_cpu --no-run --message-format=json |
  grep -o '"executable":"[^"]*cuda_source_on_cpu[^"]*"' | tail -1 | cut -d'"' -f4)
[ -x "$bin" ] || { echo "no test binary" >&2; exit 1; }
preload=
if [ -n "$rt" ]; then
  preload=$("$cxx" -print-file-name="$rt")
  [ -f "$preload" ] || { echo "$cxx has no $rt" >&2; exit 1; }
fi
# One test at a time: the reports stay readable.
UDI_CUDA_EMU_SANITIZE=$mode LD_PRELOAD=$preload \
  TSAN_OPTIONS="halt_on_error=1 exitcode=66 ignore_noninstrumented_modules=1 ${TSAN_OPTIONS:-}" \
  ASAN_OPTIONS="detect_leaks=0 ${ASAN_OPTIONS:-}" \
  "$bin" --test-threads=1 "$@"
