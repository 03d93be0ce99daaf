#!/usr/bin/env bash
# Per-node control of the e2e SLURM cluster started by slurm-up.sh.
#
#   slurm-node.sh start NODE          start the node's slurmd (no-op if running)
#   slurm-node.sh kill NODE           SIGKILL every process in the node's netns
#   slurm-node.sh wait NODE [SECS]    wait until slurmctld sees the node usable
#   slurm-node.sh state NODE          print the node's sinfo state
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,7s/^# \{0,1\}//p' "$0" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
action=$1 node=$2
node_index "$node" >/dev/null || die "unknown node '$node' (nodes: ${NODES[*]})"
ns=$(node_netns "$node")

slurmd_pid() { live_pid "$RUN_DIR/slurmd-$node.pid" slurmd; }

start_node() {
    [[ -e $MARKER ]] || die "no cluster in $STATE_DIR (run slurm-up.sh)"
    netns_exists "$ns" || die "network namespace $ns is missing"
    if pid=$(slurmd_pid); then
        log "slurmd for $node already running (pid $pid)"
        return 0
    fi
    mkdir -p "$STATE_DIR/spool/$node"
    # wait compares this with the SlurmdStartTime slurmctld reports, so it
    # does not mistake a killed node that is not yet marked DOWN for a
    # restarted one.
    date +%s >"$RUN_DIR/slurmd-$node.started"
    # nsenter keeps the host's mounts: `ip netns exec` remounts /sys, after
    # which slurmd refuses to start ("No filesystem mounted on
    # /sys/fs/cgroup"). The private UTS namespace gives every node its own
    # hostname, which is what jobs (and gloo's address lookup) see.
    # The private mount namespace shows our config at /etc/slurm to the node
    # only (nothing changes on the host): tools that scrub SLURM_* from the
    # environment before calling srun inside a job (Snakemake's jobstep
    # executor drops SLURM_CONF) still find the cluster, as on a real node.
    # setsid detaches it from the caller so a Ctrl-C in pytest does not
    # reach it.
    local bind=""
    if [[ -d /etc/slurm ]]; then
        bind='mount --bind "$3" /etc/slurm && '
    else
        log "WARNING: no /etc/slurm to overlay; srun in jobs needs SLURM_CONF" >&2
    fi
    setsid nsenter --net="/run/netns/$ns" -- unshare --uts --mount --propagation private -- \
        sh -c "$bind"'hostname "$1" && echo $$ >"$2" && exec slurmd -D -N "$1"' \
        sh "$node" "$RUN_DIR/slurmd-$node.pid" "$ETC_DIR" \
        </dev/null >>"$LOG_DIR/slurmd-$node.out" 2>&1 &
    log "started slurmd for $node (pid $!) in netns $ns"
}

kill_node() {
    local pids round=0
    netns_exists "$ns" || die "network namespace $ns is missing"
    # Loop because a dying slurmd/slurmstepd may still fork in between.
    while pids=$(netns_pids "$ns") && [[ -n $pids ]]; do
        ((round++ < 50)) || die "processes in $ns survive SIGKILL: $pids"
        log "SIGKILL in $ns: $(echo $pids)"
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    rm -f "$RUN_DIR/slurmd-$node.pid"
}

node_state() { sinfo -h -N -n "$node" -o '%t' 2>/dev/null | head -n1; }

# True once the slurmd launched by the last `start` has registered.
registered_since_start() {
    local started t
    started=$(cat "$RUN_DIR/slurmd-$node.started" 2>/dev/null) || return 0
    t=$(scontrol show node "$node" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2)
    [[ -n $t && $t != None ]] || return 1
    (($(date -d "$t" +%s) >= started))
}

wait_node() {
    local timeout=${1:-60}
    # Usable = responding (no '*' suffix) and neither down nor drained.
    wait_for "node $node to become usable" "$timeout" \
        'registered_since_start && [[ $(node_state) =~ ^(idle|mix|alloc)$ ]]' \
        "$LOG_DIR/slurmd-$node.log" "$LOG_DIR/slurmd-$node.out" "$LOG_DIR/slurmctld.log" \
        || { log "last state of $node: $(node_state)" >&2; exit 1; }
    log "node $node is $(node_state)"
}

case $action in
    start) start_node ;;
    kill) kill_node ;;
    wait) wait_node "${3:-60}" ;;
    state) node_state ;;
    *) usage ;;
esac
