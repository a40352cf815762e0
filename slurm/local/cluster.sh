#!/usr/bin/env bash
# A real one-node SLURM cluster on loopback, for tests and for trying submit locally.
#
#   slurm/local/cluster.sh install        # Debian packages (root, apt); skipped when present
#   slurm/local/cluster.sh up             # config + munged, MariaDB, slurmdbd, slurmctld, slurmd
#   eval "$(slurm/local/cluster.sh up)"   # ... and export SLURM_CONF for this shell
#   slurm/local/cluster.sh status         # exit 0 when every daemon is up and the node is usable
#   slurm/local/cluster.sh down [--wipe]  # stop by pid files; --wipe also forgets jobs and accounting
#
# Everything lives under one prefix (LF_SLURM_PREFIX, default /tmp/latentforge-slurm):
#   etc/slurm.conf, etc/slurmdbd.conf   the config; clients use SLURM_CONF=<prefix>/etc/slurm.conf
#   log/<daemon>.log, run/<daemon>.pid  one log and one pid file per daemon
#   state/ctld, spool/slurmd            controller state and slurmd spool
#   mysql/                              private MariaDB (owned by mysql): data, socket, pid, log
#   munge/                              munged's pid and log (owned by munge)
# /etc/slurm is never written: every daemon and client honours SLURM_CONF (and slurmdbd reads
# slurmdbd.conf from the same folder). Jobs inherit SLURM_CONF from sbatch's environment.
#
# Why each setting is there: /work/shared/notes/slurm-local.md (no systemd, no cgroups, 2 cores).
# stdout carries only the `export ...` lines; progress and errors go to stderr.
#
# Knobs (environment): LF_SLURM_PREFIX, LF_SLURM_PORT_BASE (slurmctld port; slurmd and slurmdbd
# use the next two; default 6817), LF_SLURM_UP_TIMEOUT (seconds per wait, default 60),
# LF_SLURM_CLUSTER (default latentforge), LF_SLURM_PARTITION (default debug).
set -euo pipefail

PREFIX=${LF_SLURM_PREFIX:-/tmp/latentforge-slurm}
PORT_BASE=${LF_SLURM_PORT_BASE:-6817}
UP_TIMEOUT=${LF_SLURM_UP_TIMEOUT:-60}
CLUSTER=${LF_SLURM_CLUSTER:-latentforge}
PARTITION=${LF_SLURM_PARTITION:-debug}
ACCOUNT=latentforge
NODE=$(hostname -s)
# GNU nproc honours OMP_NUM_THREADS (tests set it to 1); we want the CPUs this machine has.
NCPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
CONF=$PREFIX/etc/slurm.conf
DBD_CONF=$PREFIX/etc/slurmdbd.conf
DB=$PREFIX/mysql
MUNGE_DIR=$PREFIX/munge
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)
BINARIES=(munged sinfo srun sbatch sacct sacctmgr scontrol slurmctld slurmd slurmdbd mariadbd mariadb-install-db)
export PATH=/usr/sbin:/sbin:$PATH
export SLURM_CONF=$CONF

log() { printf '[cluster.sh] %s\n' "$*" >&2; }
die() { printf '[cluster.sh] error: %s\n' "$*" >&2; exit 1; }

# Print the last lines of a log to stderr: the fixture shows them as the skip reason.
tail_log() {
    local f=$1
    if [[ -s $f ]]; then
        printf -- '--- last lines of %s ---\n' "$f" >&2
        tail -n 15 "$f" >&2
    fi
}

# ---------------------------------------------------------------------------------------
# Processes. PID 1 here reaps late, so an exited daemon can linger as a zombie for ~2 s:
# "alive" means present in /proc and not in state Z.

pid_alive() {
    local pid=$1 state
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/stat ]] || return 1
    # /proc/PID/stat: "pid (comm) S ..."; comm may hold spaces, so take the field after ')'.
    state=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]]
}

pidfile_alive() {
    local f=$1
    [[ -s $f ]] && pid_alive "$(tr -dc 0-9 <"$f")"
}

# wait_for DESCRIPTION WATCH LOGFILE CMD...: poll CMD every 0.2 s until it succeeds, for at
# most UP_TIMEOUT seconds; fail at once (with the log's tail) if the daemon being watched died.
# WATCH is a pid file (it appears only once the daemon has forked, so absent early is normal),
# "pid:N" for a process we started ourselves, or "-" for nothing to watch.
wait_for() {
    local desc=$1 watch=$2 logfile=$3
    shift 3
    local deadline=$((SECONDS + UP_TIMEOUT)) seen_pid=0
    until "$@" >/dev/null 2>&1; do
        if [[ $watch == pid:* ]]; then
            if ! pid_alive "${watch#pid:}"; then
                log "$desc: the daemon exited"
                tail_log "$logfile"
                exit 1
            fi
        elif [[ $watch != - ]]; then
            if [[ -s $watch ]]; then seen_pid=1; fi
            if ((seen_pid)) && ! pidfile_alive "$watch"; then
                log "$desc: the daemon exited"
                tail_log "$logfile"
                exit 1
            fi
        fi
        if ((SECONDS >= deadline)); then
            log "$desc: not ready after ${UP_TIMEOUT}s"
            tail_log "$logfile"
            exit 1
        fi
        sleep 0.2
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A port our daemon is about to listen on must be free: otherwise the daemon dies, and the
# readiness checks would happily talk to whoever holds the port (say, another prefix's cluster).
require_free_port() {
    local name=$1 port=$2
    if port_open "$port"; then
        die "$name: port $port is already in use (another cluster? set LF_SLURM_PORT_BASE for a second one)"
    fi
}

# After a readiness check passed: it must have been our daemon that answered.
require_alive() {
    local name=$1 pidfile=$2 logfile=$3
    if ! pidfile_alive "$pidfile"; then
        log "$name: the daemon exited"
        tail_log "$logfile"
        exit 1
    fi
}

# stop_pidfile NAME PIDFILE: TERM, wait (bounded) until gone or a zombie, then KILL.
stop_pidfile() {
    local name=$1 f=$2 pid deadline
    [[ -s $f ]] || return 0
    pid=$(tr -dc 0-9 <"$f")
    if pid_alive "$pid"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 20))
        while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
        if pid_alive "$pid"; then
            log "$name (pid $pid) ignored TERM for 20s; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 5))
            while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
        fi
    fi
    rm -f "$f"
}

# ---------------------------------------------------------------------------------------
# install

cmd_install() {
    local missing=() b
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    if ((${#missing[@]} == 0)); then
        log "install: packages already present"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "install: needs root (missing: ${missing[*]})"
    command -v apt-get >/dev/null 2>&1 || die "install: no apt-get (missing: ${missing[*]})"
    log "install: missing ${missing[*]}; installing ${PACKAGES[*]}"

    # apt's maintainer scripts would start munge, mariadb and slurmctld through invoke-rc.d;
    # a policy-rc.d that exits 101 forbids that. Put back whatever was there before.
    local policy=/usr/sbin/policy-rc.d backup=""
    if [[ -e $policy ]]; then
        backup=$(mktemp /tmp/policy-rc.d.XXXXXX)
        cp -p "$policy" "$backup"
    fi
    # shellcheck disable=SC2064  # expand now: the trap must restore this backup.
    trap "if [[ -n '$backup' ]]; then cp -p '$backup' '$policy'; rm -f '$backup'; else rm -f '$policy'; fi" EXIT
    printf '#!/bin/sh\n# latentforge cluster.sh install: do not start services\nexit 101\n' >"$policy"
    chmod 755 "$policy"

    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef
        -o Dpkg::Options::=--force-confold "${PACKAGES[@]}")
    # Try with the package lists we have; stale lists (a version the mirror no longer has)
    # fail the download, and then one `apt-get update` fixes it.
    if ! "${apt[@]}" >&2; then
        log "install: retrying after apt-get update"
        apt-get update -q >&2
        "${apt[@]}" >&2
    fi
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null 2>&1 || die "install: $b still missing after apt-get install"
    done
    log "install: done"
}

# ---------------------------------------------------------------------------------------
# Configuration. Written only when its content changes, so `up` on a running cluster is a no-op.

real_memory_mb() {
    # Under the machine's memory (slurmd drains a node that claims more than it has).
    local kb
    kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    echo $((kb / 1024 * 9 / 10))
}

render_slurm_conf() {
    cat <<EOF
# Written by slurm/local/cluster.sh; edits are overwritten on the next \`up\`.
ClusterName=$CLUSTER
# The controller host must be \`hostname -s\`; pin it to loopback.
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire seconds (default 120) before they may start again.
AuthInfo=cred_expire=10
StateSaveLocation=$PREFIX/state/ctld
SlurmdSpoolDir=$PREFIX/spool/slurmd
SlurmctldPidFile=$PREFIX/run/slurmctld.pid
SlurmdPidFile=$PREFIX/run/slurmd.pid
SlurmctldLogFile=$PREFIX/log/slurmctld.log
SlurmdLogFile=$PREFIX/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd and no cgroups on these machines.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Trust the node line below over what slurmd detects (a VM may report 1 core x 2 threads,
# which CR_Core would hand out as one 2-CPU core, and a 2-task job would not fit).
SlurmdParameters=config_overrides
MailProg=/bin/true
# Scheduler passes every 5 s (default 60) so a requeued job restarts in ~12-15 s.
SchedulerParameters=sched_interval=5,bf_interval=5
# Reject at submit time what the node can never run (else it pends forever).
EnforcePartLimits=ALL
ReturnToService=2
KillWait=5
# submitit reads job states through sacct; without accounting a cancelled job never ends.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT_BASE + 2))
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NCPUS RealMemory=$(real_memory_mb) State=UNKNOWN
# FORCE:4 lets up to 4 jobs share the cores, so several engineers' test jobs (and a long
# preemption test) do not queue behind each other. One job still cannot use more CPUs than
# the node has: a 4-task job is rejected at submit time.
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

render_slurmdbd_conf() {
    cat <<EOF
# Written by slurm/local/cluster.sh; edits are overwritten on the next \`up\`.
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=$NODE
DbdPort=$((PORT_BASE + 2))
SlurmUser=root
LogFile=$PREFIX/log/slurmdbd.log
PidFile=$PREFIX/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$(cat "$PREFIX/etc/db.port")
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
}

# write_if_changed FILE MODE < content; returns 0 when the file changed.
write_if_changed() {
    local f=$1 mode=$2 tmp
    tmp=$(mktemp "$f.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $f ]] && cmp -s "$tmp" "$f"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$f"
    return 0
}

pick_db_port() {
    # A spare port, kept across restarts so slurmdbd.conf stays stable.
    local p
    if [[ -s $PREFIX/etc/db.port ]]; then
        p=$(cat "$PREFIX/etc/db.port")
        if pidfile_alive "$DB/mariadbd.pid" || ! port_open "$p"; then return 0; fi
        log "db port $p is taken by something else; picking another"
    fi
    for p in $(seq 13306 13406); do
        if ! port_open "$p"; then
            echo "$p" >"$PREFIX/etc/db.port"
            return 0
        fi
    done
    die "no free port in 13306-13406 for MariaDB"
}

ensure_hosts() {
    # Code that derives MASTER_ADDR from the node list needs the short hostname to resolve.
    if ! getent hosts "$NODE" >/dev/null 2>&1; then
        log "adding '127.0.0.1 $NODE' to /etc/hosts"
        printf '127.0.0.1 %s\n' "$NODE" >>/etc/hosts
    fi
}

write_config() {
    mkdir -p "$PREFIX"/{etc,log,run,state/ctld,spool/slurmd}
    pick_db_port
    CONF_CHANGED=0
    if render_slurm_conf | write_if_changed "$CONF" 644; then CONF_CHANGED=1; fi
    # slurmdbd refuses a config that others can read (it holds the DB password).
    if render_slurmdbd_conf | write_if_changed "$DBD_CONF" 600; then CONF_CHANGED=1; fi
}

# ---------------------------------------------------------------------------------------
# Daemons, in dependency order.

start_munge() {
    # munged is machine-wide: reuse one that already answers (ours or anyone's).
    if munge_ok; then return 0; fi
    log "starting munged"
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 700 /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    # Without systemd nobody creates the socket folder; munged runs as munge.
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 "$MUNGE_DIR"
    rm -f "$MUNGE_DIR/munged.pid"
    runuser -u munge -- munged --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" 9>&- || { tail_log "$MUNGE_DIR/munged.log"; die "munged failed to start"; }
    wait_for munged "$MUNGE_DIR/munged.pid" "$MUNGE_DIR/munged.log" munge_ok
}

start_mariadb() {
    if pidfile_alive "$DB/mariadbd.pid"; then return 0; fi
    install -d -o mysql -g mysql -m 750 "$DB"
    if [[ ! -d $DB/data/mysql ]]; then
        log "initialising MariaDB in $DB/data"
        rm -rf "$DB/data"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DB/data" --skip-test-db \
            --auth-root-authentication-method=socket >"$PREFIX/log/mariadb-install-db.log" 2>&1 ||
            { tail_log "$PREFIX/log/mariadb-install-db.log"; die "mariadb-install-db failed"; }
    fi
    # slurmdbd connects over TCP with a password; root@localhost only accepts the unix socket.
    cat >"$DB/init.sql" <<'EOF'
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
    chown mysql:mysql "$DB/init.sql"
    local port
    port=$(cat "$PREFIX/etc/db.port")
    log "starting MariaDB on 127.0.0.1:$port"
    rm -f "$DB/mariadbd.pid"
    # --no-defaults: nothing from /etc/mysql; small buffers: this is a 2-core test box.
    # setsid: its own session, so nothing of the caller's (a terminal, a test's process group)
    # signals it. Not a group leader here, so setsid execs in place and $! is mariadbd's pid.
    setsid mariadbd --no-defaults --user=mysql --datadir="$DB/data" --socket="$DB/mariadbd.sock" \
        --pid-file="$DB/mariadbd.pid" --log-error="$DB/mariadbd.log" --bind-address=127.0.0.1 \
        --port="$port" --skip-name-resolve --init-file="$DB/init.sql" --skip-log-bin \
        --innodb-buffer-pool-size=32M --innodb-lock-wait-timeout=900 --max-connections=64 --performance-schema=OFF \
        </dev/null >>"$DB/mariadbd.log" 2>&1 9>&- &
    local pid=$!
    # Ready = the port answers, and it is ours that answers.
    wait_for mariadbd "pid:$pid" "$DB/mariadbd.log" port_open "$port"
    wait_for "mariadbd pid file" "pid:$pid" "$DB/mariadbd.log" test -s "$DB/mariadbd.pid"
}

start_slurmdbd() {
    if pidfile_alive "$PREFIX/run/slurmdbd.pid"; then return 0; fi
    log "starting slurmdbd"
    require_free_port slurmdbd $((PORT_BASE + 2))
    rm -f "$PREFIX/run/slurmdbd.pid"
    slurmdbd 9>&- || { tail_log "$PREFIX/log/slurmdbd.log"; die "slurmdbd failed to start"; }
    wait_for slurmdbd "$PREFIX/run/slurmdbd.pid" "$PREFIX/log/slurmdbd.log" \
        sacctmgr -n -P list cluster format=cluster
    require_alive slurmdbd "$PREFIX/run/slurmdbd.pid" "$PREFIX/log/slurmdbd.log"
}

register_accounting() {
    # The cluster must exist in the database before slurmctld registers with slurmdbd;
    # the account lets profiles pass --account like they would on a real cluster.
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        log "registering cluster $CLUSTER and account $ACCOUNT in accounting"
        sacctmgr -i add cluster "$CLUSTER" >&2
    fi
    if ! sacctmgr -n -P list account "$ACCOUNT" format=account | grep -qx "$ACCOUNT"; then
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description=tests Organization=latentforge >&2
        sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >&2
    fi
}

node_usable() {
    local state
    state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null) || return 1
    # "idle*" (not responding), "down", "drained" ... are not usable.
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]
}

resume_node() {
    # A node left drained or down by an earlier crash stays so even with every daemon up
    # (ReturnToService=2 covers only a node that was down for not responding).
    local state
    state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null) || return 0
    if [[ $state =~ ^(down|drained|draining|fail|failing)$ ]]; then
        log "node $NODE is $state ($(sinfo -h -N -n "$NODE" -o %E)); resuming it"
        scontrol update NodeName="$NODE" State=RESUME >&2 || true
    fi
}

start_slurmctld() {
    if pidfile_alive "$PREFIX/run/slurmctld.pid"; then return 0; fi
    log "starting slurmctld"
    require_free_port slurmctld "$PORT_BASE"
    rm -f "$PREFIX/run/slurmctld.pid"
    slurmctld -f "$CONF" 9>&- || { tail_log "$PREFIX/log/slurmctld.log"; die "slurmctld failed to start"; }
    wait_for slurmctld "$PREFIX/run/slurmctld.pid" "$PREFIX/log/slurmctld.log" scontrol ping
    require_alive slurmctld "$PREFIX/run/slurmctld.pid" "$PREFIX/log/slurmctld.log"
}

start_slurmd() {
    if pidfile_alive "$PREFIX/run/slurmd.pid"; then return 0; fi
    log "starting slurmd -N $NODE"
    require_free_port slurmd $((PORT_BASE + 1))
    rm -f "$PREFIX/run/slurmd.pid"
    slurmd -f "$CONF" -N "$NODE" 9>&- || { tail_log "$PREFIX/log/slurmd.log"; die "slurmd failed to start"; }
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

all_alive() {
    munge_ok && pidfile_alive "$DB/mariadbd.pid" && pidfile_alive "$PREFIX/run/slurmdbd.pid" &&
        pidfile_alive "$PREFIX/run/slurmctld.pid" && pidfile_alive "$PREFIX/run/slurmd.pid"
}

print_env() {
    printf 'export SLURM_CONF=%q\n' "$CONF"
}

cmd_up() {
    [[ $(id -u) == 0 ]] || die "up: needs root (daemons run as root, munge and mysql)"
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null 2>&1 || die "up: $b not found; run '$0 install' first"
    done
    ensure_hosts
    write_config
    # Fast path: everything running with the same config.
    if ((CONF_CHANGED == 0)) && all_alive && node_usable; then
        print_env
        return 0
    fi
    if ((CONF_CHANGED)) && { pidfile_alive "$PREFIX/run/slurmctld.pid" || pidfile_alive "$PREFIX/run/slurmd.pid" ||
        pidfile_alive "$PREFIX/run/slurmdbd.pid"; }; then
        log "config changed: restarting the SLURM daemons"
        stop_slurm
    fi
    start_munge
    start_mariadb
    start_slurmdbd
    register_accounting
    start_slurmctld
    start_slurmd
    resume_node
    wait_for "node $NODE idle" "$PREFIX/run/slurmd.pid" "$PREFIX/log/slurmd.log" node_usable
    wait_for "sacct" - "$PREFIX/log/slurmdbd.log" sacct -n -X
    require_alive slurmd "$PREFIX/run/slurmd.pid" "$PREFIX/log/slurmd.log"
    require_alive slurmctld "$PREFIX/run/slurmctld.pid" "$PREFIX/log/slurmctld.log"
    require_alive slurmdbd "$PREFIX/run/slurmdbd.pid" "$PREFIX/log/slurmdbd.log"
    log "up: cluster $CLUSTER, partition $PARTITION, node $NODE ($NCPUS CPUs)"
    print_env
}

stop_slurm() {
    stop_pidfile slurmd "$PREFIX/run/slurmd.pid"
    stop_pidfile slurmctld "$PREFIX/run/slurmctld.pid"
    stop_pidfile slurmdbd "$PREFIX/run/slurmdbd.pid"
}

cmd_down() {
    local wipe=0
    case ${1:-} in
        --wipe) wipe=1 ;;
        "") ;;
        *) die "down: unknown option $1 (only --wipe)" ;;
    esac
    stop_slurm
    stop_pidfile mariadbd "$DB/mariadbd.pid"
    # Only a munged we started (its pid file is ours); a machine-wide one stays.
    stop_pidfile munged "$MUNGE_DIR/munged.pid"
    if ((wipe)); then
        # Controller state and accounting go together: job ids restart at 1, and an old
        # COMPLETED record cannot be mistaken for a new job with the same id.
        log "wiping state, spool and accounting under $PREFIX"
        rm -rf "$PREFIX/state" "$PREFIX/spool" "$DB" "$PREFIX/log" "$MUNGE_DIR"
    fi
}

cmd_status() {
    local rc=0 name f
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        case $name in
            munged) f=$MUNGE_DIR/munged.pid ;;
            mariadbd) f=$DB/mariadbd.pid ;;
            *) f=$PREFIX/run/$name.pid ;;
        esac
        if pidfile_alive "$f"; then
            printf '%-10s up (pid %s)\n' "$name" "$(tr -dc 0-9 <"$f")"
        elif [[ $name == munged ]] && munge_ok; then
            printf '%-10s up (not started by us)\n' "$name"
        else
            printf '%-10s down\n' "$name"
            rc=3
        fi
    done
    if ((rc == 0)); then
        sinfo -N -o '%N %P %T %c %m' || rc=3
        node_usable || rc=3
    fi
    return $rc
}

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
        install) cmd_install ;;
        up | down)
            mkdir -p "$PREFIX"
            # Several pytest sessions may call `up` at once; one at a time.
            exec 9>"$PREFIX/.lock"
            flock -w $((UP_TIMEOUT * 5)) 9 || die "$cmd: another cluster.sh holds $PREFIX/.lock"
            if [[ $cmd == up ]]; then cmd_up; else cmd_down "$@"; fi
            ;;
        status) cmd_status ;;
        *)
            echo "usage: $0 {install|up|down [--wipe]|status}" >&2
            exit 2
            ;;
    esac
}

main "$@"
