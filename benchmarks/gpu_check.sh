#!/usr/bin/env bash
# One GPU run that checks and measures nanoseek on CUDA (see benchmarks/gpu_check.py):
#   bash benchmarks/gpu_check.sh --out gpu_check.md          # ~5 minutes on one H100 (--sections to pick; compile, train16, train_ac, train_fused opt-in)
#   bash benchmarks/gpu_check.sh --dry-run --out dry.md      # toy sizes on the CPU (the default without a GPU)
# Installs nothing: nanoseek runs from src/ against the torch (>= 2.4) and transformers already installed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
