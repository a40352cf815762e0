# Shared by slurm/local/cluster.sh (one node on loopback) and slurm/local/multinode.sh
# (several nodes in network namespaces): sourced, never run.
#
# The caller sets, before sourcing:
#   SCRIPT       its own name, for log lines and config headers
#   PREFIX       where config, logs, pid files, state and the database live
#   PORT_BASE    slurmctld's port; slurmd and slurmdbd use the next two
#   UP_TIMEOUT   seconds per wait
#   CLUSTER, PARTITION
#   NODE         this machine's `hostname -s` (slurmdbd's DbdHost)
#   CTLD_HOST    the controller's hostname (slurmctld insists that it is its `hostname -s`)
#   CTLD_LAUNCH  an array: the command slurmctld is started under (empty: none)
#   CTLD_ADDR    the address slurmctld and slurmdbd are reached at
#   CTLD_WHY     a comment line for slurm.conf: why SlurmctldHost has that address
#   PORT_KNOB    the environment variable that moves PORT_BASE (named in errors)
#   MUNGE_SOCKET a private munged socket, or "" for the machine-wide default one
#   DB_PORTS     "FIRST LAST": the range a private MariaDB picks a spare port from
# and defines:
#   render_nodes        NodeName lines for slurm.conf
#   render_site_conf    extra slurm.conf lines (may print nothing)
#   SLURMD_SPOOL, SLURMD_PIDFILE, SLURMD_LOGFILE   slurmd paths (may hold %n)
#
# Facts about these machines that shape every setting (Debian 12's slurm-wlm 22.05, munge
# 0.5, run as root; no systemd, no cgroups, 2 cores):
# - Without systemd nobody creates /run/munge, and munged must run as the munge user.
# - slurmctld and slurmd daemonise themselves; each gets a pid file, a log and state/spool
#   folders under one prefix and is stopped by that pid.
# - PID 1 reaps late: an exited daemon shows in /proc for ~2 s as a zombie.
# - No cgroups: proctrack/linuxproc, task/none, jobacct_gather/none.
# - submitit reads job states through sacct: without accounting (slurmdbd and a database) a
#   cancelled or killed job never counts as done and job.result() blocks forever.
# - apt's maintainer scripts try to start munge, mariadb and slurmctld; a temporary
#   policy-rc.d that exits 101 stops that.

ACCOUNT=latentforge
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

log() { printf '[%s] %s\n' "$SCRIPT" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$SCRIPT" "$*" >&2; exit 1; }

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

# port_open PORT [HOST]: something accepts connections there (HOST defaults to loopback).
port_open() { (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; }

# A port our daemon is about to listen on must be free: otherwise the daemon dies, and the
# readiness checks would happily talk to whoever holds the port (say, another prefix's cluster).
require_free_port() {
    local name=$1 port=$2
    if port_open "$port" "$CTLD_ADDR"; then
        die "$name: port $port is already in use (another cluster? set $PORT_KNOB for a second one)"
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
    printf '#!/bin/sh\n# latentforge %s install: do not start services\nexit 101\n' "$SCRIPT" >"$policy"
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

# The AuthInfo options: a short credential lifetime, and a private munged's socket if any.
auth_info() { printf 'cred_expire=10%s' "${MUNGE_SOCKET:+,socket=$MUNGE_SOCKET}"; }

render_slurm_conf() {
    cat <<EOF
# Written by slurm/local/$SCRIPT; edits are overwritten on the next \`up\`.
ClusterName=$CLUSTER
# $CTLD_WHY
SlurmctldHost=$CTLD_HOST($CTLD_ADDR)
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire seconds (default 120) before they may start again.
AuthInfo=$(auth_info)
StateSaveLocation=$PREFIX/state/ctld
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$PREFIX/run/slurmctld.pid
SlurmdPidFile=$SLURMD_PIDFILE
SlurmctldLogFile=$PREFIX/log/slurmctld.log
SlurmdLogFile=$SLURMD_LOGFILE
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
AccountingStorageHost=$CTLD_ADDR
AccountingStoragePort=$((PORT_BASE + 2))
JobCompType=jobcomp/none
EOF
    render_site_conf
    render_nodes
    cat <<EOF
# FORCE:4 lets up to 4 jobs share the cores, so several engineers' test jobs (and a long
# preemption test) do not queue behind each other. One job still cannot use more CPUs than
# the node has: a 4-task job is rejected at submit time.
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

render_slurmdbd_conf() {
    printf '# Written by slurm/local/%s; edits are overwritten on the next `up`.\n' "$SCRIPT"
    printf 'AuthType=auth/munge\n'
    if [[ -n ${MUNGE_SOCKET:-} ]]; then printf 'AuthInfo=socket=%s\n' "$MUNGE_SOCKET"; fi
    cat <<EOF
DbdAddr=$CTLD_ADDR
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
    local p first last
    read -r first last <<<"$DB_PORTS"
    if [[ -s $PREFIX/etc/db.port ]]; then
        p=$(cat "$PREFIX/etc/db.port")
        if pidfile_alive "$DB/mariadbd.pid" || ! port_open "$p"; then return 0; fi
        log "db port $p is taken by something else; picking another"
    fi
    for p in $(seq "$first" "$last"); do
        if ! port_open "$p"; then
            echo "$p" >"$PREFIX/etc/db.port"
            return 0
        fi
    done
    die "no free port in $first-$last for MariaDB"
}

# write_config [DIR...]: also creates DIRs (the slurmd spool folders).
write_config() {
    mkdir -p "$PREFIX"/{etc,log,run,state/ctld} "$@"
    pick_db_port
    CONF_CHANGED=0
    if render_slurm_conf | write_if_changed "$CONF" 644; then CONF_CHANGED=1; fi
    # slurmdbd refuses a config that others can read (it holds the DB password).
    if render_slurmdbd_conf | write_if_changed "$DBD_CONF" 600; then CONF_CHANGED=1; fi
}

# ---------------------------------------------------------------------------------------
# Daemons on the controller host, in dependency order.

munge_ok() {
    local sock=()
    if [[ -n ${MUNGE_SOCKET:-} ]]; then sock=(--socket="$MUNGE_SOCKET"); fi
    munge "${sock[@]}" -n 2>/dev/null | unmunge "${sock[@]}" >/dev/null 2>&1
}

start_munge() {
    # The default munged is machine-wide: reuse one that already answers (ours or anyone's).
    # With MUNGE_SOCKET set, only our own private one can answer there.
    if munge_ok; then return 0; fi
    log "starting munged${MUNGE_SOCKET:+ on $MUNGE_SOCKET}"
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
    local sock=()
    if [[ -n ${MUNGE_SOCKET:-} ]]; then
        # munged insists that everyone may traverse its socket's folder.
        install -d -o munge -g munge -m 755 "$(dirname "$MUNGE_SOCKET")"
        sock=(--socket="$MUNGE_SOCKET")
    fi
    runuser -u munge -- munged --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" "${sock[@]}" 9>&- ||
        { tail_log "$MUNGE_DIR/munged.log"; die "munged failed to start"; }
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

start_slurmctld() {
    if pidfile_alive "$PREFIX/run/slurmctld.pid"; then return 0; fi
    log "starting slurmctld"
    require_free_port slurmctld "$PORT_BASE"
    rm -f "$PREFIX/run/slurmctld.pid"
    "${CTLD_LAUNCH[@]}" slurmctld -f "$CONF" 9>&- ||
        { tail_log "$PREFIX/log/slurmctld.log"; die "slurmctld failed to start"; }
    wait_for slurmctld "$PREFIX/run/slurmctld.pid" "$PREFIX/log/slurmctld.log" scontrol ping
    require_alive slurmctld "$PREFIX/run/slurmctld.pid" "$PREFIX/log/slurmctld.log"
}

# The controller-side daemons: munged, MariaDB, slurmdbd (with the cluster registered), slurmctld.
start_controller() {
    start_munge
    start_mariadb
    start_slurmdbd
    register_accounting
    start_slurmctld
}

controller_alive() {
    munge_ok && pidfile_alive "$DB/mariadbd.pid" && pidfile_alive "$PREFIX/run/slurmdbd.pid" &&
        pidfile_alive "$PREFIX/run/slurmctld.pid"
}

# After the nodes are up: accounting answers, and the daemons that answered are ours.
check_controller() {
    wait_for "sacct" - "$PREFIX/log/slurmdbd.log" sacct -n -X
    require_alive slurmctld "$PREFIX/run/slurmctld.pid" "$PREFIX/log/slurmctld.log"
    require_alive slurmdbd "$PREFIX/run/slurmdbd.pid" "$PREFIX/log/slurmdbd.log"
}

stop_controller() {
    stop_pidfile slurmctld "$PREFIX/run/slurmctld.pid"
    stop_pidfile slurmdbd "$PREFIX/run/slurmdbd.pid"
}

# The database and our own munged (its pid file is ours; a machine-wide one stays).
stop_backends() {
    stop_pidfile mariadbd "$DB/mariadbd.pid"
    stop_pidfile munged "$MUNGE_DIR/munged.pid"
}

node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null; }

node_usable() {
    local state
    state=$(node_state "$1") || return 1
    # "idle*" (not responding), "down", "drained" ... are not usable.
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]]
}

resume_node() {
    # A node left drained or down by an earlier crash stays so even with every daemon up
    # (ReturnToService=2 covers only a node that was down for not responding).
    local node=$1 state
    state=$(node_state "$node") || return 0
    if [[ $state =~ ^(down|drained|draining|fail|failing)$ ]]; then
        log "node $node is $state ($(sinfo -h -N -n "$node" -o %E)); resuming it"
        scontrol update NodeName="$node" State=RESUME >&2 || true
    fi
}

print_env() {
    printf 'export SLURM_CONF=%q\n' "$CONF"
}

# status_line NAME PIDFILE: one line; returns 1 when the daemon is down.
status_line() {
    local name=$1 f=$2
    if pidfile_alive "$f"; then
        printf '%-10s up (pid %s)\n' "$name" "$(tr -dc 0-9 <"$f")"
    elif [[ $name == munged ]] && munge_ok; then
        printf '%-10s up (not started by us)\n' "$name"
    else
        printf '%-10s down\n' "$name"
        return 1
    fi
}

# controller_status: the controller-side daemons' lines; returns 3 when one is down.
controller_status() {
    local rc=0
    status_line munged "$MUNGE_DIR/munged.pid" || rc=3
    status_line mariadbd "$DB/mariadbd.pid" || rc=3
    status_line slurmdbd "$PREFIX/run/slurmdbd.pid" || rc=3
    status_line slurmctld "$PREFIX/run/slurmctld.pid" || rc=3
    return $rc
}

# locked NAME CMD...: run CMD holding PREFIX/.lock (several pytest sessions may call `up`
# at once); NAME is the subcommand, for the error.
locked() {
    local name=$1
    shift
    mkdir -p "$PREFIX"
    exec 9>"$PREFIX/.lock"
    flock -w $((UP_TIMEOUT * 5)) 9 || die "$name: another $SCRIPT holds $PREFIX/.lock"
    "$@"
}
