#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for trying the sbatch scripts and for the tests.
#
#   sudo bash launch/local_slurm.sh start    # install (Debian/Ubuntu) if needed, configure, start; waits for the node
#   sudo bash launch/local_slurm.sh stop
#
# Needs root (slurmd runs jobs as their users) and the Debian packages slurmd slurmctld
# slurm-client munge, installed here when missing (MREM_SLURM_NO_INSTALL=1 refuses instead).
# State, spool and logs live in $MREM_SLURM_DIR (default /tmp/mrem-slurm). Not for production:
# one node, root as SlurmUser, no accounting.
set -euo pipefail

STATE=${MREM_SLURM_DIR:-/tmp/mrem-slurm}
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))

die() { echo "local_slurm.sh: $*" >&2; exit 1; }

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null && return
  [ "${MREM_SLURM_NO_INSTALL:-0}" = 1 ] && die "SLURM is not installed: apt-get install slurmd slurmctld slurm-client munge"
  command -v apt-get >/dev/null || die "no apt-get: install slurmd, slurmctld, slurm-client and munge with your package manager"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmd slurmctld slurm-client munge >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmd slurmctld slurm-client munge >/dev/null; }
}

start() {
  [ "$(id -u)" = 0 ] || die "run as root (slurmd must be able to start jobs as any user)"
  install
  mkdir -p "$STATE"/{spool,state,log} /etc/slurm
  # munge authenticates every SLURM message: a key readable by the munge user only.
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged"
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=mremlocal
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits until the old job's credential expires: 10 s instead of 120 keeps the
# requeue test (and trying the pre-timeout path by hand) short.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "SLURM is up: node $HOST, $CPUS CPUs (state in $STATE)"
      return
    fi
    sleep 1
  done
  die "the node did not become idle in 60 s: see $STATE/log/slurmctld.log and $STATE/log/slurmd.log"
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
  echo "SLURM stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 start|stop" ;;
esac
