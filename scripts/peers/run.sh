#!/usr/bin/env bash
# Side by side: Herald, graphile-worker, pg-boss and Celery on Q1, Q1b, Q2
# and Q3 (docs/benchmarks.md, Workloads), from one run of this script on one machine.
# Not run by CI. See scripts/peers/README.md.
#
#   bash scripts/peers/run.sh
#
# Environment (all optional):
#   SYSTEMS="herald graphile-worker pg-boss celery"   which columns to run
#   WORKLOADS="Q1 Q1b Q2 Q3"                          which workloads
#   PGHOST/PGPORT/PGUSER    Postgres (default 127.0.0.1:5432, user postgres, trust auth)
#   REDIS_HOST/REDIS_PORT   Redis (default 127.0.0.1:6379)
#   CELERY_BROKER_DB=11 CELERY_STATE_DB=12   Redis databases Celery may flush
#   GRAPHILE_WORKER_VERSION, PG_BOSS_VERSION, PG_VERSION, CELERY_VERSION   pins
#   Tuning knobs read by the bench programs: GW_CONCURRENCY, GW_LOCAL_QUEUE,
#   GW_COMPLETE_BATCH_DELAY, PGBOSS_WORKERS, PGBOSS_BATCH, CELERY_POOL,
#   CELERY_CONCURRENCY, CELERY_PREFETCH.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PEERS="$ROOT/scripts/peers"
WORK="$ROOT/.dev/peers"

SYSTEMS=${SYSTEMS:-"herald graphile-worker pg-boss celery"}
WORKLOADS=${WORKLOADS:-"Q1 Q1b Q2 Q3"}
export PGOPTIONS=${PGOPTIONS:-"--client-min-messages=warning"}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
REDIS_HOST=${REDIS_HOST:-127.0.0.1}
REDIS_PORT=${REDIS_PORT:-6379}
CELERY_BROKER_DB=${CELERY_BROKER_DB:-11}
CELERY_STATE_DB=${CELERY_STATE_DB:-12}
GRAPHILE_WORKER_VERSION=${GRAPHILE_WORKER_VERSION:-0.17.3}
PG_BOSS_VERSION=${PG_BOSS_VERSION:-10.4.2}
PG_VERSION=${PG_VERSION:-8.23.1}
CELERY_VERSION=${CELERY_VERSION:-5.7.0}
TIMEOUT=${TIMEOUT:-600}

if [[ "$CELERY_BROKER_DB" == 0 || "$CELERY_STATE_DB" == 0 ]]; then
  echo "refusing to flush Redis db 0; pick other CELERY_BROKER_DB/CELERY_STATE_DB" >&2
  exit 2
fi

RUN="$WORK/run-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$RUN"
RESULTS="$RUN/results.jsonl"
: >"$RESULTS"
log() { echo "[peers $(date -u +%H:%M:%S)] $*" >&2; }

wants() { [[ " $SYSTEMS " == *" $1 "* ]]; }

# --- installs (once; reused by later runs) ----------------------------------
install_node() {
  local dir="$WORK/node"
  mkdir -p "$dir"
  if [[ ! -f "$dir/package.json" ]]; then
    (cd "$dir" && npm init -y >/dev/null)
  fi
  log "npm install graphile-worker@$GRAPHILE_WORKER_VERSION pg-boss@$PG_BOSS_VERSION pg@$PG_VERSION"
  (cd "$dir" && npm install --no-audit --no-fund --silent \
    "graphile-worker@$GRAPHILE_WORKER_VERSION" "pg-boss@$PG_BOSS_VERSION" "pg@$PG_VERSION" >&2)
  export NODE_PATH="$dir/node_modules"
}

install_celery() {
  local venv="$WORK/venv"
  if [[ ! -x "$venv/bin/python" ]]; then
    log "python3.11 -m venv $venv"
    python3.11 -m venv "$venv"
  fi
  log "pip install celery[redis]==$CELERY_VERSION"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "celery[redis]==$CELERY_VERSION" >&2
  CELERY_PY="$venv/bin/python"
}

# --- one workload on a peer, on a fresh database -----------------------------
# Appends the program's JSON line (or an error line) to $RESULTS.
record_error() {
  printf '{"system": "%s", "workload": "%s", "error": "%s"}\n' "$1" "$2" "$3" >>"$RESULTS"
}

run_node_peer() {
  local system=$1 wl=$2
  local db="peers_${system//-/_}_${wl,,}"
  dropdb --if-exists "$db"
  createdb "$db"
  log "$system $wl (database $db)"
  local out
  if out=$(DATABASE_URL="postgres://$PGUSER@$PGHOST:$PGPORT/$db" \
      timeout "$TIMEOUT" node "$PEERS/$system/bench.js" "$wl" 2>"$RUN/$system-$wl.log"); then
    grep '^{' <<<"$out" | tail -n 1 >>"$RESULTS"
  else
    log "$system $wl failed; see $RUN/$system-$wl.log"
    record_error "$system" "$wl" "exit status $?, log in $RUN/$system-$wl.log"
  fi
  dropdb --if-exists "$db"
}

run_celery() {
  local wl=$1
  # A fresh "database" for Celery: its own two Redis dbs, emptied.
  redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$CELERY_BROKER_DB" flushdb >/dev/null
  redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$CELERY_STATE_DB" flushdb >/dev/null
  log "celery $wl (Redis dbs $CELERY_BROKER_DB and $CELERY_STATE_DB)"
  local out
  if out=$(cd "$PEERS/celery" && \
      CELERY_BROKER_URL="redis://$REDIS_HOST:$REDIS_PORT/$CELERY_BROKER_DB" \
      PEERS_STATE_URL="redis://$REDIS_HOST:$REDIS_PORT/$CELERY_STATE_DB" \
      timeout "$TIMEOUT" "$CELERY_PY" bench.py "$wl" 2>"$RUN/celery-$wl.log"); then
    grep '^{' <<<"$out" | tail -n 1 >>"$RESULTS"
  else
    log "celery $wl failed; see $RUN/celery-$wl.log"
    record_error celery "$wl" "exit status $?, log in $RUN/celery-$wl.log"
  fi
  redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$CELERY_BROKER_DB" flushdb >/dev/null
  redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$CELERY_STATE_DB" flushdb >/dev/null
}

# --- Herald: its own bench, same definitions, parsed from its JSON lines -----
run_herald() {
  local bin="$ROOT/target/release/herald"
  if [[ ! -x "$bin" ]]; then
    log "building herald (cargo build --release)"
    (cd "$ROOT" && cargo build --release >&2)
  fi
  log "herald bench $WORKLOADS --runs 1"
  local out
  # shellcheck disable=SC2086
  if out=$(cd "$ROOT" && timeout "$TIMEOUT" "$bin" bench $WORKLOADS --runs 1 2>"$RUN/herald.log"); then
    grep '^{' <<<"$out" | python3 -c '
import json, sys
names = {"Q1": "Q1", "Q1B": "Q1b", "Q2": "Q2", "Q3": "Q3"}
for line in sys.stdin:
    r = json.loads(line)
    w = names.get(str(r.get("workload")).upper())
    if w is None:
        continue
    r["workload"] = w
    r["system"] = "herald"
    config = "herald bench " + w + " --runs 1 (built-in workload)"
    if w == "Q2" and "worker_processes" in r:
        config += ", %d worker process(es), concurrency %d, claim batch %d" % (
            r["worker_processes"], r.get("concurrency_per_worker", 0), r.get("claim_batch", 0))
    if w == "Q2":
        r["counted"] = "the herald tasks table (herald bench)"
    r["config"] = config
    print(json.dumps(r))
' >>"$RESULTS"
  else
    log "herald bench failed; see $RUN/herald.log"
    for wl in $WORKLOADS; do record_error herald "$wl" "herald bench failed, log in $RUN/herald.log"; done
  fi
}

# --- main --------------------------------------------------------------------
if wants graphile-worker || wants pg-boss; then install_node; fi
if wants celery; then install_celery; fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
  echo "postgres: $(psql -qAtc 'show server_version')"
  echo "redis: $(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" info server | tr -d '\r' | awk -F: '/^redis_version/ {print $2}')"
  echo "node: $(node --version 2>/dev/null || echo none), python: $(python3.11 --version 2>/dev/null | awk '{print $2}')"
  if wants herald; then
    echo "herald: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock sql 2>/dev/null || echo ' (+ uncommitted changes in the tree)'), binary built $(date -u -r "$ROOT/target/release/herald" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo 'by this run')"
  fi
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "command: bash scripts/peers/run.sh (SYSTEMS=\"$SYSTEMS\" WORKLOADS=\"$WORKLOADS\")"
} | tee "$RUN/machine.txt"

for system in $SYSTEMS; do
  case "$system" in
    herald) run_herald ;;
    graphile-worker|pg-boss) for wl in $WORKLOADS; do run_node_peer "$system" "$wl"; done ;;
    celery) for wl in $WORKLOADS; do run_celery "$wl"; done ;;
    *) echo "unknown system $system" >&2; exit 2 ;;
  esac
done

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$RUN/machine.txt"
echo
python3 "$PEERS/lib/table.py" "$RESULTS" | tee "$RUN/table.md"
echo
echo "JSON lines ($RESULTS):"
cat "$RESULTS"
