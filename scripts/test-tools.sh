#!/usr/bin/env bash
# The programs the test suite starts by itself, on spare loopback ports, besides
# the Postgres and Redis that scripts/dev-services.sh provides:
#
#   initdb/pg_ctl/postgres  private Postgres servers (TLS, restart mid-stream)
#   pgbouncer               transaction and session pooling (tests/suite/pgbouncer.rs)
#   redis-cli               building a Redis Cluster (tests/suite/redis_cluster.rs);
#                           sentinels run as `redis-server --sentinel` (redis_sentinel.rs)
#   chromium, chromedriver  the dashboard's browser tests (dashboard.rs)
#
#   scripts/test-tools.sh check     say what is missing; exit 1 if anything is
#   scripts/test-tools.sh install   install what is missing from Debian's packages
#                                   (as root, or with passwordless sudo)
set -euo pipefail

say() { printf 'test-tools: %s\n' "$*"; }
die() { printf 'test-tools: error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }
pg_bin() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || have initdb; }

# "program package" pairs; a package is installed when its program is missing.
missing_packages() {
    local pkgs=()
    pg_bin || pkgs+=(postgresql)
    have pgbouncer || pkgs+=(pgbouncer)
    have redis-cli || pkgs+=(redis-tools)
    have chromium || pkgs+=(chromium)
    have chromedriver || pkgs+=(chromium-driver)
    printf '%s\n' "${pkgs[@]}"
}

mapfile -t missing < <(missing_packages | sed '/^$/d')

case "${1:-check}" in
check)
    if ((${#missing[@]})); then
        say "missing Debian packages: ${missing[*]} (scripts/test-tools.sh install, or apt-get install -y ${missing[*]})"
        exit 1
    fi
    say "every program the suite starts is installed"
    ;;
install)
    ((${#missing[@]})) || { say "nothing to install"; exit 0; }
    have apt-get || die "need Debian packages ${missing[*]} but apt-get is not available"
    sudo=()
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null && sudo -n true 2>/dev/null \
            || die "need root or passwordless sudo to install ${missing[*]}"
        sudo=(sudo -n)
    fi
    say "apt-get install -y ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    ;;
*)
    die "usage: $0 check|install"
    ;;
esac
