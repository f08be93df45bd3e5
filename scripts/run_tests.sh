#!/usr/bin/env bash
# Run the test suite on this machine's CPU, setting up .venv first if needed.
#
#   bash scripts/run_tests.sh [pytest arguments...]
#
# With no arguments pytest runs everything under tests/ (pytest.ini's testpaths); give files,
# node ids or -k/-m expressions to narrow it. Tests marked `gpu` are deselected here (on a GPU
# machine run them with `.venv/bin/python -m pytest -m gpu`). Exit status is pytest's, except that
# a run that collected no test fails: CI must never pass on zero tests. The time spent in each
# tier (unit, distributed, vllm, e2e: markers added by directory, see tests/tiers.py) is printed
# last. While working, `bash scripts/run_tests.sh -m "not slow and not gpu"` runs the quick tier
# (a -m given here replaces the "not gpu" below, so say "not gpu" again).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The vLLM tier (tests/integration, marker `vllm`) runs everywhere the suite runs, CI included.
bash scripts/bootstrap_env.sh --with-vllm

status=0
tier_times="$(mktemp)"
trap 'rm -f "$tier_times"' EXIT
MEGATRON_RLHF_TIER_TIMES="$tier_times" \
  .venv/bin/python -m pytest -m "not gpu" -q -ra --timeout=900 --durations=15 "$@" || status=$?
if [ -s "$tier_times" ]; then
  echo "run_tests: time per tier (set-up + call + tear-down):"
  cat "$tier_times"
fi
if [ "$status" -eq 5 ]; then
  echo "run_tests: error: pytest collected no tests (exit 5); a run with no tests is a failure" >&2
  exit 1
fi
exit "$status"
