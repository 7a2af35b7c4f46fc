#!/usr/bin/env bash
# One sha256 over the sources the binaries are built from (Rust, CUDA and C++ files and the
# manifests of the workspace and vendored crates), without git: build-gpu-bundle.sh records it
# in .gpu/BUILD-INFO and gpu-check.sh compares it with the checkout it runs in, so that a bundle
# built from other sources is not measured as this code.
set -euo pipefail
cd "$(dirname "$0")/.."
find Cargo.toml Cargo.lock shared loader shard-tool trainer vendor -type f \
  \( -name '*.rs' -o -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' \
     -o -name 'Cargo.toml' -o -name 'Cargo.lock' \) -not -path '*/target/*' \
  | LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum | cut -d' ' -f1
