// graphile-worker side of the peer benchmarks (Q1, Q1b, Q2, Q3 of
// docs/benchmarks.md, Workloads). Usage: node bench.js <Q1|Q1b|Q2|Q3>
// Env: DATABASE_URL (a fresh database; this script migrates it),
//      GW_CONCURRENCY, GW_LOCAL_QUEUE, GW_COMPLETE_BATCH_DELAY, GW_POOL.
"use strict";

const path = require("path");
const { run, makeWorkerUtils } = require("graphile-worker");
const { Pool } = require("pg");
const version = require("graphile-worker/package.json").version;
const c = require(path.join(__dirname, "..", "lib", "common.js"));

const DATABASE_URL = process.env.DATABASE_URL;
const CONCURRENCY = parseInt(process.env.GW_CONCURRENCY || "32", 10);
const LOCAL_QUEUE = parseInt(process.env.GW_LOCAL_QUEUE || "1000", 10);
const COMPLETE_DELAY = parseInt(process.env.GW_COMPLETE_BATCH_DELAY || "0", 10);
const POOL = parseInt(process.env.GW_POOL || String(CONCURRENCY + 2), 10);

// Throughput configuration (Q2): the batching options of
// https://worker.graphile.org/docs/performance#batching.
function throughputOptions() {
  return {
    connectionString: DATABASE_URL,
    concurrency: CONCURRENCY,
    maxPoolSize: POOL,
    noHandleSignals: true,
    pollInterval: 2000,
    preset: {
      worker: {
        preparedStatements: true,
        localQueue: { size: LOCAL_QUEUE },
        completeJobBatchDelay: COMPLETE_DELAY,
        failJobBatchDelay: COMPLETE_DELAY,
      },
    },
  };
}

// Latency configuration (Q3): no local queue (it would hold jobs locked in a
// batch) and no completion delay; jobs are announced by LISTEN/NOTIFY.
function latencyOptions() {
  return {
    connectionString: DATABASE_URL,
    concurrency: CONCURRENCY,
    maxPoolSize: POOL,
    noHandleSignals: true,
    pollInterval: 2000,
    preset: { worker: { preparedStatements: true } },
  };
}

function configText(opts) {
  const w = opts.preset.worker;
  const parts = [`graphile-worker ${version}`, `1 process`, `concurrency ${opts.concurrency}`, `pool ${opts.maxPoolSize}`, `preparedStatements`];
  if (w.localQueue) parts.push(`localQueue.size ${w.localQueue.size}`);
  if (w.completeJobBatchDelay !== undefined) parts.push(`completeJobBatchDelay ${w.completeJobBatchDelay} ms`);
  return parts.join(", ");
}

const noop = { noop: async () => {} };

async function utils() {
  const u = await makeWorkerUtils({ connectionString: DATABASE_URL });
  await u.migrate();
  return u;
}

async function q1() {
  const N = 10000;
  const u = await utils();
  const t0 = c.nowMs();
  for (let i = 0; i < N; i++) {
    // one add_job call = one statement = one transaction
    await u.addJob("noop", { seq: i });
  }
  const s = (c.nowMs() - t0) / 1000;
  await u.release();
  c.emit({ system: "graphile-worker", workload: "Q1", tasks_per_s: c.round2(N / s), config: `graphile-worker ${version}, WorkerUtils.addJob, sequential, one client` });
}

async function enqueueBatches(u, N, B) {
  for (let i = 0; i < N; i += B) {
    const specs = [];
    for (let j = i; j < Math.min(N, i + B); j++) specs.push({ identifier: "noop", payload: { seq: j } });
    await u.addJobs(specs);
  }
}

async function q1b() {
  const N = 20000, B = 1000;
  const u = await utils();
  const t0 = c.nowMs();
  await enqueueBatches(u, N, B);
  const s = (c.nowMs() - t0) / 1000;
  await u.release();
  c.emit({ system: "graphile-worker", workload: "Q1b", tasks_per_s: c.round2(N / s), config: `graphile-worker ${version}, WorkerUtils.addJobs (graphile_worker.add_jobs), 1,000 per call` });
}

async function q2() {
  const N = 20000;
  const u = await utils();
  await enqueueBatches(u, N, 1000);
  await u.release();
  const pool = new Pool({ connectionString: DATABASE_URL, max: 1 });
  const left = async () => Number((await pool.query("select count(*)::int as n from graphile_worker.jobs")).rows[0].n);
  if ((await left()) !== N) throw new Error("pre-enqueue incomplete");
  const opts = throughputOptions();
  const t0 = c.nowMs();
  const runner = await run({ ...opts, taskList: noop });
  // graphile-worker deletes a job when it completes: completed = N - rows left.
  while ((await left()) > 0) await c.sleep(10);
  const s = (c.nowMs() - t0) / 1000;
  await runner.stop();
  await pool.end();
  c.emit({ system: "graphile-worker", workload: "Q2", tasks_per_s: c.round2(N / s), config: configText(opts), counted: "rows left in graphile_worker.jobs (completed jobs are deleted)" });
}

async function q3Worker() {
  const started = [];
  let seen = 0;
  const expected = parseInt(process.argv[3], 10);
  const opts = latencyOptions();
  const runner = await run({
    ...opts,
    taskList: {
      noop: async (payload) => {
        started[payload.seq] = c.nowMs();
        seen++;
      },
    },
  });
  // let the pool connect and LISTEN before the producer starts
  await c.sleep(1000);
  process.send({ type: "ready" });
  const deadline = Date.now() + 60000;
  process.on("message", async (m) => {
    if (m.type !== "finish") return;
    while (seen < expected && Date.now() < deadline) await c.sleep(20);
    await runner.stop();
    process.send({ type: "results", started }, () => process.exit(0));
  });
}

async function q3() {
  const periodMs = 5, durationMs = 10000;
  const n = durationMs / periodMs;
  const u = await utils();
  const w = c.forkWorker(__filename, ["q3-worker", String(n)]);
  await w.ready;
  // warm the producer's connection and prepared statement
  const enqueued = await c.paceProducer((seq) => u.addJob("noop", { seq }), periodMs, durationMs);
  w.child.send({ type: "finish" });
  const started = await w.results;
  await u.release();
  const summary = c.latencySummary(enqueued, started);
  c.emit({ system: "graphile-worker", workload: "Q3", ...summary, config: configText(latencyOptions()) + ", worker in its own process, jobs announced by LISTEN/NOTIFY" });
}

const which = process.argv[2];
const main = { Q1: q1, Q1b: q1b, Q2: q2, Q3: q3, "q3-worker": q3Worker }[which];
if (!main) {
  console.error("usage: node bench.js <Q1|Q1b|Q2|Q3>");
  process.exit(2);
}
main().then(
  () => { if (which !== "q3-worker") process.exit(0); },
  (e) => { console.error(e); process.exit(1); }
);
