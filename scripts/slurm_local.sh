#!/usr/bin/env bash
# A one-node Slurm cluster on this host, for the tests (tests/test_slurm.py) and for trying the job
# scripts of scripts/slurm/ by hand:
#
#   scripts/slurm_local.sh start        # install if missing (root + apt), start, wait for the node
#   scripts/slurm_local.sh run CMD ...  # start, run CMD with SLURM_CONF set, stop (CMD's exit status)
#   scripts/slurm_local.sh stop         # stop what `start` started, remove its folder
#   scripts/slurm_local.sh env          # the line to source: export SLURM_CONF=...
#
# Everything lives in one folder, $DLLAMA_SLURM_DIR (default /tmp/dllama-slurm): slurm.conf, a munge
# key and socket of its own, state, spool, logs, the job-completion log. Nothing under /etc changes
# and no system service starts: munged, slurmctld and slurmd run from here as root with this folder's
# config; clients find it through SLURM_CONF.
# Config: Debian 12's Slurm 22.05, no cgroups (proctrack/linuxproc, task/none), the host's CPUs and
# memory, one partition `debug`. Accounting without slurmdbd (which needs a database): job states and
# exit codes come from the job-completion log (jobcomp/filetxt), read by `sacct -c` (`sacct` without
# -c needs slurmdbd). KillWait=5: scancel and a time limit send SIGTERM, then SIGKILL 5 s later.
# Ranks beyond the CPUs: `srun --overcommit` / `sbatch --overcommit` (the tests' 4 ranks on 2 cores).
set -euo pipefail
dir="${DLLAMA_SLURM_DIR:-${TMPDIR:-/tmp}/dllama-slurm}"
conf="$dir/slurm.conf"
HEADER="# written by scripts/slurm_local.sh: a one-node test cluster"
sbin=/usr/sbin

say() { echo "slurm_local: $*" >&2; }

install_slurm() {
    [ -x "$sbin/slurmctld" ] && [ -x "$sbin/slurmd" ] && [ -x "$sbin/munged" ] && command -v sbatch >/dev/null \
        && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        say "Slurm is not installed, and installing it needs root and apt-get"; return 1
    fi
    say "installing Debian's slurmctld, slurmd, slurm-client and munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

running() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_config() {
    local host cpus mem port
    # slurmctld on port, slurmd on port + 1: Slurm's own 6817/6818 unless a Slurm of the host has them
    port="${DLLAMA_SLURM_PORT:-6817}"
    while [ -z "${DLLAMA_SLURM_PORT:-}" ] && { listening "$port" || listening $((port + 1)); }; do
        port=$((port + 2))
    done
    host=$(hostname -s)
    cpus=$(nproc --all)
    mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))   # MiB, leave 10 %
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    chmod 700 "$dir" "$dir/munge"
    cat > "$conf" <<EOF
$HEADER
ClusterName=dllama-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
SchedulerType=sched/backfill
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    [ -f "$dir/munge/munge.key" ] || { dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
                                       chmod 400 "$dir/munge/munge.key"; }
}

start() {
    install_slurm
    if running slurmctld && running slurmd; then say "already running ($conf)"; return 0; fi
    write_config
    export SLURM_CONF="$conf"
    running munged || "$sbin/munged" --force --key-file="$dir/munge/munge.key" \
        --socket="$dir/munge/munge.socket" --pid-file="$dir/munged.pid" \
        --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed"
    running slurmctld || "$sbin/slurmctld" -f "$conf" -i
    running slurmd || "$sbin/slurmd" -f "$conf" -N "$(hostname -s)"
    local t=0 state=""
    while :; do   # the node registers within a second or two
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n1 || true)
        [ "$state" = idle ] && break
        if [ $t -ge 300 ]; then
            say "the node is not idle after 30 s (state: ${state:-none}); logs: $dir/*.log"
            tail -n 5 "$dir"/slurmctld.log "$dir"/slurmd.log >&2 || true
            stop; return 1
        fi
        sleep 0.1; t=$((t + 1))
    done
    say "up: node $(hostname -s), $(nproc --all) CPUs, partition debug; export SLURM_CONF=$conf"
}

stop() {
    local d pid jobs
    if running slurmctld; then   # end the jobs first: a job step outlives slurmd
        jobs=$(SLURM_CONF="$conf" squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            SLURM_CONF="$conf" scancel $jobs 2>/dev/null || true
            for _ in $(seq 100); do
                [ -z "$(SLURM_CONF="$conf" squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1
            done
        fi
    fi
    for d in slurmd slurmctld munged; do   # in this order: slurmd first ends the steps it runs
        running "$d" || continue
        pid=$(cat "$dir/$d.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    # a job step still running after slurmd left: the slurmstepd processes of this cluster (they
    # carry its SLURM_CONF), whose tasks then end too
    for p in /proc/[0-9]*; do
        [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] && grep -qsxz "SLURM_CONF=$conf" "$p/environ" \
            && kill -9 "${p#/proc/}" 2>/dev/null || true
    done
    # the folder only when it is ours (DLLAMA_SLURM_DIR could name any folder)
    if [ "$(head -n1 "$conf" 2>/dev/null)" = "$HEADER" ]; then rm -rf "$dir"; fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$conf" ;;
    run)
        shift
        [ $# -gt 0 ] || { say "run: give a command"; exit 2; }
        start
        trap stop EXIT
        SLURM_CONF="$conf" "$@"
        ;;
    *) echo "usage: $0 start|stop|env|run CMD ..." >&2; exit 2 ;;
esac
