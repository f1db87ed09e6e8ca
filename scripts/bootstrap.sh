#!/usr/bin/env bash
# Creates the project's virtual environment and installs Tether with its dev tools.
# On a fresh Debian machine `python3 -m venv` needs the python3-venv package: as root we
# install it; otherwise we say exactly what is missing.
set -euo pipefail
python="$1"; venv="$2"

if ! command -v "$python" >/dev/null 2>&1; then
  echo "error: $python not found; Tether needs Python 3.11 or newer." >&2; exit 1
fi
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "error: $("$python" --version 2>&1) is too old; Tether needs Python 3.11 or newer." >&2; exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing python3-venv (needed by 'python3 -m venv')"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      "$python" -m venv "$venv"
    else
      echo "error: '$python -m venv' failed; install Debian's python3-venv package (apt-get install python3-venv)." >&2
      exit 1
    fi
  fi
fi
pip_quiet() {
  # pip's own output goes to a log that is shown only when it fails.
  local log; log=$(mktemp)
  if ! "$venv/bin/python" -m pip --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"
    echo "error: pip $* failed" >&2; exit 1
  fi
  rm -f "$log"
}
pip_quiet install -q --upgrade pip
pip_quiet install -q -e '.[dev]'
"$venv/bin/python" -c 'import tether' || { echo "error: installing tether failed" >&2; exit 1; }
