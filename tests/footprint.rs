//! What the Redis backend leaves on its nodes grows with the deployment,
//! never with the number of names ever locked: after any number of
//! distinct names are locked and released, each node holds one
//! bookkeeping key (its fencing counter and restart marker; one per hash
//! slot on a Redis Cluster) and its memory is back where it was.
//!
//! `TOWER_DSYNC_FOOTPRINT_NAMES` sets how many names (default 100,000).

#![cfg(feature = "redis")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use support::{BOUND, RedisNodes, RedisServer, field, wait_until};
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, RedisSync};

/// Tasks locking at once.
const TASKS: usize = 32;

fn names() -> usize {
    std::env::var("TOWER_DSYNC_FOOTPRINT_NAMES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000)
}

/// Locks and releases `count` distinct names (`<prefix>-<i>`), `TASKS` at a
/// time.
async fn lock_distinct_names<D>(sync: &D, prefix: &str, count: usize)
where
    D: DistSync + Clone + Send + Sync + 'static,
    D::Mutex: Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (sync, next, prefix) = (sync.clone(), next.clone(), prefix.to_owned());
            tokio::spawn(async move {
                let options = DistMutexOptions::default().with_tries(1);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let mut m = sync.new_mutex(&format!("{prefix}-{i}"), options.clone())?;
                    m.lock().await?;
                    m.unlock().await?;
                }
                Ok::<_, tower_dsync::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await
            .expect("a locking task")
            .expect("lock and unlock");
    }
}

fn used_memory(server: &RedisServer) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(&mut server.connection())
        .expect("INFO memory");
    field(&info, "used_memory")
        .and_then(|v| v.parse().ok())
        .expect("used_memory")
}

fn keys(server: &RedisServer) -> Vec<String> {
    redis::cmd("KEYS")
        .arg("*")
        .query(&mut server.connection())
        .expect("KEYS")
}

/// Redlock over three nodes: after 100,000 distinct names, each node holds
/// its one bookkeeping key and nothing else, and its memory is within
/// 1 MiB of where it was (a key of ~80 bytes per name, as a per-name
/// counter would be, is ~8 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_names_leave_nothing_per_name_on_redlock() {
    let nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    // Connections made, scripts loaded, the deployment settled.
    lock_distinct_names(&sync, "warm", 100).await;
    let only_bookkeeping = || {
        nodes
            .servers
            .iter()
            .all(|server| keys(server) == ["dsync:\u{1f}node"])
    };
    wait_until(BOUND, "the warm-up released everywhere", only_bookkeeping).await;
    let before: Vec<i64> = nodes.servers.iter().map(used_memory).collect();

    let count = names();
    let started = std::time::Instant::now();
    lock_distinct_names(&sync, "name", count).await;
    let took = started.elapsed();
    wait_until(BOUND, "every release applied everywhere", only_bookkeeping).await;
    let after: Vec<i64> = nodes.servers.iter().map(used_memory).collect();
    println!(
        "{count} distinct names over 3 nodes in {took:.1?}: keys per node {:?}, used_memory before {before:?}, after {after:?}",
        nodes
            .servers
            .iter()
            .map(RedisServer::dbsize)
            .collect::<Vec<_>>()
    );
    for (node, (before, after)) in before.iter().zip(&after).enumerate() {
        assert!(
            after - before < 1 << 20,
            "node {node} grew by {} bytes after {count} names",
            after - before
        );
    }
}

/// One node: the same, one bookkeeping key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_names_leave_nothing_per_name_on_one_node() {
    let node = RedisServer::start();
    let sync = RedisSync::new([node.url()]).unwrap();
    lock_distinct_names(&sync, "name", names() / 10).await;
    wait_until(BOUND, "every release applied", || {
        keys(&node) == ["dsync:\u{1f}node"]
    })
    .await;
}
