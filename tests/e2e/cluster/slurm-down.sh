#!/usr/bin/env bash
# Stops the e2e SLURM cluster started by slurm-up.sh and puts the machine
# back as it was: daemons stopped by pid, namespaces/bridge/veths deleted,
# our /etc/hosts lines removed, the state dir deleted. Safe to run when
# nothing is up (then it does nothing).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"

[[ $(id -u) -eq 0 ]] || die "must run as root"

did=0

# SIGTERM first so slurmctld/mariadb shut down cleanly, SIGKILL after a grace
# period: down must not hang on a wedged daemon.
# A zombie counts as gone: it is no longer running, only unreaped.
alive() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z ]]
}

stop_pid() {
    local what=$1 pid=$2 grace=${3:-10} i
    log "stopping $what (pid $pid)"
    did=1
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < grace * 10; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "$what did not exit within ${grace}s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "WARNING: $what (pid $pid) still exists" >&2
}

stop_pidfile() {
    local what=$1 pidfile=$2 name=$3 pid
    if pid=$(live_pid "$pidfile" "$name"); then
        stop_pid "$what" "$pid" "${4:-10}"
    fi
}

# 1. Compute nodes: slurmd, then whatever still lives in the node's
# namespace (slurmstepd, job processes): those are not children of slurmd
# any more and would otherwise outlive the cluster.
for node in "${NODES[@]}"; do
    stop_pidfile "slurmd $node" "$RUN_DIR/slurmd-$node.pid" slurmd 5
    ns=$(node_netns "$node")
    for round in 1 2 3; do
        pids=$(netns_pids "$ns")
        [[ -n $pids ]] || break
        log "killing leftover processes in $ns: $(echo $pids)"
        did=1
        kill -KILL $pids 2>/dev/null || true
        sleep 0.2
    done
done

# 2. Controller side, in reverse start order.
stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid" slurmctld
stop_pidfile slurmdbd "$RUN_DIR/slurmdbd.pid" slurmdbd
stop_pidfile mariadbd "$MYSQL_DIR/mysqld.pid" mariadbd 30
stop_pidfile munged "$MUNGE_DIR/munged.pid" munged

# 3. Network. The names are reserved for this cluster, so leftovers from a
# run whose state dir is gone are removed too. Deleting a namespace also
# deletes the veth end inside it, and with it the host end.
for node in "${NODES[@]}"; do
    ns=$(node_netns "$node")
    if netns_exists "$ns"; then
        log "deleting netns $ns"
        ip netns del "$ns"
        did=1
    fi
done
# The host ends vanish asynchronously after `ip netns del`; wait for that so
# an immediate slurm-up can recreate them, and delete any that stay.
for node in "${NODES[@]}"; do
    veth=$(node_veth "$node")
    for ((i = 0; i < 50; i++)); do
        ip link show "$veth" >/dev/null 2>&1 || break
        sleep 0.1
    done
    if ip link show "$veth" >/dev/null 2>&1; then
        log "deleting veth $veth"
        ip link del "$veth" 2>/dev/null || true
        did=1
    fi
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "deleting bridge $BRIDGE"
    ip link del "$BRIDGE"
    did=1
fi

if [[ -f $STATE_DIR/net.created ]] && grep -qx "rundir /run/netns" "$STATE_DIR/net.created" \
    && [[ -d /run/netns && -z $(ls -A /run/netns) ]]; then
    log "removing /run/netns (created by slurm-up.sh)"
    for ((i = 0; i < 5; i++)); do
        mountpoint -q /run/netns || break
        umount /run/netns
    done
    rmdir /run/netns
    did=1
fi

# 4. /etc/hosts: drop only our marked lines. If what remains is the backup
# taken by up (modulo the newline up may have had to add), write the backup
# back byte for byte. Written in place: /etc/hosts may be a bind mount.
if grep -qF "$HOSTS_MARK" /etc/hosts; then
    log "removing our lines from /etc/hosts"
    did=1
    filtered=$(grep -vF "$HOSTS_MARK" /etc/hosts || true)
    if [[ -f $HOSTS_BACKUP && $(cat "$HOSTS_BACKUP") == "$filtered" ]]; then
        cat "$HOSTS_BACKUP" >/etc/hosts
        touch -r "$HOSTS_BACKUP" /etc/hosts
    else
        printf '%s\n' "$filtered" >/etc/hosts
    fi
fi

# 5. State dir, only if up created it.
if [[ -e $MARKER ]]; then
    log "removing $STATE_DIR"
    rm -rf --one-file-system "$STATE_DIR"
    did=1
elif [[ -e $STATE_DIR ]]; then
    log "leaving $STATE_DIR alone: not created by slurm-up.sh"
fi

if ((did)); then
    log "cluster down"
else
    log "nothing to do: no cluster was up"
fi
