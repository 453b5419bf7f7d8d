"""Celery side of the peer benchmarks (Q1, Q1b, Q2, Q3 of docs/benchmarks.md, Workloads).

Usage: python bench.py <Q1|Q1b|Q2|Q3>   (run from this directory, or with it on
PYTHONPATH). Env: CELERY_BROKER_URL, PEERS_STATE_URL (separate Redis dbs,
flushed by run.sh before each workload), CELERY_WORKERS (worker processes), CELERY_POOL (solo|prefork|threads),
CELERY_CONCURRENCY, CELERY_PREFETCH.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import celery
from celery import group

from tasks import COUNTER, STARTS, app, noop, stamp, state

HERE = os.path.dirname(os.path.abspath(__file__))
POOL = os.environ.get("CELERY_POOL", "solo")
CONCURRENCY = int(os.environ.get("CELERY_CONCURRENCY", "1"))
PREFETCH = int(os.environ.get("CELERY_PREFETCH", "64"))
WORKERS = int(os.environ.get("CELERY_WORKERS", "2"))


def now_ms():
    return time.monotonic() * 1000.0


def emit(obj):
    print(json.dumps(obj), flush=True)


def r2(x):
    return round(x, 2)


def worker_config():
    return (
        f"Celery {celery.__version__}, Redis broker, {WORKERS} worker process(es) "
        f"(celery worker -P {POOL} -c {CONCURRENCY}), "
        f"prefetch multiplier {PREFETCH}, --without-gossip --without-mingle --without-heartbeat, "
        f"results ignored"
    )


def start_worker():
    return [start_one_worker(i) for i in range(WORKERS)]


def start_one_worker(i):
    cmd = [
        sys.executable, "-m", "celery", "-A", "tasks", "worker",
        "-P", POOL, "-c", str(CONCURRENCY), "--prefetch-multiplier", str(PREFETCH),
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-l", "warning", "-n", f"peers-{os.getpid()}-{i}@%h",
    ]
    return subprocess.Popen(cmd, cwd=HERE, env={**os.environ, "PYTHONPATH": HERE})


def stop_worker(procs):
    for proc in procs:
        proc.send_signal(signal.SIGQUIT)  # cold shutdown: the bench is over
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def any_exited(procs):
    return any(p.poll() is not None for p in procs)


def q1():
    n = 10000
    t0 = now_ms()
    for i in range(n):
        noop.apply_async(args=(i,))  # one publish to Redis per call
    s = (now_ms() - t0) / 1000
    emit({"system": "celery", "workload": "Q1", "tasks_per_s": r2(n / s),
          "config": f"Celery {celery.__version__}, apply_async() sequentially, one client, Redis broker"})


def enqueue_batches(n, b):
    for i in range(0, n, b):
        group(noop.s(j) for j in range(i, min(n, i + b))).apply_async()


def q1b():
    n, b = 20000, 1000
    t0 = now_ms()
    enqueue_batches(n, b)
    s = (now_ms() - t0) / 1000
    emit({"system": "celery", "workload": "Q1b", "tasks_per_s": r2(n / s),
          "config": f"Celery {celery.__version__}, group() of 1,000 signatures per apply_async (Celery has no bulk insert; "
                    "a group publishes its messages one by one over one producer connection)"})


def q2():
    n = 20000
    enqueue_batches(n, 1000)
    state.delete(COUNTER)
    t0 = now_ms()
    first = None
    proc = start_worker()
    try:
        deadline = time.monotonic() + 300
        while True:
            done = int(state.get(COUNTER) or 0)
            if done and first is None:
                first = now_ms()
            if done >= n:
                break
            if time.monotonic() > deadline or any_exited(proc):
                raise SystemExit(f"Q2: only {done} of {n} completed")
            time.sleep(0.01)
        t1 = now_ms()
    finally:
        stop_worker(proc)
    emit({"system": "celery", "workload": "Q2", "tasks_per_s": r2(n / ((t1 - t0) / 1000)),
          "tasks_per_s_after_first": r2(n / ((t1 - first) / 1000)),
          "config": worker_config(),
          "counted": "Redis INCR counter written by the task (db of PEERS_STATE_URL); timed from the worker's launch"})


def percentile(sorted_vals, p):
    rank = math.ceil(p / 100 * len(sorted_vals))
    return sorted_vals[min(len(sorted_vals), max(1, rank)) - 1]


def q3():
    period_ms, duration_ms = 5, 10000
    n = duration_ms // period_ms
    state.delete(STARTS)
    proc = start_worker()
    try:
        # idle and ready: a warm-up task has run
        stamp.apply_async(args=(-1,))
        deadline = time.monotonic() + 60
        while not state.hexists(STARTS, -1):
            if time.monotonic() > deadline or any_exited(proc):
                raise SystemExit("Q3: worker did not start")
            time.sleep(0.05)
        time.sleep(1)
        enq = [0.0] * n
        t0 = now_ms()
        for seq in range(n):
            wait = t0 + seq * period_ms - now_ms()
            if wait > 0:
                time.sleep(wait / 1000)
            stamp.apply_async(args=(seq,))
            enq[seq] = now_ms()
        deadline = time.monotonic() + 60
        while state.hlen(STARTS) < n + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        starts = {int(k): float(v) for k, v in state.hgetall(STARTS).items()}
    finally:
        stop_worker(proc)
    lat = sorted(starts[s] - enq[s] for s in range(n) if s in starts)
    emit({"system": "celery", "workload": "Q3",
          "p50_ms": r2(percentile(lat, 50)), "p95_ms": r2(percentile(lat, 95)),
          "p99_ms": r2(percentile(lat, 99)), "max_ms": r2(lat[-1]),
          "negative_samples": sum(1 for x in lat if x < 0), "samples": len(lat),
          "missing": n - len(lat),
          "config": worker_config() + "; producer stamp after apply_async returned (the LPUSH to Redis)"})


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    fn = {"Q1": q1, "Q1b": q1b, "Q2": q2, "Q3": q3}.get(which)
    if fn is None:
        sys.exit("usage: python bench.py <Q1|Q1b|Q2|Q3>")
    fn()
