#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying and testing hydra/launcher=slurm.
#
#   scripts/slurm-local.sh up       # install (Debian/Ubuntu, as root) and start; waits for idle
#   eval "$(scripts/slurm-local.sh env)"   # point sinfo/sbatch/squeue of this shell at it
#   scripts/slurm-local.sh status   # sinfo + squeue
#   scripts/slurm-local.sh down     # stop exactly what `up` started
#
# Everything the cluster writes (slurm.conf, controller state, spool, logs, pid files) lives in
# .slurm/ of this checkout (git ignores it), not in /etc/slurm: `down` + `rm -rf .slurm` leaves
# the machine as it was, a real cluster's /etc/slurm/slurm.conf is never shadowed, and each
# checkout's cluster is its own. SLURM's tools find it through SLURM_CONF (`env` prints it;
# jobs inherit it from the shell that submits them).
#
# The node is this machine as `slurmd -C` sees it (its CPUs and memory), no GPUs (no gres):
# CPU jobs (trainer=cpu / ddp_cpu). No accounting daemon (slurmdbd): nanoforge's SLURM launcher
# asks squeue for job states instead of sacct (src/nanoforge/slurm.py).
# Ports: SLURM's defaults 6817/6818, or NANOFORGE_SLURM_PORT (controller; node = +1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${NANOFORGE_SLURM_DIR:-$ROOT/.slurm}"
CONF="$STATE/slurm.conf"
PORT="${NANOFORGE_SLURM_PORT:-6817}"
export SLURM_CONF="$CONF"

say() { echo "slurm-local: $*" >&2; }
die() { say "error: $*"; exit 1; }

install() {
  local missing=()
  for tool in slurmctld slurmd sinfo munged; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null 2>&1 \
      || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: run as root to install slurm-wlm and munge with apt-get"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM (slurmctld, slurmd, client) and munge with your package manager"
  say "installing slurmctld slurmd slurm-client munge (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge >"$STATE/apt.log" 2>&1 \
    || { [ -n "$(find /var/lib/apt/lists -name '*Packages*' 2>/dev/null | head -1)" ] \
         || say "(the package lists are empty: run apt-get update first)"; die "apt-get failed, see $STATE/apt.log"; }
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then
    say "munged already running (left alone)"
    return 0
  fi
  [ -f /etc/munge/munge.key ] || die "no /etc/munge/munge.key: reinstall munge (it creates the key)"
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged did not start (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$STATE/munged.pid"  # ours: `down` stops it
}

write_conf() {
  local host node
  host="$(hostname -s)"
  # NodeName=<host> CPUs=... Boards=... SocketsPerBoard=... CoresPerSocket=... ThreadsPerCore=... RealMemory=...
  node="$(/usr/sbin/slurmd -C | head -1)"
  mkdir -p "$STATE/ctld" "$STATE/spool"
  cat >"$CONF" <<EOF
# written by scripts/slurm-local.sh: a one-node cluster on this machine (no GPUs, no accounting)
ClusterName=nanoforge-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire+1 s before it may start again (default 120 s): 10 s here
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# no cgroups needed: works in containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# jobs may be requeued (preemption, Lightning's auto-requeue)
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# finished jobs stay visible to squeue (their state) for 10 minutes
MinJobAge=600
KillWait=30
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_idle() {
  local host state
  host="$(hostname -s)"
  for _ in $(seq 120); do
    state="$(sinfo -h -n "$host" -o %t 2>/dev/null || true)"
    case "$state" in
      idle*|mix*|alloc*) say "node $host is $state: SLURM is up"; return 0 ;;
    esac
    sleep 0.5
  done
  die "node $host did not become idle (state: ${state:-none}); see $STATE/slurmctld.log and slurmd.log"
}

up() {
  mkdir -p "$STATE"
  install
  if running "$STATE/slurmctld.pid" && running "$STATE/slurmd.pid"; then
    say "already running"; wait_idle; return 0
  fi
  start_munge
  write_conf
  running "$STATE/slurmctld.pid" || /usr/sbin/slurmctld -f "$CONF"
  running "$STATE/slurmd.pid" || /usr/sbin/slurmd -f "$CONF"
  wait_idle
  say "use it from a shell: eval \"\$(scripts/slurm-local.sh env)\""
}

stop() {  # stop the daemon whose pid file is $1, if it runs
  local pidfile="$1" pid
  running "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid="$(cat "$pidfile")"
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$pidfile"
}

down() {
  if [ -f "$CONF" ] && running "$STATE/slurmctld.pid"; then
    scancel --full --quiet --user "$(id -un)" 2>/dev/null || true  # no job outlives its cluster
  fi
  stop "$STATE/slurmd.pid"
  stop "$STATE/slurmctld.pid"
  stop "$STATE/munged.pid"  # only when `up` started it
  say "stopped"
}

status() {
  running "$STATE/slurmctld.pid" || { say "not running"; return 1; }
  sinfo
  squeue
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
