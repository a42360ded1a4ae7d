#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py, issue 18) on a bare machine: a venv with the project installed from the
# repository's constraints (torch==2.14.1; on x86_64 Linux pip's torch wheel is the CUDA build), then the script with
# the arguments given; it writes gpu_check.json / gpu_check.md to --out, default $OUT when set.
#
#   bash benchmarks/gpu_check.sh --install-only                  # the install alone (minutes: torch + CUDA wheels)
#   bash benchmarks/gpu_check.sh --out "$OUT"                     # the GPU run (--budget-seconds 420 by default)
#   bash benchmarks/gpu_check.sh --out "$OUT" --models sd35       # SD3.5-medium alone (about 4-5 min)
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu_check   # tiny models on CPU, seconds
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GPU_CHECK_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -c constraints.txt -e .   # quick when already satisfied
if [ "${1:-}" = "--install-only" ]; then exit 0; fi
exec "$venv/bin/python" benchmarks/gpu_check.py "$@"
