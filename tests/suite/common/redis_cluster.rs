//! Private Redis Clusters and Sentinel setups for the tests of
//! `redis_cluster` and `redis_sentinel`: `redis-server` processes on free
//! loopback ports (cluster bus ports chosen free as well, with
//! `--cluster-port`), state in a temporary directory of their own, stopped
//! and removed on Drop. Needs `redis-server`, `redis-cli` (for
//! `--cluster create`) and, for Sentinel, `redis-server --sentinel` on PATH.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// One redis-server process.
struct Node {
    port: u16,
    child: Option<Child>,
    args: Vec<String>,
}

impl Node {
    fn spawn(port: u16, args: Vec<String>) -> Node {
        let mut node = Node {
            port,
            child: None,
            args,
        };
        node.start();
        node
    }

    fn start(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        wait_port(self.port);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis on port {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "herald-{what}-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).expect("creating a temporary directory");
    dir
}

/// A command sent to one node.
pub async fn node_cmd<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await
}

/// A local Redis Cluster: `masters` primaries, each with `replicas`
/// replicas, slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
    replicas: usize,
}

impl RedisCluster {
    pub async fn start(masters: usize, replicas: usize) -> RedisCluster {
        let dir = temp_dir("cluster");
        let count = masters * (1 + replicas);
        let mut nodes = Vec::new();
        for _ in 0..count {
            let port = free_port();
            let bus = free_port();
            let args = vec![
                "--port".into(),
                port.to_string(),
                "--cluster-port".into(),
                bus.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                dir.join(format!("nodes-{port}.conf")).display().to_string(),
                "--cluster-node-timeout".into(),
                "2000".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--save".into(),
                "".into(),
                "--appendonly".into(),
                "no".into(),
            ];
            nodes.push(Node::spawn(port, args));
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli on PATH");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster {
            nodes,
            dir,
            replicas: masters * replicas,
        };
        cluster.wait_consistent(masters).await;
        cluster
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Wait until every node says the cluster is ok, sees `masters`
    /// primaries covering all slots, and agrees on who owns them.
    pub async fn wait_consistent(&self, masters: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            let mut views = Vec::new();
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let info: String = node_cmd(node.port, &["CLUSTER", "INFO"])
                    .await
                    .unwrap_or_default();
                if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                    ok = false;
                }
                let known: String = node_cmd(node.port, &["CLUSTER", "NODES"])
                    .await
                    .unwrap_or_default();
                let replicas = known
                    .lines()
                    .filter(|l| l.contains("slave") && l.contains("connected"))
                    .count();
                if replicas != self.replicas {
                    ok = false;
                }
                match self.shards_seen_by(node.port).await {
                    Some(view) if view.len() == masters => views.push(view),
                    _ => ok = false,
                }
            }
            if ok && views.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become consistent"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Primary port → its slot ranges, as `port` sees them (CLUSTER SLOTS).
    async fn shards_seen_by(&self, port: u16) -> Option<Vec<(u16, Vec<(i64, i64)>)>> {
        let slots: redis::Value = node_cmd(port, &["CLUSTER", "SLOTS"]).await.ok()?;
        let mut map: HashMap<u16, Vec<(i64, i64)>> = HashMap::new();
        let redis::Value::Array(ranges) = slots else {
            return None;
        };
        for range in ranges {
            let redis::Value::Array(items) = range else {
                return None;
            };
            let (redis::Value::Int(from), redis::Value::Int(to), redis::Value::Array(master)) =
                (&items[0], &items[1], &items[2])
            else {
                return None;
            };
            let redis::Value::Int(port) = master[1] else {
                return None;
            };
            map.entry(port as u16).or_default().push((*from, *to));
        }
        let mut view: Vec<_> = map.into_iter().collect();
        for (_, ranges) in view.iter_mut() {
            ranges.sort();
        }
        view.sort();
        Some(view)
    }

    /// The primary port owning `slot` now (as the first live node sees it).
    pub async fn owner_of_slot(&self, slot: u16) -> u16 {
        let port = self.live_port();
        let view = self.shards_seen_by(port).await.expect("CLUSTER SLOTS");
        view.into_iter()
            .find(|(_, ranges)| {
                ranges
                    .iter()
                    .any(|(a, b)| (*a..=*b).contains(&i64::from(slot)))
            })
            .map(|(port, _)| port)
            .expect("every slot has an owner")
    }

    /// The primary port owning `key`'s slot.
    pub async fn owner_of(&self, key: &str) -> u16 {
        let slot: i64 = node_cmd(self.live_port(), &["CLUSTER", "KEYSLOT", key])
            .await
            .unwrap();
        assert_eq!(
            slot as u16,
            herald::redis_pool::slot(key.as_bytes()),
            "Herald's slot of {key} is Redis's"
        );
        self.owner_of_slot(slot as u16).await
    }

    /// Primary ports.
    pub async fn masters(&self) -> Vec<u16> {
        let view = self
            .shards_seen_by(self.live_port())
            .await
            .expect("CLUSTER SLOTS");
        view.into_iter().map(|(port, _)| port).collect()
    }

    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .map(|n| n.port)
            .expect("a live node")
    }

    /// A replica of the primary on `master`.
    pub async fn replica_of(&self, master: u16) -> u16 {
        let id: String = node_cmd(master, &["CLUSTER", "MYID"]).await.unwrap();
        let nodes: String = node_cmd(master, &["CLUSTER", "NODES"]).await.unwrap();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 3 && fields[2].contains("slave") && fields[3] == id {
                let addr = fields[1].split('@').next().unwrap();
                return addr.rsplit(':').next().unwrap().parse().unwrap();
            }
        }
        panic!("no replica of {master}: {nodes}");
    }

    /// `CLUSTER FAILOVER` on a replica of `master`: the replica takes over
    /// (the old primary pauses its writers, the replica catches up, then
    /// they swap). Returns the new primary's port once every node agrees.
    pub async fn failover(&self, master: u16) -> u16 {
        let replica = self.replica_of(master).await;
        let masters = self.masters().await.len();
        let _: String = node_cmd(replica, &["CLUSTER", "FAILOVER"]).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let role: redis::Value = node_cmd(replica, &["ROLE"]).await.unwrap();
            let is_master = matches!(&role, redis::Value::Array(items)
                if matches!(items.first(), Some(redis::Value::BulkString(b)) if b == b"master"));
            if is_master && self.masters().await.contains(&replica) {
                break;
            }
            assert!(Instant::now() < deadline, "the failover did not happen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.wait_consistent(masters).await;
        replica
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A primary, one replica and three sentinels monitoring them as
/// `mymaster` (quorum 2), on free loopback ports.
pub struct RedisSentinel {
    pub primary: u16,
    pub replica: u16,
    pub sentinels: Vec<u16>,
    nodes: Vec<Node>,
    dir: PathBuf,
}

pub const MASTER_NAME: &str = "mymaster";

impl RedisSentinel {
    pub async fn start() -> RedisSentinel {
        let dir = temp_dir("sentinel");
        let primary = free_port();
        let replica = free_port();
        let base = |port: u16| -> Vec<String> {
            vec![
                "--port".into(),
                port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--save".into(),
                "".into(),
                "--appendonly".into(),
                "no".into(),
                "--dir".into(),
                dir.display().to_string(),
            ]
        };
        let mut nodes = vec![Node::spawn(primary, base(primary))];
        let mut replica_args = base(replica);
        replica_args.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.to_string(),
        ]);
        nodes.push(Node::spawn(replica, replica_args));
        // The replica must be in sync before a failover can pick it.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info: String = node_cmd(replica, &["INFO", "replication"])
                .await
                .unwrap_or_default();
            if info.contains("master_link_status:up") {
                break;
            }
            assert!(Instant::now() < deadline, "the replica did not sync");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2\nsentinel down-after-milliseconds {MASTER_NAME} 1000\nsentinel failover-timeout {MASTER_NAME} 5000\nsentinel parallel-syncs {MASTER_NAME} 1\n",
                    dir.display()
                ),
            )
            .unwrap();
            nodes.push(Node::spawn(
                port,
                vec![conf.display().to_string(), "--sentinel".into()],
            ));
            sentinels.push(port);
        }
        let setup = RedisSentinel {
            primary,
            replica,
            sentinels,
            nodes,
            dir,
        };
        // Every sentinel knows the replica and the other sentinels.
        let deadline = Instant::now() + Duration::from_secs(30);
        'wait: loop {
            assert!(Instant::now() < deadline, "the sentinels did not settle");
            tokio::time::sleep(Duration::from_millis(100)).await;
            for &port in &setup.sentinels {
                let info: String = node_cmd(port, &["INFO", "sentinel"])
                    .await
                    .unwrap_or_default();
                if !info.contains("slaves=1,sentinels=3") {
                    continue 'wait;
                }
            }
            break;
        }
        setup
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The primary's port as the first sentinel names it.
    pub async fn current_primary(&self) -> u16 {
        let addr: Vec<String> = node_cmd(
            self.sentinels[0],
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
        )
        .await
        .unwrap();
        addr[1].parse().unwrap()
    }

    /// `SENTINEL FAILOVER`, then wait until every sentinel names the other
    /// server as primary and it says so itself. Returns the new primary.
    pub async fn failover(&self) -> u16 {
        let old = self.current_primary().await;
        let _: String = node_cmd(self.sentinels[0], &["SENTINEL", "FAILOVER", MASTER_NAME])
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut all = true;
            let mut new = 0;
            for &port in &self.sentinels {
                let addr: Vec<String> =
                    node_cmd(port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])
                        .await
                        .unwrap();
                new = addr[1].parse().unwrap();
                all &= new != old;
            }
            if all {
                let role: redis::Value = node_cmd(new, &["ROLE"]).await.unwrap();
                if matches!(&role, redis::Value::Array(items)
                    if matches!(items.first(), Some(redis::Value::BulkString(b)) if b == b"master"))
                {
                    return new;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel failover did not happen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a subscriber received, with arrival times, read on its own task.
/// What a `RedisPool`'s check and a `Subscriber`'s connect (to topic `a`)
/// both say of `config`'s Redis, for settings each must refuse.
pub async fn refusals(config: &herald::Config) -> [String; 2] {
    let pool = herald::RedisPool::from_config(config)
        .unwrap()
        .check()
        .await
        .unwrap_err()
        .to_string();
    let subscriber = herald::Subscriber::from_config(config)
        .unwrap()
        .topic("a")
        .connect()
        .await
        .unwrap_err()
        .to_string();
    [pool, subscriber]
}

/// The end of a failover test, once the producer stopped with `per_key`
/// events on each of `keys` keys: waits for them all, prints what the
/// stream saw (`what` names the failover; docs quote these lines), and
/// asserts that nothing was lost, per-key order, and, once the relay
/// stopped, an empty outbox and no dead letters. `window` is where to look
/// for the longest pause in deliveries.
pub async fn finish_failover(
    what: &str,
    stream: &mut TimedStream,
    (keys, per_key): (usize, usize),
    window: (Instant, Instant),
    relay: super::RelayTask,
    db: &super::TestDb,
) {
    let total = keys * per_key;
    let all = stream.until_distinct(total, Duration::from_secs(60)).await;
    let lost = stream.missing(keys, per_key);
    stream.drain_for(Duration::from_millis(300)).await;
    let stall = stream.longest_pause(window.0, window.1);
    println!(
        "{what}: longest pause in deliveries {stall:?}; {total} events committed, \
         {} distinct received, {} lost, {} duplicates, {} gaps reported",
        stream.distinct(),
        lost.len(),
        stream.duplicates(),
        stream.gaps.len()
    );
    assert!(
        all,
        "every committed event reached the subscriber; missing {:?}",
        &lost[..lost.len().min(20)]
    );
    stream.assert_per_key_order(keys, per_key);
    relay.stop().await;
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
    assert_eq!(
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        0
    );
}

pub struct TimedStream {
    rx: tokio::sync::mpsc::UnboundedReceiver<(Instant, herald::Delivery)>,
    pub events: Vec<(Instant, herald::Envelope)>,
    pub gaps: Vec<herald::pubsub::Gap>,
}

impl TimedStream {
    pub async fn start(mut subscriber: herald::Subscriber) -> TimedStream {
        subscriber.connect().await.expect("subscribing");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(d) = subscriber.next().await {
                if tx.send((Instant::now(), d)).is_err() {
                    return;
                }
            }
        });
        TimedStream {
            rx,
            events: Vec::new(),
            gaps: Vec::new(),
        }
    }

    /// Receive until `n` distinct event ids arrived or `timeout` passed.
    pub async fn until_distinct(&mut self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.distinct() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some((at, herald::Delivery::Event { envelope, .. }))) => {
                    self.events.push((at, envelope))
                }
                Ok(Some((_, herald::Delivery::Gap(gap)))) => self.gaps.push(gap),
                Ok(Some((_, herald::Delivery::Undecodable { channel, error }))) => {
                    panic!("undecodable message on {channel}: {error}")
                }
                Ok(None) | Err(_) => return false,
            }
        }
        true
    }

    /// Keep receiving for `quiet`.
    pub async fn drain_for(&mut self, quiet: Duration) {
        self.until_distinct(usize::MAX, quiet).await;
    }

    pub fn distinct(&self) -> usize {
        self.events
            .iter()
            .map(|(_, e)| e.id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    pub fn duplicates(&self) -> usize {
        self.events.len() - self.distinct()
    }

    /// The longest time without an event between `from` and `to`.
    pub fn longest_pause(&self, from: Instant, to: Instant) -> Duration {
        let mut times: Vec<Instant> = self
            .events
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| *t >= from && *t <= to)
            .collect();
        times.sort();
        let mut last = from;
        let mut longest = Duration::ZERO;
        for t in times {
            longest = longest.max(t - last);
            last = t;
        }
        longest
    }

    /// (key, seq) pairs expected but never received.
    pub fn missing(&self, keys: usize, per_key: usize) -> Vec<(String, i64)> {
        let got: std::collections::HashSet<(String, i64)> = self
            .events
            .iter()
            .map(|(_, e)| {
                (
                    e.key.clone().unwrap_or_default(),
                    e.payload["seq"].as_i64().unwrap(),
                )
            })
            .collect();
        let mut missing = Vec::new();
        for k in 0..keys {
            for seq in 0..per_key as i64 {
                if !got.contains(&(format!("key-{k}"), seq)) {
                    missing.push((format!("key-{k}"), seq));
                }
            }
        }
        missing
    }

    /// Every key's first deliveries are its sequence numbers in order.
    pub fn assert_per_key_order(&self, keys: usize, per_key: usize) {
        let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
        for (_, e) in &self.events {
            by_key
                .entry(e.key.clone().unwrap_or_default())
                .or_default()
                .push(e.payload["seq"].as_i64().unwrap());
        }
        assert_eq!(by_key.len(), keys, "every key arrived");
        for (key, seqs) in by_key {
            let mut seen = std::collections::HashSet::new();
            let firsts: Vec<i64> = seqs.into_iter().filter(|s| seen.insert(*s)).collect();
            let expected: Vec<i64> = (0..per_key as i64).collect();
            assert_eq!(firsts, expected, "first deliveries of {key} are in order");
        }
    }
}

/// The topic of key `k` when keys are spread over `topics` topics.
pub fn topic_of(k: usize, topics: usize) -> String {
    format!("test.t{}", k % topics)
}

/// Commits one event per key every `every` (key `key-<k>` on topic
/// [`topic_of`], `seq` counting up per key) until stopped.
pub struct Producer {
    stop: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<usize>,
}

impl Producer {
    pub fn start(config: &herald::Config, keys: usize, topics: usize, every: Duration) -> Producer {
        let config = config.clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            let client = herald::db::connect(&config, "herald-test").await.unwrap();
            let mut rounds = 0usize;
            while !token.is_cancelled() {
                let batch: Vec<herald::Event> = (0..keys)
                    .map(|k| {
                        herald::Event::new(topic_of(k, topics), &serde_json::json!({"seq": rounds}))
                            .unwrap()
                            .key(format!("key-{k}"))
                    })
                    .collect();
                herald::publish_batch(&client, &batch).await.unwrap();
                rounds += 1;
                tokio::time::sleep(every).await;
            }
            rounds
        });
        Producer { stop, handle }
    }

    /// Stop; how many events each key got.
    pub async fn stop(self) -> usize {
        self.stop.cancel();
        self.handle.await.unwrap()
    }
}
