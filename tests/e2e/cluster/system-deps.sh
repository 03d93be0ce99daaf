#!/usr/bin/env bash
# Installs the Debian packages the end-to-end tests need (a private SLURM
# cluster, a browser for the report tests, iproute2 for the node namespaces).
# Idempotent: apt is only touched when a package is missing. Must run as root.
set -euo pipefail

PACKAGES=(slurm-wlm slurmdbd munge mariadb-server chromium iproute2)
# slurm-up.sh starts the daemons through these binaries, so their presence is
# checked too: a half-removed package can leave dpkg "installed" state behind.
BINARIES=(slurmctld slurmd slurmdbd sacctmgr munged mariadbd mysql_install_db ip nsenter unshare)
DAEMONS=(mariadbd mysqld munged slurmctld slurmd slurmdbd)

log() { printf '[system-deps] %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (apt-get install)" >&2
    exit 1
fi

daemons_before=" "
for d in "${DAEMONS[@]}"; do
    daemons_before+="$(pgrep -x "$d" | tr '\n' ' ' || true)"
done

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
    if [[ $status != ii* ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    log "all packages already installed: ${PACKAGES[*]}"
else
    log "missing packages: ${missing[*]}"

    # Package postinst scripts would start mariadb/munge/slurm as system
    # services; the tests run their own private instances instead, so forbid
    # service starts for the duration of the install. An administrator's own
    # policy-rc.d (Docker images ship one) is put back untouched afterwards.
    policy=/usr/sbin/policy-rc.d
    policy_backup=""
    if [[ -e $policy ]]; then
        policy_backup=$(mktemp /usr/sbin/.policy-rc.d.flashnet.XXXXXX)
        cp -a "$policy" "$policy_backup"
        log "saved existing $policy to $policy_backup"
    fi
    restore_policy() {
        if [[ -n $policy_backup ]]; then
            mv -f "$policy_backup" "$policy"
            log "restored the original $policy"
        else
            rm -f "$policy"
            log "removed the temporary $policy"
        fi
    }
    trap restore_policy EXIT
    printf '#!/bin/sh\n# flashnet system-deps.sh: no service starts during install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    log "installed temporary $policy (exit 101)"

    export DEBIAN_FRONTEND=noninteractive
    log "apt-get update"
    apt-get update -q
    log "apt-get install ${missing[*]}"
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}"

    restore_policy
    trap - EXIT
fi

for bin in "${BINARIES[@]}"; do
    if ! command -v "$bin" >/dev/null 2>&1; then
        log "binary $bin still missing after install" >&2
        exit 1
    fi
done
log "binaries present: ${BINARIES[*]}"

# The packages must not have left their system daemons behind (they would
# hold the default ports and munge socket and confuse the private cluster).
# Daemons that were already running before (e.g. a test cluster that is up)
# are not this install's doing and are only reported.
left=()
for d in "${DAEMONS[@]}"; do
    for pid in $(pgrep -x "$d" || true); do
        if [[ " $daemons_before " != *" $pid "* ]]; then
            left+=("$d[$pid]")
        fi
    done
done
if [[ ${#left[@]} -gt 0 ]]; then
    log "the install left daemons running: ${left[*]}" >&2
    exit 1
fi
if [[ -n ${daemons_before// /} ]]; then
    log "note: daemon pids already running before this script: $daemons_before"
else
    log "no mariadb/munge/slurm daemon running"
fi
log "done"
