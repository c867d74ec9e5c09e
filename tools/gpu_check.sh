#!/usr/bin/env bash
# keel's checks on a lent NVIDIA GPU (bf16, nccl), most wanted first: keel vs plain PyTorch with
# the monitors' cost (and where it goes), MoE on the alltoall dispatcher, decode throughput per
# attention type, the spectral bound and monitors in bf16, and the demo's throughput and MFU. Each
# section is independent and time-boxed, so one failing or hanging does not stop the rest, and the
# log is written to $OUT as it goes. megatron-core, Hydra and OmegaConf travel in .gpu/site (copied
# from .venv: pure Python) because the GPU machine reaches no package registry.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/.gpu/site:$PWD PYTHONUNBUFFERED=1 KEEL_CACHE=/tmp/keel-cache PYTHONWARNINGS=ignore KEEL_DEBUG=1 HYDRA_FULL_ERROR=1
OUT=${OUT:-/tmp/keel-gpu-out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

section() { echo "== $1  ($(date -u +%H:%M:%S))"; }
filtered() { grep -v -e Warning -e warnings.warn; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import sys, torch, megatron.core; print(sys.version.split()[0], torch.__version__, megatron.core.__version__)"

section "1. keel vs plain PyTorch and the monitors' cost: 286M model, then the demo model"
MODEL_286M=(+experiment=demo model.num_layers=24 model.hidden_size=1024 model.head_dim=64 model.max_seq_len=1024
            data.seq_len=1024 trainer.global_batch_size=16 trainer.micro_batch_size=8)
timeout 150 python3 tools/bench_step.py --steps 10 "${MODEL_286M[@]}" 2>&1 | filtered | tail -9
timeout 60 python3 tools/bench_step.py --steps 10 +experiment=demo trainer.global_batch_size=64 \
  trainer.micro_batch_size=64 2>&1 | filtered | tail -9
timeout 120 python3 tools/profile_monitor.py "${MODEL_286M[@]}" 2>&1 | filtered | tail -16

section "2. MoE in bf16 on the alltoall dispatcher (one GPU: EP=1), with both losses"
python3 -c "import torch; from pretrain.config import MoEConfig; from models.gpt import moe_fields; \
print('cuda', torch.cuda.is_available(), 'dispatcher', moe_fields(MoEConfig(num_experts=8), 256)['moe_token_dispatcher_type'])"
timeout 120 python3 pretrain/main.py +experiment=moe_specialization run_dir=/tmp/runs/moe model.moe.ortho_loss=0.1 \
  model.moe.var_loss=0.1 trainer.max_steps=40 trainer.eval_interval=20 trainer.progress=false 2>&1 | filtered | tail -4
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/runs/moe/metrics.jsonl")]
r = rows[-1]
print({k: v for k, v in r.items() if k in ("step", "loss", "val_loss", "tokens_per_s") or
       (k.startswith("moe/") and k.count("/") == 1)})
PY
cp /tmp/runs/moe/metrics.jsonl "$OUT/moe_metrics.jsonl"

section "3. decode tokens/s vs context, bf16"
timeout 120 python3 tools/bench_decode.py --device cuda --dtype bf16 --contexts 256 1024 4096 8192 --batch 8 \
  --steps 16 2>&1 | filtered | tail -12

section "4. spectral bound + monitors in bf16"
timeout 90 python3 pretrain/main.py +experiment=smoke run_dir=/tmp/runs/spec optim.spectral.enabled=true \
  logging.monitors.interval=5 trainer.progress=false 2>&1 | filtered | tail -3
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/runs/spec/metrics.jsonl")]
r = rows[-1]
print({k: r[k] for k in ("step", "loss", "grad_norm", "tokens_per_s", "mfu", "spectral/clip_rate",
                         "stability/attn_entropy_min", "stability/qk_sigma1_max", "stability/logit_norm") if k in r})
PY

section "5. demo (bf16)"
timeout 120 python3 pretrain/main.py +experiment=demo run_dir=/tmp/runs/demo trainer.progress=false 2>&1 | filtered | tail -25
cp /tmp/runs/demo/metrics.jsonl "$OUT/demo_metrics.jsonl"
section "done"
