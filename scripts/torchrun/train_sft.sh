#!/usr/bin/env bash
# `megatron-rlhf train-sft` under torchrun: scripts/torchrun/train_sft.sh [train-sft options]
# Environment (NPROC_PER_NODE, NNODES, MASTER_ADDR, MASTER_PORT, RDZV_ID): see run.sh beside it.
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" train-sft "$@"
