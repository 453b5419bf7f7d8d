"""Celery app and tasks for the peer benchmarks (see scripts/peers/README.md).

Broker: Redis, database CELERY_BROKER_URL (default db 11). Results are
ignored (no result backend). Celery keeps no task table, so the tasks write
what the measurement needs into a second Redis database (PEERS_STATE_URL,
default db 12): `noop` INCRs a completion counter (Q2 counts completions from
it), `stamp` records its start time under its sequence number (Q3).
"""
import os
import time

import redis
from celery import Celery

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/11")
STATE_URL = os.environ.get("PEERS_STATE_URL", "redis://127.0.0.1:6379/12")

app = Celery("peers", broker=BROKER_URL)
app.conf.update(
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=int(os.environ.get("CELERY_PREFETCH", "64")),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

# redis-py pools reconnect after fork (they check the pid), so one module-level
# client serves the prefork children as well.
state = redis.Redis.from_url(STATE_URL)

COUNTER = "peers:completed"
STARTS = "peers:starts"


@app.task(name="noop")
def noop(seq):
    state.incr(COUNTER)


@app.task(name="stamp")
def stamp(seq):
    # CLOCK_MONOTONIC: one clock for every process on the machine.
    state.hset(STARTS, seq, repr(time.monotonic() * 1000.0))
