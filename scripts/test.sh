#!/usr/bin/env bash
# The project's test command (README line 2, and what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-deps.sh
cargo test --workspace --locked
# The learning check (#[ignore]d above: minutes of CPU pretraining): k-NN top-1 after a short
# pretraining must beat the same network at random init clearly.
cargo test --locked -p trainer --test e2e_learning -- --ignored learning --nocapture
