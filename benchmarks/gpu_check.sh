#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py says what it runs):
#   bash benchmarks/gpu_check.sh [OUT] [--record] [--stages a,b] [--budget SECONDS]
#   bash benchmarks/gpu_check.sh OUT --cpu-smoke         # tiny sizes on a CPU, as CI runs it
# OUT defaults to $OUT, the output folder of a device machine. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
