// Shared helpers for the Node peer benchmarks (graphile-worker, pg-boss).
// Figures follow the workloads of docs/benchmarks.md; see scripts/peers/README.md.
"use strict";

const { fork } = require("child_process");

// CLOCK_MONOTONIC in ms (libuv's uv_hrtime). It is one clock for every
// process on the machine, so the producer's and the worker's stamps compare.
function nowMs() {
  return Number(process.hrtime.bigint()) / 1e6;
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, Math.max(0, ms)));
}

function round2(v) {
  return Math.round(v * 100) / 100;
}

function percentile(sorted, p) {
  // nearest-rank percentile of an ascending array
  if (sorted.length === 0) return NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

// Q3 summary from producer stamps and handler stamps, both keyed by seq.
function latencySummary(enqueued, started) {
  const lat = [];
  let missing = 0;
  for (let seq = 0; seq < enqueued.length; seq++) {
    const s = started[seq];
    if (s === undefined || s === null) {
      missing++;
      continue;
    }
    lat.push(s - enqueued[seq]);
  }
  lat.sort((a, b) => a - b);
  return {
    p50_ms: round2(percentile(lat, 50)),
    p95_ms: round2(percentile(lat, 95)),
    p99_ms: round2(percentile(lat, 99)),
    max_ms: round2(lat[lat.length - 1]),
    negative_samples: lat.filter((x) => x < 0).length,
    samples: lat.length,
    missing,
  };
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function log(...args) {
  console.error(...args);
}

// Q3 producer loop: one enqueue every `periodMs` for `durationMs`, paced
// against the start time (not a sleep after each call) so the rate holds.
// `enqueue(seq)` must resolve once the enqueue's commit returned.
async function paceProducer(enqueue, periodMs = 5, durationMs = 10000) {
  const n = Math.round(durationMs / periodMs);
  const stamps = new Array(n);
  const t0 = nowMs();
  for (let seq = 0; seq < n; seq++) {
    const due = t0 + seq * periodMs;
    const wait = due - nowMs();
    if (wait > 0) await sleep(wait);
    await enqueue(seq);
    stamps[seq] = nowMs();
  }
  return stamps;
}

// Start this same script as a worker child ("q3-worker" mode); resolves when
// the child reports it is ready. child.results resolves with its stamps.
function forkWorker(script, args) {
  const child = fork(script, args, { stdio: ["ignore", "inherit", "inherit", "ipc"] });
  let resolveResults, rejectResults;
  const results = new Promise((res, rej) => {
    resolveResults = res;
    rejectResults = rej;
  });
  const ready = new Promise((res, rej) => {
    child.on("message", (m) => {
      if (m.type === "ready") res();
      if (m.type === "results") resolveResults(m.started);
    });
    child.on("exit", (code) => {
      rej(new Error(`worker exited with ${code}`));
      rejectResults(new Error(`worker exited with ${code}`));
    });
  });
  return { child, ready, results };
}

module.exports = { nowMs, sleep, round2, percentile, latencySummary, emit, log, paceProducer, forkWorker };
