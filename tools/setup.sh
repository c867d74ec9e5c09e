#!/usr/bin/env bash
# Create .venv in the repository root and install keel (editable) with its test extras.
# Idempotent: when pyproject.toml has not changed since the last install, it does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.keel-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch is pinned in pyproject.toml: an open range would pull a multi-GB CUDA build
  .venv/bin/pip install --disable-pip-version-check -q -e '.[test]'
  echo "$want" > "$stamp"
fi
