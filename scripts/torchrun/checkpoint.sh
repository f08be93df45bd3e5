#!/usr/bin/env bash
# The checkpoint tools under torchrun, for layouts larger than one process can spawn locally:
#   scripts/torchrun/checkpoint.sh convert-hf|export-hf|verify [options]
# WORLD_SIZE (NNODES x NPROC_PER_NODE) must equal the layout's TP x PP (x EP where it applies).
# Environment (NPROC_PER_NODE, NNODES, MASTER_ADDR, MASTER_PORT, RDZV_ID): see run.sh beside it.
case "${1:-}" in
  convert-hf|export-hf|verify) ;;
  *) echo "checkpoint.sh: error: first argument must be convert-hf, export-hf or verify" >&2; exit 2 ;;
esac
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" "$@"
