#!/usr/bin/env bash
# The one command for a GPU lent for a few minutes (see benchmarks/gpu_check.py for what it runs and writes):
#
#   bash benchmarks/gpu_check.sh --out gpu-check           # on the GPU: everything that fits in --budget_s 420
#   bash benchmarks/gpu_check.sh --dry_run                 # the plan for a GPU with estimated times; runs nothing
#   bash benchmarks/gpu_check.sh --smoke --out /tmp/smoke  # the same on the CPU with tiny models (CI)
#
# Offline: nothing downloads (the models are built from configs). It uses the active Python when that has the
# requirements, else the project's cached virtualenv (examples/venv.sh, which installs requirements.txt only
# the first time, and only where there is a network).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false
python="${PYTHON:-python3}"
needs='import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("torch", "diffusers", "transformers", "peft", "accelerate", "pytest")))'
if ! "$python" -c "$needs" 2>/dev/null; then
  source "$root/examples/venv.sh"
  python=python
fi
# The clone's modules (as examples/venv.sh sets them), also when the active Python is used.
export PYTHONPATH="$root:$root/examples${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$root/benchmarks/gpu_check.py" "$@"
