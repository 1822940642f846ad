#!/usr/bin/env bash
# The GPU check in one command, on a fresh GPU machine with only the project installed:
#
#   bash experiments/gpu_check.sh                  # writes gpu-check-<UTC time>.json here, within 8 minutes
#   bash experiments/gpu_check.sh --out FILE.json  # or name the file (an existing one is refused)
#   bash experiments/gpu_check.sh --dry-run        # the same parts at tiny sizes on the CPU (the tests run this)
#
# What it measures and the goals it compares with: rayssl/bench/gpu_check.py and docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m rayssl gpu-check "$@"
