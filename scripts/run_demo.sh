#!/usr/bin/env bash
# Run the demo on this machine's CPU, setting up .venv first if needed.
#
#   bash scripts/run_demo.sh [megatron-rlhf demo arguments...]   (see --help)
#
# Runs from the repository root, so relative paths (the default --out outputs/demo included) are
# relative to it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap_env.sh --with-vllm
exec .venv/bin/megatron-rlhf demo "$@"
