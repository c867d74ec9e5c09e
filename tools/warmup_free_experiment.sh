#!/usr/bin/env bash
# The warmup-free experiment (docs/results/warmup_free.md): AdamW without warmup vs with warmup vs
# the spectral bound without warmup vs QuacK without warmup, at two high learning rates and 2 seeds,
# plus a τ ablation.
# Usage: tools/warmup_free_experiment.sh OUT_DIR [JOBS] [extra overrides...]
#   e.g. with pre-packed data: tools/warmup_free_experiment.sh runs/warmup_free 4 data.path=P/train ...
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: tools/warmup_free_experiment.sh OUT_DIR [JOBS] [overrides...]}; jobs=${2:-1}; shift 2 || shift $#
mkdir -p "$out"
PY=${PYTHON:-.venv/bin/python}
run() {  # name preset overrides...
  local name=$1 preset=$2; shift 2
  [ -f "$out/$name/result.json" ] && return 0
  $PY pretrain/main.py +experiment=$preset run_dir="$out/$name" trainer.progress=false logging.tensorboard=false \
    "$@" > "$out/$name.log" 2>&1 || true
}
plan() {
  for lr in 3e-3 1e-2; do for seed in 1 2; do
    echo "adamw_lr${lr}_s${seed} warmup_free_adamw optim.lr=$lr seed=$seed"
    echo "warmup_lr${lr}_s${seed} warmup_free_adamw_warmup optim.lr=$lr seed=$seed"
    echo "spectral_lr${lr}_s${seed} warmup_free_spectral optim.lr=$lr seed=$seed"
    echo "quack_lr${lr}_s${seed} warmup_free_quack optim.lr=$lr seed=$seed"
  done; done
  echo "adamw_lr3e-2_s1 warmup_free_adamw optim.lr=3e-2 seed=1"
  for tau in 0.01 0.02 0.1 0.2; do
    echo "spectral_tau${tau}_lr1e-2_s1 warmup_free_spectral optim.lr=1e-2 optim.spectral.tau=$tau seed=1"
  done
}
export -f run; export out PY
plan | while read -r name preset args; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
  run "$name" "$preset" $args "$@" &
done
wait
echo "done: $(ls "$out"/*/result.json | wc -l) runs in $out"
