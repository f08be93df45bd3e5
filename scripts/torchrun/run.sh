#!/usr/bin/env bash
# Run one SPMD `megatron-rlhf` command under torchrun, on one node or several.
#
#   scripts/torchrun/run.sh COMMAND [ARGS...]
#
# COMMAND is a command that runs its ranks in-process when launched (RANK/WORLD_SIZE set):
# train-sft, train-rm, train-genrm, and the checkpoint tools convert-hf, export-hf, verify (their
# WORLD_SIZE must equal the layout's TP x PP (x DP for the trainings)). The named scripts beside
# this one (train_sft.sh, train_rm.sh, train_genrm.sh, checkpoint.sh) call it.
#
# Environment:
#   NPROC_PER_NODE  ranks per node (default: the GPUs this node sees; required on a CPU machine)
#   NNODES          nodes (default: SLURM_JOB_NUM_NODES under Slurm, else 1)
#   MASTER_ADDR     rendezvous host for several nodes (default: the first node of
#                   SLURM_JOB_NODELIST under Slurm); MASTER_PORT (default 29500, below the
#                   ephemeral range)
#   RDZV_ID         rendezvous id shared by the nodes of one run (default: SLURM_JOB_ID, else
#                   "mrlhf"); every node runs this script with the same values
#   RDZV_IS_HOST    1 on the node whose agent hosts the rendezvous store, 0 on the others
#                   (default: torch decides from MASTER_ADDR and the hostname)
#   MRLHF_VENV      virtualenv to run from (default: <checkout>/.venv when present)
#   TORCHRUN_ARGS   extra torchrun options (e.g. "--max-restarts 1")
#
# One node: torchrun --standalone (a private rendezvous on a free local port). Several nodes:
# the c10d rendezvous at MASTER_ADDR:MASTER_PORT; torchrun assigns the node ranks. The script
# exec's torchrun, so its exit status (non-zero when any rank failed) is the script's, and a
# signal to it reaches torchrun, which stops every rank.
set -euo pipefail

die() { echo "torchrun/run.sh: error: $*" >&2; exit 2; }
[ $# -ge 1 ] || die "usage: $0 COMMAND [ARGS...] (train-sft, train-rm, train-genrm, convert-hf, export-hf, verify)"
case "$1" in
  train-sft|train-rm|train-genrm|convert-hf|export-hf|verify) ;;
  *) die "'$1' does not run SPMD under torchrun (use train-sft, train-rm, train-genrm, convert-hf, export-hf or verify)" ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${MRLHF_VENV:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then MRLHF_VENV="$ROOT/.venv"; fi
[ -z "${MRLHF_VENV:-}" ] || export PATH="$MRLHF_VENV/bin:$PATH"
command -v torchrun >/dev/null || die "torchrun not found in PATH (set MRLHF_VENV)"

nproc="${NPROC_PER_NODE:-}"
if [ -z "$nproc" ]; then
  nproc="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [ "${nproc:-0}" -gt 0 ] || die "NPROC_PER_NODE is not set and no GPU is visible; set NPROC_PER_NODE"
fi
case "$nproc" in ''|*[!0-9]*|0) die "NPROC_PER_NODE must be a positive integer, got '$nproc'" ;; esac
nnodes="${NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
case "$nnodes" in ''|*[!0-9]*|0) die "NNODES must be a positive integer, got '$nnodes'" ;; esac

launch=(--nproc-per-node="$nproc")
if [ "$nnodes" = 1 ]; then
  launch+=(--standalone --nnodes=1)
else
  addr="${MASTER_ADDR:-}"
  if [ -z "$addr" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    addr="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  fi
  [ -n "$addr" ] || die "NNODES=$nnodes needs MASTER_ADDR (the rendezvous host, reachable from every node)"
  launch+=(--nnodes="$nnodes" --rdzv-backend=c10d --rdzv-endpoint="$addr:${MASTER_PORT:-29500}"
    --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-mrlhf}}")
  # Which agent hosts the rendezvous store: RDZV_IS_HOST=1 on exactly one node (the sbatch sets it
  # on the first); unset, torch guesses from the hostname, which fails when MASTER_ADDR is an
  # address the host's name does not resolve to.
  [ -z "${RDZV_IS_HOST:-}" ] || launch+=(--rdzv-conf="is_host=$RDZV_IS_HOST")
fi
# shellcheck disable=SC2086
exec torchrun "${launch[@]}" ${TORCHRUN_ARGS:-} -m megatron_rlhf "$@"
