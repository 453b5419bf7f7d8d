//! Publishing a relay batch: one pipelined PUBLISH round trip per batch
//! (bounded in bytes) on one server or a Sentinel primary, or per slot's
//! primary on a cluster in sharded mode, reporting what Redis did with each
//! message (accepted, refused on its own, or not known to have run). It
//! never decides what happens to an event: the relay does, from the report.

use std::time::Duration;

use crate::config::PubSubMode;
use crate::error::{Context, Error, Result};
use crate::redis_pool::RedisPool;

/// PUBLISH every `(channel, message)` in order, in one pipelined round trip.
/// Returns the total number of subscribers that received them. All or
/// nothing: any refused message fails the call (see [`publish_each`] for
/// per-message outcomes).
pub async fn publish_all(
    pool: impl Into<RedisPool>,
    messages: &[(String, String)],
    timeout: Duration,
) -> Result<i64> {
    if messages.is_empty() {
        return Ok(0);
    }
    let pool = pool.into();
    if pool.cluster().await.is_some() {
        let out = publish_each(
            &pool,
            messages,
            timeout,
            usize::MAX,
            std::time::Instant::now(),
        )
        .await;
        if let Some(error) = out.outage {
            return Err(error);
        }
        if let Some(Sent::Refused(reason)) = out.sent.iter().find(|s| **s != Sent::Accepted) {
            return Err(Error::Other(reason.clone()));
        }
        return Ok(out.receivers);
    }
    let mut conn = pool.get().await?;
    let mut pipe = redis::pipe();
    for (channel, message) in messages {
        pipe.publish(channel, message);
    }
    let receivers: Vec<i64> = tokio::time::timeout(timeout, pipe.query_async(&mut conn))
        .await
        .map_err(|_| {
            Error::Timeout(
                timeout,
                format!("publishing {} messages to Redis", messages.len()),
            )
        })?
        .context(format!("publishing {} messages", messages.len()))?;
    Ok(receivers.iter().sum())
}

/// What Redis did with one message of [`publish_each`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Redis ran the PUBLISH.
    Accepted,
    /// Redis refused this PUBLISH for this message alone (for example an
    /// ACL that denies its channel); the reason as Redis gave it.
    Refused(String),
    /// Not known to have run: its pipeline failed as a whole, was never
    /// sent, or Redis refused it for a reason that concerns every message
    /// (authentication, the PUBLISH command denied, loading).
    Unsent,
}

/// The outcome of [`publish_each`]: one [`Sent`] per message, in order.
#[derive(Debug)]
pub struct Publication {
    pub sent: Vec<Sent>,
    /// Why the [`Sent::Unsent`] messages were not sent: Redis unreachable,
    /// too slow, or refusing every message. None when every message was
    /// accepted or refused on its own.
    pub outage: Option<Error>,
    /// The outage is a timeout (no reply within `redis.response_timeout`).
    pub timed_out: bool,
    /// Messages the first pipeline held (the rest went in later ones); on
    /// a cluster in sharded mode, the first pipeline of every slot's.
    pub first_pipeline: usize,
    /// Subscribers that received the accepted messages, summed as Redis
    /// counted them (per node for classic pub/sub in a cluster).
    pub receivers: i64,
}

impl Publication {
    pub fn all_accepted(&self) -> bool {
        self.sent.iter().all(|s| *s == Sent::Accepted)
    }
}

/// PUBLISH every `(channel, message)` in order, in pipelines of at most
/// `max_bytes` each (a larger message goes alone), one after the other, and
/// report what Redis did with each. A pipeline that fails as a whole leaves
/// it and every later message [`Sent::Unsent`], and so does reaching
/// `last_start` before a pipeline (which bounds how long the caller waits).
///
/// On a cluster, classic PUBLISH goes through the primary of slot 0 (one
/// node, so batches stay in order for every subscriber) and sharded SPUBLISH
/// goes per slot to its primary, the slots' pipelines at the same time;
/// a channel's messages keep their order within its slot's pipelines.
pub async fn publish_each(
    pool: impl Into<RedisPool>,
    messages: &[(String, String)],
    timeout: Duration,
    max_bytes: usize,
    last_start: std::time::Instant,
) -> Publication {
    let mut out = Publication {
        sent: Vec::with_capacity(messages.len()),
        outage: None,
        timed_out: false,
        first_pipeline: 0,
        receivers: 0,
    };
    if messages.is_empty() {
        return out;
    }
    let pool = pool.into();
    if let Some(conn) = pool.cluster().await {
        return publish_cluster(&pool, conn, messages, timeout, max_bytes, last_start).await;
    }
    let conn = pool.get().await;
    // Checked after `get`, which is where a failover is noticed.
    let mut conn = match conn.and_then(|conn| pool.held_back().map_or(Ok(conn), Err)) {
        Ok(conn) => conn,
        Err(error) => {
            out.outage = Some(error);
            out.sent.resize(messages.len(), Sent::Unsent);
            return out;
        }
    };
    let audience = pool.audience();
    let mut held: Vec<&str> = Vec::new();
    let mut start = 0;
    while start < messages.len() && out.outage.is_none() {
        if start > 0 && std::time::Instant::now() >= last_start {
            break;
        }
        let mut end = start;
        let mut bytes = 0usize;
        while end < messages.len() {
            let size = messages[end].0.len() + messages[end].1.len();
            if end > start && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            end += 1;
        }
        if start == 0 {
            out.first_pipeline = end;
        }
        match publish_pipeline(&mut conn, &messages[start..end], timeout).await {
            Ok(results) => {
                for (result, (channel, _)) in results.into_iter().zip(&messages[start..end]) {
                    match result {
                        Ok(_) if held.contains(&channel.as_str()) => out.sent.push(Sent::Unsent),
                        Ok(n) if audience.is_some_and(|a| a.hold(channel, n)) => {
                            held.push(channel);
                            out.outage
                                .get_or_insert_with(|| vanished(channel, audience));
                            out.sent.push(Sent::Unsent);
                        }
                        Ok(n) => {
                            out.receivers += n;
                            out.sent.push(Sent::Accepted)
                        }
                        Err(error) if refuses_everything(&error) => {
                            out.sent.push(Sent::Unsent);
                            if out.outage.is_none() {
                                out.outage = Some(Error::Redis {
                                    context: "Redis refuses PUBLISH itself (authentication or ACL)"
                                        .into(),
                                    error,
                                });
                            }
                        }
                        Err(error) => out
                            .sent
                            .push(Sent::Refused(format!("redis: PUBLISH refused: {error}"))),
                    }
                }
            }
            Err(error) => {
                out.timed_out = matches!(&error, Error::Timeout(..))
                    || matches!(&error, Error::Redis { error, .. } if error.is_timeout());
                out.outage = Some(error);
                break;
            }
        }
        start = end;
    }
    out.sent.resize(messages.len(), Sent::Unsent);
    out
}

/// One pipeline with per-command results.
async fn publish_pipeline<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    messages: &[(String, String)],
    timeout: Duration,
) -> Result<Vec<redis::RedisResult<i64>>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (channel, message) in messages {
        pipe.publish(channel, message);
    }
    let results: Vec<redis::RedisResult<i64>> =
        tokio::time::timeout(timeout, pipe.query_async(conn))
            .await
            .map_err(|_| {
                Error::Timeout(
                    timeout,
                    format!("publishing {} messages to Redis", messages.len()),
                )
            })?
            .context(format!("publishing {} messages", messages.len()))?;
    if results.len() != messages.len() {
        return Err(Error::Other(format!(
            "redis: {} replies to a pipeline of {} PUBLISH",
            results.len(),
            messages.len()
        )));
    }
    Ok(results)
}

/// Why a channel's messages are held back: its subscribers vanished at
/// once, as they do when a failover moves them to another server.
fn vanished(channel: &str, audience: Option<&crate::redis_pool::Audience>) -> Error {
    Error::Other(format!(
        "redis: channel {channel} lost every subscriber at once (a failover or slot move?); its events wait up to {:?} (redis.connect_timeout) for them to subscribe again",
        audience.map(|a| a.grace()).unwrap_or_default()
    ))
}

/// One group of a cluster publication: the messages (indices into the
/// batch, in order) that go to one node.
struct Group {
    route: redis::cluster_routing::Route,
    indices: Vec<usize>,
    mode: PubSubMode,
}

/// What one group's pipelines did.
struct GroupOutcome {
    sent: Vec<(usize, Sent)>,
    outage: Option<Error>,
    timed_out: bool,
    first_pipeline: usize,
    receivers: i64,
}

async fn publish_cluster(
    pool: &RedisPool,
    conn: Result<redis::cluster_async::ClusterConnection>,
    messages: &[(String, String)],
    timeout: Duration,
    max_bytes: usize,
    last_start: std::time::Instant,
) -> Publication {
    use redis::cluster_routing::{Route, SlotAddr};
    let mode = pool.pubsub();
    let audience = match mode {
        PubSubMode::Sharded => pool.audience(),
        PubSubMode::Classic => None,
    };
    let mut out = Publication {
        sent: vec![Sent::Unsent; messages.len()],
        outage: None,
        timed_out: false,
        first_pipeline: 0,
        receivers: 0,
    };
    let conn = match conn {
        Ok(conn) => conn,
        Err(error) => {
            out.outage = Some(error);
            return out;
        }
    };
    let groups: Vec<Group> = match mode {
        PubSubMode::Classic => vec![Group {
            route: Route::new(0, SlotAddr::Master),
            indices: (0..messages.len()).collect(),
            mode,
        }],
        PubSubMode::Sharded => {
            let mut by_slot: Vec<(u16, Vec<usize>)> = Vec::new();
            for (i, (channel, _)) in messages.iter().enumerate() {
                let slot = crate::redis_pool::slot(channel.as_bytes());
                match by_slot.iter_mut().find(|(s, _)| *s == slot) {
                    Some((_, indices)) => indices.push(i),
                    None => by_slot.push((slot, vec![i])),
                }
            }
            by_slot
                .into_iter()
                .map(|(slot, indices)| Group {
                    route: Route::new(slot, SlotAddr::Master),
                    indices,
                    mode,
                })
                .collect()
        }
    };
    let outcomes = futures_util::future::join_all(groups.into_iter().map(|group| {
        publish_group(
            conn.clone(),
            audience,
            group,
            messages,
            timeout,
            max_bytes,
            last_start,
        )
    }))
    .await;
    for outcome in outcomes {
        for (i, sent) in outcome.sent {
            out.sent[i] = sent;
        }
        out.first_pipeline += outcome.first_pipeline;
        out.receivers += outcome.receivers;
        out.timed_out |= outcome.timed_out;
        if out.outage.is_none() {
            out.outage = outcome.outage;
        }
    }
    out
}

/// One group's messages in pipelines of at most `max_bytes`, one after the
/// other, to the node of its route.
async fn publish_group(
    mut conn: redis::cluster_async::ClusterConnection,
    audience: Option<&crate::redis_pool::Audience>,
    group: Group,
    messages: &[(String, String)],
    timeout: Duration,
    max_bytes: usize,
    last_start: std::time::Instant,
) -> GroupOutcome {
    let mut out = GroupOutcome {
        sent: Vec::with_capacity(group.indices.len()),
        outage: None,
        timed_out: false,
        first_pipeline: 0,
        receivers: 0,
    };
    let command = match group.mode {
        PubSubMode::Classic => "PUBLISH",
        PubSubMode::Sharded => "SPUBLISH",
    };
    let mut start = 0;
    let mut held: Vec<String> = Vec::new();
    let indices = &group.indices;
    while start < indices.len() && out.outage.is_none() {
        if start > 0 && std::time::Instant::now() >= last_start {
            break;
        }
        let mut end = start;
        let mut bytes = 0usize;
        while end < indices.len() {
            let (channel, message) = &messages[indices[end]];
            let size = channel.len() + message.len();
            if end > start && bytes.saturating_add(size) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(size);
            end += 1;
        }
        if start == 0 {
            out.first_pipeline = end;
        }
        let mut pipe = redis::pipe();
        for &i in &indices[start..end] {
            let (channel, message) = &messages[i];
            pipe.cmd(command).arg(channel).arg(message);
        }
        let count = end - start;
        let route = redis::cluster_routing::SingleNodeRoutingInfo::SpecificNode(group.route);
        let reply = tokio::time::timeout(timeout, conn.route_pipeline(pipe, 0, count, route)).await;
        let values = match reply {
            Err(_) => {
                out.timed_out = true;
                out.outage = Some(Error::Timeout(
                    timeout,
                    format!("publishing {count} messages to the Redis Cluster"),
                ));
                break;
            }
            Ok(Err(error)) => {
                out.timed_out = error.is_timeout();
                out.outage = Some(Error::Redis {
                    context: format!("publishing {count} messages"),
                    error,
                });
                break;
            }
            Ok(Ok(values)) if values.len() != count => {
                out.outage = Some(Error::Other(format!(
                    "redis: {} replies to a pipeline of {count} {command}",
                    values.len()
                )));
                break;
            }
            Ok(Ok(values)) => values,
        };
        for (&i, value) in indices[start..end].iter().zip(values) {
            let channel = &messages[i].0;
            let sent = match value.extract_error() {
                // After one of a channel's messages is held, its later
                // ones are too, so the channel keeps its order.
                Ok(_) if held.contains(channel) => Sent::Unsent,
                Ok(value) => {
                    let receivers = redis::from_redis_value::<i64>(value).unwrap_or(0);
                    if audience.is_some_and(|a| a.hold(channel, receivers)) {
                        // Its subscribers vanished together: the slot
                        // moved and they are subscribing again at the
                        // new primary. Publish it again once they are.
                        held.push(channel.clone());
                        out.outage
                            .get_or_insert_with(|| vanished(channel, audience));
                        Sent::Unsent
                    } else {
                        out.receivers += receivers;
                        Sent::Accepted
                    }
                }
                Err(error) if refuses_everything(&error) => {
                    if out.outage.is_none() {
                        out.outage = Some(Error::Redis {
                            context: format!("Redis refuses {command} itself"),
                            error,
                        });
                    }
                    Sent::Unsent
                }
                Err(error) => Sent::Refused(format!("redis: {command} refused: {error}")),
            };
            out.sent.push((i, sent));
        }
        start = end;
    }
    for &i in &indices[out.sent.len()..] {
        out.sent.push((i, Sent::Unsent));
    }
    out
}

/// Whether a PUBLISH's error concerns Redis or this client rather than the
/// message: not authenticated, wrong password, the PUBLISH command itself
/// denied by an ACL, or a server not ready. Such errors are outages, never
/// charged to events; a NOPERM for a channel concerns that channel's
/// messages only.
pub fn refuses_everything(error: &redis::RedisError) -> bool {
    match error.code() {
        Some(
            "NOAUTH" | "WRONGPASS" | "LOADING" | "BUSY" | "MASTERDOWN" | "CLUSTERDOWN" | "TRYAGAIN"
            | "MOVED" | "ASK" | "READONLY",
        ) => true,
        Some("NOPERM") => !error
            .detail()
            .unwrap_or_default()
            .to_ascii_lowercase()
            .contains("channel"),
        Some(_) => false,
        None => true,
    }
}
