//! The maintenance leader against real Postgres: one leader per database
//! among several candidates; the leader's session terminated, or its
//! `herald run` process killed with SIGKILL, and another takes over and
//! does the work (a lease rescued, a dead node expired); each service's
//! effect (processed_events retention, finished-task cleanup, VACUUM).
//! Every wait is on a condition, with a deadline.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{self, HeraldProcess, TestDb};
use herald::maintenance::{Maintenance, MaintenanceStatus, APPLICATION_NAME, LEADER_LOCK};
use herald::{Config, Task};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// Short intervals, so that a test sees each service act within a second.
fn fast(c: &mut Config) {
    c.maintenance.leader_retry = Duration::from_millis(200);
    c.maintenance.rescue_interval = Some(Duration::from_millis(100));
    c.maintenance.node_expiry_interval = Some(Duration::from_millis(100));
    c.maintenance.clean_interval = Duration::from_millis(100);
    c.maintenance.retention_interval = Duration::from_millis(100);
    c.maintenance.vacuum_interval = Duration::from_millis(100);
}

/// One in-process candidate.
struct Candidate {
    status: Arc<MaintenanceStatus>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<herald::Result<()>>,
}

impl Candidate {
    fn start(config: &Config) -> Candidate {
        let m = Maintenance::new(config);
        let status = m.status();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(m.run(stop.clone()));
        Candidate {
            status,
            stop,
            handle,
        }
    }

    fn leads(&self) -> bool {
        self.status.leader.load(Ordering::Relaxed)
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("maintenance stops within 10 s")
            .expect("maintenance task")
            .expect("maintenance ends without error");
    }
}

fn leaders(candidates: &[Candidate]) -> usize {
    candidates.iter().filter(|c| c.leads()).count()
}

fn terms(candidates: &[Candidate]) -> u64 {
    candidates
        .iter()
        .map(|c| c.status.terms.load(Ordering::Relaxed))
        .sum()
}

/// Poll `cond` every 20 ms until it holds; fail after `timeout` naming `what`.
async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Backend pids of the sessions holding the leader lock in this database.
async fn lock_holders(client: &tokio_postgres::Client) -> Vec<i32> {
    client
        .query(
            "SELECT l.pid FROM pg_locks l
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND l.classid::bigint = $1 AND l.objid::bigint = $2",
            &[&i64::from(LEADER_LOCK.0), &i64::from(LEADER_LOCK.1)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn scalar(client: &tokio_postgres::Client, sql: &str, id: i64) -> i64 {
    client.query_one(sql, &[&id]).await.expect(sql).get(0)
}

/// A task whose worker died: running, its lease expired a minute ago.
async fn task_with_expired_lease(client: &tokio_postgres::Client) -> i64 {
    let id = herald::enqueue(client, &Task::new("herald.noop", &json!({})).unwrap())
        .await
        .unwrap();
    client
        .execute(
            "UPDATE herald.tasks SET state = 'running', attempts = 1, leased_by = 'gone:1:0',
                    started_at = now() - interval '2 minutes',
                    lease_expires_at = now() - interval '1 minute'
             WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    id
}

async fn is_rescued(client: &tokio_postgres::Client, id: i64) -> bool {
    scalar(
        client,
        "SELECT count(*) FROM herald.tasks WHERE id = $1 AND state = 'ready' AND leased_by IS NULL",
        id,
    )
    .await
        == 1
}

/// A `herald.nodes` row whose process stopped heartbeating an hour ago.
async fn stale_node(client: &tokio_postgres::Client) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    client
        .execute(
            "INSERT INTO herald.nodes (id, host, pid, roles, version, heartbeat_interval,
                                       missed_heartbeats, started_at, last_seen)
             VALUES ($1, 'gone-host', 1, '{worker}', 'test', interval '1 second', 1,
                     now() - interval '2 hours', now() - interval '1 hour')",
            &[&id],
        )
        .await
        .unwrap();
    id
}

async fn node_exists(client: &tokio_postgres::Client, id: uuid::Uuid) -> bool {
    client
        .query_one("SELECT count(*) FROM herald.nodes WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 1
}

/// Three candidates, one leader, whose session holds the lock; the others
/// keep trying and stay followers.
#[tokio::test(flavor = "multi_thread")]
async fn exactly_one_of_three_candidates_leads() {
    let db = TestDb::with(fast).await;
    let client = db.client().await;
    let candidates: Vec<Candidate> = (0..3).map(|_| Candidate::start(&db.config)).collect();
    wait_until(WAIT, "a leader", || async { leaders(&candidates) == 1 }).await;
    // Several retry rounds: never two leaders, never none, one lock holder.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(leaders(&candidates), 1, "one leader at a time");
        assert_eq!(lock_holders(&client).await.len(), 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(terms(&candidates), 1, "nobody took over from a live leader");
    let holder = lock_holders(&client).await[0];
    let app: String = client
        .query_one(
            "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
            &[&holder],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(app, APPLICATION_NAME);
    for c in candidates {
        c.stop().await;
    }
    let c = &client;
    wait_until(WAIT, "the lock let go at shutdown", || async move {
        lock_holders(c).await.is_empty()
    })
    .await;
}

/// The leader's session is terminated: it stops leading, another takes
/// over within a few retries and rescues a lease left expired after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_leader_session_hands_over_and_rescue_continues() {
    let db = TestDb::with(fast).await;
    let client = db.client().await;
    let candidates: Vec<Candidate> = (0..3).map(|_| Candidate::start(&db.config)).collect();
    wait_until(WAIT, "a leader", || async { leaders(&candidates) == 1 }).await;
    let first = candidates.iter().position(|c| c.leads()).unwrap();
    let holder = lock_holders(&client).await[0];

    let killed = Instant::now();
    client
        .execute("SELECT pg_terminate_backend($1)", &[&holder])
        .await
        .unwrap();
    wait_until(WAIT, "a second term", || async { terms(&candidates) == 2 }).await;
    let handover = killed.elapsed();
    // Left after the handover: only the new leader can rescue it.
    let id = task_with_expired_lease(&client).await;
    wait_until(WAIT, "the lease rescued", || is_rescued(&client, id)).await;
    let rescued = killed.elapsed();
    eprintln!(
        "terminated leader session: new leader after {handover:?}, lease rescued after {rescued:?} \
         (leader_retry {:?})",
        db.config.maintenance.leader_retry
    );
    assert_eq!(leaders(&candidates), 1);
    assert_eq!(lock_holders(&client).await.len(), 1);
    assert_ne!(lock_holders(&client).await[0], holder);
    if candidates[first].leads() {
        // It campaigned again and won; it must have let go in between.
        assert_eq!(candidates[first].status.terms.load(Ordering::Relaxed), 2);
    }
    for c in candidates {
        c.stop().await;
    }
}

/// A `herald run` process that leads is killed with SIGKILL: the
/// in-process candidate takes over and expires a dead node and rescues a
/// lease, both left after the kill.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_herald_run_leader_is_replaced() {
    let db = TestDb::with(fast).await;
    let client = db.client().await;
    let child = HeraldProcess::command(
        &db.config,
        &["run"],
        &[
            ("HERALD_MAINTENANCE_LEADER_RETRY", "200ms"),
            ("HERALD_ADMIN_ENABLED", "false"),
            ("HERALD_SCHEDULER_ENABLED", "false"),
        ],
    );
    let c = &client;
    wait_until(WAIT, "the herald run child to lead", || async move {
        lock_holders(c).await.len() == 1
    })
    .await;
    let holder = lock_holders(&client).await[0];
    let candidate = Candidate::start(&db.config);
    wait_until(WAIT, "the second candidate's session", || async move {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND datname = current_database()",
                &[&APPLICATION_NAME],
            )
            .await
            .unwrap()
            .get(0);
        n == 2
    })
    .await;
    assert!(!candidate.leads(), "the child leads");
    assert_eq!(lock_holders(&client).await, vec![holder]);

    let killed = Instant::now();
    child.kill9().await;
    let node = stale_node(&client).await;
    let id = task_with_expired_lease(&client).await;
    wait_until(WAIT, "the candidate to lead", || async {
        candidate.leads()
    })
    .await;
    let handover = killed.elapsed();
    wait_until(WAIT, "the dead node expired", || async move {
        !node_exists(c, node).await
    })
    .await;
    wait_until(WAIT, "the lease rescued", || is_rescued(c, id)).await;
    eprintln!(
        "SIGKILLed herald run leader: new leader after {handover:?}, node expired and lease \
         rescued after {:?} (leader_retry {:?})",
        killed.elapsed(),
        db.config.maintenance.leader_retry
    );
    assert_ne!(lock_holders(&client).await, vec![holder]);
    candidate.stop().await;
}

/// The leader is cut off from Postgres (a partition: its connection stays
/// open, nothing passes): it stops its services, the server ends its silent
/// session (idle_session_timeout), and the other candidate takes over.
#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_leader_is_replaced() {
    let db = TestDb::with(fast).await;
    let client = db.client().await;
    let (proxy, url) = common::proxy::Proxy::for_url(&db.config.database_url).await;
    let mut cut_off = db.config.clone();
    cut_off.database_url = url;
    let a = Candidate::start(&cut_off);
    wait_until(WAIT, "A to lead", || async { a.leads() }).await;
    let b = Candidate::start(&db.config);
    let partitioned = Instant::now();
    proxy.partition();
    wait_until(WAIT, "A to stop leading", || async { !a.leads() }).await;
    let stopped = partitioned.elapsed();
    wait_until(WAIT, "B to lead", || async { b.leads() }).await;
    let handover = partitioned.elapsed();
    let node = stale_node(&client).await;
    let c = &client;
    wait_until(WAIT, "the dead node expired", || async move {
        !node_exists(c, node).await
    })
    .await;
    eprintln!(
        "partitioned leader: stopped its services after {stopped:?}, new leader after \
         {handover:?} (leader_retry {:?})",
        db.config.maintenance.leader_retry
    );
    assert!(!a.leads());
    proxy.heal();
    a.stop().await;
    b.stop().await;
}

/// Idempotency records older than the retention go; newer ones stay.
#[tokio::test(flavor = "multi_thread")]
async fn processed_events_past_their_retention_are_removed() {
    let db = TestDb::with(fast).await;
    assert_eq!(
        db.config.maintenance.processed_events_retention,
        Duration::from_secs(30 * 86400),
        "a month by default"
    );
    let client = db.client().await;
    for age in ["45 days", "31 days", "29 days", "1 hour", "0 seconds"] {
        client
            .execute(
                "INSERT INTO herald.processed_events (subscription, event_id, processed_at)
                 VALUES ('audit', $1, now() - $2::text::interval)",
                &[&uuid::Uuid::now_v7(), &age],
            )
            .await
            .unwrap();
    }
    let candidate = Candidate::start(&db.config);
    let c = &client;
    wait_until(WAIT, "the old records removed", || async move {
        common::scalar(c, "SELECT count(*) FROM herald.processed_events").await == 3
    })
    .await;
    let oldest: f64 = client
        .query_one(
            "SELECT extract(epoch FROM now() - min(processed_at))::float8 / 86400
             FROM herald.processed_events",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!((28.9..29.1).contains(&oldest), "{oldest} days");
    candidate.stop().await;
}

/// Finished tasks go once past `worker.retain_completed`; newer ones and
/// unfinished ones stay.
#[tokio::test(flavor = "multi_thread")]
async fn finished_tasks_past_their_retention_are_removed() {
    let db = TestDb::with(|c| {
        fast(c);
        c.worker.retain_completed = Some(Duration::from_secs(3600));
    })
    .await;
    let client = db.client().await;
    let mut ids = Vec::new();
    for (state, finished) in [
        ("succeeded", "2 hours"),
        ("cancelled", "2 hours"),
        ("succeeded", "10 minutes"),
        ("ready", ""),
    ] {
        let id = herald::enqueue(&client, &Task::new("herald.noop", &json!({})).unwrap())
            .await
            .unwrap();
        if state != "ready" {
            client
                .execute(
                    "UPDATE herald.tasks SET state = $2, attempts = 1,
                            finished_at = now() - $3::text::interval
                     WHERE id = $1",
                    &[&id, &state, &finished],
                )
                .await
                .unwrap();
        }
        ids.push(id);
    }
    let candidate = Candidate::start(&db.config);
    let c = &client;
    wait_until(WAIT, "the old finished tasks removed", || async move {
        common::scalar(c, "SELECT count(*) FROM herald.tasks").await == 2
    })
    .await;
    let left: Vec<i64> = client
        .query("SELECT id FROM herald.tasks ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec![ids[2], ids[3]]);
    candidate.stop().await;
}

/// The leader VACUUMs `herald.tasks` once it gained `worker.vacuum_after`
/// dead rows.
#[tokio::test(flavor = "multi_thread")]
async fn the_leader_vacuums_a_churned_table() {
    let db = TestDb::with(|c| {
        fast(c);
        c.worker.vacuum_after = 300;
    })
    .await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO herald.tasks (kind) SELECT 'herald.noop' FROM generate_series(1, 1000);
             DELETE FROM herald.tasks;",
        )
        .await
        .unwrap();
    let candidate = Candidate::start(&db.config);
    let c = &client;
    wait_until(WAIT, "a VACUUM of herald.tasks", || async move {
        common::scalar(
            c,
            "SELECT vacuum_count FROM pg_stat_user_tables
             WHERE schemaname = 'herald' AND relname = 'tasks'",
        )
        .await
            >= 1
    })
    .await;
    candidate.stop().await;
}
