#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the `slurm`-marked tests and for trying
# `mefbench sweep --executor slurm` without a cluster.
#
#   bash scripts/slurm-local.sh start    install SLURM (Debian's slurm-wlm daemons and client) and
#                                        munge with apt-get if missing, write
#                                        /etc/slurm/slurm.conf, start munged, slurmctld, slurmd
#                                        and wait until sinfo shows the node idle
#   bash scripts/slurm-local.sh stop     stop the three daemons this script started
#   bash scripts/slurm-local.sh status   sinfo and squeue, or why the cluster is not reachable
#
# Needs root and Debian (apt-get); `start` exits 3 with a one-line reason where either is
# missing, so that a caller can skip what needs the cluster and say why. The node is this host
# (CPUs from nproc, RealMemory from /proc/meminfo less 2 GiB of headroom), one partition
# `local`, proctrack/linuxproc and task/none (no cgroups needed), no accounting database
# (`sacct` is not available; squeue is). An existing slurm.conf that this script did not write
# is never replaced. Daemons' logs and state: $MEFBENCH_SLURM_DIR (default /tmp/mefbench-slurm).
set -euo pipefail

state_dir="${MEFBENCH_SLURM_DIR:-/tmp/mefbench-slurm}"
conf=/etc/slurm/slurm.conf
marker="# written by mefbench scripts/slurm-local.sh"
partition=local

say() { echo "slurm-local: $*"; }

reachable() { timeout 10 sinfo -h >/dev/null 2>&1; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        say "cannot start a local SLURM cluster: slurm-wlm is not installed and this is not root"
        exit 3
    fi
    if ! command -v apt-get >/dev/null; then
        say "cannot start a local SLURM cluster: slurm-wlm is not installed and there is no apt-get (not Debian)"
        exit 3
    fi
    # slurm-wlm's daemons and client without its optional plugins (hdf5, influxdb, mysql, ...)
    local packages="slurmctld slurmd slurm-client munge"
    say "installing $packages with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || true  # a stale list still installs; a missing one fails below
    # shellcheck disable=SC2086
    if ! apt-get install -y -qq --no-install-recommends $packages >"$state_dir/apt.log" 2>&1; then
        tail -5 "$state_dir/apt.log" >&2
        say "cannot start a local SLURM cluster: apt-get install $packages failed (log: $state_dir/apt.log)"
        exit 3
    fi
}

write_conf() {
    local host cpus mem_mb
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 2048))
    [ "$mem_mb" -ge 512 ] || mem_mb=512
    if [ -e "$conf" ] && ! grep -qF "$marker" "$conf"; then
        say "cannot start a local SLURM cluster: $conf exists and was not written by this script; left as it is"
        exit 3
    fi
    mkdir -p /etc/slurm "$state_dir/ctld" "$state_dir/d"
    cat >"$conf" <<EOF
$marker: a single-node test cluster; \`bash scripts/slurm-local.sh stop\` stops it
ClusterName=mefbench-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmctldParameters=preempt_send_user_signal
MinJobAge=3600
KillWait=30
StateSaveLocation=$state_dir/ctld
SlurmdSpoolDir=$state_dir/d
SlurmctldPidFile=$state_dir/slurmctld.pid
SlurmdPidFile=$state_dir/slurmd.pid
SlurmctldLogFile=$state_dir/slurmctld.log
SlurmdLogFile=$state_dir/slurmd.log
DefMemPerCPU=$((mem_mb / cpus))
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$partition Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- munged
    cp /run/munge/munged.pid "$state_dir/munged.pid" 2>/dev/null || true  # stop ends only a munged started here
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    say "munged did not come up"
    exit 1
}

node_state() { sinfo -h -n "$(hostname -s)" -o %T 2>/dev/null | head -1; }

cmd_start() {
    mkdir -p "$state_dir"
    if reachable && [ "$(node_state)" = idle ]; then
        say "already running: $(sinfo -h -o '%P %D %T %c' | head -1)"
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        say "cannot start a local SLURM cluster: not root (munged, slurmctld and slurmd need root here)"
        exit 3
    fi
    install
    write_conf
    start_munge
    pkill_pidfile "$state_dir/slurmd.pid"
    pkill_pidfile "$state_dir/slurmctld.pid"
    slurmctld -c -i  # -c: a clean state (no jobs of an earlier start); -i: ignore state it cannot read
    slurmd
    local deadline=$((SECONDS + 120)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state="$(node_state || true)"
        case "$state" in
            idle) say "running: partition $partition, node $(hostname -s), $(nproc) CPUs (logs: $state_dir)"; return 0 ;;
            down* | drain*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    say "the node did not become idle within 120 s (last state: ${state:-none}); see $state_dir/*.log"
    tail -5 "$state_dir/slurmctld.log" "$state_dir/slurmd.log" >&2 || true
    exit 1
}

# kill the daemon whose pid a pid file names (only if that pid is still that daemon: pids are
# reused), and wait for it to end
pkill_pidfile() {
    local pid name
    [ -s "$1" ] || return 0
    pid="$(cat "$1")"
    name="$(basename "$1" .pid)"
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] && kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$1"
}

cmd_stop() {
    if [ -s "$state_dir/slurmctld.pid" ] && command -v scancel >/dev/null; then
        timeout 10 scancel --user="$(id -un)" >/dev/null 2>&1 || true  # no job outlives the cluster
    fi
    pkill_pidfile "$state_dir/slurmd.pid"
    pkill_pidfile "$state_dir/slurmctld.pid"
    pkill_pidfile "$state_dir/munged.pid"
    say "stopped"
}

cmd_status() {
    if reachable; then
        sinfo
        squeue
    else
        say "no SLURM cluster reachable (sinfo failed)"
        exit 1
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 {start|stop|status}" >&2
        exit 2
        ;;
esac
