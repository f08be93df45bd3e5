#!/usr/bin/env bash
# One Ray node of a Slurm job: `ray start --block` in the foreground of this script, torn down with
# it. Started by scripts/slurm/ray_job.sbatch: directly on the first node (head), and with `srun`
# (one task per node) on the others (worker).
#
#   ray_node.sh head|worker
#
# Reads the environment set by ray_job.sbatch:
#   MRLHF_RAY_CLUSTER     per-job tag and Ray --temp-dir on every node (short path under /tmp);
#                         every process started here inherits it, which is how teardown finds them
#   MRLHF_RAY_HEAD        head address host:port (GCS) (workers)
#   MRLHF_RAY_PORT        GCS port (head)
#   MRLHF_RAY_CLIENT_PORT Ray client server port (head)
#   MRLHF_RAY_NODE_PORT_BASE, MRLHF_RAY_WORKER_PORT_MIN, MRLHF_RAY_SLOT: pinned per-node ports
#                         (module README / ray_job.sbatch header)
#   MRLHF_IFNAME          network interface whose address the node announces
#   MRLHF_RAY_OBJECT_STORE_BYTES  object store size (0: checked against /dev/shm here)
#   MRLHF_HELPER          path of ray_cluster.py;  LOG_DIR  where ray start's output goes
#
# Guarantees: on TERM/INT/exit, the `ray start` it ran is stopped (TERM, then KILL after 20 s) and
# then every process carrying this node's MRLHF_RAY_NODE tag (raylet, workers, vLLM engines) is
# ended by PID; a worker node also removes its Ray temp dir. Never kills by name, never runs
# `ray stop` (that would stop every Ray instance of the machine).
set -uo pipefail

role="${1:?usage: ray_node.sh head|worker}"
: "${MRLHF_RAY_CLUSTER:?set by ray_job.sbatch}" "${MRLHF_HELPER:?set by ray_job.sbatch}"
node="${SLURMD_NODENAME:-$(hostname -s)}"
# Per-node tag: several Slurm nodes may share one host (the local test cluster), and a node's
# teardown must end its own processes only.
export MRLHF_RAY_NODE="$MRLHF_RAY_CLUSTER/$role-$node"
log="${LOG_DIR:-.}/ray-$role-$node.log"
ray_pid=""

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

stop_tree() {  # TERM the ray start, wait, KILL; then end every tagged process of this node by PID
  local pid pids=() deadline
  trap - TERM INT
  if alive "$ray_pid"; then
    kill -TERM "$ray_pid" 2>/dev/null
    deadline=$((SECONDS + 20))
    while alive "$ray_pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
    alive "$ray_pid" && kill -KILL "$ray_pid" 2>/dev/null
  fi
  for _ in 1 2 3; do
    mapfile -t pids < <(python "$MRLHF_HELPER" tagged --var MRLHF_RAY_NODE --tag "$MRLHF_RAY_NODE")
    [ "${#pids[@]}" -gt 0 ] || break
    echo "ray_node($role@$node): ending ${#pids[@]} leftover process(es): ${pids[*]}" >>"$log"
    kill -TERM "${pids[@]}" 2>/dev/null
    sleep 3
    for pid in "${pids[@]}"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
  done
  [ "$role" = worker ] && rm -rf "$MRLHF_RAY_CLUSTER"
}

on_signal() { stop_tree; exit 143; }
trap on_signal TERM INT

hard="$(ulimit -Hn)"
[ "$hard" = unlimited ] && hard=1048576
[ "$(ulimit -Sn)" != unlimited ] && [ "$(ulimit -Sn)" -lt "$hard" ] && ulimit -n "$hard"

slot=$(( (${MRLHF_RAY_SLOT:-0} + ${SLURM_NODEID:-0}) % 8 ))
base=$((MRLHF_RAY_NODE_PORT_BASE + 10 * slot))
worker_min=$((MRLHF_RAY_WORKER_PORT_MIN + 1500 * slot))
read -r _ node_ip < <(python "$MRLHF_HELPER" netif --ifname "${MRLHF_IFNAME:-}") || exit 1
store="$(python "$MRLHF_HELPER" object-store --bytes "${MRLHF_RAY_OBJECT_STORE_BYTES:-0}")" || exit 1

gpus=0
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != NoDevFiles ]; then
  gpus="$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)"
elif command -v nvidia-smi >/dev/null 2>&1; then
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
fi
cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"

args=(--block --disable-usage-stats
  --node-ip-address="$node_ip" --num-cpus="$cpus" --num-gpus="$gpus" --object-store-memory="$store"
  --node-manager-port="$base" --object-manager-port=$((base + 1)) --runtime-env-agent-port=$((base + 2))
  --metrics-export-port=$((base + 3)) --dashboard-agent-grpc-port=$((base + 4))
  --dashboard-agent-listen-port=$((base + 5))
  --min-worker-port="$worker_min" --max-worker-port=$((worker_min + 1499)) --temp-dir="$MRLHF_RAY_CLUSTER")
if [ "$role" = head ]; then
  args+=(--head --include-dashboard=false --port="$MRLHF_RAY_PORT" --ray-client-server-port="$MRLHF_RAY_CLIENT_PORT")
else
  args+=(--address="$MRLHF_RAY_HEAD")
fi
mkdir -p "$MRLHF_RAY_CLUSTER"
echo "ray_node($role@$node): ip=$node_ip cpus=$cpus gpus=$gpus object_store=$store ports=$base..$((base + 5)) workers=$worker_min..$((worker_min + 1499))" >>"$log"
ray start "${args[@]}" >>"$log" 2>&1 &
ray_pid=$!
wait "$ray_pid"
status=$?
echo "ray_node($role@$node): ray start exited with $status" >>"$log"
stop_tree
exit "$status"
