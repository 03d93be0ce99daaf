# Shared settings and helpers for slurm-up.sh, slurm-down.sh and slurm-node.sh.
# Sourced, not executed. Everything the cluster owns is derived from here so
# that down can find exactly what up made.

CLUSTER_SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

STATE_DIR=${FLASHNET_SLURM_DIR:-/tmp/flashnet-slurm}
# A marker so that down never deletes a directory it did not create (the
# state dir is overridable and could be pointed anywhere by mistake).
MARKER="$STATE_DIR/.flashnet-slurm"

CLUSTER_NAME=flashnet
PARTITION=debug
ACCOUNT=flashnet
CTL_NAME=flashnet-ctl
NODES=(flashnet-n1 flashnet-n2)
NODE_CPUS=2
NODE_MEM_MB=4000

# Private /24 that only exists on our bridge; the namespaces get no default
# route, so nothing they send can leave this subnet.
SUBNET=${FLASHNET_SLURM_SUBNET:-10.213.47}
BRIDGE=fnslurm0
# Same name in every namespace, so a job can pin gloo/NCCL to it with
# GLOO_SOCKET_IFNAME regardless of which node it lands on.
NODE_IFNAME=fn0

# Non-default ports so a system slurm/mariadb (if any) does not clash.
MYSQL_PORT=16306
SLURMCTLD_PORT=16817
SLURMD_PORT=16818
SLURMDBD_PORT=16819

HOSTS_MARK="# flashnet-slurm"
HOSTS_BACKUP="$STATE_DIR/hosts.orig"

ETC_DIR="$STATE_DIR/etc"
RUN_DIR="$STATE_DIR/run"
LOG_DIR="$STATE_DIR/log"
MUNGE_DIR="$STATE_DIR/munge"
MYSQL_DIR="$STATE_DIR/mysql"
MUNGE_SOCKET="$MUNGE_DIR/munge.sock"
MYSQL_SOCKET="$MYSQL_DIR/mysqld.sock"
export SLURM_CONF="$ETC_DIR/slurm.conf"

_T0=${EPOCHREALTIME/./}
log() {
    local us=$((${EPOCHREALTIME/./} - _T0))
    printf '[%s +%d.%ds] %s\n' "$(basename "$0" .sh)" $((us / 1000000)) $((us / 100000 % 10)) "$*"
}
die() { log "ERROR: $*" >&2; exit 1; }

ctl_addr() { echo "$SUBNET.1"; }
node_index() {
    local i
    for i in "${!NODES[@]}"; do
        [[ ${NODES[$i]} == "$1" ]] && { echo "$i"; return 0; }
    done
    return 1
}
node_addr() { local i; i=$(node_index "$1") || die "unknown node $1"; echo "$SUBNET.$((11 + i))"; }
node_netns() { echo "$1"; }
# Host-side veth names are limited to 15 characters.
node_veth() { echo "fnv-${1##*-}"; }

# pid from a pid file, only if that process is still the daemon we expect
# (guards against killing an unrelated process that reused the pid).
live_pid() {
    local pidfile=$1 name=$2 pid argv0
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    argv0=$(tr '\0' '\n' <"/proc/$pid/cmdline" | head -n1)
    [[ $(basename "$argv0") == "$name"* ]] || return 1
    echo "$pid"
}

netns_exists() { [[ -e /run/netns/$1 ]]; }

# Every process whose network namespace is the node's: slurmd, slurmstepd and
# the job processes. `ip netns pids` compares namespace inodes, so it finds
# them however they were started.
netns_pids() { netns_exists "$1" && ip netns pids "$1" 2>/dev/null || true; }

# Polls a command until it succeeds; on timeout prints the tail of the given
# logs so the failure explains itself.
wait_for() {
    local what=$1 timeout=$2 cmd=$3; shift 3
    local deadline=$((SECONDS + timeout))
    until eval "$cmd" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${timeout}s waiting for $what" >&2
            local f
            for f in "$@"; do
                [[ -e $f ]] || continue
                log "---- tail of $f ----" >&2
                tail -n 40 "$f" >&2
            done
            return 1
        fi
        sleep 0.2
    done
}
