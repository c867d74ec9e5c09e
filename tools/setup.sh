#!/usr/bin/env bash
# Create .venv in the repository root and install keel (editable) with its test extras and the optional
# extras the tests cover (slurm: submitit, whose local backend runs the staged packer's tests; eval:
# lm-eval; wandb), at the tested versions of tools/constraints.txt. Idempotent: it does nothing when
# pyproject.toml and the constraints have not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. a Python 3.12: $PYTHON, else python3.12 if it runs (a pyenv shim may not), else pyenv's own
find_python() {
  local candidates=("${PYTHON:-}" python3.12)
  local root; root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  candidates+=("$root"/versions/3.12.*/bin/python)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    if "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$py"; return 0
    fi
  done
  echo "keel: no Python 3.12 found; set PYTHON=/path/to/python3.12" >&2
  return 1
}

if [ -x .venv/bin/python ] && ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  echo "keel: .venv is not Python 3.12; recreating it" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
  # megatron-core appends `git rev-parse HEAD` of the folder it is installed in to its version;
  # inside this repository that would be keel's commit. An empty repository answers nothing.
  git init -q .venv
fi

# 2. install at the tested versions (constraints pin every package, torch included). uv (Astral's installer)
#    resolves, downloads and unpacks the same pins about six times faster than pip: 30 s against 3 minutes on
#    this project's 2-core machine, torch's 4.8 GB CUDA build included. It takes its index from UV_* variables
#    (UV_INDEX_URL, UV_EXTRA_INDEX_URL), not from pip.conf, so where it cannot install (a mirror only pip is
#    told about) pip does. KEEL_PIP_ONLY=1 skips uv. --compile-bytecode writes the .pyc files pip writes: without
#    them, where PYTHONDONTWRITEBYTECODE is set, every process compiles torch's and megatron's sources again.
stamp=.venv/.keel-installed
want=$(cat pyproject.toml tools/constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  spec=(-c tools/constraints.txt -e '.[test,launchers,slurm,eval,wandb]')
  if [ -z "${KEEL_PIP_ONLY:-}" ] && .venv/bin/pip install --disable-pip-version-check -q -c tools/constraints.txt uv \
      && .venv/bin/uv pip install --python .venv/bin/python -q --compile-bytecode "${spec[@]}"; then
    :
  else
    [ -n "${KEEL_PIP_ONLY:-}" ] || echo "keel: uv could not install the pinned packages; installing them with pip" >&2
    .venv/bin/pip install --disable-pip-version-check -q "${spec[@]}"
  fi
  echo "$want" > "$stamp"
fi
