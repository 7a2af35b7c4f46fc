#!/usr/bin/env bash
# The project's test command (README line 2, and what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-deps.sh
cargo test --workspace --locked
