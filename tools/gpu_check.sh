#!/usr/bin/env bash
# keel's checks on a lent NVIDIA GPU (bf16, nccl): demo throughput and MFU, keel vs plain PyTorch and
# the monitors' cost, the spectral bound and monitors in bf16, MoE on the alltoall dispatcher, and
# decode throughput per attention type. Each section is independent: one failing does not stop the rest. megatron-core, Hydra and OmegaConf travel in .gpu/site
# (copied from .venv: pure Python) because the GPU machine reaches no package registry.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/.gpu/site:$PWD PYTHONUNBUFFERED=1 KEEL_CACHE=/tmp/keel-cache PYTHONWARNINGS=ignore KEEL_DEBUG=1 HYDRA_FULL_ERROR=1
OUT=${OUT:-/tmp/keel-gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import sys, torch, megatron.core; print(sys.version.split()[0], torch.__version__, megatron.core.__version__)"
echo "== 1. demo (bf16)"
python3 pretrain/main.py +experiment=demo run_dir=/tmp/runs/demo trainer.progress=false 2>&1 | grep -v Warning | tail -25
cp /tmp/runs/demo/metrics.jsonl "$OUT/demo_metrics.jsonl"
echo "== 2. keel vs plain PyTorch"
python3 tools/bench_step.py --steps 10 +experiment=demo trainer.global_batch_size=64 trainer.micro_batch_size=64 2>&1 | tail -7
python3 tools/bench_step.py --steps 10 +experiment=demo model.num_layers=24 model.hidden_size=1024 model.head_dim=64 \
  model.max_seq_len=1024 data.seq_len=1024 trainer.global_batch_size=16 trainer.micro_batch_size=8 2>&1 | tail -7
echo "== 3. spectral bound + monitors in bf16"
python3 pretrain/main.py +experiment=smoke run_dir=/tmp/runs/spec optim.spectral.enabled=true logging.monitors.interval=5 \
  trainer.progress=false 2>&1 | tail -3
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/runs/spec/metrics.jsonl")]
r = rows[-1]
print({k: r[k] for k in ("step", "loss", "grad_norm", "tokens_per_s", "mfu", "spectral/clip_rate",
                         "stability/attn_entropy_min", "stability/qk_sigma1_max", "stability/logit_norm") if k in r})
PY
echo "== 4. MoE in bf16 on the alltoall dispatcher (one GPU: EP=1), with both losses"
python3 pretrain/main.py +experiment=moe_specialization run_dir=/tmp/runs/moe model.moe.ortho_loss=0.1 \
  model.moe.var_loss=0.1 trainer.max_steps=40 trainer.eval_interval=20 trainer.progress=false 2>&1 | grep -v Warning | tail -4
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/runs/moe/metrics.jsonl")]
r = rows[-1]
print({k: v for k, v in r.items() if k in ("step", "loss", "val_loss", "tokens_per_s") or
       (k.startswith("moe/") and k.count("/") == 1)})
PY
echo "== 5. decode tokens/s vs context, bf16"
python3 tools/bench_decode.py --device cuda --dtype bf16 --contexts 256 1024 4096 8192 --batch 8 --steps 16 2>&1 | tail -12
