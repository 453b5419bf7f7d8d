//! The proxy itself: what it injects is only time and disconnection.

use std::time::{Duration, Instant};

use crate::common::proxy::{Dir, Proxy};

async fn redis_ping(url: &str) -> redis::RedisResult<String> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("PING").query_async(&mut conn).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_delays_blackholes_and_cuts() {
    let (proxy, url) = Proxy::for_url(&crate::common::redis_url()).await;
    assert_eq!(redis_ping(&url).await.expect("through the proxy"), "PONG");

    proxy.delay(Dir::Down, Duration::from_millis(300));
    let t0 = Instant::now();
    redis_ping(&url).await.expect("a delayed ping");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    proxy.heal();

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    proxy.partition();
    let held = tokio::time::timeout(
        Duration::from_millis(300),
        redis::cmd("PING").query_async::<String>(&mut conn),
    )
    .await;
    assert!(held.is_err(), "a blackholed reply does not arrive");
    proxy.heal();
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG", "the connection survives a healed partition");

    proxy.cut();
    let cut = redis::cmd("PING").query_async::<String>(&mut conn).await;
    assert!(cut.is_err(), "a cut connection fails");
    proxy.refuse();
    assert!(redis_ping(&url).await.is_err(), "refused while refusing");
    proxy.heal();
    assert_eq!(redis_ping(&url).await.unwrap(), "PONG");
}
