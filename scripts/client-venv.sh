#!/usr/bin/env bash
# Creates the Python environment the client tests run in (the official `openai` package,
# `langchain-core` with numpy for its in-memory vector store, pytest, httpx), from PyPI,
# outside the clone. Idempotent; prints the interpreter's path. The kvquilt package itself
# is used from clients/python (PYTHONPATH).
set -euo pipefail
VENV="${KVQ_CLIENT_VENV:-$HOME/.cache/kvquilt/client-venv}"
STAMP="$VENV/.kvquilt-client-v2"
if [ ! -f "$STAMP" ]; then
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    echo "client-venv: python3 -m venv failed; installing python3-venv" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >&2
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "openai==2.*" "langchain-core==1.*" "pytest==8.*" "httpx>=0.27" "numpy==2.*" >&2
  touch "$STAMP"
fi
echo "$VENV/bin/python"
