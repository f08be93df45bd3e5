# Sourced by the sbatch scripts of scripts/slurm/ (bash): the set-up every job of this project
# shares. Expects MRLHF_ROOT (the checkout) to be set by the caller. Defines:
#
#   PATH                  $MRLHF_VENV/bin first when MRLHF_VENV is set (default: $MRLHF_ROOT/.venv
#                         when it exists), so `megatron-rlhf`, `python`, `ray`, `torchrun` resolve there
#   MRLHF_HELPER          scripts/slurm/ray_cluster.py
#   LOG_DIR               ${MRLHF_LOG_DIR:-$SLURM_SUBMIT_DIR/logs}/<job name>-<job id>/restart-<n>:
#                         one directory per job and per restart (requeue), never overwritten
#   MRLHF_IFNAME, NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, HEAD_IP: the network interface (given, or
#                         the default route's) and the first node's address on it; exported
#   ulimit -n             raised to the hard limit (warned when below 65536)
#
# Guarantees: fails (exit 2) with a message naming the variable when the set-up is impossible
# (no command, interface without an address). Not guaranteed: interface names identical on every
# node (the first node's choice is exported to all).

job_fail() { echo "megatron-rlhf job: error: $*" >&2; exit 2; }

if [ -z "${MRLHF_VENV:-}" ] && [ -x "$MRLHF_ROOT/.venv/bin/python" ]; then MRLHF_VENV="$MRLHF_ROOT/.venv"; fi
if [ -n "${MRLHF_VENV:-}" ]; then
  [ -x "$MRLHF_VENV/bin/python" ] || job_fail "MRLHF_VENV=$MRLHF_VENV has no bin/python"
  export PATH="$MRLHF_VENV/bin:$PATH"
fi
export MRLHF_HELPER="$MRLHF_ROOT/scripts/slurm/ray_cluster.py"
[ -f "$MRLHF_HELPER" ] || job_fail "$MRLHF_HELPER not found (set MRLHF_ROOT to the checkout)"

LOG_DIR="${MRLHF_LOG_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/logs}/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-local}/restart-${SLURM_RESTART_COUNT:-0}"
mkdir -p "$LOG_DIR" || job_fail "cannot create the log directory $LOG_DIR (MRLHF_LOG_DIR)"
export LOG_DIR

hard_nofile="$(ulimit -Hn)"
[ "$hard_nofile" = unlimited ] && hard_nofile=1048576
if [ "$(ulimit -Sn)" != unlimited ] && [ "$(ulimit -Sn)" -lt "$hard_nofile" ]; then
  ulimit -n "$hard_nofile" || echo "megatron-rlhf job: warning: could not raise ulimit -n to $hard_nofile" >&2
fi
if [ "$(ulimit -Sn)" != unlimited ] && [ "$(ulimit -Sn)" -lt 65536 ]; then
  echo "megatron-rlhf job: warning: ulimit -n is $(ulimit -Sn) (< 65536); Ray and NCCL may run out of file descriptors" >&2
fi

read -r MRLHF_IFNAME HEAD_IP < <(python "$MRLHF_HELPER" netif --ifname "${MRLHF_IFNAME:-${NCCL_SOCKET_IFNAME:-}}") \
  || job_fail "no usable network interface (set MRLHF_IFNAME or NCCL_SOCKET_IFNAME)"
[ -n "${HEAD_IP:-}" ] || job_fail "could not read the address of the network interface (python in PATH: $(command -v python))"
export MRLHF_IFNAME HEAD_IP
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$MRLHF_IFNAME}"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$MRLHF_IFNAME}"
