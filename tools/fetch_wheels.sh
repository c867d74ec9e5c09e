#!/usr/bin/env bash
# Download keel's dependencies as Python 3.12 manylinux x86_64 wheels into .whl/, at the versions of
# tools/constraints.txt, for machines that reach no package registry (a GPU cluster behind a firewall,
# a lent GPU). Then, on that machine:
#   pip install --no-index --find-links .whl -e '.[gpu]'            # into its environment, or
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl   # beside a read-only one
#
#   bash tools/fetch_wheels.sh          # what a CUDA PyTorch image usually lacks: megatron-core, Hydra and its
#                                       # joblib launcher (the experiment drivers' multiruns)
#   bash tools/fetch_wheels.sh --all    # every dependency except torch and its CUDA libraries
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
mode=${1:---image}
out=.whl
mkdir -p "$out"

pinned() {  # the constraints line of each named package (name==version)
  for name in "$@"; do
    grep -i -E "^${name}==" tools/constraints.txt || { echo "keel: $name is not in tools/constraints.txt" >&2; exit 2; }
  done
}

case "$mode" in
  --image) specs=$(pinned megatron-core hydra-core omegaconf antlr4-python3-runtime hydra-joblib-launcher joblib) ;;
  --all) specs=$(grep -v -E '^(#|torch==|triton==|nvidia-|cuda-)' tools/constraints.txt) ;;
  *) echo "usage: bash tools/fetch_wheels.sh [--image|--all]" >&2; exit 2 ;;
esac

platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
for spec in $specs; do
  # pure-Python sdists (antlr4-python3-runtime has no wheel) are built into a wheel here
  if ! "$PIP" download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$out" "$spec" 2>/dev/null; then
    "$PIP" wheel -q --disable-pip-version-check --no-deps -w "$out" "$spec"
  fi
done
ls -1 "$out"
du -sh "$out"
