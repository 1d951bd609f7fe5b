#!/usr/bin/env bash
# The fuzz suite with a longer budget than CI's: every property of kvstore/tests/fuzz.rs
# (object parser, forged headers, chunk ids) and server/tests/fuzz.rs (API bodies, uploaded
# objects, config files) for CASES cases each (default 100000). A failure prints proptest's
# minimised input: turn it into a named regression test.
#   scripts/fuzz.sh [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cases="${1:-100000}"
start=$(date +%s)
PROPTEST_CASES="$cases" cargo test -p kvquilt-kvstore --test fuzz -- --nocapture
PROPTEST_CASES="$cases" cargo test -p kvquilt --test fuzz -- --nocapture
echo "fuzz.sh: $cases cases per property, no failure, $(( $(date +%s) - start )) s" >&2
