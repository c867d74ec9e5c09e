#!/usr/bin/env bash
# keel's checks on a lent NVIDIA GPU (bf16, nccl):   bash tools/gpu_check.sh SECTION [SECTION...]
#   bash tools/gpu_check.sh --list    the sections (triage first), with what each checks
#   bash tools/gpu_check.sh --help    the settings, and how to try a section on a CPU first
# The sections, their time-boxed steps and the settings (PY, OUT, PRECISION, TIME_SCALE, REHEARSAL,
# VAL_TOKENS, KEEL_REVISION, each section's knobs) are tools/gpu_check.py's; this runs it with $PY from the
# repository root. Its first step installs the carried wheels (.whl), before any step imports keel's dependencies.
cd "$(dirname "$0")/.." && exec "${PY:-python3}" -m tools.gpu_check "$@"
