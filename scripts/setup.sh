#!/usr/bin/env bash
# Create .venv (Python >= 3.10; 3.11 preferred) and install frame-dist with its dev and mlflow
# extras.
# Idempotent: reinstalls only when pyproject.toml changed since the last successful install.
# Sourced by scripts/demo.sh and scripts/test.sh; leaves VENV_PY pointing at the venv's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FRAME_VENV:-$ROOT/.venv}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
      PY="$candidate"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "setup: no Python >= 3.10 found (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.frame-dist-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "setup: installing frame-dist and its dependencies into $VENV (first run: a few minutes)"
  # pip as shipped with the interpreter; torch/torchvision are pinned in pyproject.toml.
  # (Some machines' pip config lists local package folders; pip's notes about absent ones are
  # filtered out. pipefail keeps pip's exit status.)
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e "$ROOT[dev,mlflow]" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
  echo "$WANT" > "$STAMP"
fi
VENV_PY="$VENV/bin/python"
export VENV_PY
