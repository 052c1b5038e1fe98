#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for development and tests.
#
#   bash slurm/local-cluster.sh up          install (first time), start, wait until usable
#   bash slurm/local-cluster.sh status      daemons, nodes, partitions, accounting; exit 0 when usable
#   bash slurm/local-cluster.sh down        stop the daemons (state and jobs kept)
#   bash slurm/local-cluster.sh purge       down, then delete slurm/state/
#   bash slurm/local-cluster.sh set-grace S set GraceTime of the preemptible partitions, live
#
# Root on Debian 12, no systemd needed: munged, mariadbd, slurmdbd, slurmctld and two slurmd
# (`slurmd -N n1`, `slurmd -N n2`) are started directly. Everything they write lives in
# slurm/state/ beside this script; /etc/slurm/slurm.conf becomes a link to slurm/state/etc/slurm.conf
# so that sbatch, sinfo, sacct ... find the cluster without SLURM_CONF.
#
# Environment (read by `up`; a changed value restarts the Slurm daemons):
#   GRACE_TIME=30     GraceTime (s) of partitions cpu and gpu: USR2 at preemption, SIGTERM this much later
#   CRED_EXPIRE=30    Slurm's credential lifetime (Slurm's default: 120); a requeued job is held this
#                     long (+1 s) before it may run again. Short here so that requeue tests wait less.
#   KILL_WAIT=10      seconds between SIGTERM and SIGKILL when a job is stopped
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
STATE="$SCRIPT_DIR/state"
ETC="$STATE/etc"
LOG="$STATE/log"
CONF="$ETC/slurm.conf"
# Unix socket paths are limited to 107 bytes; a deep clone puts its sockets and pid files in /tmp.
if (( ${#STATE} <= 70 )); then
    RUN="$STATE/run"
else
    RUN="/tmp/amodal-slurm-$(printf '%s' "$STATE" | md5sum | cut -c1-10)"
fi

CLUSTER=amodal
CTLD_PORT=6817
DBD_PORT=6819
NODE_PORTS=(6821 6822)
NODES=(n1 n2)
DB_PORT=3316
GRACE_TIME=${GRACE_TIME:-30}
CRED_EXPIRE=${CRED_EXPIRE:-30}
KILL_WAIT=${KILL_WAIT:-10}
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server mariadb-client iproute2)
NEEDED_COMMANDS=(slurmctld slurmd slurmdbd sinfo sbatch srun sacct sacctmgr scontrol munged
                 mariadbd mariadb-install-db mariadb mariadb-admin ss)
T0=$(date +%s)

say() { printf '[local-cluster %3ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { printf 'local-cluster: ERROR: %s\n' "$*" >&2; exit 1; }

# Print the last lines of a log file to stderr (for failures).
log_tail() {
    local f=$1
    if [[ -s $f ]]; then
        printf -- '--- last lines of %s ---\n' "$f" >&2
        tail -n "${2:-25}" "$f" >&2
        printf -- '---\n' >&2
    else
        printf -- '(log %s is empty or missing)\n' "$f" >&2
    fi
}

fail_with_logs() {  # message, then log files
    local msg=$1; shift
    printf 'local-cluster: ERROR: %s\n' "$msg" >&2
    local f; for f in "$@"; do log_tail "$f"; done
    exit 1
}

# wait_for SECONDS CMD...: retry CMD (quietly) every 0.5 s until it succeeds or time runs out.
wait_for() {
    local limit=$1; shift
    local end=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        (( $(date +%s) < end )) || return 1
        sleep 0.5
    done
}

need_root() { [[ $(id -u) == 0 ]] || die "run as root (the cluster's daemons and its jobs run as root)"; }

# ---------------------------------------------------------------- processes

pid_alive() { [[ -n ${1:-} && -d /proc/$1 ]]; }

# pid_from FILE NAME: the pid in FILE if that process is alive and is called NAME.
pid_from() {
    local file=$1 name=$2 pid
    [[ -r $file ]] || return 1
    pid=$(tr -dc '0-9' < "$file")
    pid_alive "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
    echo "$pid"
}

# stop_pids WHAT PID...: SIGTERM to all, wait up to 30 s for them (a slurmd waits for its ending
# jobs), then SIGKILL.
stop_pids() {
    local what=$1 i pid left; shift
    (( $# )) || return 0
    kill -TERM "$@" 2>/dev/null || true
    for i in $(seq 120); do
        left=(); for pid in "$@"; do pid_alive "$pid" && left+=("$pid"); done
        (( ${#left[@]} )) || { say "stopped $what (pid $*)"; return 0; }
        sleep 0.25
    done
    kill -KILL "${left[@]}" 2>/dev/null || true
    sleep 0.5
    say "killed $what (pid ${left[*]}) after 30 s"
}

# The daemons, their pid files and process names, in start order.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd-n1 slurmd-n2)
pidfile_of() {
    case $1 in
        slurmd-*) echo "$RUN/slurmd-${1#slurmd-}.pid" ;;
        *) echo "$RUN/$1.pid" ;;
    esac
}
comm_of() { case $1 in slurmd-*) echo slurmd ;; *) echo "$1" ;; esac; }
daemon_pid() { pid_from "$(pidfile_of "$1")" "$(comm_of "$1")"; }

# proc_args PID: its command line and its SLURM_CONF, on one line (empty when it is gone).
proc_args() {
    [[ -n ${1:-} ]] || return 0
    { tr '\0' ' ' < "/proc/$1/cmdline"; tr '\0' '\n' < "/proc/$1/environ" | grep '^SLURM_CONF='; } 2>/dev/null || true
}
is_ours() { [[ $1 == *[=\ ]"$STATE/"* || $1 == *[=\ ]"$RUN/"* ]]; }

# Daemons of another checkout's cluster (or of a system-wide Slurm) hold our ports and would
# answer our commands: stop them. Ours mention $STATE in their command line or environment.
stop_foreign_daemons() {
    local kind p pid comm args
    # Clients of a daemon go first: slurmd, slurmctld, slurmdbd, then the database and munge.
    for kind in slurmd slurmctld slurmdbd mariadbd munged; do
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        comm=$(cat "$p/comm" 2>/dev/null) || continue
        [[ $comm == "$kind" ]] || continue
        args=$(proc_args "$pid")
        # No command line: a zombie, or a daemon's child between fork and exec; leave it.
        [[ -n $args ]] || continue
        is_ours "$args" && continue
        # A child of one of our daemons (slurmd forks to start job steps) is ours too.
        is_ours "$(proc_args "$(awk '{print $4}' "$p/stat" 2>/dev/null)")" && continue
        case $comm in
            munged|mariadbd)
                # A system munge or database does not get in our way; another checkout's does (ports).
                [[ $args == */slurm/state/* || $args == */amodal-slurm-* ]] || continue ;;
        esac
        say "stopping $comm (pid $pid) that belongs to another cluster: $args"
        stop_pids "$comm" "$pid"
    done
    done
}

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# ---------------------------------------------------------------- install

install_packages() {
    local missing=() c
    for c in "${NEEDED_COMMANDS[@]}"; do
        command -v "$c" >/dev/null 2>&1 || [[ -x /usr/sbin/$c ]] || missing+=("$c")
    done
    if (( ${#missing[@]} == 0 )); then return 0; fi
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install ${PACKAGES[*]} by hand"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # Keep the packages' maintainer scripts from starting system-wide daemons of their own.
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
    } > "$LOG/apt.log" 2>&1 || rc=$?
    (( made_policy )) && rm -f /usr/sbin/policy-rc.d
    (( rc == 0 )) || fail_with_logs "apt-get failed (exit $rc)" "$LOG/apt.log"
    say "packages installed"
}

# ---------------------------------------------------------------- configuration

ensure_hosts() {
    # Jobs learn their peers as node names (SLURM_JOB_NODELIST=n[1-2]); these must resolve.
    local n missing=()
    for n in "${NODES[@]}"; do getent hosts "$n" >/dev/null || missing+=("$n"); done
    if (( ${#missing[@]} )); then
        printf '127.0.0.1 %s  # amodal slurm/local-cluster.sh\n' "${missing[*]}" >> /etc/hosts
        say "added ${missing[*]} to /etc/hosts"
    fi
}

# Write FILE from stdin only when its content changes; return 0 if it changed.
write_if_changed() {
    local file=$1 mode=$2 tmp
    tmp=$(mktemp "$file.XXXXXX")
    cat > "$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then rm -f "$tmp"; return 1; fi
    mv -f "$tmp" "$file"
    return 0
}

CONF_CHANGED=0
write_configs() {
    [[ $GRACE_TIME =~ ^[0-9]+$ ]] || die "GRACE_TIME=$GRACE_TIME: expected whole seconds"
    [[ $CRED_EXPIRE =~ ^[0-9]+$ ]] && (( CRED_EXPIRE >= 10 )) || die "CRED_EXPIRE=$CRED_EXPIRE: expected seconds >= 10"
    [[ $KILL_WAIT =~ ^[0-9]+$ ]] || die "KILL_WAIT=$KILL_WAIT: expected whole seconds"
    local cpus mem host pass
    cpus=$(nproc)
    # Both nodes share this machine's memory; each claims 40% so the two do not claim more than all.
    mem=$(awk '/^MemTotal:/ {m = int($2 / 1024 * 0.4); if (m > 16000) m = 16000; print m}' /proc/meminfo)
    host=$(hostname -s)
    [[ -s $ETC/db.pass ]] || (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$ETC/db.pass")
    pass=$(cat "$ETC/db.pass")

    write_if_changed "$CONF" 644 <<EOF && CONF_CHANGED=1 || true
# Generated by slurm/local-cluster.sh; edits are overwritten by \`up\`.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again.
AuthInfo=socket=$RUN/munge.sock,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No usable cgroups in containers: track job processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=$KILL_WAIT
MinJobAge=300
InactiveLimit=0
# Look at pending jobs often: this cluster is tiny and tests wait on it.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
# Cores are the unit: two 1-CPU jobs share a node; a job that wants a whole node uses --exclusive.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# Connections to slurmdbd take their munge socket from here, not from AuthInfo.
AccountingStoragePass=$RUN/munge.sock
JobCompType=jobcomp/none
MailProg=/bin/true
# Two slurmd share the machine's cores: trust the CPU and memory figures below.
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=${NODE_PORTS[0]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=${NODE_PORTS[1]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
# cpu (default) and gpu: low priority, preemptible. gpu is only a name here (no GPUs) so that
# commands written for a GPU cluster (--partition gpu) run unchanged. high preempts both.
PartitionName=cpu Nodes=n1,n2 Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=n1,n2 PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME MaxTime=INFINITE State=UP
PartitionName=high Nodes=n1,n2 PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP
EOF

    # slurmdbd insists on mode 600 for its file (it holds the database password).
    write_if_changed "$ETC/slurmdbd.conf" 600 <<EOF && CONF_CHANGED=1 || true
# Generated by slurm/local-cluster.sh; edits are overwritten by \`up\`.
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$RUN/munge.sock
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF

    write_if_changed "$ETC/my.cnf" 644 <<EOF || true
# Generated by slurm/local-cluster.sh: the accounting database of the local cluster only.
[mysqld]
user=root
datadir=$STATE/mysql
socket=$RUN/mysqld.sock
pid-file=$RUN/mariadbd.pid
port=$DB_PORT
bind-address=127.0.0.1
log-error=$LOG/mariadb.log
skip-name-resolve
performance_schema=OFF
innodb_buffer_pool_size=64M
innodb_log_file_size=64M
innodb_lock_wait_timeout=900
innodb_use_native_aio=0
[client]
socket=$RUN/mysqld.sock
user=root
EOF

    # Clients (sbatch, sinfo, sacct, submitit) read /etc/slurm/slurm.conf.
    mkdir -p /etc/slurm
    if [[ -e /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]]; then
        mv /etc/slurm/slurm.conf "/etc/slurm/slurm.conf.before-amodal"
        say "moved the existing /etc/slurm/slurm.conf to /etc/slurm/slurm.conf.before-amodal"
    fi
    if [[ $(readlink /etc/slurm/slurm.conf 2>/dev/null) != "$CONF" ]]; then
        ln -sfn "$CONF" /etc/slurm/slurm.conf
        CONF_CHANGED=1
    fi
}

# ---------------------------------------------------------------- daemons

start_munged() {
    daemon_pid munged >/dev/null && return 0
    if [[ ! -s $STATE/munge/munge.key ]]; then
        (umask 077; mkdir -p "$STATE/munge"; head -c 1024 /dev/urandom > "$STATE/munge/munge.key")
    fi
    chmod 700 "$STATE/munge"; chmod 400 "$STATE/munge/munge.key"
    rm -f "$RUN/munge.sock" "$RUN/munge.sock.lock"
    # --force: the clone's parent folders may be group-writable, which munged otherwise refuses.
    # 9>&-: daemons must not inherit the lock of this script (they would hold it forever).
    munged 9>&- --force --key-file="$STATE/munge/munge.key" --socket="$RUN/munge.sock" \
        --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" --seed-file="$STATE/munge/munged.seed" \
        >> "$LOG/munged.log" 2>&1 || fail_with_logs "munged did not start" "$LOG/munged.log"
    wait_for 20 munge --socket="$RUN/munge.sock" -n </dev/null || fail_with_logs "munged does not answer" "$LOG/munged.log"
    say "munged up"
}

mysql_() { mariadb --defaults-file="$ETC/my.cnf" "$@"; }

start_mariadb() {
    if ! daemon_pid mariadbd >/dev/null; then
        if [[ ! -d $STATE/mysql/mysql ]]; then
            rm -rf "$STATE/mysql"
            mariadb-install-db --defaults-file="$ETC/my.cnf" --auth-root-authentication-method=socket \
                --skip-test-db > "$LOG/mariadb-install.log" 2>&1 \
                || fail_with_logs "mariadb-install-db failed" "$LOG/mariadb-install.log"
            say "database files created"
        fi
        port_busy "$DB_PORT" && fail_with_logs "port $DB_PORT (database) is held by another program" /dev/null
        setsid mariadbd --defaults-file="$ETC/my.cnf" 9>&- < /dev/null >> "$LOG/mariadb.log" 2>&1 &
        wait_for 60 mariadb-admin --defaults-file="$ETC/my.cnf" ping \
            || fail_with_logs "mariadbd does not answer on $RUN/mysqld.sock" "$LOG/mariadb.log"
        say "mariadbd up"
    fi
    local pass; pass=$(cat "$ETC/db.pass")
    mysql_ -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
        ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
        || fail_with_logs "could not create the accounting database and its user" "$LOG/mariadb.log"
}

start_slurmdbd() {
    daemon_pid slurmdbd >/dev/null && return 0
    port_busy "$DBD_PORT" && die "port $DBD_PORT (slurmdbd) is held by another program: $(ss -Hltnp "sport = :$DBD_PORT")"
    SLURM_CONF="$CONF" slurmdbd 9>&- >> "$LOG/slurmdbd.log" 2>&1 || fail_with_logs "slurmdbd did not start" "$LOG/slurmdbd.log"
    wait_for 60 sacctmgr -n show cluster || fail_with_logs "slurmdbd does not answer" "$LOG/slurmdbd.log"
    say "slurmdbd up"
}

ensure_cluster_registered() {
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" > "$LOG/sacctmgr.log" 2>&1 \
            || fail_with_logs "sacctmgr add cluster $CLUSTER failed" "$LOG/sacctmgr.log" "$LOG/slurmdbd.log"
        say "cluster $CLUSTER registered in accounting"
    fi
}

start_slurmctld() {
    daemon_pid slurmctld >/dev/null && return 0
    port_busy "$CTLD_PORT" && die "port $CTLD_PORT (slurmctld) is held by another program: $(ss -Hltnp "sport = :$CTLD_PORT")"
    mkdir -p "$STATE/ctld"
    slurmctld -f "$CONF" 9>&- >> "$LOG/slurmctld.log" 2>&1 || fail_with_logs "slurmctld did not start" "$LOG/slurmctld.log"
    wait_for 60 bash -c 'scontrol ping | grep -q UP' || fail_with_logs "slurmctld does not answer" "$LOG/slurmctld.log"
    say "slurmctld up"
}

start_slurmd() {
    local i node port
    for i in 0 1; do
        node=${NODES[$i]} port=${NODE_PORTS[$i]}
        daemon_pid "slurmd-$node" >/dev/null && continue
        port_busy "$port" && die "port $port (slurmd $node) is held by another program: $(ss -Hltnp "sport = :$port")"
        mkdir -p "$STATE/spool/$node"
        slurmd -f "$CONF" -N "$node" 9>&- >> "$LOG/slurmd-$node.log" 2>&1 \
            || fail_with_logs "slurmd -N $node did not start" "$LOG/slurmd-$node.log"
        say "slurmd $node started"
    done
}

node_states() { sinfo -h -N -p cpu -o '%N %t' 2>/dev/null; }

nodes_usable() {
    local states; states=$(node_states) || return 1
    local n; for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mix|alloc|comp)$" <<< "$states" || return 1
    done
}

sacct_answers() { timeout 20 sacct -n -X -S now-1hours -o JobID > /dev/null 2>&1; }

wait_nodes() {
    if ! wait_for 60 nodes_usable; then
        # A node left down or drained by an earlier run (state is kept in slurm/state/ctld).
        scontrol update NodeName=n1,n2 State=RESUME > /dev/null 2>&1 || true
        wait_for 30 nodes_usable || fail_with_logs "nodes not idle after 90 s: $(node_states | tr '\n' ' ')" \
            "$LOG/slurmctld.log" "$LOG/slurmd-n1.log" "$LOG/slurmd-n2.log"
    fi
    say "nodes: $(node_states | tr '\n' ' ')"
}

stop_slurm_daemons() {
    local pids=() pid d
    for d in slurmd-n1 slurmd-n2; do pid=$(daemon_pid "$d") && pids+=("$pid"); done
    stop_pids "slurmd n1 n2" "${pids[@]}"
    for d in slurmctld slurmdbd; do pid=$(daemon_pid "$d") && stop_pids "$d" "$pid"; done
    return 0
}

all_daemons_alive() {
    local d; for d in "${DAEMONS[@]}"; do daemon_pid "$d" > /dev/null || return 1; done
}

cluster_ready() {
    [[ $(readlink /etc/slurm/slurm.conf 2>/dev/null) == "$CONF" ]] && all_daemons_alive && nodes_usable && sacct_answers
}

# ---------------------------------------------------------------- commands

cmd_up() {
    need_root
    mkdir -p "$STATE" "$ETC" "$LOG" "$RUN"
    exec 9> "$STATE/.lock"
    flock -w 900 9 || die "another local-cluster.sh holds $STATE/.lock"
    install_packages
    write_configs
    if (( ! CONF_CHANGED )) && cluster_ready; then
        say "already up: $(node_states | tr '\n' ' ')"
        return 0
    fi
    stop_foreign_daemons
    ensure_hosts
    if (( CONF_CHANGED )); then
        say "configuration changed: restarting the Slurm daemons"
        stop_slurm_daemons
    fi
    start_munged
    start_mariadb
    start_slurmdbd
    ensure_cluster_registered
    start_slurmctld
    start_slurmd
    wait_nodes
    wait_for 60 sacct_answers || fail_with_logs "sacct does not answer" "$LOG/slurmdbd.log" "$LOG/slurmctld.log"
    say "up: cluster $CLUSTER, partitions cpu (default) gpu high, GraceTime=$GRACE_TIME, state in $STATE"
}

cmd_down() {
    need_root
    [[ -d $STATE ]] || { echo "nothing to stop: no $STATE"; return 0; }
    exec 9> "$STATE/.lock"
    flock -w 900 9 || die "another local-cluster.sh holds $STATE/.lock"
    stop_slurm_daemons
    local d pid
    for d in mariadbd munged; do pid=$(daemon_pid "$d") && stop_pids "$d" "$pid"; done
    say "down (state kept in $STATE)"
}

cmd_purge() {
    cmd_down
    [[ $(readlink /etc/slurm/slurm.conf 2>/dev/null) == "$CONF" ]] && rm -f /etc/slurm/slurm.conf
    rm -rf "$STATE"
    [[ $RUN == /tmp/amodal-slurm-* ]] && rm -rf "$RUN"
    say "purged $STATE"
}

cmd_status() {
    local d pid ok=0
    for d in "${DAEMONS[@]}"; do
        if pid=$(daemon_pid "$d"); then printf '%-10s running (pid %s)\n' "$d" "$pid"
        else printf '%-10s NOT RUNNING\n' "$d"; ok=1; fi
    done
    if [[ $(readlink /etc/slurm/slurm.conf 2>/dev/null) != "$CONF" ]]; then
        echo "/etc/slurm/slurm.conf does not point to $CONF"; ok=1
    fi
    if command -v sinfo > /dev/null && sinfo -h > /dev/null 2>&1; then
        sinfo -o '%9P %.5a %.6D %.8t %N'
        scontrol show partition -o 2>/dev/null | sed -E 's/.*PartitionName=([^ ]+).*PriorityTier=([^ ]+).*GraceTime=([^ ]+).*/partition \1: PriorityTier=\2 GraceTime=\3/'
        nodes_usable || { echo "nodes not usable"; ok=1; }
    else
        echo "sinfo: no answer from slurmctld"; ok=1
    fi
    if sacct_answers; then echo "sacct answers"; else echo "sacct: no answer"; ok=1; fi
    if (( ok == 0 )); then echo "cluster $CLUSTER is up"; else echo "cluster $CLUSTER is NOT usable: run 'bash slurm/local-cluster.sh up'"; fi
    return $ok
}

cmd_set_grace() {
    local s=${1:-}
    [[ $s =~ ^[0-9]+$ ]] || die "set-grace SECONDS: expected whole seconds, got '${s}'"
    local p; for p in cpu gpu; do
        scontrol update PartitionName=$p GraceTime="$s" || die "scontrol update PartitionName=$p GraceTime=$s failed"
    done
    echo "GraceTime=$s on partitions cpu and gpu (until the next restart of slurmctld or scontrol reconfigure)"
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    purge) cmd_purge ;;
    status) cmd_status ;;
    set-grace) shift; cmd_set_grace "${1:-}" ;;
    *) echo "usage: bash $0 up|down|status|purge|set-grace SECONDS" >&2; exit 2 ;;
esac
