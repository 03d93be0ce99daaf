#!/usr/bin/env bash
# Starts a private two-node SLURM cluster (Debian's SLURM 22.05) on this
# machine for the end-to-end tests: MariaDB + slurmdbd for accounting (sacct),
# slurmctld on a private bridge, and one slurmd per node, each in its own
# network + UTS namespace. All state lives in $FLASHNET_SLURM_DIR
# (default /tmp/flashnet-slurm); clients source "$FLASHNET_SLURM_DIR/env.sh".
# slurm-down.sh undoes everything. Needs root.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"

t_start=$SECONDS
[[ $(id -u) -eq 0 ]] || die "must run as root (namespaces, /etc/hosts, daemons)"
for bin in ip ss nsenter unshare setsid munged munge unmunge mariadbd mariadb-install-db mariadb \
    mariadb-admin slurmdbd slurmctld slurmd sacctmgr sinfo scontrol; do
    command -v "$bin" >/dev/null || die "$bin not found (run tests/e2e/cluster/system-deps.sh)"
done

cluster_healthy() {
    [[ -e $MARKER ]] || return 1
    live_pid "$MUNGE_DIR/munged.pid" munged >/dev/null || return 1
    live_pid "$MYSQL_DIR/mysqld.pid" mariadbd >/dev/null || return 1
    live_pid "$RUN_DIR/slurmdbd.pid" slurmdbd >/dev/null || return 1
    live_pid "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null || return 1
    local node
    for node in "${NODES[@]}"; do
        live_pid "$RUN_DIR/slurmd-$node.pid" slurmd >/dev/null || return 1
        [[ $(sinfo -h -N -n "$node" -o '%t' 2>/dev/null) =~ ^(idle|mix|alloc)$ ]] || return 1
    done
}

if [[ -e $MARKER ]]; then
    if cluster_healthy; then
        log "cluster already up in $STATE_DIR; reusing it"
        exit 0
    fi
    log "found an unhealthy cluster in $STATE_DIR; tearing it down first"
    "$HERE/slurm-down.sh"
fi
[[ ! -e $STATE_DIR ]] || [[ -z $(ls -A "$STATE_DIR") ]] \
    || die "$STATE_DIR exists and is not a cluster state dir; refusing to use it"

# A failed start should not leave half a cluster behind; wait_for already
# printed the relevant logs. FLASHNET_SLURM_KEEP_ON_FAILURE=1 keeps it all for
# debugging.
on_exit() {
    local rc=$?
    ((rc != 0)) || return 0
    if [[ ${FLASHNET_SLURM_KEEP_ON_FAILURE:-0} == 1 ]]; then
        log "start failed (rc=$rc); leaving $STATE_DIR for inspection" >&2
    else
        log "start failed (rc=$rc); cleaning up with slurm-down.sh" >&2
        "$HERE/slurm-down.sh" >&2 || true
    fi
}
trap on_exit EXIT

mkdir -p "$STATE_DIR"
touch "$MARKER"
mkdir -p "$ETC_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/ctld" "$STATE_DIR/spool"
# munged refuses key/socket directories that others can read or write.
install -d -m 0700 "$MUNGE_DIR"
install -d -m 0700 "$MYSQL_DIR"

# ---------------------------------------------------------------- network
# Refuse a subnet that is already routed here: we must only ever talk to
# addresses we created ourselves.
if [[ -n $(ip -4 route show to match "$SUBNET.1" | grep -v '^default') ]]; then
    die "subnet $SUBNET.0/24 is already in use here (set FLASHNET_SLURM_SUBNET)"
fi
ip link show "$BRIDGE" >/dev/null 2>&1 && die "bridge $BRIDGE already exists (stale? run slurm-down.sh)"
for node in "${NODES[@]}"; do
    netns_exists "$(node_netns "$node")" && die "netns $(node_netns "$node") already exists (stale? run slurm-down.sh)"
done

# The controller-side daemons listen in the host's namespace.
for port in "$MYSQL_PORT" "$SLURMDBD_PORT" "$SLURMCTLD_PORT"; do
    [[ -z $(ss -Hltn "sport = :$port") ]] || die "TCP port $port is already in use here"
done

log "network: bridge $BRIDGE $(ctl_addr)/24, nodes ${NODES[*]}"
# The first `ip netns add` on a machine creates /run/netns and bind-mounts it
# onto itself; remember that so down can undo it too. (The bridge, veths and
# namespaces have reserved names; down finds them by name.)
[[ -e /run/netns ]] || echo "rundir /run/netns" >>"$STATE_DIR/net.created"
ip link add "$BRIDGE" type bridge
ip addr add "$(ctl_addr)/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for node in "${NODES[@]}"; do
    ns=$(node_netns "$node") veth=$(node_veth "$node")
    ip netns add "$ns"
    ip link add "$veth" type veth peer name "$NODE_IFNAME" netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$(node_addr "$node")/24" dev "$NODE_IFNAME"
    ip -n "$ns" link set "$NODE_IFNAME" up
done

# ------------------------------------------------------------ /etc/hosts
# Node names must resolve everywhere (slurmctld, srun, gloo's MASTER_ADDR).
# Only marked lines are added; down removes exactly those.
cp -a /etc/hosts "$HOSTS_BACKUP"
{
    # Keep the last original line intact if the file lacks a final newline.
    [[ -s /etc/hosts && $(tail -c1 /etc/hosts | od -An -c | tr -d ' ') != '\n' ]] && echo
    echo "$(ctl_addr) $CTL_NAME $HOSTS_MARK"
    for node in "${NODES[@]}"; do
        echo "$(node_addr "$node") $node $HOSTS_MARK"
    done
} >>/etc/hosts
# (append in place: /etc/hosts may be a bind mount that cannot be replaced)

# ------------------------------------------------------------------ munge
log "munge: private key and socket $MUNGE_SOCKET"
dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
chmod 0400 "$MUNGE_DIR/munge.key"
# --force: munged otherwise refuses to run as root.
setsid munged -F --force \
    --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$LOG_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" \
    </dev/null >>"$LOG_DIR/munged.out" 2>&1 &
wait_for munged 20 'munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET"' \
    "$LOG_DIR/munged.log" "$LOG_DIR/munged.out"

# ---------------------------------------------------------------- mariadb
log "mariadb: datadir $MYSQL_DIR/data, $(ctl_addr):$MYSQL_PORT"
# --no-defaults everywhere: the system's /etc/mysql config must not leak in.
mariadb-install-db --no-defaults --user=root --datadir="$MYSQL_DIR/data" \
    --auth-root-authentication-method=socket --skip-test-db \
    >"$LOG_DIR/mariadb-install.log" 2>&1 \
    || { tail -n 40 "$LOG_DIR/mariadb-install.log" >&2; false; }
setsid mariadbd --no-defaults --user=root --datadir="$MYSQL_DIR/data" \
    --socket="$MYSQL_SOCKET" --pid-file="$MYSQL_DIR/mysqld.pid" \
    --bind-address="$(ctl_addr)" --port="$MYSQL_PORT" --skip-name-resolve \
    --log-error="$LOG_DIR/mariadb.log" --skip-log-bin \
    --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
    --innodb-flush-log-at-trx-commit=0 --innodb-flush-method=nosync --innodb-doublewrite=0 \
    </dev/null >>"$LOG_DIR/mariadb.out" 2>&1 &
wait_for mariadb 60 'mariadb-admin --no-defaults -S "$MYSQL_SOCKET" -u root ping' \
    "$LOG_DIR/mariadb.log" "$LOG_DIR/mariadb.out"
MYSQL_PASS=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
# --skip-name-resolve: grants are per address; slurmdbd connects from the
# bridge address over TCP (it cannot be pointed at a custom socket).
mariadb --no-defaults -S "$MYSQL_SOCKET" -u root <<SQL
CREATE USER 'slurm'@'$(ctl_addr)' IDENTIFIED BY '$MYSQL_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'$(ctl_addr)';
SQL

# ----------------------------------------------------------- slurm config
render() {
    sed -e "s|@CLUSTER_NAME@|$CLUSTER_NAME|g" -e "s|@CTL_NAME@|$CTL_NAME|g" \
        -e "s|@CTL_ADDR@|$(ctl_addr)|g" -e "s|@STATE_DIR@|$STATE_DIR|g" \
        -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" -e "s|@MYSQL_PORT@|$MYSQL_PORT|g" \
        -e "s|@MYSQL_PASS@|$MYSQL_PASS|g" -e "s|@SLURMCTLD_PORT@|$SLURMCTLD_PORT|g" \
        -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@SLURMDBD_PORT@|$SLURMDBD_PORT|g" \
        "$1"
}
render "$HERE/slurm.conf.in" >"$ETC_DIR/slurm.conf"
{
    echo
    for node in "${NODES[@]}"; do
        echo "NodeName=$node NodeAddr=$(node_addr "$node") NodeHostname=$node" \
            "CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN"
    done
    echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES" \
        "MaxTime=INFINITE State=UP OverSubscribe=NO"
} >>"$ETC_DIR/slurm.conf"
# slurmdbd refuses a config readable by others (it holds the DB password).
(umask 077 && render "$HERE/slurmdbd.conf.in" >"$ETC_DIR/slurmdbd.conf")
: >"$ETC_DIR/plugstack.conf"
# Each "export K=V" line a TaskProlog prints is set in the task's env.
cat >"$ETC_DIR/task-prolog.sh" <<EOF
#!/bin/sh
dir="$STATE_DIR/tmp/job-\$SLURM_JOB_ID"
mkdir -p "\$dir" && echo "export TMPDIR=\$dir"
EOF
chmod 755 "$ETC_DIR/task-prolog.sh"

# Controller daemons run in the host's network namespace (reachable from the
# nodes through the bridge) but under the controller's hostname, which
# slurmctld and slurmdbd compare against SlurmctldHost / DbdHost.
start_ctl_daemon() {
    local name=$1; shift
    setsid unshare --uts -- sh -c 'hostname "$1" && shift && exec "$@"' \
        sh "$CTL_NAME" "$@" </dev/null >>"$LOG_DIR/$name.out" 2>&1 &
}

# --------------------------------------------------------------- slurmdbd
log "slurmdbd: $(ctl_addr):$SLURMDBD_PORT"
start_ctl_daemon slurmdbd slurmdbd -D
# Wait for the listening socket first: a sacctmgr that finds no slurmdbd
# backs off for seconds before it gives up.
wait_for "slurmdbd to listen" 30 '[[ -n $(ss -Hltn "sport = :$SLURMDBD_PORT") ]]' \
    "$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmdbd.out"
wait_for slurmdbd 30 'sacctmgr -n -P list cluster' "$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmdbd.out"
log "slurmdbd up; adding cluster, account and user"
sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER_NAME" \
    Description="flashnet e2e tests" Organization=flashnet >/dev/null
sacctmgr -i add user root Cluster="$CLUSTER_NAME" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null

# -------------------------------------------------------------- slurmctld
log "slurmctld: $CTL_NAME $(ctl_addr):$SLURMCTLD_PORT"
start_ctl_daemon slurmctld slurmctld -D
wait_for "slurmctld to listen" 30 '[[ -n $(ss -Hltn "sport = :$SLURMCTLD_PORT") ]]' \
    "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmctld.out"
wait_for slurmctld 30 'scontrol ping | grep -q UP' "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmctld.out"

# ----------------------------------------------------------------- slurmd
for node in "${NODES[@]}"; do
    "$HERE/slurm-node.sh" start "$node"
done
for node in "${NODES[@]}"; do
    "$HERE/slurm-node.sh" wait "$node" 40
done
# The controller registers with slurmdbd asynchronously; until it has, jobs
# would not reach the accounting database that sacct reads.
wait_for "slurmctld to register with slurmdbd" 30 \
    '[[ -n $(sacctmgr -n -P list cluster "$CLUSTER_NAME" format=ControlHost) ]]' \
    "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmdbd.log"

# ----------------------------------------------------------------- env.sh
cat >"$STATE_DIR/env.sh" <<EOF
# Source this to use the flashnet e2e SLURM cluster (written by slurm-up.sh).
export SLURM_CONF=$SLURM_CONF
export FLASHNET_SLURM_DIR=$STATE_DIR
export FLASHNET_SLURM_CLUSTER=$CLUSTER_NAME
export FLASHNET_SLURM_PARTITION=$PARTITION
export FLASHNET_SLURM_ACCOUNT=$ACCOUNT
export FLASHNET_SLURM_NODES="${NODES[*]}"
export FLASHNET_SLURM_NODE_IFNAME=$NODE_IFNAME
EOF

log "cluster up in $((SECONDS - t_start))s: partition $PARTITION, account $ACCOUNT, nodes ${NODES[*]}"
log "clients: source $STATE_DIR/env.sh"
sinfo
