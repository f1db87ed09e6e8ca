#!/usr/bin/env bash
# Installs LiteLLM's proxy into its own venv (never a Tether dependency), for the side-by-side
# column of bench_llm. Idempotent. Usage: bash bench/litellm/setup.sh [VENV] (default /tmp/litellm-venv)
set -euo pipefail
VENV="${1:-/tmp/litellm-venv}"
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/litellm" ]; then
  echo "litellm already installed in $VENV: $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))')"
  exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet 'litellm[proxy]'
echo "installed litellm $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))') in $VENV"
