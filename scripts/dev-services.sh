#!/usr/bin/env bash
# Development services for Herald: Postgres and Redis on 127.0.0.1.
#
#   scripts/dev-services.sh up      reuse what already answers, start what is missing
#   scripts/dev-services.sh down    stop only what `up` started (recorded in .dev/started)
#   scripts/dev-services.sh status  say what answers
#   scripts/dev-services.sh env     print `export` lines for the URLs to use
#                                   (eval "$(scripts/dev-services.sh env)"; values
#                                   already in the environment win)
#
# `up` leaves Postgres alone when DATABASE_URL is set and Redis alone when
# REDIS_URL is set. Otherwise it uses whatever answers on the port; failing
# that it starts the service with `docker compose` when a Docker engine is
# reachable, else from local binaries into .dev/ (git-ignored).
#
# Overrides (for running a second, private pair next to the usual one):
#   HERALD_DEV_PG_PORT     (default 5432)
#   HERALD_DEV_REDIS_PORT  (default 6379)
#   HERALD_DEV_DIR         (default <project>/.dev)
#   HERALD_DEV_NO_DOCKER=1 never use docker, always local binaries
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV_DIR="${HERALD_DEV_DIR:-$ROOT/.dev}"
HOST=127.0.0.1
PG_PORT="${HERALD_DEV_PG_PORT:-5432}"
REDIS_PORT="${HERALD_DEV_REDIS_PORT:-6379}"
STARTED="$DEV_DIR/started"
PG_LOG="$DEV_DIR/pg.log"
REDIS_DIR="$DEV_DIR/redis"
REDIS_LOG="$DEV_DIR/redis.log"
REDIS_PID="$DEV_DIR/redis.pid"
WAIT_SECONDS="${HERALD_DEV_WAIT_SECONDS:-30}"
DEV_OS_USER=herald-dev

say() { printf 'dev-services: %s\n' "$*"; }
die() { printf 'dev-services: error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------- probes

# 0 when something accepts connections on HOST:PG_PORT (or is starting up).
pg_answers() {
    if have pg_isready; then
        local rc=0
        pg_isready -q -h "$HOST" -p "$PG_PORT" -t 2 || rc=$?
        # 0 = accepting, 1 = rejecting (starting up / shutting down), 2 = no answer.
        [[ $rc -eq 0 || $rc -eq 1 ]]
    else
        tcp_open "$HOST" "$PG_PORT"
    fi
}

# 0 when Postgres accepts connections (not merely listening).
pg_ready() {
    if have pg_isready; then
        pg_isready -q -h "$HOST" -p "$PG_PORT" -t 2
    else
        tcp_open "$HOST" "$PG_PORT"
    fi
}

tcp_open() {
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# 0 when Redis answers PING with PONG on HOST:REDIS_PORT.
redis_answers() {
    local reply=""
    if have redis-cli; then
        # A password is harmless to a server without one (Redis 6+).
        reply="$(REDISCLI_AUTH="${HERALD_REDIS_PASSWORD:-herald}" timeout 3 redis-cli --no-auth-warning \
            -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null </dev/null || true)"
    else
        # AUTH first (an error on a server without a password), then PING.
        reply="$(timeout 3 bash -c '
            exec 3<>"/dev/tcp/$1/$2" || exit 1
            printf "AUTH %s\r\nPING\r\n" "$3" >&3
            IFS= read -r -t 2 line <&3 || exit 1
            IFS= read -r -t 2 line <&3 || exit 1
            printf "%s" "$line"' _ "$HOST" "$REDIS_PORT" "${HERALD_REDIS_PASSWORD:-herald}" 2>/dev/null || true)"
    fi
    [[ "${reply%$'\r'}" == "+PONG" || "${reply%$'\r'}" == "PONG" ]]
}

docker_usable() {
    [[ "${HERALD_DEV_NO_DOCKER:-0}" != 1 ]] || return 1
    have docker || return 1
    docker info >/dev/null 2>&1 || return 1
    docker compose version >/dev/null 2>&1
}

wait_for() { # what check-function hint
    local what="$1" check="$2" hint="$3" i
    for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
        if "$check"; then return 0; fi
        sleep 0.5
    done
    die "$what did not answer within ${WAIT_SECONDS}s; $hint"
}

# ------------------------------------------------------- the started file

record() { # line
    mkdir -p "$DEV_DIR"
    touch "$STARTED"
    grep -qxF -- "$1" "$STARTED" || printf '%s\n' "$1" >>"$STARTED"
}

started_field() { # kind -> the rest of the first line "kind ..."
    [[ -f "$STARTED" ]] || return 1
    local line
    line="$(grep -m1 -E "^$1( |\$)" "$STARTED")" || return 1
    printf '%s\n' "${line#"$1"}"
}

forget() { # kind
    [[ -f "$STARTED" ]] || return 0
    local tmp="$STARTED.tmp"
    grep -vE "^$1( |\$)" "$STARTED" >"$tmp" || true
    if [[ -s "$tmp" ]]; then mv "$tmp" "$STARTED"; else rm -f "$tmp" "$STARTED"; fi
}

# --------------------------------------------------------- local Postgres

# Directory holding initdb, pg_ctl and postgres: PATH first, then the highest
# version under /usr/lib/postgresql (Debian/Ubuntu) or /usr/pgsql-* (RHEL).
pg_bindir() {
    if have initdb && have pg_ctl && have postgres; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return 0
    fi
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin /usr/pgsql-*/bin 2>/dev/null \
        | awk -F/ '{ v = ($3 == "lib") ? $5 : substr($3, 7); print v "\t" $0 }' \
        | sort -t$'\t' -k1,1V | tail -n1 | cut -f2)" || true
    if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]]; then
        printf '%s\n' "$d"
        return 0
    fi
    return 1
}

# The OS user that runs the server: us, unless we are root (Postgres refuses).
pg_os_user() {
    if [[ $EUID -ne 0 ]]; then id -un; return; fi
    if id postgres >/dev/null 2>&1; then echo postgres; return; fi
    if ! id "$DEV_OS_USER" >/dev/null 2>&1; then
        have useradd || die "running as root, no 'postgres' user and no useradd to create '$DEV_OS_USER'"
        useradd --system --no-create-home --shell /usr/sbin/nologin "$DEV_OS_USER" 2>/dev/null \
            || id "$DEV_OS_USER" >/dev/null 2>&1 \
            || die "could not create the system user '$DEV_OS_USER'"
    fi
    echo "$DEV_OS_USER"
}

as_user() { # user cmd...
    local user="$1"; shift
    if [[ "$user" == "$(id -un)" ]]; then
        "$@"
    else
        runuser -u "$user" -- "$@"
    fi
}

# Data directory: .dev/pg, unless the server user cannot reach it (a project
# under /root, say); then a directory of our own under /tmp.
pg_datadir_for() { # user
    local user="$1" dir="$DEV_DIR/pg"
    if [[ "$user" == "$(id -un)" ]] || as_user "$user" test -x "$DEV_DIR" 2>/dev/null; then
        printf '%s\n' "$dir"
    else
        local sum
        sum="$(printf '%s' "$DEV_DIR" | cksum | cut -d' ' -f1)"
        printf '%s\n' "${TMPDIR:-/tmp}/herald-dev-pg-$sum"
    fi
}

start_local_pg() {
    local bindir user datadir sockdir logfile
    bindir="$(pg_bindir)" || die "no Postgres on $HOST:$PG_PORT, no usable Docker, and no initdb/pg_ctl/postgres found on PATH or under /usr/lib/postgresql/*/bin; install Postgres (e.g. apt-get install postgresql) or set DATABASE_URL"
    user="$(pg_os_user)"
    mkdir -p "$DEV_DIR"
    datadir="$(pg_datadir_for "$user")"
    if [[ "$datadir" == "$DEV_DIR/pg" ]]; then
        sockdir="$DEV_DIR/pg-sock"
        logfile="$PG_LOG"
    else
        sockdir="$datadir-sock"
        logfile="$datadir.log"
        say "note: user '$user' cannot reach $DEV_DIR; using $datadir"
    fi
    # A Unix socket path is limited to ~107 bytes.
    if (( ${#sockdir} > 90 )); then
        sockdir="${TMPDIR:-/tmp}/herald-dev-sock-$(printf '%s' "$datadir" | cksum | cut -d' ' -f1)"
    fi
    mkdir -p "$datadir" "$sockdir"
    touch "$logfile"
    if [[ "$user" != "$(id -un)" ]]; then
        chown -R "$user" "$datadir" "$sockdir" "$logfile"
    fi
    chmod 700 "$datadir"

    if [[ ! -f "$datadir/PG_VERSION" ]]; then
        say "initdb $datadir (as $user, $bindir)"
        as_user "$user" "$bindir/initdb" -D "$datadir" --auth=trust -U postgres \
            --encoding=UTF8 --no-locale >>"$logfile" 2>&1 \
            || die "initdb failed; see $logfile"
    fi

    say "starting Postgres $("$bindir/postgres" --version | awk '{print $3}') on $HOST:$PG_PORT (data $datadir, log $logfile)"
    if ! as_user "$user" "$bindir/pg_ctl" -D "$datadir" -l "$logfile" -w -t "$WAIT_SECONDS" \
        -o "-c listen_addresses=$HOST -p $PG_PORT -k '$sockdir'" start >/dev/null 9>&-; then
        tail -n 20 "$logfile" >&2 || true
        die "Postgres did not start on $HOST:$PG_PORT; see $logfile"
    fi
    forget pg
    record "pg $user $bindir $datadir $logfile"
}

stop_local_pg() {
    local rest user bindir datadir logfile
    rest="$(started_field pg)" || return 0
    read -r user bindir datadir logfile <<<"$rest"
    if as_user "$user" "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1; then
        say "stopping Postgres (data $datadir)"
        as_user "$user" "$bindir/pg_ctl" -D "$datadir" -m fast -w -t "$WAIT_SECONDS" stop >/dev/null \
            || die "pg_ctl stop failed; see $logfile"
    else
        say "Postgres (data $datadir) is not running"
    fi
    forget pg
}

psql_bin() {
    if have psql; then command -v psql; return; fi
    local d
    d="$(pg_bindir)" && [[ -x "$d/psql" ]] && { echo "$d/psql"; return; }
    return 1
}

ensure_database() {
    local psql conn exists
    if started_field docker-postgres >/dev/null; then
        return 0 # the image creates it (POSTGRES_DB)
    fi
    psql="$(psql_bin)" || { say "warning: no psql found; cannot check that database 'herald' exists"; return 0; }
    conn="host=$HOST port=$PG_PORT user=postgres dbname=postgres connect_timeout=5"
    local i
    for ((i = 0; ; i++)); do # retried: a server may still be starting up
        exists="$("$psql" "$conn" -XAtqc "SELECT 1 FROM pg_database WHERE datname = 'herald'" </dev/null 2>&1)" && break
        ((i < WAIT_SECONDS)) || die "cannot connect to Postgres as user postgres on $HOST:$PG_PORT: $exists"
        [[ "$exists" == *"starting up"* || "$exists" == *"shutting down"* ]] \
            || die "cannot connect to Postgres as user postgres on $HOST:$PG_PORT: $exists"
        sleep 1
    done
    if [[ "$exists" != 1 ]]; then
        local out
        if out="$("$psql" "$conn" -XAtqc "CREATE DATABASE herald" </dev/null 2>&1)"; then
            say "created database herald"
        elif [[ "$("$psql" "$conn" -XAtqc "SELECT 1 FROM pg_database WHERE datname = 'herald'" </dev/null 2>/dev/null)" == 1 ]]; then
            : # created concurrently by someone else
        else
            die "CREATE DATABASE herald failed: $out"
        fi
    fi
}

# ------------------------------------------------------------ local Redis

start_local_redis() {
    have redis-server || die "no Redis on $HOST:$REDIS_PORT, no usable Docker, and no redis-server on PATH; install it (e.g. apt-get install redis-server) or set REDIS_URL"
    mkdir -p "$REDIS_DIR"
    say "starting $(redis-server --version | awk '{print $1, $2, $3}') on $HOST:$REDIS_PORT (log $REDIS_LOG)"
    redis-server --daemonize yes --bind "$HOST" --port "$REDIS_PORT" --save "" --appendonly no \
        --dir "$REDIS_DIR" --logfile "$REDIS_LOG" --pidfile "$REDIS_PID" </dev/null >/dev/null 9>&- \
        || die "redis-server failed to start; see $REDIS_LOG"
    record "redis $REDIS_PID $REDIS_LOG"
}

stop_local_redis() {
    local rest pidfile pid i
    rest="$(started_field redis)" || return 0
    read -r pidfile _ <<<"$rest"
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        say "stopping Redis (pid $pid)"
        kill "$pid"
        for ((i = 0; i < 40; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -0 "$pid" 2>/dev/null && die "Redis (pid $pid) did not exit"
    else
        say "Redis from $pidfile is not running"
    fi
    rm -f "$pidfile"
    forget redis
}

# ---------------------------------------------------------------- docker

# docker-compose.yml requires HERALD_ADMIN_TOKEN for any command; this script
# starts only postgres and redis, which never read it.
compose() {
    (cd "$ROOT" && HERALD_DEV_PG_PORT="$PG_PORT" HERALD_DEV_REDIS_PORT="$REDIS_PORT" \
        HERALD_ADMIN_TOKEN="${HERALD_ADMIN_TOKEN:-unused-by-dev-services}" docker compose "$@")
}

start_docker() { # services...
    say "starting $* with docker compose"
    compose up -d --wait "$@" 9>&- || die "docker compose up $* failed; see: docker compose logs $*"
    local s
    for s in "$@"; do record "docker-$s"; done
}

# ------------------------------------------------------------- commands

lock() {
    mkdir -p "$DEV_DIR"
    if have flock; then
        exec 9>"$DEV_DIR/lock"
        # Servers started below must not inherit fd 9 (they would hold the lock).
        flock -w 120 9 || die "another dev-services.sh is holding $DEV_DIR/lock"
    fi
}

cmd_up() {
    lock
    local want_docker=() pg_local=0 redis_local=0 pg_managed=1 redis_managed=1

    if [[ -n "${DATABASE_URL:-}" ]]; then
        pg_managed=0
        say "Postgres: DATABASE_URL is set; leaving Postgres alone"
    elif pg_answers; then
        say "Postgres: using the server on $HOST:$PG_PORT"
    elif [[ -f "$DEV_DIR/pg/PG_VERSION" ]]; then
        pg_local=1 # restart the cluster this script created before
    elif docker_usable; then
        want_docker+=(postgres)
    else
        pg_local=1
    fi

    if [[ -n "${REDIS_URL:-}" ]]; then
        redis_managed=0
        say "Redis: REDIS_URL is set; leaving Redis alone"
    elif redis_answers; then
        say "Redis: using the server on $HOST:$REDIS_PORT"
    elif docker_usable; then
        want_docker+=(redis)
    else
        redis_local=1
    fi

    if ((${#want_docker[@]})); then start_docker "${want_docker[@]}"; fi
    if ((pg_local)); then start_local_pg; fi
    if ((redis_local)); then start_local_redis; fi

    local pg_hint="see ${PG_LOG}" redis_hint="see ${REDIS_LOG}"
    if started_field docker-postgres >/dev/null; then pg_hint="see: docker compose logs postgres"; fi
    if started_field docker-redis >/dev/null; then redis_hint="see: docker compose logs redis"; fi
    if [[ "$(started_field pg 2>/dev/null)" =~ \ ([^ ]+)$ ]]; then pg_hint="see ${BASH_REMATCH[1]}"; fi
    if ((pg_managed)); then
        wait_for "Postgres on $HOST:$PG_PORT" pg_ready "$pg_hint"
        ensure_database
    fi
    if ((redis_managed)); then
        wait_for "Redis on $HOST:$REDIS_PORT" redis_answers "$redis_hint"
    fi
    say "ready"
}

cmd_down() {
    lock
    if [[ ! -f "$STARTED" ]]; then
        say "nothing was started by this script (no $STARTED)"
        return 0
    fi
    stop_local_redis
    stop_local_pg
    if started_field docker-postgres >/dev/null || started_field docker-redis >/dev/null; then
        say "docker compose down"
        compose down
        forget docker-postgres
        forget docker-redis
    fi
    rm -f "$STARTED"
}

cmd_status() {
    local rc=0 how
    how=""
    started_field pg >/dev/null && how=" (started by this script from ${DEV_DIR})"
    started_field docker-postgres >/dev/null && how=" (started by this script with docker compose)"
    if [[ -n "${DATABASE_URL:-}" ]]; then
        if have pg_isready && pg_isready -q -d "$DATABASE_URL" -t 2; then
            say "Postgres: DATABASE_URL answers"
        else
            say "Postgres: DATABASE_URL is set (not managed here)$(have pg_isready && echo '; it does not answer')"
        fi
    elif pg_ready; then
        say "Postgres: answering on $HOST:$PG_PORT$how"
    elif pg_answers; then
        say "Postgres: listening on $HOST:$PG_PORT but not accepting connections yet$how"
    else
        say "Postgres: nothing on $HOST:$PG_PORT"; rc=1
    fi

    how=""
    started_field redis >/dev/null && how=" (started by this script from ${DEV_DIR})"
    started_field docker-redis >/dev/null && how=" (started by this script with docker compose)"
    if [[ -n "${REDIS_URL:-}" ]]; then
        if have redis-cli && [[ "$(timeout 3 redis-cli -u "$REDIS_URL" ping 2>/dev/null </dev/null)" == PONG ]]; then
            say "Redis: REDIS_URL answers"
        else
            say "Redis: REDIS_URL is set (not managed here)"
        fi
    elif redis_answers; then
        say "Redis: answering PING on $HOST:$REDIS_PORT$how"
    else
        say "Redis: nothing on $HOST:$REDIS_PORT"; rc=1
    fi
    return "$rc"
}

cmd_env() {
    # The containers of docker-compose.yml have passwords (defaults: herald).
    local pg_user="postgres" redis_auth=""
    if started_field docker-postgres >/dev/null; then pg_user="herald:${HERALD_DB_PASSWORD:-herald}"; fi
    if started_field docker-redis >/dev/null; then redis_auth=":${HERALD_REDIS_PASSWORD:-herald}@"; fi
    local base="postgres://$pg_user@$HOST:$PG_PORT"
    local redis="redis://$redis_auth$HOST:$REDIS_PORT"
    printf 'export DATABASE_URL="${DATABASE_URL:-%s/herald}"\n' "$base"
    printf 'export HERALD_TEST_DATABASE_URL="${HERALD_TEST_DATABASE_URL:-%s/postgres}"\n' "$base"
    printf 'export REDIS_URL="${REDIS_URL:-%s}"\n' "$redis"
    printf 'export HERALD_TEST_REDIS_URL="${HERALD_TEST_REDIS_URL:-%s}"\n' "$redis"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
