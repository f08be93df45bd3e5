#!/usr/bin/env bash
# A real single-host Slurm cluster for tests and for trying the launchers on one machine.
#
#   scripts/slurm/local_cluster.sh up   [--dir DIR] [--nodes N] [--cpus C]
#   scripts/slurm/local_cluster.sh down [--dir DIR]
#   scripts/slurm/local_cluster.sh status [--dir DIR]
#
# `up` writes munge key, slurm.conf and state under DIR (default /tmp/mrlhf-slurm; keep it short:
# the munge socket path must fit a Unix socket name), starts a private munged, slurmctld and one
# slurmd per node (N nodes, default 2, on ports picked free at start-up; several slurmd on one host
# need a Slurm built with --enable-multiple-slurmd, as Debian's slurm-wlm is; if the second slurmd
# does not come up the cluster falls back to one node and says so), waits until every node is idle
# and prints the line to use it:
#
#   export SLURM_CONF=DIR/slurm.conf      (also in DIR/env.sh)
#
# Everything runs as root from DIR, outside /etc: the system's munged and Slurm (if any) are never
# touched, and a second cluster in another DIR does not interfere. Nodes declare C CPUs each
# (default: this machine's CPU count; SlurmdParameters=config_overrides lets them declare more),
# no GPUs, proctrack/linuxproc, task/none, select/cons_tres, requeue allowed, KillWait 30 s.
#
# `down` cancels every job, waits for them to end, stops the daemons by the PIDs recorded at `up`
# (TERM, then KILL), then ends by PID any process still tied to DIR (its command line, working
# directory or open files under DIR, or a job process carrying this cluster's SLURM_CONF), so that
# nothing is left running. It never kills by process name. `down` on a cluster that is not up is a
# no-op. DIR is kept (logs under DIR/log) so a failed run can be read afterwards.
#
# Not guaranteed: cgroup limits (none are enforced: proctrack/linuxproc follows the process tree
# only, so a job process that daemonizes away from it is found by `down`'s scan, not by Slurm).
set -euo pipefail

die() { echo "local_cluster: error: $*" >&2; exit 1; }

action="${1:-}"
[ -n "$action" ] || die "usage: $0 up|down|status [--dir DIR] [--nodes N] [--cpus C]"
shift
DIR="${MRLHF_LOCAL_SLURM_DIR:-/tmp/mrlhf-slurm}"
NODES=2
CPUS="$(nproc)"
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --nodes) NODES="$2"; shift 2 ;;
    --cpus) CPUS="$2"; shift 2 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
case "$NODES" in ''|*[!0-9]*|0) die "--nodes must be a positive integer, got '$NODES'" ;; esac
case "$CPUS" in ''|*[!0-9]*|0) die "--cpus must be a positive integer, got '$CPUS'" ;; esac
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
CONF="$DIR/slurm.conf"
PIDS="$DIR/pids"          # one "role pid" line per daemon started by `up`
export SLURM_CONF="$CONF"

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

free_ports() {  # free_ports N: N distinct TCP ports free now, below the ephemeral range
  python3 - "$1" <<'PYEOF'
import random, socket, sys
wanted, found = int(sys.argv[1]), []
candidates = list(range(20000, 30000))
random.shuffle(candidates)
for port in candidates:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            continue
    found.append(port)
    if len(found) == wanted:
        break
print(" ".join(map(str, found)))
PYEOF
}

start_daemon() {  # start_daemon ROLE LOGFILE CMD...: detached (own session), PID recorded
  local role="$1" logfile="$2"
  shift 2
  setsid "$@" </dev/null >>"$logfile" 2>&1 &
  echo "$role $!" >>"$PIDS"
}

write_conf() {  # write_conf NODES: slurm.conf for NODES nodes on this host
  local nodes="$1" host ctl_port i
  host="$(hostname -s)"
  read -r -a ports <<<"$(free_ports $((nodes + 1)))"
  [ "${#ports[@]}" -eq $((nodes + 1)) ] || die "could not find $((nodes + 1)) free ports"
  ctl_port="${ports[0]}"
  {
    echo "# written by scripts/slurm/local_cluster.sh up; removed state is rebuilt at the next up"
    echo "ClusterName=mrlhf-local"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmctldPort=$ctl_port"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=socket=$DIR/munge/munge.socket"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    echo "SlurmctldDebug=info"
    echo "SlurmdDebug=info"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SchedulerType=sched/backfill"
    echo "SwitchType=switch/none"
    echo "MpiDefault=none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "SlurmdParameters=config_overrides"
    echo "ReturnToService=2"
    echo "JobRequeue=1"
    echo "KillWait=30"
    echo "MinJobAge=300"
    echo "SlurmdTimeout=60"
    echo "InactiveLimit=0"
    for ((i = 1; i <= nodes; i++)); do
      echo "NodeName=node$i NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[$i]} CPUs=$CPUS State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } >"$CONF"
}

wait_idle() {  # wait_idle NODES SECONDS: true when NODES nodes are idle
  local nodes="$1" deadline=$((SECONDS + $2)) idle
  while [ "$SECONDS" -lt "$deadline" ]; do
    idle="$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" || idle=0
    [ "$idle" -ge "$nodes" ] && return 0
    sleep 1
  done
  return 1
}

# PIDs of processes tied to DIR (see the header), never this script nor its ancestors.
cluster_processes() {
  python3 - "$DIR" "$CONF" $$ <<'PYEOF'
import os, sys
root, conf, me = sys.argv[1], sys.argv[2], int(sys.argv[3])
mine = {me, os.getpid()}
pid = me
while pid > 1:  # ancestors of the calling script
    try:
        with open(f"/proc/{pid}/stat") as stat:
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        break
    mine.add(pid)
under = lambda path: path == root or path.startswith(root + "/")
for entry in os.listdir("/proc"):
    if not entry.isdigit() or int(entry) in mine:
        continue
    base = f"/proc/{entry}"
    try:
        argv = open(f"{base}/cmdline", "rb").read().split(b"\0")
        if any(under(arg.decode(errors="replace").split("=", 1)[-1]) for arg in argv if arg):
            print(entry); continue
        if under(os.readlink(f"{base}/cwd")):
            print(entry); continue
        if any(under(os.readlink(f"{base}/fd/{fd}")) for fd in os.listdir(f"{base}/fd")):
            print(entry); continue
        env = open(f"{base}/environ", "rb").read().split(b"\0")
        if f"SLURM_CONF={conf}".encode() in env and any(item.startswith(b"SLURM_JOB_ID=") for item in env):
            print(entry)
    except OSError:
        continue
PYEOF
}

stop_pids() {  # stop_pids SECONDS PID...: TERM, wait up to SECONDS, then KILL
  local grace="$1" pid deadline left
  shift
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  deadline=$((SECONDS + grace))
  while [ "$SECONDS" -lt "$deadline" ]; do
    left=0
    for pid in "$@"; do alive "$pid" && left=1; done
    [ "$left" = 0 ] && return 0
    sleep 0.5
  done
  for pid in "$@"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
}

cluster_down() {
  local pids=() role pid jobs
  if [ -f "$PIDS" ]; then
    while read -r role pid; do
      if [ "$role" = slurmctld ] && alive "$pid"; then
        jobs="$(squeue -h -o '%A' 2>/dev/null || true)"
        if [ -n "$jobs" ]; then
          # shellcheck disable=SC2086
          scancel $jobs 2>/dev/null || true
          for _ in $(seq 1 90); do
            [ -z "$(squeue -h -o '%A' 2>/dev/null || true)" ] && break
            sleep 1
          done
        fi
      fi
    done <"$PIDS"
    # slurmd first, then slurmctld, munged last (the others authenticate through it)
    for role in slurmd slurmctld munged; do
      pids=()
      while read -r r pid; do [ "$r" = "$role" ] && alive "$pid" && pids+=("$pid"); done <"$PIDS"
      stop_pids 15 "${pids[@]}"
    done
    rm -f "$PIDS"
  fi
  mapfile -t pids < <(cluster_processes)
  if [ "${#pids[@]}" -gt 0 ]; then
    echo "local_cluster: ending ${#pids[@]} leftover process(es) of $DIR: ${pids[*]}" >&2
    stop_pids 10 "${pids[@]}"
  fi
}

cluster_up() {
  local role pid nodes="$NODES" i
  if [ -f "$PIDS" ]; then
    while read -r role pid; do
      alive "$pid" && die "a cluster is already up in $DIR ($role pid $pid); run '$0 down --dir $DIR' first"
    done <"$PIDS"
  fi
  command -v slurmctld >/dev/null && command -v munged >/dev/null \
    || die "slurmctld/munged not found: install Debian's slurm-wlm and munge (scripts/bootstrap_env.sh does)"
  [ "$(id -u)" = 0 ] || die "the local cluster runs slurmd as root; run as root"
  rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/munge"
  mkdir -p "$DIR/state" "$DIR/run" "$DIR/log" "$DIR/munge"
  for ((i = 1; i <= nodes; i++)); do mkdir -p "$DIR/spool/node$i"; done
  chmod 700 "$DIR/munge"
  : >"$PIDS"
  trap 'cluster_down' ERR

  # munged refuses a key readable by others and directories writable by others: key 0400 in 0700
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  start_daemon munged "$DIR/log/munged.out" munged --foreground --force \
    --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  for _ in $(seq 1 50); do [ -S "$DIR/munge/munge.socket" ] && break; sleep 0.2; done
  [ -S "$DIR/munge/munge.socket" ] || die "munged did not start (see $DIR/log/munged.log)"

  write_conf "$nodes"
  start_daemon slurmctld "$DIR/log/slurmctld.out" slurmctld -D -i -f "$CONF"
  for ((i = 1; i <= nodes; i++)); do
    start_daemon slurmd "$DIR/log/slurmd-node$i.out" slurmd -D -N "node$i" -f "$CONF"
  done
  if ! wait_idle "$nodes" 60; then
    if [ "$nodes" -gt 1 ]; then
      echo "local_cluster: $nodes slurmd on one host did not come up (Slurm without multiple-slurmd?);" \
        "falling back to one node (see $DIR/log)" >&2
      trap - ERR
      cluster_down
      NODES=1
      cluster_up
      return
    fi
    die "slurm did not become idle within 60 s (see $DIR/log)"
  fi
  trap - ERR
  echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
  echo "local_cluster: up with $nodes node(s) x $CPUS CPUs in $DIR" >&2
  echo "export SLURM_CONF=$CONF"
}

case "$action" in
  up) cluster_up ;;
  down) cluster_down; echo "local_cluster: down ($DIR)" >&2 ;;
  status)
    [ -f "$CONF" ] || die "no cluster in $DIR"
    sinfo -N -o '%N %T %c' ;;
  *) die "unknown action '$action' (up, down or status)" ;;
esac
