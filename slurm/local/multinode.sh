#!/usr/bin/env bash
# A real several-node SLURM cluster on this one machine: each node's slurmd runs in its own
# network namespace (own address, own interface) and UTS namespace (own hostname), all on a
# private bridge that exists only here. One slurmctld, slurmdbd (with a private MariaDB) and a
# private munged run on the host. For tests of multi-node jobs (cross-node rendezvous, a lost
# node); it runs side by side with cluster.sh's one-node cluster.
#
#   slurm/local/multinode.sh install           # Debian packages (root, apt); skipped when present
#   slurm/local/multinode.sh up [--nodes N]    # namespaces, bridge, /etc/hosts, daemons (N=2)
#   eval "$(slurm/local/multinode.sh up)"      # ... and export SLURM_CONF for this shell
#   slurm/local/multinode.sh status            # exit 0 when every daemon is up and every node usable
#   slurm/local/multinode.sh kill-node NAME    # SIGKILL everything in one node's namespace (a lost node)
#   slurm/local/multinode.sh down [--wipe]     # stop everything, remove namespaces, links, hosts lines
#
# Several test sessions may share the cluster: `up --holder PID` records that process as a
# user, and `down --holder PID` forgets it and tears down only when no recorded user is still
# alive (a plain `down` always tears down). A user that wants another node count while others
# are alive is refused.
#
# stdout carries only the `export ...` lines; progress and errors go to stderr. When network
# namespaces cannot be made here (not root, no ip/nsenter/unshare, the kernel refuses) `up`
# exits 77 after one line "... error: network namespaces unavailable: WHY".
#
# The picture, with the defaults (N nodes: lfnode1..lfnodeN):
#
#   host: slurmctld (hostname lfnode-ctld) on 10.77.0.1 (bridge lfbr0); slurmdbd reached there;
#         MariaDB on 127.0.0.1; a munged of its own on PREFIX/run/munge/munged.socket
#         (AuthInfo=socket=...), so cluster.sh's `down` cannot take it away
#     lfbr0 10.77.0.1/24 ── lfnode1-h ══ eth0 10.77.0.11 [netns lfnode1, hostname lfnode1: slurmd]
#                       └── lfnode2-h ══ eth0 10.77.0.12 [netns lfnode2, hostname lfnode2: slurmd]
#
# The namespaces have no default route and nothing is forwarded or NATed: traffic stays on
# the bridge. /etc/hosts gets one line per node and one for the controller (each ending in a
# marker comment naming PREFIX) so that code deriving MASTER_ADDR from SLURM_JOB_NODELIST
# resolves the names; `down` removes exactly those lines.
#
# Facts this relies on (Debian 12, slurm-wlm 22.05, no systemd):
# - Enter a namespace with `nsenter --net=/var/run/netns/NAME`, not `ip netns exec`: the latter
#   remounts /sys for the namespace, which hides /sys/fs/cgroup, and slurmd then stops with
#   "No filesystem mounted on /sys/fs/cgroup ... slurmd initialization failed".
# - `unshare --uts` inside the namespace gives the node its hostname; slurmd and jobs see it.
# - Per-node slurmd paths take %n (spool, pid file, log).
# - gloo binds to the address of the hostname unless GLOO_SOCKET_IFNAME names an interface;
#   with a name that does not resolve a cross-node job hangs until killed. The /etc/hosts lines
#   below make the names resolve, and nothing here sets GLOO_SOCKET_IFNAME, as on a real cluster:
#   latentforge derives it (latentforge/env.py, bind_gloo_interface: the interface on the route
#   to MASTER_ADDR, eth0 in every namespace).
# - Paths are shared with the host (only net and uts are unshared), so the nodes reach munged
#   through its unix socket and see the same files.
#
# Everything lives under one prefix (LF_SLURM_MULTI_PREFIX, default /tmp/latentforge-slurm-multi),
# laid out like cluster.sh's plus etc/nodes (the node names) and per-node run/slurmd.NODE.pid,
# log/slurmd.NODE.log, spool/NODE.
#
# Knobs (environment): LF_SLURM_MULTI_PREFIX, LF_SLURM_MULTI_PORT_BASE (slurmctld port; slurmd
# and slurmdbd use the next two; default 6917, cluster.sh's is 6817), LF_SLURM_UP_TIMEOUT
# (seconds per wait, default 60), LF_SLURM_MULTI_CLUSTER (default lfmulti),
# LF_SLURM_MULTI_PARTITION (default debug), LF_SLURM_MULTI_SUBNET (first three octets of the
# private /24, default 10.77.0), LF_SLURM_MULTI_BRIDGE (default lfbr0), LF_SLURM_MULTI_NODE_STEM
# (node names STEM1..STEMN, default lfnode).
set -euo pipefail

SCRIPT=multinode.sh
PREFIX=${LF_SLURM_MULTI_PREFIX:-/tmp/latentforge-slurm-multi}
PORT_BASE=${LF_SLURM_MULTI_PORT_BASE:-6917}
PORT_KNOB=LF_SLURM_MULTI_PORT_BASE
UP_TIMEOUT=${LF_SLURM_UP_TIMEOUT:-60}
CLUSTER=${LF_SLURM_MULTI_CLUSTER:-lfmulti}
PARTITION=${LF_SLURM_MULTI_PARTITION:-debug}
SUBNET=${LF_SLURM_MULTI_SUBNET:-10.77.0}
BRIDGE=${LF_SLURM_MULTI_BRIDGE:-lfbr0}
STEM=${LF_SLURM_MULTI_NODE_STEM:-lfnode}
IFNAME=eth0  # the interface inside every node's namespace
MAX_NODES=32
NODE=$(hostname -s)
CTLD_ADDR=$SUBNET.1
# slurmctld gets a hostname of its own (a UTS namespace; it stays in the host's network) that
# /etc/hosts maps to the bridge address: NoCtldInAddrAny binds it to what its hostname resolves
# to, so it listens on the bridge only (with the machine's name it would bind 127.0.0.1).
CTLD_HOST=$STEM-ctld
CTLD_WHY='The controller host must be `hostname -s` (its own, from a UTS namespace) at the bridge address.'
# as_host NAME CMD...: CMD in a new UTS namespace whose hostname is NAME (no fork on the way).
AS_HOST=(unshare --uts -- sh -c 'hostname "$1" && shift && exec "$@"' sh)
CTLD_LAUNCH=("${AS_HOST[@]}" "$CTLD_HOST")
MUNGE_SOCKET=$PREFIX/run/munge/munged.socket
DB_PORTS="13407 13506"  # not cluster.sh's range, so neither takes the other's port while it is down
SLURMD_SPOOL=$PREFIX/spool/%n
SLURMD_PIDFILE=$PREFIX/run/slurmd.%n.pid
SLURMD_LOGFILE=$PREFIX/log/slurmd.%n.log
NODES_FILE=$PREFIX/etc/nodes
HOLDERS=$PREFIX/holders  # one file per user process (`--holder PID`): its start time
HOSTS_MARK="# latentforge multinode.sh $PREFIX"
NO_NETNS_RC=77
NODES=()
# shellcheck source=slurm/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# One line, a distinct exit code: the pytest fixture skips on it with this reason.
die_netns() {
    printf '[%s] error: network namespaces unavailable: %s\n' "$SCRIPT" "$*" >&2
    exit "$NO_NETNS_RC"
}

validate_knobs() {
    local o
    [[ $SUBNET =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] ||
        die "LF_SLURM_MULTI_SUBNET=$SUBNET: want the first three octets of a /24, e.g. 10.77.0"
    for o in "${BASH_REMATCH[@]:1}"; do ((10#$o <= 255)) || die "LF_SLURM_MULTI_SUBNET=$SUBNET: octet $o > 255"; done
    [[ $BRIDGE =~ ^[A-Za-z][A-Za-z0-9_-]{0,14}$ ]] ||
        die "LF_SLURM_MULTI_BRIDGE=$BRIDGE: want 1-15 letters, digits, - or _"
    # Node names are hostnames and namespace names; NAME-h (the host end of its link) must fit
    # the kernel's 15-character interface names.
    [[ $STEM =~ ^[a-z][a-z0-9-]{0,8}$ ]] ||
        die "LF_SLURM_MULTI_NODE_STEM=$STEM: want 1-9 lowercase letters, digits or -, a letter first"
    [[ $PORT_BASE =~ ^[0-9]+$ ]] && ((PORT_BASE >= 1024 && PORT_BASE <= 65533)) ||
        die "$PORT_KNOB=$PORT_BASE: want a port in 1024-65533"
}

node_addr() { echo "$SUBNET.$((10 + $1))"; }      # node_addr I: node I's address (I from 1)
veth_name() { echo "$1-h"; }                         # the host end of node NAME's link
node_path() { echo "${1//%n/$2}"; }                  # node_path TEMPLATE NAME: expand %n
in_node() {                                          # in_node NAME CMD...: run CMD in its netns
    local node=$1
    shift
    nsenter --net="/var/run/netns/$node" "$@"
}

read_nodes() {
    NODES=()
    [[ -s $NODES_FILE ]] || return 1
    mapfile -t NODES <"$NODES_FILE"
    ((${#NODES[@]} > 0))
}

is_node() {
    local n
    for n in "${NODES[@]}"; do [[ $n == "$1" ]] && return 0; done
    return 1
}

# ---------------------------------------------------------------------------------------
# Users (holders): PREFIX/holders/PID holds the process's start time, so a reused pid is not
# mistaken for the process that registered.

proc_start() { sed -E 's/^.*\) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}'; }

# live_holders [EXCEPT]: the recorded users still alive (minus EXCEPT); forgets the dead.
live_holders() {
    local f pid live=()
    [[ -d $HOLDERS ]] || return 0
    for f in "$HOLDERS"/*; do
        [[ -e $f ]] || continue
        pid=${f##*/}
        if pid_alive "$pid" && [[ $(proc_start "$pid") == "$(cat "$f")" ]]; then
            [[ $pid == "${1:-}" ]] || live+=("$pid")
        else
            rm -f "$f"
        fi
    done
    echo "${live[*]}"
}

check_holder() {
    [[ $1 =~ ^[0-9]+$ ]] && pid_alive "$1" || die "--holder $1: not a running process id"
}

# ---------------------------------------------------------------------------------------
# Configuration

render_site_conf() {
    cat <<EOF
# A node whose slurmd stops answering (kill-node) is DOWN after 30 s, not the default 300.
SlurmdTimeout=30
# slurmctld listens on its SlurmctldHost address (the bridge) only, not on every interface.
CommunicationParameters=NoCtldInAddrAny
EOF
}

render_nodes() {
    local i mem
    mem=$(($(real_memory_mb) / ${#NODES[@]}))
    echo "# The nodes share this machine: each claims all its CPUs and a share of its memory."
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[i]} NodeAddr=$(node_addr $((i + 1))) CPUs=$NCPUS RealMemory=$mem State=UNKNOWN"
    done
}

# ---------------------------------------------------------------------------------------
# /etc/hosts: one line per node and one for the controller, each ending in HOSTS_MARK;
# nothing else is touched.

hosts_without_ours() {
    awk -v m=" $HOSTS_MARK" '!(length($0) >= length(m) && substr($0, length($0) - length(m) + 1) == m)' /etc/hosts
}

# write_hosts < content: in place (the file may be a bind mount), only when it changes.
write_hosts() {
    local tmp
    tmp=$(mktemp /tmp/lf-hosts.XXXXXX)
    cat >"$tmp"
    if ! cmp -s "$tmp" /etc/hosts; then cat "$tmp" >/etc/hosts; fi
    rm -f "$tmp"
}

update_hosts() {
    local i name others
    others=$(hosts_without_ours)
    for name in "$CTLD_HOST" "${NODES[@]}"; do
        if awk -v n="$name" '{sub(/#.*/, "")} {for (f = 2; f <= NF; f++) if ($f == n) found = 1} END {exit !found}' \
            <<<"$others"; then
            die "/etc/hosts already names $name (not our line); set LF_SLURM_MULTI_NODE_STEM"
        fi
    done
    {
        printf '%s\n' "$others"
        printf '%s %s %s\n' "$CTLD_ADDR" "$CTLD_HOST" "$HOSTS_MARK"
        for i in "${!NODES[@]}"; do printf '%s %s %s\n' "$(node_addr $((i + 1)))" "${NODES[i]}" "$HOSTS_MARK"; done
    } | write_hosts
}

remove_hosts() {
    if grep -qF " $HOSTS_MARK" /etc/hosts; then
        log "removing our lines from /etc/hosts"
        hosts_without_ours | write_hosts
    fi
}

# ---------------------------------------------------------------------------------------
# Network: a bridge with the controller's address, one namespace per node joined to it by a
# veth pair. Every step is idempotent, so `up` repairs what is missing.

check_netns_tools() {
    local b
    [[ $(id -u) == 0 ]] || die_netns "needs root to create network namespaces and a bridge"
    for b in ip nsenter unshare hostname; do
        command -v "$b" >/dev/null 2>&1 || die_netns "$b not found (packages iproute2, util-linux, hostname)"
    done
}

setup_network() {
    local i node veth out owner
    owner=$(ip -o -4 addr show | awk -v p="$SUBNET." -v br="$BRIDGE" '$2 != br && index($4, p) == 1 {print $2; exit}')
    [[ -z $owner ]] || die "$SUBNET.0/24 is already used by interface $owner; set LF_SLURM_MULTI_SUBNET"
    for node in "${NODES[@]}"; do
        if [[ ! -e /var/run/netns/$node ]]; then
            out=$(ip netns add "$node" 2>&1) || die_netns "'ip netns add $node' failed: ${out//$'\n'/ }"
        fi
        out=$(in_node "$node" unshare --uts true 2>&1) ||
            die_netns "cannot enter namespace $node with nsenter + unshare --uts: ${out//$'\n'/ }"
    done
    if ! ip link show dev "$BRIDGE" >/dev/null 2>&1; then
        log "creating bridge $BRIDGE ($CTLD_ADDR/24)"
        out=$(ip link add "$BRIDGE" type bridge 2>&1) || die_netns "cannot create bridge $BRIDGE: ${out//$'\n'/ }"
    fi
    ip addr replace "$CTLD_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in "${!NODES[@]}"; do
        node=${NODES[i]}
        veth=$(veth_name "$node")
        # A host end without its peer in the namespace (a namespace re-made by hand) is stale.
        if ip link show dev "$veth" >/dev/null 2>&1 && ! ip -n "$node" link show dev "$IFNAME" >/dev/null 2>&1; then
            ip link del "$veth"
        fi
        if ! ip link show dev "$veth" >/dev/null 2>&1; then
            log "linking namespace $node ($IFNAME $(node_addr $((i + 1)))) to $BRIDGE"
            out=$(ip link add "$veth" type veth peer name "$IFNAME" netns "$node" 2>&1) ||
                die_netns "cannot create a veth pair into $node: ${out//$'\n'/ }"
        fi
        ip link set "$veth" master "$BRIDGE" up
        ip -n "$node" addr replace "$(node_addr $((i + 1)))/24" dev "$IFNAME"
        ip -n "$node" link set lo up
        ip -n "$node" link set "$IFNAME" up
    done
}

# kill_namespace NAME SIGNAL: SIGNAL every process in the namespace; after TERM wait (bounded)
# and KILL what is left. Returns 1 if something survived.
kill_namespace() {
    local node=$1 sig=$2 pids deadline
    [[ -e /var/run/netns/$node ]] || return 0
    pids=$(ip netns pids "$node" 2>/dev/null | tr '\n' ' ')
    [[ -n ${pids// /} ]] || return 0
    # shellcheck disable=SC2086  # a list of pids
    kill -"$sig" $pids 2>/dev/null || true
    deadline=$((SECONDS + 15))
    while [[ -n $(ip netns pids "$node" 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.1; done
    pids=$(ip netns pids "$node" 2>/dev/null | tr '\n' ' ')
    [[ -n ${pids// /} ]] || return 0
    if [[ $sig != KILL ]]; then
        log "processes in $node ignored $sig: sending KILL to $pids"
        kill_namespace "$node" KILL
        return
    fi
    log "processes in $node survived KILL: $pids"
    return 1
}

# remove_node NAME: its slurmd, every process in its namespace, its link, its namespace.
remove_node() {
    local node=$1 veth
    stop_pidfile "slurmd $node" "$(node_path "$SLURMD_PIDFILE" "$node")"
    kill_namespace "$node" TERM || true
    veth=$(veth_name "$node")
    if ip link show dev "$veth" >/dev/null 2>&1; then ip link del "$veth" || true; fi
    if [[ -e /var/run/netns/$node ]]; then
        log "removing namespace $node"
        ip netns del "$node" || log "could not remove namespace $node"
    fi
}

# ---------------------------------------------------------------------------------------
# Daemons

start_slurmd() {
    local node=$1 pidfile logfile
    pidfile=$(node_path "$SLURMD_PIDFILE" "$node")
    logfile=$(node_path "$SLURMD_LOGFILE" "$node")
    if pidfile_alive "$pidfile"; then return 0; fi
    log "starting slurmd -N $node in namespace $node"
    rm -f "$pidfile"
    # nsenter (not `ip netns exec`, see the top), then a UTS namespace with the node's hostname.
    # Nothing forks on the way: slurmd itself daemonises, and its daemon keeps both namespaces.
    in_node "$node" "${AS_HOST[@]}" "$node" slurmd -f "$CONF" -N "$node" </dev/null 9>&- ||
        { tail_log "$logfile"; die "slurmd on $node failed to start"; }
}

slurmds_alive() {
    local node
    for node in "${NODES[@]}"; do pidfile_alive "$(node_path "$SLURMD_PIDFILE" "$node")" || return 1; done
}

nodes_usable() {
    local node
    for node in "${NODES[@]}"; do node_usable "$node" || return 1; done
}

network_intact() {
    local node
    ip link show dev "$BRIDGE" >/dev/null 2>&1 || return 1
    for node in "${NODES[@]}"; do
        [[ -e /var/run/netns/$node ]] && ip link show dev "$(veth_name "$node")" >/dev/null 2>&1 || return 1
    done
}

stop_slurm() {
    local node
    for node in "${NODES[@]}"; do stop_pidfile "slurmd $node" "$(node_path "$SLURMD_PIDFILE" "$node")"; done
    stop_controller
}

# ---------------------------------------------------------------------------------------
# Commands

cmd_up() {
    local n=2 i node old=() spools=() holder="" others
    while (($#)); do
        case $1 in
            --holder)
                [[ $# -ge 2 ]] || die "up: --holder needs a process id"
                holder=$2
                shift 2
                ;;
            --nodes)
                [[ $# -ge 2 ]] || die "up: --nodes needs a number"
                n=$2
                shift 2
                ;;
            --nodes=*)
                n=${1#--nodes=}
                shift
                ;;
            *) die "up: unknown option $1 (only --nodes N, --holder PID)" ;;
        esac
    done
    [[ $n =~ ^[0-9]+$ ]] && ((10#$n >= 1 && 10#$n <= MAX_NODES)) || die "up: --nodes $n: want 1 to $MAX_NODES"
    n=$((10#$n))
    if [[ -n $holder ]]; then check_holder "$holder"; fi
    check_netns_tools
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null 2>&1 || die "up: $b not found; run '$0 install' first"
    done

    # Nodes of an earlier `up` with another count: the ones not wanted now go, unless others use them.
    if read_nodes; then old=("${NODES[@]}"); fi
    if ((${#old[@]} && ${#old[@]} != n)); then
        others=$(live_holders "$holder")
        [[ -z $others ]] ||
            die "up: the cluster runs ${#old[@]} nodes for processes $others; it cannot change to $n now"
    fi
    NODES=()
    for ((i = 1; i <= n; i++)); do NODES+=("$STEM$i"); done
    for node in "${old[@]}"; do
        if ! is_node "$node"; then
            log "node $node is no longer wanted (--nodes $n)"
            remove_node "$node"
        fi
    done
    mkdir -p "$PREFIX/etc"
    # Written before anything is made, so `down` finds what to remove even after a failed `up`.
    printf '%s\n' "${NODES[@]}" >"$NODES_FILE"

    setup_network
    update_hosts
    for node in "${NODES[@]}"; do spools+=("$(node_path "$SLURMD_SPOOL" "$node")"); done
    write_config "${spools[@]}"
    # Fast path: everything running with the same config.
    if ((CONF_CHANGED == 0)) && controller_alive && slurmds_alive && nodes_usable; then
        register_holder "$holder"
        print_env
        return 0
    fi
    if ((CONF_CHANGED)) &&
        { pidfile_alive "$PREFIX/run/slurmctld.pid" || pidfile_alive "$PREFIX/run/slurmdbd.pid"; }; then
        log "config changed: restarting the SLURM daemons"
        stop_slurm
    fi
    start_controller
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
    for node in "${NODES[@]}"; do
        resume_node "$node"
        wait_for "node $node idle" "$(node_path "$SLURMD_PIDFILE" "$node")" "$(node_path "$SLURMD_LOGFILE" "$node")" \
            node_usable "$node"
    done
    check_controller
    register_holder "$holder"
    log "up: cluster $CLUSTER, partition $PARTITION, nodes ${NODES[*]} ($NCPUS CPUs each) on $BRIDGE $SUBNET.0/24"
    print_env
}

register_holder() {
    [[ -n $1 ]] || return 0
    mkdir -p "$HOLDERS"
    proc_start "$1" >"$HOLDERS/$1"
}

cmd_down() {
    local wipe=0 node holder="" others
    while (($#)); do
        case $1 in
            --wipe) wipe=1 ;;
            --holder)
                [[ $# -ge 2 ]] || die "down: --holder needs a process id"
                holder=$2
                shift
                ;;
            *) die "down: unknown option $1 (only --wipe, --holder PID)" ;;
        esac
        shift
    done
    if [[ -n $holder ]]; then
        rm -f "$HOLDERS/$holder"
        others=$(live_holders)
        if [[ -n $others ]]; then
            log "down: still used by processes $others; leaving the cluster up"
            return 0
        fi
    fi
    rm -rf "$HOLDERS"
    read_nodes || true
    for node in "${NODES[@]}"; do remove_node "$node"; done
    stop_controller
    stop_backends
    if ip link show dev "$BRIDGE" >/dev/null 2>&1; then
        log "removing bridge $BRIDGE"
        ip link del "$BRIDGE"
    fi
    remove_hosts
    rm -f "$NODES_FILE"
    if ((wipe)); then
        # Controller state and accounting go together: job ids restart at 1, and an old
        # COMPLETED record cannot be mistaken for a new job with the same id.
        log "wiping state, spool and accounting under $PREFIX"
        rm -rf "$PREFIX/state" "$PREFIX/spool" "$DB" "$PREFIX/log" "$MUNGE_DIR"
    fi
}

cmd_kill_node() {
    local node=${1:-}
    read_nodes || die "kill-node: the cluster under $PREFIX is not up"
    [[ -n $node ]] || die "kill-node: which node? (${NODES[*]})"
    is_node "$node" || die "kill-node: no node '$node' in this cluster (${NODES[*]})"
    [[ -e /var/run/netns/$node ]] || die "kill-node: namespace $node does not exist"
    log "killing node $node: SIGKILL to every process in its namespace"
    kill_namespace "$node" KILL || die "kill-node: processes in $node survived SIGKILL"
    rm -f "$(node_path "$SLURMD_PIDFILE" "$node")"
    log "node $node is dead; slurmctld marks it DOWN within SlurmdTimeout (30 s); \`up\` restarts it"
}

cmd_status() {
    local rc=0 node
    controller_status || rc=3
    if ! read_nodes; then
        printf '%-10s none (not up)\n' nodes
        return 3
    fi
    for node in "${NODES[@]}"; do
        status_line "slurmd $node" "$(node_path "$SLURMD_PIDFILE" "$node")" || rc=3
    done
    network_intact || { printf '%-10s incomplete (bridge %s or a namespace is missing)\n' network "$BRIDGE"; rc=3; }
    if ((rc == 0)); then
        sinfo -N -o '%N %P %T %c %m' || rc=3
        nodes_usable || rc=3
    fi
    return $rc
}

main() {
    local cmd=${1:-}
    shift || true
    validate_knobs
    case $cmd in
        install) cmd_install ;;
        up)
            check_netns_tools  # before the lock: a non-root user cannot even write PREFIX/.lock
            locked up cmd_up "$@"
            ;;
        down) locked down cmd_down "$@" ;;
        kill-node) locked kill-node cmd_kill_node "$@" ;;
        status) cmd_status ;;
        *)
            local usage="{install|up [--nodes N] [--holder PID]|down [--wipe] [--holder PID]|status|kill-node NAME}"
            echo "usage: $0 $usage" >&2
            exit 2
            ;;
    esac
}

main "$@"
