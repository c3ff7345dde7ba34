#!/usr/bin/env bash
# Runs every benchmark and rewrites its section of benchmarks/RESULTS.md. About 15 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY benchmarks/trial_vs_plain.py
$PY benchmarks/mfu.py
$PY benchmarks/latency.py
$PY benchmarks/pruning.py
$PY benchmarks/replayed_views.py
