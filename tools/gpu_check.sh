#!/usr/bin/env bash
# keel's checks on a lent NVIDIA GPU (bf16, nccl):   bash tools/gpu_check.sh SECTION [SECTION...]
#
#   triage  everything pending on a GPU in one call of at most 9 minutes, run before any other section until
#       it has run once: the GPU-only tests (compiled decode kernel, CUDA-graph steps, compiled layers),
#       decoding at batch 32 x 16k for GQA, MQA, GTA, GLA and MLA (Triton; SDPA for GQA and MQA, with the
#       backend that ran), the 755M step against compiled plain PyTorch and a torch.profiler summary of it;
#       $OUT/triage.json and $OUT/triage.md (a section for BENCHMARKS.md) collect it all
#   10  install and smoke: versions, then megatron-core's GPTModel with megatron DDP, the distributed
#       optimizer and bf16 training the smoke model
#   20  step speed: compiled against eager losses, then keel vs plain PyTorch (eager and compiled):
#       ms, tokens/s, MFU and peak memory at 286M and 755M, and the monitors' cost
#   21  checkpoints: synchronous against background (checkpoint.async_save) saves
#   22  step speed at about 1.5B parameters, and the monitors' parts at 286M
#   30  decoding: the split-K Triton kernel and the CUDA-graph step against the PyTorch path, then
#       tokens/s and HBM bandwidth per attention type (bench_decode.py --preset memory-bound)
#   40  experiments: MoE on the alltoall dispatcher, the spectral bound and monitors, the demo (bf16)
#   41  warmup-free claim (docs/results/warmup_free.md) in bf16: AdamW, AdamW + warmup 120 and the spectral
#       bound at lr 1e-2 and 3e-2 on the reported seeds 1-3, all at once on the GPU, then the paired report
#   42  packing claim (docs/results/packing.md) in bf16: the CPU's driver and presets, every arm and seed
#       (CT, BFD, SP, SP at r = 0, SP at CT's distinct tokens, replay; seeds 1-10), then the paired report
#   43  width claim (docs/results/width_scaling.md) in bf16, part 1 of 2 (run `43 46` in one call): the LR
#       grid at widths 32-512 on seeds 1-3, widened until every optimum is bracketed, then the fit
#   44  MoE claim (docs/results/moe.md) in bf16: pretrain with the auxiliary loss only, continue it with aux
#       only and with L_o + L_v at the β = γ the CPU's tuning seeds chose, seeds 1-3 at once, paired report
#   45  GTA/GLA claim (docs/results/attention.md) in bf16: six types at head dim 128, the LR tuned per type
#       on seed 100, every type at its rate on seeds 1-3, then the paired report
#   46  width claim, part 2 of 2: the grid finished if 43 ran out of time, the fit, the transfer to width
#       768 on seeds 4-6 (the fitted rule and 0.42 against an LR search), then the paired report
# Numbers group sections by area; later work adds its own (21, 31, 41, ...). The claim sections (41-46)
# score at least 1M validation tokens per set (VAL_TOKENS), holding out more of the files than the CPU runs.
#
# A lent GPU gives about 15 minutes in all, so one call runs one or two sections. Each section is
# time-boxed: the timeouts of its steps, each with KILL_GRACE, add up to its budget (SECTION_BUDGET;
# TRIAGE_BUDGET for the triage; checked by tests/tools/test_gpu_check.py), which with the machine's start
# fits the 8 minutes a section may take (9 for the triage). A step gets SIGINT at its limit, so pytest
# still prints its summary and writes its report, and SIGKILL KILL_GRACE seconds later. Every step's limit,
# exit code and seconds go to $STEPS_LOG. The claim sections' runs (41-46) run many at once with
# trainer.compile=false: their models are a few million parameters, too small to gain from compiling,
# and 16-18 runs compiling at once (inductor starts min(32, cores) workers each) would spend their time box.
# The image lacks megatron-core and Hydra: `bash tools/fetch_wheels.sh` puts them in .whl/ here, the
# call carries .whl, and this script installs them with pip --no-index, as a cluster without internet
# would. Logs go to $OUT/gpu_check.log. The copy on the device has no git history: call the script as
# `KEEL_REVISION=<commit> bash tools/gpu_check.sh ...` from a clean, committed tree, so that runs and reports
# record that commit (pretrain.rundir.git_revision) rather than "unknown", which the reports refuse.
set -uo pipefail
cd "$(dirname "$0")/.."
SECTION_BUDGET=300
TRIAGE_BUDGET=490
INSTALL_BUDGET=45
KILL_GRACE=5
OUT=${OUT:-/tmp/keel-gpu-out}; mkdir -p "$OUT"
STEPS_LOG=${STEPS_LOG:-$OUT/steps.jsonl}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 KEEL_CACHE=/tmp/keel-cache PYTHONWARNINGS=ignore KEEL_DEBUG=1 HYDRA_FULL_ERROR=1
PY=${PY:-python3}
PRECISION=${PRECISION:-bf16}  # PRECISION=fp32 PY=.venv/bin/python TIME_SCALE=8 tries a section on a CPU first
MODEL_286M=(+experiment=demo model.num_layers=24 model.hidden_size=1024 model.head_dim=64 model.max_seq_len=1024
            data.seq_len=1024 trainer.global_batch_size=16 trainer.micro_batch_size=8)

# the tokenizer and packed sets a preset's runs share, built once before a multirun's workers start
PREPARE='import sys; from pretrain.config import compose_config; from data.prepare import ensure_packed, \
ensure_tokenizer; data = compose_config(sys.argv[1:]).data; print(ensure_packed(data, ensure_tokenizer(data)))'

# The claim sections' validation (issue 16): at least VAL_TOKENS tokens per set on a GPU, the same rows for
# every seed and arm. The CPU's 5% split of the default corpus holds 379k tokens, so a section holds out
# more of the files. Scored once, after the last step: the reports read final losses, and thousands of
# small evaluation batches would cost a run more than its training.
VAL_TOKENS=1048576
VALIDATION='import math, sys; from pretrain.config import compose_config; tokens, percent, fill = sys.argv[1:4]; \
c = compose_config([*sys.argv[4:], f"data.val_percent={percent}"]); row = c.trainer.global_batch_size * c.data.seq_len; \
print(f"data.val_percent={percent} trainer.eval_batches={math.ceil(int(tokens) / (row * float(fill)))}", \
f"trainer.eval_interval={c.trainer.max_steps}")'
validation() {  # validation PERCENT FILL OVERRIDES...: the overrides that give a preset's runs this validation;
                # FILL: the share of a validation row that is text (1 for concat-packed sets)
  timeout 60 "$PY" -c "$VALIDATION" "$VAL_TOKENS" "$@" || { echo "!! no validation overrides for $*" >&2; return 1; }
}

say() { echo "== $*  ($(date -u +%H:%M:%S))"; }
step() {  # step SECONDS COMMAND...: one time-boxed step; its output is in the log, its outcome in $STEPS_LOG
  local seconds=$(( $1 * ${TIME_SCALE:-1} )) start=$SECONDS; shift  # TIME_SCALE > 1: a CPU trial's time
  timeout -s INT -k "$KILL_GRACE" "$seconds" "$@" 2>&1 | grep -v -e Warning -e warnings.warn
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "!! exit $rc after at most ${seconds}s: $*"
  local command="$*"
  printf '{"step": "%s", "limit_s": %d, "rc": %d, "seconds": %d}\n' "$(echo "${command#"$PY "}" | tr -d '"\\')" \
    "$seconds" "$rc" $((SECONDS - start)) >> "$STEPS_LOG"
}

install() {  # what the image lacks, from carried wheels only
  if [ -d .whl ]; then
    step $INSTALL_BUDGET "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$PY" -c "import sys, torch, megatron.core; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'megatron-core', megatron.core.__version__, 'cuda', torch.cuda.is_available())"
}

section_triage() {
  say "triage: GPU-only tests, decoding at batch 32 x 16k, the 755M step against compiled plain PyTorch, its profile"
  # REHEARSAL=1 runs the same steps at CPU shapes (with PRECISION=fp32 PY=.venv/bin/python TIME_SCALE=4)
  local t="$OUT/triage" preset=755M
  local shapes=(--preset memory-bound --batch 32 --contexts 16384 --device cuda --dtype bf16)
  if [ "${REHEARSAL:-0}" = 1 ]; then
    preset=cpu shapes=(--batch 2 --contexts 64 --device cpu --dtype fp32)
  fi
  mkdir -p "$t"
  STEPS_LOG="$t/steps.jsonl"
  step 10 "$PY" tools/triage_report.py --versions "$OUT"
  # 1. what only a GPU runs: the compiled decode kernel, CUDA-graph steps, compiled layers with block masks
  step 130 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$t/tests.xml" tests/models/test_decode_kernels.py \
    tests/models/test_decode.py tests/pretrain/test_compile.py
  # 2. decoding where reading the cache is the cost: the Triton kernel for five types, then torch's SDPA
  step 85 "$PY" tools/bench_decode.py "${shapes[@]}" --steps 10 --types gqa mqa gta gla mla --save "$t/decode.json"
  step 30 "$PY" tools/bench_decode.py "${shapes[@]}" --steps 10 --types gqa mqa --kernel sdpa \
    --save "$t/decode_sdpa.json"
  # 3. the step at 755M against compiled plain PyTorch, then where keel's step spends its time
  step 115 "$PY" tools/bench_step.py --preset $preset --steps 8 --json "$t/step.json" trainer.precision=$PRECISION
  step 70 "$PY" tools/profile_step.py --preset $preset --steps 3 --json "$t/profile.json" trainer.precision=$PRECISION
  step 10 "$PY" tools/triage_report.py "$OUT"
}

section_10() {
  say "10. smoke: megatron-core GPTModel + DDP + distributed optimizer, bf16"
  rm -rf /tmp/runs/smoke  # a rerun on a warm machine trains again rather than resuming the finished run
  step 120 "$PY" pretrain/main.py +experiment=smoke run_dir=/tmp/runs/smoke optim.distributed=true \
    trainer.precision=$PRECISION trainer.max_steps=30 trainer.progress=false
  step 15 "$PY" -c "import json; rows = [json.loads(l) for l in open('/tmp/runs/smoke/metrics.jsonl')]; \
print('loss', rows[0]['loss'], '->', rows[-1]['loss'], 'val', [r['val_loss'] for r in rows if 'val_loss' in r])"
  step 150 "$PY" -m pytest -q -p no:cacheprovider tests/pretrain/test_cpu_compat.py tests/models/test_gpt.py
}

section_20() {
  say "20. step speed: compiled against eager losses (20 steps, bf16), then keel against plain PyTorch eager and compiled, with the monitors' cost (286M, 755M)"
  step 75 "$PY" -m pytest -q -p no:cacheprovider tests/pretrain/test_compile.py
  step 95 "$PY" tools/bench_step.py --preset 286M --steps 8 trainer.precision=$PRECISION
  step 115 "$PY" tools/bench_step.py --preset 755M --steps 8 trainer.precision=$PRECISION
}

section_22() {
  say "22. step speed at about 1.5B parameters (one GPU: bf16 weights, fp32 main parameters and Adam), and the monitors' parts (286M)"
  step 195 "$PY" tools/bench_step.py --preset 1.5B --steps 6 trainer.precision=$PRECISION
  step 95 "$PY" tools/profile_monitor.py "${MODEL_286M[@]}"
}

section_21() {
  say "21. checkpoints: how long a synchronous and a background save hold training up (286M)"
  step 240 "$PY" tools/bench_checkpoint.py --saves 3 "${MODEL_286M[@]}"
}

section_30() {
  say "30. decoding: kernel checks, then tokens/s and HBM bandwidth at 4 x 2048, batch 32 then 64, 4k-32k, bf16"
  # from a cold cache: about 30 Triton specialisations, 12 CUDA-graph captures and 45 model builds
  step 120 "$PY" -m pytest -q -p no:cacheprovider tests/models/test_decode_kernels.py tests/models/test_decode.py
  # rows print as measured (batch 32 first), so a cut-off run still logs the issue's batch-32 figures
  step 140 "$PY" tools/bench_decode.py --preset memory-bound --device cuda --dtype bf16 --steps 10
  # torch's own SDPA for grouped heads, against the Triton kernel above, at the issue's point
  step 25 "$PY" tools/bench_decode.py --preset memory-bound --device cuda --dtype bf16 --steps 10 --types gqa mqa \
    --batch 32 --contexts 16384 --kernel sdpa
}

section_40() {
  say "40. experiments in bf16: MoE on the alltoall dispatcher, the spectral bound with monitors, the demo"
  rm -rf /tmp/runs/moe /tmp/runs/spec /tmp/runs/demo  # as in section 10: train again, never resume
  step 105 "$PY" pretrain/main.py +experiment=moe_specialization run_dir=/tmp/runs/moe model.moe.ortho_loss=0.1 \
    model.moe.var_loss=0.1 trainer.max_steps=40 trainer.eval_interval=20 trainer.progress=false
  step 65 "$PY" pretrain/main.py +experiment=smoke run_dir=/tmp/runs/spec optim.spectral.enabled=true \
    logging.monitors.interval=5 trainer.progress=false
  step 115 "$PY" pretrain/main.py +experiment=demo run_dir=/tmp/runs/demo trainer.progress=false
  cp /tmp/runs/moe/metrics.jsonl "$OUT/moe_metrics.jsonl" 2>/dev/null
  cp /tmp/runs/demo/metrics.jsonl "$OUT/demo_metrics.jsonl" 2>/dev/null
}

section_41() {
  say "41. warmup-free in bf16: AdamW, AdamW + warmup 120, the spectral bound (τ 0.05) at lr 1e-2 and 3e-2, seeds 1-3"
  # 18 small runs side by side (the GPU is far from full), each time-boxed itself (a timeout stops only its
  # own child); WF_LRS, WF_SEEDS and WF_STEPS shrink the grid to try the section on a CPU first
  local val
  val=$(validation 15 1 +experiment=warmup_free_adamw_warmup trainer.max_steps="${WF_STEPS:-300}") || return
  step 230 env PY="$PY" PRECISION="$PRECISION" OUT="$OUT" WF_STEPS="${WF_STEPS:-300}" WF_LRS="${WF_LRS:-1e-2 3e-2}" \
      WF_SEEDS="${WF_SEEDS:-1 2 3}" VAL="$val" bash -c '
    common="trainer.precision=$PRECISION trainer.compile=false trainer.progress=false logging.tensorboard=false $VAL"
    for lr in $WF_LRS; do for seed in $WF_SEEDS; do
      for arm in "adamw +experiment=warmup_free_adamw_warmup lr.warmup_steps=0" \
                 "warmup +experiment=warmup_free_adamw_warmup lr.warmup_steps=120" \
                 "spectral +experiment=warmup_free_spectral optim.spectral.tau=0.05"; do
        set -- $arm; name=$1; shift
        timeout -k 5 220 "$PY" pretrain/main.py "$@" optim.lr=$lr seed=$seed trainer.max_steps=$WF_STEPS $common \
          run_dir=/tmp/runs/warmup_free/$name-$lr-$seed > "$OUT/wf-$name-$lr-$seed.log" 2>&1 &
      done
    done; done
    wait'
  step 60 "$PY" tools/experiments/warmup_free_report.py /tmp/runs/warmup_free --out "$OUT" --name warmup_free_gpu
  tar -C /tmp/runs -czf "$OUT/warmup_free_runs.tgz" --exclude=checkpoints warmup_free 2>/dev/null
}

section_42() {
  say "42. packing in bf16: CT, BFD, SP, SP at r = 0, SP at CT's distinct tokens and replay, seeds 1-10, one pretrained model"
  # The CPU's driver and presets; every training run in bf16, PACK_JOBS of them at once on the GPU.
  # PACK_SET (overrides for every run) and PACK_JOBS shrink the section to try it on a CPU first; a
  # trainer.max_steps there also shortens the distinct arm, which the report then takes for SP.
  # 30% of the files held out: each domain's split then holds 1M tokens of text (5% holds 275k and 106k); a
  # validation row is one document piece, on the CPU about half text and half padding
  local val
  val=$(validation 30 0.45 +experiment=cpt_packing) || return
  local driver=(tools/experiments/cpt_experiment.py --jobs "${PACK_JOBS:-16}" --set trainer.precision=$PRECISION
                trainer.compile=false $val
                ${PACK_SET:-})
  step 95 "$PY" "${driver[@]}" --stage pack
  # every stage after pretrain needs only the pretrained model: they run side by side
  step 165 env PY="$PY" bash -c '"$PY" "$@" --stage pretrain || exit
    for stage in init cpt replay ablation distinct; do "$PY" "$@" --stage $stage & done; wait' _ "${driver[@]}"
  step 25 "$PY" "${driver[@]}" --stage report --json "$OUT/packing_gpu.json" --png "$OUT/packing_gpu.png"
  tar -czf "$OUT/packing_runs.tgz" --exclude=checkpoints runs/cpt_pretrain runs/cpt_packing 2>/dev/null
}

section_43() {
  say "43. width in bf16 (1 of 2): the LR grid at widths 32-512, seeds 1-3, widened until every optimum is bracketed"
  # One multirun per width, all at once (--concurrent), WIDTH_JOBS runs each. The driver resumes from the
  # runs on disk, so section 46 finishes what this one's time box cut off. WIDTH_SET and WIDTH_JOBS shrink
  # the section to try it on a CPU first.
  local val
  val=$(validation 15 1 +experiment=width_sweep) || return
  step 45 "$PY" -c "$PREPARE" +experiment=width_sweep $val
  step 215 "$PY" tools/experiments/width_experiment.py --stage grid --concurrent --jobs "${WIDTH_JOBS:-4}" \
    --set trainer.precision=$PRECISION trainer.compile=false $val ${WIDTH_SET:-}
  step 25 "$PY" tools/experiments/width_experiment.py --stage fit
}

section_46() {
  say "46. width in bf16 (2 of 2): the grid's rest, the fit, the transfer to width 768 on seeds 4-6, the report"
  local val
  val=$(validation 15 1 +experiment=width_sweep) || return
  local driver=(tools/experiments/width_experiment.py --concurrent --jobs "${WIDTH_JOBS:-4}"
                --set trainer.precision=$PRECISION trainer.compile=false $val ${WIDTH_SET:-})
  step 65 "$PY" "${driver[@]}" --stage grid
  step 25 "$PY" "${driver[@]}" --stage fit
  step 145 "$PY" "${driver[@]}" --stage transfer
  step 45 "$PY" "${driver[@]}" --stage report --out "$OUT" --name width_gpu
  tar -czf "$OUT/width_runs.tgz" --exclude=checkpoints runs/width 2>/dev/null
}

section_44() {
  say "44. MoE in bf16: pretrain (aux loss only), then aux only and L_o + L_v (β = γ from docs/results/moe.json) on seeds 1-3"
  # β = γ is the one the CPU run chose on its tuning seeds (not chosen again here). MOE_PRETRAIN_STEPS,
  # MOE_STEPS and MOE_SET (overrides for every run) shrink the section to try it on a CPU first.
  local beta
  beta=$("$PY" -c "import json; t = json.load(open('docs/results/moe.json'))['tuning']; \
assert t['ortho_loss'] == t['var_loss']; print(t['ortho_loss'])") || { echo "!! no β = γ in docs/results/moe.json"; return; }
  # 30% of the files held out: the modules' share then holds the 1M validation tokens too (10% holds 250k)
  local pre cont
  pre=$(validation 30 1 +experiment=moe_pretrain trainer.max_steps="${MOE_PRETRAIN_STEPS:-1200}") || return
  cont=$(validation 30 1 +experiment=moe_continue trainer.max_steps="${MOE_STEPS:-500}") || return
  step 65 "$PY" tools/experiments/moe_experiment.py --stage pack --set $pre
  step 75 "$PY" pretrain/main.py +experiment=moe_pretrain trainer.precision=$PRECISION trainer.compile=false \
    $pre ${MOE_SET:-} trainer.max_steps="${MOE_PRETRAIN_STEPS:-1200}" checkpoint.interval="${MOE_PRETRAIN_STEPS:-1200}"
  step 105 env PY="$PY" PRECISION="$PRECISION" OUT="$OUT" BETA="$beta" MOE_STEPS="${MOE_STEPS:-500}" \
      MOE_SET="$cont ${MOE_SET:-}" bash -c '
    for coeff in 0 $BETA; do for seed in 1 2 3; do
      timeout -k 5 100 "$PY" pretrain/main.py +experiment=moe_continue model.moe.ortho_loss=$coeff \
        model.moe.var_loss=$coeff seed=$seed trainer.precision=$PRECISION trainer.compile=false \
        trainer.max_steps=$MOE_STEPS $MOE_SET \
        > "$OUT/moe-$coeff-$seed.log" 2>&1 &
    done; done
    wait'
  step 35 "$PY" tools/experiments/moe_report.py runs/moe_continue --pretrained runs/moe_pretrain --out "$OUT" \
    --name moe_gpu
  tar -czf "$OUT/moe_runs.tgz" --exclude=checkpoints runs/moe_pretrain runs/moe_continue 2>/dev/null
}

section_45() {
  say "45. GTA/GLA in bf16: six types at head dim 128, LR tuned per type on seed 100, then seeds 1-3 at each type's rate"
  # The CPU's driver and preset; every run in bf16, ATTN_JOBS of them at once per multirun on the GPU (the
  # compare stage's multiruns, one per chosen rate, all at once). ATTN_SET and ATTN_JOBS shrink the section
  # to try it on a CPU first.
  local val
  val=$(validation 15 1 +experiment=attention_d128) || return
  local driver=(tools/experiments/attention_experiment.py --concurrent --jobs "${ATTN_JOBS:-18}"
                --set trainer.precision=$PRECISION trainer.compile=false $val ${ATTN_SET:-})
  step 55 "$PY" -c "$PREPARE" +experiment=attention_d128 $val
  step 105 "$PY" "${driver[@]}" --stage tune
  step 10 "$PY" "${driver[@]}" --stage report-choice
  step 85 "$PY" "${driver[@]}" --stage compare
  step 20 "$PY" "${driver[@]}" --stage report --out "$OUT" --name attention_gpu
  tar -czf "$OUT/attention_runs.tgz" --exclude=checkpoints runs/attention_d128 2>/dev/null
}

sections=$(declare -F | sed -n 's/^declare -f section_//p' | tr '\n' ' ')
if [ $# = 0 ] || [ "$1" = --list ]; then
  echo "usage: bash tools/gpu_check.sh SECTION... (sections: $sections)"; exit $([ $# = 0 ] && echo 2 || echo 0)
fi
for s in "$@"; do
  declare -F "section_$s" >/dev/null || { echo "keel: no section $s in tools/gpu_check.sh (sections: $sections)" >&2; exit 2; }
done
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
install
for s in "$@"; do "section_$s"; done
say done
