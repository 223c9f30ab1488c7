#!/usr/bin/env bash
# The SLURM checks (.ci/slurm_check.py) on a real cluster; not part of `make test` or CI.
#   bash .ci/slurm_check.sh
# Uses the cluster `sinfo` answers from; where none does, and as root on Debian/Ubuntu, installs
# slurm-wlm and munge and starts a one-node cluster on this host (slurm.conf written only where none
# exists): munged, slurmctld and slurmd started by hand (no systemd needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

if ! sinfo -h >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "no SLURM cluster answers and this is not root: cannot start one" >&2; exit 1; }
  command -v slurmctld >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
  host=$(hostname -s)
  if [ ! -e /etc/slurm/slurm.conf ]; then
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
    mkdir -p /etc/slurm
    cat > /etc/slurm/slurm.conf <<EOF
ClusterName=xnorpp-check
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  fi
  mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
  chown munge:munge /run/munge
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 30); do sinfo -h >/dev/null 2>&1 && break; sleep 1; done
fi
sinfo
export WANDB_MODE=offline WANDB_SILENT=true
"$PY" .ci/slurm_check.py
