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
# Why each setting is there: the comments in slurm.conf below and in common.sh (shared with
# multinode.sh, the several-node cluster in network namespaces).
# stdout carries only the `export ...` lines; progress and errors go to stderr.
#
# Knobs (environment): LF_SLURM_PREFIX, LF_SLURM_PORT_BASE (slurmctld port; slurmd and slurmdbd
# use the next two; default 6817), LF_SLURM_UP_TIMEOUT (seconds per wait, default 60),
# LF_SLURM_CLUSTER (default latentforge), LF_SLURM_PARTITION (default debug).
set -euo pipefail

SCRIPT=cluster.sh
PREFIX=${LF_SLURM_PREFIX:-/tmp/latentforge-slurm}
PORT_BASE=${LF_SLURM_PORT_BASE:-6817}
PORT_KNOB=LF_SLURM_PORT_BASE
UP_TIMEOUT=${LF_SLURM_UP_TIMEOUT:-60}
CLUSTER=${LF_SLURM_CLUSTER:-latentforge}
PARTITION=${LF_SLURM_PARTITION:-debug}
NODE=$(hostname -s)
CTLD_HOST=$NODE
CTLD_LAUNCH=()
CTLD_ADDR=127.0.0.1
CTLD_WHY='The controller host must be `hostname -s`; pin it to loopback.'
MUNGE_SOCKET=""  # the machine-wide munged
DB_PORTS="13306 13406"
SLURMD_SPOOL=$PREFIX/spool/slurmd
SLURMD_PIDFILE=$PREFIX/run/slurmd.pid
SLURMD_LOGFILE=$PREFIX/log/slurmd.log
# shellcheck source=slurm/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

render_site_conf() { :; }

render_nodes() {
    echo "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NCPUS RealMemory=$(real_memory_mb) State=UNKNOWN"
}

ensure_hosts() {
    # Code that derives MASTER_ADDR from the node list needs the short hostname to resolve.
    if ! getent hosts "$NODE" >/dev/null 2>&1; then
        log "adding '127.0.0.1 $NODE' to /etc/hosts"
        printf '127.0.0.1 %s\n' "$NODE" >>/etc/hosts
    fi
}

start_slurmd() {
    if pidfile_alive "$SLURMD_PIDFILE"; then return 0; fi
    log "starting slurmd -N $NODE"
    require_free_port slurmd $((PORT_BASE + 1))
    rm -f "$SLURMD_PIDFILE"
    slurmd -f "$CONF" -N "$NODE" 9>&- || { tail_log "$SLURMD_LOGFILE"; die "slurmd failed to start"; }
}

all_alive() { controller_alive && pidfile_alive "$SLURMD_PIDFILE"; }

cmd_up() {
    [[ $(id -u) == 0 ]] || die "up: needs root (daemons run as root, munge and mysql)"
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null 2>&1 || die "up: $b not found; run '$0 install' first"
    done
    ensure_hosts
    write_config "$SLURMD_SPOOL"
    # Fast path: everything running with the same config.
    if ((CONF_CHANGED == 0)) && all_alive && node_usable "$NODE"; then
        print_env
        return 0
    fi
    if ((CONF_CHANGED)) && { pidfile_alive "$PREFIX/run/slurmctld.pid" || pidfile_alive "$SLURMD_PIDFILE" ||
        pidfile_alive "$PREFIX/run/slurmdbd.pid"; }; then
        log "config changed: restarting the SLURM daemons"
        stop_slurm
    fi
    start_controller
    start_slurmd
    resume_node "$NODE"
    wait_for "node $NODE idle" "$SLURMD_PIDFILE" "$SLURMD_LOGFILE" node_usable "$NODE"
    require_alive slurmd "$SLURMD_PIDFILE" "$SLURMD_LOGFILE"
    check_controller
    log "up: cluster $CLUSTER, partition $PARTITION, node $NODE ($NCPUS CPUs)"
    print_env
}

stop_slurm() {
    stop_pidfile slurmd "$SLURMD_PIDFILE"
    stop_controller
}

cmd_down() {
    local wipe=0
    case ${1:-} in
        --wipe) wipe=1 ;;
        "") ;;
        *) die "down: unknown option $1 (only --wipe)" ;;
    esac
    stop_slurm
    stop_backends
    if ((wipe)); then
        # Controller state and accounting go together: job ids restart at 1, and an old
        # COMPLETED record cannot be mistaken for a new job with the same id.
        log "wiping state, spool and accounting under $PREFIX"
        rm -rf "$PREFIX/state" "$PREFIX/spool" "$DB" "$PREFIX/log" "$MUNGE_DIR"
    fi
}

cmd_status() {
    local rc=0
    controller_status || rc=3
    status_line slurmd "$SLURMD_PIDFILE" || rc=3
    if ((rc == 0)); then
        sinfo -N -o '%N %P %T %c %m' || rc=3
        node_usable "$NODE" || rc=3
    fi
    return $rc
}

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
        install) cmd_install ;;
        up) locked up cmd_up ;;
        down) locked down cmd_down "$@" ;;
        status) cmd_status ;;
        *)
            echo "usage: $0 {install|up|down [--wipe]|status}" >&2
            exit 2
            ;;
    esac
}

main "$@"
