#!/usr/bin/env bash
# Creates the Python environment of the independent reference (HF transformers on CPU) used by
# scripts/hf_reference.py to regenerate model/tests/fixtures. Not needed to build or test:
# the fixtures are committed. About 5 GB (torch wheels), from PyPI.
set -euo pipefail
VENV="${KVQ_ORACLE_VENV:-$HOME/.cache/kvquilt/oracle-venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.15.0 transformers==5.24.0 accelerate==1.15.0 gguf==0.19.0 numpy==2.4.6 safetensors==0.8.0 tokenizers==0.23.3
echo "$VENV/bin/python"
