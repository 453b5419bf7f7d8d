// pg-boss side of the peer benchmarks (Q1, Q1b, Q2, Q3 of
// docs/benchmarks.md, Workloads). Usage: node bench.js <Q1|Q1b|Q2|Q3>
// Env: DATABASE_URL (a fresh database; pg-boss migrates it on start),
//      PGBOSS_WORKERS (work() subscriptions), PGBOSS_BATCH (batchSize).
"use strict";

const path = require("path");
const PgBoss = require("pg-boss");
const { Pool } = require("pg");
const version = require("pg-boss/package.json").version;
const c = require(path.join(__dirname, "..", "lib", "common.js"));

const DATABASE_URL = process.env.DATABASE_URL;
const WORKERS = parseInt(process.env.PGBOSS_WORKERS || "2", 10);
const BATCH = parseInt(process.env.PGBOSS_BATCH || "5000", 10);
const Q3_BATCH = 200;
const QUEUE = "noop";

// Maintenance and cron are off in every mode: the bench measures the queue.
async function boss(max = 10) {
  const b = new PgBoss({ connectionString: DATABASE_URL, max, supervise: false, schedule: false });
  b.on("error", (e) => c.log("pg-boss error:", e.message));
  await b.start();
  return b;
}

async function producer() {
  const b = await boss();
  await b.createQueue(QUEUE);
  return b;
}

async function q1() {
  const N = 10000;
  const b = await producer();
  const t0 = c.nowMs();
  for (let i = 0; i < N; i++) await b.send(QUEUE, { seq: i }); // one INSERT, one transaction
  const s = (c.nowMs() - t0) / 1000;
  await b.stop({ graceful: false, wait: true });
  c.emit({ system: "pg-boss", workload: "Q1", tasks_per_s: c.round2(N / s), config: `pg-boss ${version}, send(), sequential, one client` });
}

async function enqueueBatches(b, N, B) {
  for (let i = 0; i < N; i += B) {
    const jobs = [];
    for (let j = i; j < Math.min(N, i + B); j++) jobs.push({ name: QUEUE, data: { seq: j } });
    await b.insert(jobs);
  }
}

async function q1b() {
  const N = 20000, B = 1000;
  const b = await producer();
  const t0 = c.nowMs();
  await enqueueBatches(b, N, B);
  const s = (c.nowMs() - t0) / 1000;
  await b.stop({ graceful: false, wait: true });
  c.emit({ system: "pg-boss", workload: "Q1b", tasks_per_s: c.round2(N / s), config: `pg-boss ${version}, insert() of 1,000 jobs per call` });
}

function q2Config() {
  return `pg-boss ${version}, 1 process, ${WORKERS} work() subscriptions, batchSize ${BATCH}, pollingIntervalSeconds 0.5 (the minimum), pool max ${WORKERS + 4}, supervise/schedule off`;
}

async function q2() {
  const N = 20000;
  const p = await producer();
  await enqueueBatches(p, N, 1000);
  await p.stop({ graceful: false, wait: true });
  const pool = new Pool({ connectionString: DATABASE_URL, max: 1 });
  const done = async () =>
    Number((await pool.query("select count(*)::int as n from pgboss.job where name = $1 and state = 'completed'", [QUEUE])).rows[0].n);
  const t0 = c.nowMs();
  const b = await boss(WORKERS + 4);
  for (let i = 0; i < WORKERS; i++) {
    await b.work(QUEUE, { batchSize: BATCH, pollingIntervalSeconds: 0.5 }, async () => {});
  }
  while ((await done()) < N) await c.sleep(10);
  const s = (c.nowMs() - t0) / 1000;
  await b.stop({ graceful: false, wait: true });
  await pool.end();
  c.emit({ system: "pg-boss", workload: "Q2", tasks_per_s: c.round2(N / s), config: q2Config(), counted: "pgboss.job rows in state 'completed'" });
}

function q3Config() {
  return `pg-boss ${version}, worker in its own process, 1 work() subscription, batchSize ${Q3_BATCH}, pollingIntervalSeconds 0.5 (the minimum; pg-boss 10 polls, it has no LISTEN/NOTIFY wake-up)`;
}

async function q3Worker() {
  const started = [];
  let seen = 0;
  const expected = parseInt(process.argv[3], 10);
  const b = await boss();
  await b.work(QUEUE, { batchSize: Q3_BATCH, pollingIntervalSeconds: 0.5 }, async (jobs) => {
    const t = c.nowMs(); // the handler starts for the whole fetched batch
    for (const j of jobs) started[j.data.seq] = t;
    seen += jobs.length;
  });
  process.send({ type: "ready" });
  const deadline = Date.now() + 60000;
  process.on("message", async (m) => {
    if (m.type !== "finish") return;
    while (seen < expected && Date.now() < deadline) await c.sleep(20);
    await b.stop({ graceful: false, wait: true });
    process.send({ type: "results", started }, () => process.exit(0));
  });
}

async function q3() {
  const periodMs = 5, durationMs = 10000;
  const n = durationMs / periodMs;
  const p = await producer();
  const w = c.forkWorker(__filename, ["q3-worker", String(n)]);
  await w.ready;
  await c.sleep(1000);
  const enqueued = await c.paceProducer((seq) => p.send(QUEUE, { seq }), periodMs, durationMs);
  w.child.send({ type: "finish" });
  const started = await w.results;
  await p.stop({ graceful: false, wait: true });
  c.emit({ system: "pg-boss", workload: "Q3", ...c.latencySummary(enqueued, started), config: q3Config() });
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
