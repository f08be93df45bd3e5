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
# last, with the run's wall time. Test modules run in parallel worker processes (pytest-xdist,
# `--dist loadfile`: a module's tests, and the engines and clusters its fixtures start, stay in
# one worker; the longest modules start first, see tests/tiers.py): alone, the integration tier
# leaves a core idle about a third of the time (process start-ups, imports one after another),
# which a second module fills. Workers: MEGATRON_RLHF_TEST_WORKERS if
# set (1: one process, no xdist), else one per core up to one per 8 GiB of available memory,
# at most 4. While working, `bash scripts/run_tests.sh -m "not slow and not gpu"` runs the quick tier
# (a -m given here replaces the "not gpu" below, so say "not gpu" again).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The vLLM tier (tests/integration, marker `vllm`) runs everywhere the suite runs, CI included.
bash scripts/bootstrap_env.sh --with-vllm

workers="${MEGATRON_RLHF_TEST_WORKERS:-}"
if [ -z "$workers" ]; then
  cores="$(nproc)"
  memory_gib=$(( $(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) / 1048576 ))
  workers=$(( cores < memory_gib / 8 ? cores : memory_gib / 8 ))
  workers=$(( workers > 4 ? 4 : workers < 1 ? 1 : workers ))
fi
if ! [[ "$workers" =~ ^[1-9][0-9]*$ ]]; then
  echo "run_tests: error: MEGATRON_RLHF_TEST_WORKERS=$workers is not a positive whole number" >&2
  exit 2
fi
parallel=()
if [ "$workers" -gt 1 ]; then
  parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
fi

status=0
tier_times="$(mktemp)"
trap 'rm -f "$tier_times"' EXIT
MEGATRON_RLHF_TIER_TIMES="$tier_times" \
  .venv/bin/python -m pytest -m "not gpu" -q -ra --timeout=900 --durations=15 "${parallel[@]}" "$@" || status=$?
if [ -s "$tier_times" ]; then
  echo "run_tests: time per tier (set-up + call + tear-down):"
  cat "$tier_times"
fi
if [ "$status" -eq 5 ]; then
  echo "run_tests: error: pytest collected no tests (exit 5); a run with no tests is a failure" >&2
  exit 1
fi
exit "$status"
