#!/usr/bin/env bash
# A one-machine SLURM cluster, to try the submitit launcher (and to test it): one node named
# after this host with all its CPUs, one partition `debug`, no accounting daemon.
#
#   scripts/slurm_local.sh start    # write /etc/slurm/slurm.conf, start munged, slurmctld, slurmd
#   scripts/slurm_local.sh status   # the daemons, sinfo and squeue
#   scripts/slurm_local.sh stop     # stop the daemons (queued jobs are kept in the state folder)
#
# Needs root and Debian's packages: apt-get install -y slurm-wlm munge. Every command is
# idempotent: `start` on a running cluster leaves it running. State and logs go to
# $SLURM_LOCAL_DIR (default /var/lib/deflect-slurm). A slurm.conf this script did not write is
# never overwritten: on a real cluster, use the cluster.
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/var/lib/deflect-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by deflect scripts/slurm_local.sh"
HOST=$(hostname -s)

need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "slurm_local.sh: $1 not found: install SLURM with: apt-get install -y slurm-wlm munge" >&2
        exit 1
    fi
}

alive() {  # alive <pid file>: the process it names is running
    [[ -f $1 ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        echo "slurm_local.sh: $CONF exists and was not written by this script; leaving it" >&2
        return
    fi
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
    cat >"$CONF" <<EOF
$MARK
ClusterName=deflect-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# No cgroups (containers and laptops rarely delegate them): processes are tracked through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# No slurmdbd: sacct has nothing to show, so job states come from squeue and the run folders.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Quick turnaround on one machine: no waiting between a job's end and the next start.
SchedulerParameters=defer_batch=0
MinJobAge=300
KillWait=10
# Job arrays above this many tasks are refused by sbatch (SLURM's default).
MaxArraySize=1001
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start() {
    need slurmctld
    need munged
    write_conf
    mkdir -p /run/munge "$STATE"
    chown munge:munge /run/munge 2>/dev/null || true
    if ! pgrep -x munged >/dev/null; then
        [[ -f /etc/munge/munge.key ]] || mungekey --create
        # Root only when it must: munged refuses root unless forced, and runs as munge if it can.
        if id munge >/dev/null 2>&1; then
            chown munge:munge /etc/munge/munge.key /var/lib/munge /var/log/munge 2>/dev/null || true
            su -s /bin/sh munge -c munged 2>/dev/null || munged --force
        else
            munged --force
        fi
    fi
    if ! alive "$STATE/slurmctld.pid"; then
        slurmctld
    fi
    if ! alive "$STATE/slurmd.pid"; then
        slurmd
    fi
    for _ in $(seq 60); do  # until the node takes jobs
        if sinfo -h -N -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            scontrol show config | awk '/^SLURM_VERSION/ {print "slurm_local.sh: SLURM " $3 " up on " h}' h="$HOST"
            return 0
        fi
        sleep 1
    done
    echo "slurm_local.sh: the node did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
    sinfo -N -l >&2 || true
    exit 1
}

stop() {
    local name
    for name in slurmd slurmctld; do
        if alive "$STATE/$name.pid"; then
            kill "$(cat "$STATE/$name.pid")"
            for _ in $(seq 30); do
                alive "$STATE/$name.pid" || break
                sleep 0.5
            done
        fi
    done
    echo "slurm_local.sh: stopped (munged left running: other programs may use it)"
}

status() {
    local name
    for name in slurmctld slurmd; do
        if alive "$STATE/$name.pid"; then
            echo "$name: running (pid $(cat "$STATE/$name.pid"))"
        else
            echo "$name: stopped"
        fi
    done
    if pgrep -x munged >/dev/null; then echo "munged: running"; else echo "munged: stopped"; fi
    if alive "$STATE/slurmctld.pid"; then
        sinfo
        squeue
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
