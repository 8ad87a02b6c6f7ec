//! `RedisSync` on real `redis-server` processes: the conformance suite on one
//! and three nodes, then faults (killed, paused and restarted nodes), errors
//! and configuration.

#![cfg(feature = "redis")]

mod conformance;
mod support;

use std::collections::HashSet;
use std::pin::pin;
use std::time::Duration;

use conformance::{
    Suite, eventually, poll_once, real_time_options, served_in_start_order, unique, wake_only,
};
use support::RedisNodes;
use tokio::time::Instant;
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, Error, RedisSync};

/// Two `RedisSync`s over the same nodes, as two processes would have.
fn two_processes(nodes: &RedisNodes) -> (RedisSync, RedisSync) {
    (
        RedisSync::new(nodes.urls()).unwrap(),
        RedisSync::new(nodes.urls()).unwrap(),
    )
}

fn suite(nodes: usize) -> Suite<RedisSync> {
    let servers = RedisNodes::start(nodes);
    Suite {
        sync: RedisSync::new(servers.urls()).unwrap(),
        other: RedisSync::new(servers.urls()).unwrap(),
        base: real_time_options(),
        guard: Box::new(servers),
    }
}

mod one_node {
    use super::*;
    conformance_tests!(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        suite(1)
    );
}

mod three_nodes {
    use super::*;
    conformance_tests!(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        suite(3)
    );
}

mod three_nodes_fail_fast {
    //! Deciding on the quorum and finishing the rest in the background
    //! keeps every guarantee.
    use super::*;

    fn suite() -> Suite<RedisSync> {
        let servers = RedisNodes::start(3);
        let build = || {
            RedisSync::builder()
                .urls(servers.urls())
                .fail_fast(true)
                .build()
                .unwrap()
        };
        Suite {
            sync: build(),
            other: build(),
            base: real_time_options(),
            guard: Box::new(servers),
        }
    }

    conformance_tests!(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        suite()
    );
}

/// Five nodes, two killed: everything still works. Three killed: `lock`
/// fails with the no-quorum error within `tries * (timeout + max delay)` and
/// leaves no key on the survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_minority_and_majority_down() {
    let mut nodes = RedisNodes::start(5);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let tries = 3;
    let delay = Duration::from_millis(20);
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(2))
        .with_timeout_factor(0.1)
        .with_tries(tries)
        .with_retry_delay(delay);
    let name = unique("five");
    let key = format!("dsync:{name}");
    warm(&sync).await;

    nodes.servers[0].kill();
    nodes.servers[1].kill();
    let mut m = sync.new_mutex(&name, options.clone()).unwrap();
    m.lock().await.unwrap();
    assert_eq!(nodes.count_key(&key), 3);
    m.extend().await.unwrap();
    assert!(m.valid().await.unwrap());
    m.unlock().await.unwrap();
    assert_eq!(nodes.count_key(&key), 0);

    nodes.servers[2].kill();
    let start = Instant::now();
    let err = m.lock().await.unwrap_err();
    let elapsed = start.elapsed();
    let bound = (options.node_timeout() + delay) * tries;
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
    match &err {
        Error::Unavailable { quorum, failures } => {
            assert_eq!(*quorum, 3);
            assert_eq!(failures.len(), 3, "{err}");
            for f in failures {
                assert!(err.to_string().contains(f.node()));
            }
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    no_key_left(&nodes, &key).await;
}

/// One of three nodes paused: `lock`, `extend` and `unlock` still succeed,
/// each bounded by the per-node timeout; after it resumes, no key is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_node_is_bounded_by_the_node_timeout() {
    let mut nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(10))
        .with_timeout_factor(0.05)
        .with_tries(1);
    let timeout = options.node_timeout();
    let name = unique("paused");
    let key = format!("dsync:{name}");
    // Connect to every node first, so the pause hits open connections.
    warm(&sync).await;

    nodes.servers[2].pause();
    let mut m = sync.new_mutex(&name, options).unwrap();
    for step in ["lock", "extend", "valid", "unlock"] {
        let start = Instant::now();
        match step {
            "lock" => m.lock().await.unwrap(),
            "extend" => m.extend().await.unwrap(),
            "valid" => assert!(m.valid().await.unwrap()),
            _ => m.unlock().await.unwrap(),
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed < timeout * 2,
            "{step} took {elapsed:?} with a node timeout of {timeout:?}"
        );
    }
    nodes.servers[2].resume();
    no_key_left(&nodes, &key).await;
}

/// With `set_nx_on_extend`, an `extend` may re-create a key a node lost,
/// but never the key of a lock its mutex released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_nx_on_extend_never_takes_back_a_released_name() {
    let servers = RedisNodes::start(3);
    let build = || {
        RedisSync::builder()
            .urls(servers.urls())
            .set_nx_on_extend(true)
            .build()
            .unwrap()
    };
    let suite = Suite {
        sync: build(),
        other: build(),
        base: real_time_options(),
        guard: Box::new(()),
    };
    suite.extend_after_unlock_is_refused().await;
}

/// A node restarted empty gets the key back from `extend` with
/// `set_nx_on_extend`, and not without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_nx_on_extend_restores_a_restarted_node() {
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(30));
    for set_nx in [false, true] {
        // Fresh nodes each time: a restarted node takes no new lock for
        // an expiry.
        let mut nodes = RedisNodes::start(3);
        let sync = RedisSync::builder()
            .urls(nodes.urls())
            .set_nx_on_extend(set_nx)
            .build()
            .unwrap();
        let name = unique("setnx");
        let key = format!("dsync:{name}");
        let mut m = sync.new_mutex(&name, options.clone()).unwrap();
        m.lock().await.unwrap();
        on_every_node(&nodes, &key).await;
        nodes.servers[0].restart();
        assert!(!nodes.servers[0].exists(&key));
        // The first command after the restart may find the old connection
        // broken; the connection manager then reconnects on its own.
        let mut extends = 0;
        eventually(
            Duration::from_secs(10),
            "extend reaches the restarted node",
            async || {
                m.extend().await.unwrap();
                extends += 1;
                extends >= 3 && (!set_nx || nodes.servers[0].exists(&key))
            },
        )
        .await;
        assert_eq!(nodes.servers[0].exists(&key), set_nx);
        m.unlock().await.unwrap();
        no_key_left(&nodes, &key).await;
    }
}

/// A `lock()` dropped mid-attempt leaves no key on any node, also when a
/// node answers only after the attempt was abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_lock_leaves_no_key() {
    let mut nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(60));
    warm(&sync).await;

    for round in 0..20 {
        let name = unique("dropped");
        let mut m = sync.new_mutex(&name, options.clone()).unwrap();
        let completed = {
            let mut fut = pin!(m.lock());
            let mut result = poll_once(fut.as_mut()).await;
            // Let some nodes answer before the future is dropped.
            for _ in 0..round % 4 {
                if result.is_none() {
                    tokio::task::yield_now().await;
                    result = poll_once(fut.as_mut()).await;
                }
            }
            result
        };
        if let Some(result) = completed {
            result.unwrap();
            m.unlock().await.unwrap();
        }
    }
    eventually(
        Duration::from_secs(10),
        "every abandoned key released",
        async || nodes.total_keys() == 0,
    )
    .await;

    // With a paused node that answers only after the abandon. The first
    // poll sends the attempt to every node; on the multi-thread runtime
    // two live nodes may answer within that very poll, and the lock is
    // taken. So every node is paused during it (no answer can come), then
    // two of them resume and apply the attempt, which is no longer polled.
    for server in &mut nodes.servers {
        server.pause();
    }
    let name = unique("dropped-paused");
    let key = format!("dsync:{name}");
    let mut m = sync.new_mutex(&name, options.clone()).unwrap();
    {
        let mut fut = pin!(m.lock());
        assert!(poll_once(fut.as_mut()).await.is_none());
        nodes.servers[0].resume();
        nodes.servers[2].resume();
        eventually(
            Duration::from_secs(10),
            "two nodes set the key",
            async || nodes.count_key(&key) == 2,
        )
        .await;
    }
    nodes.servers[1].resume();
    no_key_left(&nodes, &key).await;
}

/// A busy name reports the holder's remaining time from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_reports_the_remaining_time() {
    let nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(20))
        .with_tries(2)
        .with_retry_delay(Duration::from_millis(1));
    let mut a = sync.new_mutex("held", options.clone()).unwrap();
    let mut b = sync.new_mutex("held", options).unwrap();
    a.lock().await.unwrap();
    match b.lock().await {
        Err(Error::Held {
            remaining: Some(left),
        }) => assert!(left > Duration::from_secs(10) && left <= Duration::from_secs(20)),
        other => panic!("expected Held with a remaining time, got {other:?}"),
    }
    // A failed attempt leaves nothing of b's behind (the release of the
    // third node may finish after unlock returned).
    a.unlock().await.unwrap();
    eventually(Duration::from_secs(10), "no key left", async || {
        nodes.total_keys() == 0
    })
    .await;
}

/// All nodes down: `Unavailable` naming each node; all paused: `Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_silent_backends() {
    let mut nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(2))
        .with_timeout_factor(0.1)
        .with_tries(1);
    warm(&sync).await;

    for server in &mut nodes.servers {
        server.pause();
    }
    let mut m = sync.new_mutex(&unique("silent"), options.clone()).unwrap();
    match m.lock().await {
        Err(Error::Timeout {
            after,
            nodes: silent,
        }) => {
            // The nodes were waited for the whole node timeout.
            assert!(after >= options.node_timeout(), "after {after:?}");
            assert_eq!(silent.len(), 3);
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    for server in &mut nodes.servers {
        server.resume();
        server.kill();
    }
    let err = m.lock().await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    match &err {
        Error::Unavailable {
            quorum: 2,
            failures,
        } => {
            let named: HashSet<&str> = failures.iter().map(|f| f.node()).collect();
            assert_eq!(named.len(), 3, "{err}");
            assert!(
                std::error::Error::source(&err).is_some(),
                "the cause is chained"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        matches!(m.unlock().await, Err(Error::NotAcquired)),
        "never acquired"
    );
}

/// A node down when a new deployment is first used is not fatal: the two
/// others cannot tell a new deployment from two nodes restarted empty one
/// after the other while the third holds locks, so they take no lock for
/// one expiry (`Unavailable`, naming them, with the time left); then locks
/// work on the two, and the third node is used once it is back and its own
/// expiry has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_deployment_with_a_node_down_waits_one_expiry() {
    let mut nodes = RedisNodes::start_new(3);
    nodes.servers[2].kill();
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let expiry = Duration::from_millis(500);
    let once = DistMutexOptions::default()
        .with_expiry(expiry)
        .with_tries(1);
    let mut m = sync.new_mutex("late", once).unwrap();
    let error = m.lock().await.expect_err("the two nodes are recovering");
    assert!(error.is_unavailable(), "{error:?}");
    let left = error.retry_after().expect("the time until they count");
    assert!(left <= expiry, "{left:?}");
    assert!(error.to_string().contains("restarted empty"), "{error}");
    assert_eq!(nodes.count_key("dsync:late"), 0, "no key set meanwhile");
    let patient = DistMutexOptions::default()
        .with_expiry(expiry)
        .with_tries(u32::MAX)
        .with_retry_delay(Duration::from_millis(10));
    let mut m = sync.new_mutex("late", patient).unwrap();
    m.lock().await.expect("the two nodes count after an expiry");
    m.unlock().await.unwrap();
    nodes.servers[2].restart();
    eventually(
        Duration::from_secs(10),
        "the late node takes part",
        async || {
            m.lock().await.unwrap();
            let on_late = nodes.servers[2].exists("dsync:late");
            m.unlock().await.unwrap();
            on_late
        },
    )
    .await;
}

/// Keys are the prefix followed by the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_prefix_and_separator() {
    let nodes = RedisNodes::start(1);
    let sync = RedisSync::builder()
        .urls(nodes.urls())
        .key_prefix("app:locks:")
        .separator("/")
        .build()
        .unwrap();
    assert_eq!(sync.separator(), "/");
    assert_eq!(sync.key_prefix(), "app:locks:");
    let mut m = sync.new_mutex("a/b", DistMutexOptions::default()).unwrap();
    assert_eq!(m.key(), "app:locks:a/b");
    m.lock().await.unwrap();
    assert!(nodes.servers[0].exists("app:locks:a/b"));
    m.unlock().await.unwrap();
}

/// Bad configuration is a typed error that names the problem.
#[tokio::test]
async fn configuration_errors() {
    let cases: [(Vec<&str>, &str); 3] = [
        (vec![], "no Redis node"),
        (vec!["not a url"], "invalid URL"),
        (vec!["redis://127.0.0.1:1", "http://x"], "node #2"),
    ];
    for (urls, expected) in cases {
        let err = RedisSync::new(urls).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
        assert!(err.to_string().contains(expected), "{err}");
    }
    #[cfg(not(feature = "tls"))]
    {
        let err = RedisSync::new(["rediss://127.0.0.1:1"]).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    }
}

/// TLS to a plain port fails as an unavailable backend, without a panic.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_plain_port_is_unavailable() {
    let nodes = RedisNodes::start(1);
    let url = format!("rediss://127.0.0.1:{}/#insecure", nodes.servers[0].port());
    let sync = RedisSync::new([url]).unwrap();
    let options = DistMutexOptions::default().with_tries(1);
    let mut m = sync.new_mutex("tls", options).unwrap();
    let err = m.lock().await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert_eq!(nodes.total_keys(), 0);
}

#[test]
fn building_outside_a_runtime_is_an_error() {
    let err = RedisSync::new(["redis://127.0.0.1:1"]).unwrap_err();
    assert!(err.to_string().contains("Tokio runtime"), "{err}");
}

/// 10,000 generated values are distinct, and each carries 128 random bits.
#[test]
fn generated_values_are_distinct_and_random() {
    let values: Vec<String> = (0..10_000).map(|_| tower_dsync::random_value()).collect();
    let distinct: HashSet<&String> = values.iter().collect();
    assert_eq!(distinct.len(), values.len());
    let mut ones = 0u64;
    for v in &values {
        assert_eq!(v.len(), 32);
        ones += u64::from(u128::from_str_radix(v, 16).unwrap().count_ones());
    }
    // 1,280,000 bits: a fair source gives 50 % ones within a fraction of a
    // percent; a biased or truncated one does not.
    let share = ones as f64 / (10_000.0 * 128.0);
    assert!((share - 0.5).abs() < 0.005, "share of ones {share}");
}

/// Waits (bounded) until no node keeps `key`: releases run in the
/// background.
async fn no_key_left(nodes: &RedisNodes, key: &str) {
    eventually(Duration::from_secs(10), "no key left", async || {
        nodes.count_key(key) == 0
    })
    .await;
}

/// Waits until `key` is on every node: `lock()` returns once a quorum
/// said yes, and the other nodes follow.
async fn on_every_node(nodes: &RedisNodes, key: &str) {
    let all = nodes.servers.len();
    eventually(
        Duration::from_secs(10),
        "the key on every node",
        async || nodes.count_key(key) == all,
    )
    .await;
}

/// A node's fencing counter (one per node, in its bookkeeping hash).
fn fence(server: &support::RedisServer) -> u64 {
    redis::cmd("HGET")
        .arg("dsync:\u{1f}node")
        .arg("fence")
        .query(&mut server.connection())
        .unwrap()
}

fn set_fence(server: &support::RedisServer, token: u64) {
    let _: () = redis::cmd("HSET")
        .arg("dsync:\u{1f}node")
        .arg("fence")
        .arg(token)
        .query(&mut server.connection())
        .unwrap();
}

/// Warms every node's connection of `sync`.
async fn warm(sync: &RedisSync) {
    let mut m = sync
        .new_mutex(&unique("warm"), DistMutexOptions::default())
        .unwrap();
    m.lock().await.unwrap();
    m.unlock().await.unwrap();
}

/// With no retry delay at all, callers lined up in one process behind a
/// caller whose attempt is slow (its node is paused) keep their place
/// until their turn, then each gets the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_retry_delay_callers_wait_for_a_slow_attempt() {
    callers_in_line_are_served(Duration::ZERO, "zero-delay-line").await;
}

/// A retry delay too long to add to a clock (`Duration::MAX`: retry only
/// when woken by a release) is a valid option: callers that line up behind
/// another caller of their process wait for their turn, then get the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_retry_delay_waits_in_line() {
    callers_in_line_are_served(Duration::MAX, "endless-delay-line").await;
}

/// Three callers of one process, with `retry_delay`, lock and unlock one
/// name while the first one's attempt waits for its paused node: each gets
/// the name in its turn.
async fn callers_in_line_are_served(retry_delay: Duration, prefix: &str) {
    let mut nodes = RedisNodes::start(1);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    // Scripts loaded, connection made: commands reach the node in the
    // order they are sent.
    warm(&sync).await;
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(20))
        .with_timeout_factor(0.5)
        .with_retry_delay(retry_delay)
        .with_tries(3);
    let name = unique(prefix);
    let mut mutexes: Vec<_> = (0..3)
        .map(|_| sync.new_mutex(&name, options.clone()).unwrap())
        .collect();
    let mut callers: Vec<_> = mutexes
        .iter_mut()
        .map(|m| {
            Box::pin(async move {
                m.lock().await?;
                m.unlock().await
            })
        })
        .collect();
    nodes.servers[0].pause();
    // The first caller's attempt waits for the paused node; the others
    // line up behind it.
    for caller in &mut callers {
        assert!(poll_once(caller.as_mut()).await.is_none());
    }
    nodes.servers[0].resume();
    let all = futures_util::future::join_all(callers);
    let outcomes = tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("every caller served");
    for outcome in outcomes {
        outcome.expect("each caller gets the name in its turn");
    }
}

/// A `lock()` with a preset value, dropped mid-attempt, releases what it
/// got in the background; that release must never undo a later acquisition
/// with the same value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preset_value_cleanup_never_undoes_a_later_lock() {
    let mut nodes = RedisNodes::start(3);
    let build = || {
        RedisSync::builder()
            .urls(nodes.urls())
            .fail_fast(true)
            .build()
            .unwrap()
    };
    let (sync, other) = (build(), build());
    warm(&sync).await;
    warm(&other).await;
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(30))
        .with_timeout_factor(0.1)
        .with_tries(1);
    let value = "the-owners-value";
    // The case under test needs an attempt abandoned before any node
    // answered (the nodes that had said yes by then are released at once):
    // every node is paused during its first poll, and two of them resume
    // to apply it.
    for server in &mut nodes.servers {
        server.pause();
    }
    let name = unique("preset");
    let mut b = sync
        .new_mutex(&name, options.clone().with_value(value))
        .unwrap();
    {
        let mut fut = pin!(b.lock());
        assert!(poll_once(fut.as_mut()).await.is_none());
    }
    nodes.servers[0].resume();
    nodes.servers[1].resume();
    let key = format!("dsync:{name}");
    eventually(
        Duration::from_secs(5),
        "two nodes set the key",
        async || nodes.count_key(&key) == 2,
    )
    .await;
    // The abandoned attempt's release now waits for the paused node.
    let mut owner = other
        .new_mutex(&name, options.clone().with_value(value))
        .unwrap();
    owner.unlock().await.unwrap();
    {
        let mut fut = pin!(b.lock());
        let _ = poll_once(fut.as_mut()).await;
    }
    b.lock().await.unwrap();
    nodes.servers[2].resume();
    let mut c = other
        .new_mutex(
            &name,
            options
                .with_tries(100)
                .with_retry_delay(Duration::from_millis(20)),
        )
        .unwrap();
    assert!(c.lock().await.is_err(), "two owners");
    assert!(b.valid().await.unwrap());
}

/// A per-node timeout longer than redis-rs's default response timeout is
/// honoured, and reported as `Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_node_timeouts_are_honoured() {
    let mut nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    warm(&sync).await;
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(20))
        .with_tries(1);
    assert_eq!(options.node_timeout(), Duration::from_secs(1));
    for server in &mut nodes.servers {
        server.pause();
    }
    let mut m = sync.new_mutex(&unique("slow"), options).unwrap();
    match m.lock().await {
        Err(Error::Timeout { after, nodes }) => {
            assert!(after >= Duration::from_secs(1), "after {after:?}");
            assert_eq!(nodes.len(), 3);
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    for server in &mut nodes.servers {
        server.resume();
    }
}

/// With `fail_fast`, a held name is reported as `Held` even when a dead
/// node answers first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_fast_reports_held_despite_a_dead_node() {
    let mut nodes = RedisNodes::start(3);
    let sync = RedisSync::builder()
        .urls(nodes.urls())
        .fail_fast(true)
        .build()
        .unwrap();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(30))
        .with_tries(1);
    let mut a = sync.new_mutex("ff", options.clone()).unwrap();
    a.lock().await.unwrap();
    nodes.servers[0].kill();
    for _ in 0..5 {
        let mut b = sync.new_mutex("ff", options.clone()).unwrap();
        match b.lock().await {
            Err(Error::Held { remaining: Some(_) }) => {}
            other => panic!("expected Held, got {other:?}"),
        }
    }
}

/// A node restarted since the last command answers the very next command,
/// even when another node is down: it takes no new lock until an expiry
/// has passed since it came back (the lock is unavailable meanwhile, and
/// the error names it), then it takes part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_answers_at_once_and_counts_after_an_expiry() {
    let mut nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    warm(&sync).await;
    nodes.servers[2].kill();
    nodes.servers[1].restart();
    let expiry = Duration::from_millis(500);
    let once = DistMutexOptions::default()
        .with_expiry(expiry)
        .with_tries(1);
    let name = unique("restarted");
    let mut m = sync.new_mutex(&name, once).unwrap();
    let error = m.lock().await.expect_err("node 1 is recovering");
    let restarted = format!(
        "node 127.0.0.1:{}: restarted empty",
        nodes.servers[1].port()
    );
    assert!(error.to_string().contains(&restarted), "{error}");
    assert!(error.retry_after().is_some_and(|left| left <= expiry));
    let patient = DistMutexOptions::default()
        .with_expiry(expiry)
        .with_tries(u32::MAX)
        .with_retry_delay(Duration::from_millis(10));
    let mut m = sync.new_mutex(&name, patient).unwrap();
    m.lock().await.expect("node 1 counts after an expiry");
    assert!(nodes.servers[1].exists(&format!("dsync:{name}")));
    m.unlock().await.unwrap();
}

/// Fencing tokens grow strictly over 5,000 acquisitions of one name by 16
/// tasks on two `RedisSync` instances over 3 nodes, also across two of the
/// nodes killed and restarted empty one after the other midway, whenever
/// that falls (a holder restarts them while it holds the name): the
/// restarted nodes take no new lock for an expiry, and their counters start
/// again at their clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_grow_across_replicas_and_empty_restarts() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    const TOTAL: usize = 5_000;
    let nodes = Arc::new(std::sync::Mutex::new(RedisNodes::start(3)));
    let urls = nodes.lock().unwrap().urls();
    let (a, b) = (
        RedisSync::new(&urls).unwrap(),
        RedisSync::new(&urls).unwrap(),
    );
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(1))
        .with_timeout_factor(0.2)
        .with_tries(u32::MAX)
        .with_retry_delay(Duration::from_millis(1));
    let name = unique("fenced");
    let last = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let restarts = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let sync = if i % 2 == 0 { a.clone() } else { b.clone() };
        let mut m = sync.new_mutex(&name, options.clone()).unwrap();
        let (last, done, restarts, nodes) =
            (last.clone(), done.clone(), restarts.clone(), nodes.clone());
        tasks.push(tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < TOTAL {
                m.lock().await.unwrap();
                let token = m.fencing_token().expect("Redis issues tokens");
                let previous = last.swap(token, Ordering::SeqCst);
                assert!(token > previous, "token {token} after {previous}");
                let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                // Node 0 at a third of the way, node 1 at two thirds.
                let due = [TOTAL / 3, 2 * TOTAL / 3];
                let next = restarts.load(Ordering::SeqCst);
                if next < due.len()
                    && n >= due[next]
                    && restarts
                        .compare_exchange(next, next + 1, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    let nodes = nodes.clone();
                    tokio::task::spawn_blocking(move || {
                        nodes.lock().unwrap().servers[next].restart()
                    })
                    .await
                    .unwrap();
                    // The restarted node lost this holder's key. If it was
                    // one of only two nodes that granted the lock, the
                    // holder keeps it by putting the key back (what the
                    // layer's extend loop does); unlocking at once would
                    // find one key and rightly answer `NotAcquired`.
                    m.extend().await.unwrap();
                }
                m.unlock().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(done.load(Ordering::SeqCst) >= TOTAL);
    assert_eq!(restarts.load(Ordering::SeqCst), 2, "both nodes restarted");
}

/// The quorum's highest token is written back to a quorum, so a later
/// quorum without the node that had it still continues above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_token_is_written_back_to_a_quorum() {
    let mut nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    warm(&sync).await;
    let options = DistMutexOptions::default().with_tries(1);
    let name = unique("writeback");
    // Nodes 0 and 1 are ahead of node 2 by different amounts (they missed
    // acquisitions): any two nodes disagree, so the token is written back.
    let base = fence(&nodes.servers[2]);
    set_fence(&nodes.servers[0], base + 100);
    set_fence(&nodes.servers[1], base + 50);
    let mut m = sync.new_mutex(&name, options.clone()).unwrap();
    m.lock().await.unwrap();
    // The highest token of the two nodes that answered first, written
    // back to a quorum.
    let first = m.fencing_token().unwrap();
    assert!(first == base + 101 || first == base + 51, "{first}");
    m.unlock().await.unwrap();
    // `unlock` returns once a quorum deleted the key; the third node's
    // release may still be on its way, and the next `lock` (a new value)
    // does not wait for it. Here it is the first release on a fresh node:
    // `NOSCRIPT`, then loaded and sent again, so the next acquire can
    // overtake it and find the old key. With node 0 killed, the next
    // quorum needs both other nodes: wait until every node is free.
    no_key_left(&nodes, &format!("dsync:{name}")).await;
    nodes.servers[0].kill();
    m.lock().await.unwrap();
    let token = m.fencing_token().unwrap();
    assert!(token > first, "token {token} went back from {first}");
    m.unlock().await.unwrap();
}

/// Only nodes that granted an acquisition vouch for its fencing token. With
/// nodes X, Y, Z: B's attempt takes Y while its command to X is held up on
/// the way (a proxy); A, refused by Y, takes X and Z, whose counter is far
/// ahead (attempts that got Z alone raised it); A's write-back of Z's token
/// is lost on X (A may not read the counter there) and acknowledged by Y
/// and Z; then B's command reaches X. Had Y's acknowledgement counted, A
/// would hold a token that B, the next holder, gets below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_refused_does_not_vouch_for_the_token() {
    let nodes = RedisNodes::start(3);
    let (x, y, z) = (&nodes.servers[0], &nodes.servers[1], &nodes.servers[2]);
    // The deployment in use: every node counts and has its counter.
    warm(&RedisSync::new(nodes.urls()).unwrap()).await;
    let name = unique("vouch");
    let key = format!("dsync:{name}");
    set_fence(z, fence(x) + 10);
    // On X, A's user may not write the node's bookkeeping hash (`HSET`):
    // its FENCE fails there, while its acquisition (`SET`, `HINCRBY`) and
    // release go through.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("fenceless")
        .arg("on")
        .arg(">secret")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-hset")
        .query(&mut x.connection())
        .unwrap();
    let a_sync = RedisSync::new([
        format!("redis://fenceless:secret@127.0.0.1:{}", x.port()),
        y.url(),
        z.url(),
    ])
    .unwrap();
    let proxy = support::proxy::Proxy::start(x.port()).await;
    let dead = format!("redis://127.0.0.1:{}", support::free_port());
    let b_sync = RedisSync::new([proxy.url(), y.url(), dead]).unwrap();
    warm(&b_sync).await;
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(20))
        .with_timeout_factor(0.5)
        .with_tries(1);
    let mut b = b_sync.new_mutex(&name, options.clone()).unwrap();
    proxy.hold();
    let b_locks = tokio::spawn(async move {
        let outcome = b.lock().await;
        (outcome, b)
    });
    eventually(Duration::from_secs(10), "B's attempt took Y", async || {
        y.exists(&key)
    })
    .await;
    let mut a = a_sync.new_mutex(&name, options).unwrap();
    let a_token = match a.lock().await {
        Ok(()) => {
            let token = a.fencing_token().unwrap();
            a.unlock().await.unwrap();
            Some(token)
        }
        Err(_) => {
            // No token issued: what the attempt got is released.
            eventually(
                Duration::from_secs(10),
                "A's attempt released on X",
                async || !x.exists(&key),
            )
            .await;
            None
        }
    };
    proxy.release();
    let (outcome, mut b) = b_locks.await.unwrap();
    outcome.expect("B takes X once its command arrives");
    let b_token = b.fencing_token().unwrap();
    if let Some(a_token) = a_token {
        assert!(
            b_token > a_token,
            "B holds the name after A, with token {b_token} below A's {a_token}"
        );
    }
    b.unlock().await.unwrap();
}

/// A process's entry in a node's wait queue goes with its last waiter: a
/// waiter that acquires the name while one node refuses it (another
/// owner's key is there, so the refusal queued the process there) leaves
/// that node's queue, and so does a waiter that gives up; then a try of
/// another process that needs that node gets the name at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_entry_goes_with_its_waiter() {
    let mut nodes = RedisNodes::start(3);
    let (one, two) = two_processes(&nodes);
    warm(&one).await;
    warm(&two).await;
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(30))
        .with_timeout_factor(0.5)
        .with_retry_delay(Duration::from_millis(5))
        .with_tries(3);
    // Well within the entry's TTL (10 s): a leftover entry would still
    // be there.
    let bound = Duration::from_secs(5);
    let mut names = Vec::new();
    // The check for waiters left may run before the acquiring waiter is
    // gone, and must still leave no entry: many acquisitions, each
    // checked.
    for _ in 0..50 {
        let name = unique("entry");
        let (key, queue) = (format!("dsync:{name}"), format!("dsync:{name}\u{1f}queue"));
        // Node 1 refuses: another owner's key, there until the test takes
        // it away.
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg("another-owner")
            .arg("PX")
            .arg(60_000)
            .query(&mut nodes.servers[1].connection())
            .unwrap();
        let mut waiter = one.new_mutex(&name, options.clone()).unwrap();
        waiter.lock().await.unwrap();
        eventually(bound, "the entry left node 1's queue", async || {
            nodes.servers[1].zcard(&queue) == 0
        })
        .await;
        nodes.servers[1].del(&key);
        waiter.unlock().await.unwrap();
        names.push(name);
    }
    // A try of another process that needs node 1 (node 0 is down) gets
    // each name at once: nobody waits ahead of it there.
    nodes.servers[0].kill();
    for name in &names {
        let mut once = two.new_mutex(name, options.clone().with_tries(1)).unwrap();
        once.lock().await.expect("nobody waits for the name");
        once.unlock().await.unwrap();
    }

    // A waiter that gives up leaves every queue it was in.
    let name = unique("entry-gives-up");
    let queue = format!("dsync:{name}\u{1f}queue");
    let mut holder = two.new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    let mut waiter = one.new_mutex(&name, options.clone()).unwrap();
    assert!(matches!(waiter.lock().await, Err(Error::Held { .. })));
    eventually(bound, "the entry left every queue", async || {
        nodes.count_key(&queue) == 0
    })
    .await;
    holder.unlock().await.unwrap();
    let mut once = two.new_mutex(&name, options.with_tries(1)).unwrap();
    once.lock().await.expect("nobody waits for the name");
    once.unlock().await.unwrap();
}

/// The number of subscribers of `channel` on a node.
fn wake_channels(server: &support::RedisServer) -> usize {
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("dsync:\u{1f}wake\u{1f}*")
        .query(&mut server.connection())
        .unwrap();
    channels.len()
}

/// A waiter wakes on the release message, not after its retry delay (an
/// hour here), also after its node's subscriber had to reconnect; the
/// process stays subscribed to its own wake-up channel, and leaves no
/// entry in the wait queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_wake_on_release_messages() {
    let mut nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let options = wake_only(3);
    let name = unique("push");
    let mut a = sync.new_mutex(&name, options.clone()).unwrap();
    a.lock().await.unwrap();
    let other = RedisSync::new(nodes.urls()).unwrap();
    let mut b = other.new_mutex(&name, options).unwrap();
    let waiter = tokio::spawn(async move {
        b.lock().await.unwrap();
        b
    });
    let queue = format!("dsync:{name}\u{1f}queue");
    // a's lock returned once two nodes said yes; on the third, b may have
    // come first, so b is queued on a quorum, not necessarily everywhere.
    eventually(
        Duration::from_secs(10),
        "b subscribed everywhere and queued on a quorum",
        async || {
            nodes.servers.iter().all(|s| wake_channels(s) == 1) && nodes.count_key(&queue) >= 2
        },
    )
    .await;
    // A node restarts (a still holds the other two): its subscriber
    // reconnects and subscribes again.
    nodes.servers[2].restart();
    eventually(Duration::from_secs(10), "b subscribed again", async || {
        wake_channels(&nodes.servers[2]) == 1
    })
    .await;
    a.unlock().await.unwrap();
    let mut b = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("woken by the release, not by the hour-long retry delay")
        .unwrap();
    b.unlock().await.unwrap();
    no_key_left(&nodes, &queue).await;
    assert!(
        nodes.servers.iter().all(|s| wake_channels(s) == 1),
        "the process stays subscribed to its own channel"
    );
}

/// A release right after a waiter was refused is not missed, whatever the
/// interleaving with the waiter's subscription (its retry delay is an
/// hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_during_subscription_is_not_missed() {
    let nodes = RedisNodes::start(1);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let options = wake_only(3);
    for round in 0..30u32 {
        let name = unique("race");
        let mut a = sync.new_mutex(&name, options.clone()).unwrap();
        a.lock().await.unwrap();
        let mut b = sync.new_mutex(&name, options.clone()).unwrap();
        let waiter = tokio::spawn(async move {
            b.lock().await.unwrap();
            b
        });
        for _ in 0..round % 6 {
            tokio::task::yield_now().await;
        }
        a.unlock().await.unwrap();
        let mut b = tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("the release woke the waiter")
            .unwrap();
        b.unlock().await.unwrap();
    }
}

/// With a preset value, an attempt resent after a dropped connection does
/// not take a key that holds the same value: it may be another owner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preset_value_resend_does_not_take_another_owners_key() {
    let nodes = RedisNodes::start(1);
    let (one, two) = two_processes(&nodes);
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(60))
        .with_timeout_factor(0.5)
        .with_value("shared-value")
        .with_tries(1);
    let name = unique("resend");
    let mut first = one.new_mutex(&name, options.clone()).unwrap();
    first.lock().await.unwrap();
    let mut second = two.new_mutex(&name, options).unwrap();
    let _ = second.valid().await; // opens the second handle's connection
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut nodes.servers[0].connection())
        .unwrap();
    // Resent or not, the second owner is refused: a key holding a preset
    // value may be another owner's.
    let outcome = second.lock().await;
    assert!(matches!(outcome, Err(Error::Held { .. })), "{outcome:?}");
    first.unlock().await.unwrap();
}

/// Waiters of two processes are served in the order they started waiting,
/// on one node and on three: the wait queue is honoured by the acquire
/// script, and each release wakes the process first in line (the retry
/// delay is an hour, so only wake-ups can serve them).
///
/// The nodes can order only the waiters whose place reached them: the
/// holder lets go once both processes are in line on every node.
async fn fifo_across_processes(nodes: usize) {
    let nodes = RedisNodes::start(nodes);
    let count = nodes.servers.len();
    let processes = [
        RedisSync::new(nodes.urls()).unwrap(),
        RedisSync::new(nodes.urls()).unwrap(),
    ];
    let options = wake_only(1000);
    let name = unique("fifo-processes");
    let key = format!("dsync:{name}");
    let queue = format!("dsync:{name}\u{1f}queue");
    let mut holder = processes[0].new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    // `lock` returned once a quorum said yes: a waiter's first attempt
    // could still reach the last node before the holder's own.
    eventually(
        Duration::from_secs(10),
        "the holder's key on every node",
        async || nodes.count_value(&key, holder.value()) == count,
    )
    .await;
    served_in_start_order(&processes, &name, holder, &options, async || {
        nodes.servers.iter().all(|s| s.zcard(&queue) == 2)
    })
    .await;
    no_key_left(&nodes, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_fifo_across_processes_one_node() {
    fifo_across_processes(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_fifo_across_processes_three_nodes() {
    fifo_across_processes(3).await;
}

/// A try that does not wait (one try) does not jump the line: while another
/// process waits for the name, a free lock is refused to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_does_not_jump_the_line() {
    let nodes = RedisNodes::start(1);
    let (first, second) = two_processes(&nodes);
    let options = wake_only(1000);
    let name = unique("no-jump");
    let mut holder = first.new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    // Connected beforehand: one poll of the waiter sends its attempt.
    warm(&second).await;
    let mut waiter = second.new_mutex(&name, options.clone()).unwrap();
    let queue = format!("dsync:{name}\u{1f}queue");
    {
        let mut waiting = pin!(waiter.lock());
        assert!(poll_once(waiting.as_mut()).await.is_none());
        eventually(
            Duration::from_secs(10),
            "the waiter is queued",
            async || nodes.count_key(&queue) == 1,
        )
        .await;
        // Released while the waiter is not polled: the name is free on the
        // node, but the waiter comes first.
        holder.unlock().await.unwrap();
        let mut intruder = first.new_mutex(&name, options.with_tries(1)).unwrap();
        assert!(matches!(
            intruder.lock().await,
            Err(Error::Held { remaining: None })
        ));
        tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("the waiter was woken")
            .unwrap();
    }
    waiter.unlock().await.unwrap();
    assert_eq!(nodes.count_key(&queue), 0);
}

/// A process that died while first in line holds the others up for at most
/// its entry's TTL (one expiry), never forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_waiter_holds_the_line_up_for_its_entry_ttl_only() {
    let nodes = RedisNodes::start(1);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let name = unique("ghost");
    let (queue, deadlines) = (
        format!("dsync:{name}\u{1f}queue"),
        format!("dsync:{name}\u{1f}leases"),
    );
    // A "process" queued at time 0 with an entry TTL of 300 ms from now, that
    // will never come to take the lock.
    let mut conn = nodes.servers[0].connection();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut conn).unwrap();
    let deadline = secs * 1000 + micros / 1000 + 300;
    let _: () = redis::pipe()
        .cmd("ZADD")
        .arg(&queue)
        .arg(0)
        .arg("ghost")
        .ignore()
        .cmd("HSET")
        .arg(&deadlines)
        .arg("ghost")
        .arg(deadline)
        .ignore()
        .query(&mut conn)
        .unwrap();
    let mut once = sync
        .new_mutex(&name, real_time_options().with_tries(1))
        .unwrap();
    assert!(matches!(once.lock().await, Err(Error::Held { .. })));
    let mut patient = sync
        .new_mutex(&name, real_time_options().with_tries(10_000))
        .unwrap();
    patient
        .lock()
        .await
        .expect("taken once the entry's TTL ran out");
    patient.unlock().await.unwrap();
    assert_eq!(nodes.count_key(&queue), 0, "the dead entry was dropped");
    assert_eq!(nodes.count_key(&deadlines), 0);
}

/// With one node of three down (its subscription can never be set up), a
/// waiter on a held name still gives up after its tries, instead of
/// retrying at once, forever, waiting for a subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_gives_up_with_a_node_down() {
    let mut nodes = RedisNodes::start(3);
    let (one, two) = two_processes(&nodes);
    warm(&one).await;
    nodes.servers[2].kill();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(60))
        .with_retry_delay(Duration::from_millis(5))
        .with_tries(3);
    let name = unique("dead-subscription");
    let mut holder = one.new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    let mut waiter = two.new_mutex(&name, options).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), waiter.lock())
        .await
        .expect("three tries end");
    assert!(matches!(outcome, Err(Error::Held { .. })), "{outcome:?}");
    holder.unlock().await.unwrap();
}

/// A waiter first in line that gets only a minority (the name is free on
/// one node, held on the two others) releases its leftover key without
/// waking itself: the release announces nobody when the process first in
/// line is the releaser (waking itself would burn its tries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_release_does_not_wake_its_own_process() {
    let nodes = RedisNodes::start(3);
    let (one, two) = two_processes(&nodes);
    // Tries to spare: the attempts below are never the waiter's last (the
    // release of a last try does not put the process back in line, and
    // wakes whoever is first there, its own next waiter included).
    let options = wake_only(1000);
    let name = unique("self-wake");
    let key = format!("dsync:{name}");
    let mut holder = one.new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    // `lock` returned once two nodes said yes; the waiters' first attempt
    // could still overtake the holder's on the third node and take it
    // there, while the case below needs the holder on every node.
    eventually(
        Duration::from_secs(10),
        "the holder's key on every node",
        async || nodes.count_value(&key, holder.value()) == 3,
    )
    .await;
    // Two waiters in the second process: the first attempts with a next
    // waiter, so the process's entry stays where it gets the key.
    let mut m1 = two.new_mutex(&name, options.clone()).unwrap();
    let mut m2 = two.new_mutex(&name, options.clone()).unwrap();
    let first = tokio::spawn(async move { m1.lock().await });
    let queue = format!("dsync:{name}\u{1f}queue");
    eventually(
        Duration::from_secs(10),
        "queued and subscribed",
        async || {
            nodes.count_key(&queue) == 3 && nodes.servers.iter().all(|s| wake_channels(s) == 1)
        },
    )
    .await;
    let second = tokio::spawn(async move { m2.lock().await });
    // The third node lost the holder's key (restarted, say).
    nodes.servers[2].del(&key);
    for server in &nodes.servers {
        server.reset_stats();
    }
    // Wake the first waiter as a release would: it gets the third node
    // only, and releases it.
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("dsync:\u{1f}wake\u{1f}*")
        .query(&mut nodes.servers[0].connection())
        .unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channels[0])
        .arg(format!("7 {key}"))
        .query(&mut nodes.servers[0].connection())
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the leftover released",
        async || nodes.servers[2].calls("del") >= 1,
    )
    .await;
    // PUBLISH runs inside the release script: counted by now if it ran.
    assert_eq!(nodes.servers[2].calls("publish"), 0, "woke itself");
    first.abort();
    second.abort();
    holder.unlock().await.unwrap();
}

/// An operation that returned once a quorum said yes leaves its other
/// commands to finish in the background; the next operation of the same
/// owner waits for them. Here every node has forgotten the scripts, so
/// each command is sent twice (`NOSCRIPT`, then loaded): without the wait,
/// the slowest node's acquire could land after the release and leave the
/// key behind. The race shows mostly on a loaded machine (the commandstats
/// test in tests/layer.rs found it there); on an idle one this test seldom
/// catches it, and guards the path against outright breakage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stragglers_never_overtake_the_next_operation() {
    let nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    for round in 0..20 {
        for server in &nodes.servers {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query(&mut server.connection())
                .unwrap();
        }
        let name = unique("straggler");
        let long = real_time_options().with_expiry(Duration::from_secs(60));
        let mut m = sync.new_mutex(&name, long).unwrap();
        m.lock().await.unwrap();
        m.extend().await.unwrap();
        m.unlock().await.unwrap();
        let key = format!("dsync:{name}");
        let what = format!("no key left in round {round}");
        eventually(Duration::from_secs(10), &what, async || {
            nodes.count_key(&key) == 0
        })
        .await;
    }
}

/// With a node down, a waiter's tries are still counted: `lock()` with 3
/// tries on a name held for a minute gives up with `Held` after its tries
/// (3 attempts and one more right after it subscribed to wake-ups),
/// instead of retrying without a pause until the holder lets go.
/// The subscriptions are never all in place while a node is down, and an
/// attempt refused without them subscribes and retries at once,
/// uncounted: once per call, not after every refused attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tries_are_counted_with_a_node_down() {
    let mut nodes = RedisNodes::start(3);
    let (first, second) = two_processes(&nodes);
    // Connected to every node, and done: `unlock` returns on a quorum, so
    // the last node's commands may still be on their way; they are done
    // once its key is gone.
    let warm = unique("counted-warm");
    for sync in [&first, &second] {
        let mut m = sync.new_mutex(&warm, DistMutexOptions::default()).unwrap();
        m.lock().await.unwrap();
        m.unlock().await.unwrap();
        no_key_left(&nodes, &format!("dsync:{warm}")).await;
    }
    nodes.servers[2].kill();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(60))
        .with_timeout_factor(0.01)
        .with_retry_delay(Duration::from_millis(20));
    let name = unique("counted");
    let mut holder = first.new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    // Attempts, not script calls: each refused attempt puts the process in
    // line on the node (one ZADD in the acquire script). Its departure from
    // the line puts nobody there, and its number varies: the waiter leaves
    // when it gives up, and its last attempt's cleanup, which runs in the
    // background, leaves again if it finds no waiter of the process left
    // (in case the departure overtook the attempt).
    let before = nodes.servers[0].calls("zadd");
    let mut waiter = second.new_mutex(&name, options.with_tries(3)).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), waiter.lock()).await;
    let attempts = nodes.servers[0].calls("zadd") - before;
    assert!(
        matches!(result, Ok(Err(Error::Held { .. }))),
        "{result:?} after {attempts} attempts on a live node"
    );
    assert!(attempts <= 4, "{attempts} attempts for 3 tries");
    holder.unlock().await.unwrap();
}

/// Waiters of two processes keep handing a name over while a minority of
/// the nodes is down: on five nodes with two killed (every live node is
/// needed), 2 x 2 waiters take the name 200 times, and every `lock()`
/// succeeds within its tries. Two ways this can fail: (1) a failed attempt
/// that released the nodes it got only once the dead nodes had timed out
/// would leave its own keys in the way of the next attempt of the same
/// process, which would get the other nodes, and so on; (2) an attempt
/// that got some nodes and left the process out of their wait queues would
/// let two processes, each first in line on some nodes, split the nodes
/// between them again and again. Either way the name would go to nobody
/// until the waiters gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_hand_over_with_a_minority_down() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const TAKES: usize = 400;
    let mut nodes = RedisNodes::start(5);
    let processes = [
        RedisSync::new(nodes.urls()).unwrap(),
        RedisSync::new(nodes.urls()).unwrap(),
    ];
    for process in &processes {
        warm(process).await;
    }
    nodes.servers[0].kill();
    nodes.servers[1].kill();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(1))
        .with_timeout_factor(0.1);
    let name: Arc<str> = unique("minority-down").into();
    let taken = Arc::new(AtomicUsize::new(0));
    let waiters: Vec<_> = [0, 0, 1, 1]
        .into_iter()
        .map(|p| {
            let (process, options) = (processes[p].clone(), options.clone());
            let (name, taken) = (name.clone(), taken.clone());
            tokio::spawn(async move {
                while taken.load(Ordering::Relaxed) < TAKES {
                    let mut mutex = process.new_mutex(&name, options.clone()).unwrap();
                    tokio::time::timeout(Duration::from_secs(30), mutex.lock())
                        .await
                        .expect("taken within 30 s")
                        .expect("taken within its tries");
                    taken.fetch_add(1, Ordering::Relaxed);
                    // The work: the other waiters line up meanwhile.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    mutex.unlock().await.unwrap();
                }
            })
        })
        .collect();
    for waiter in waiters {
        waiter.await.expect("the name keeps being handed over");
    }
    no_key_left(&nodes, &format!("dsync:{name}")).await;
}

/// With `appendfsync always`, a restarted node keeps its state: after
/// acquisitions up to token `t` on three nodes, two of them are killed and
/// restarted, one after the other (never more than one down), and the third
/// is paused, so that the next quorum is the two restarted nodes. They
/// reloaded their counters and restart markers from the append-only file:
/// they take the lock at once (no recovery period), with a token greater
/// than `t`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_survive_restarts_with_appendfsync_always() {
    let mut nodes = RedisNodes::start_persistent(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let options = real_time_options().with_tries(10);
    let name = unique("persistent-fence");
    let mut last = 0;
    for _ in 0..5 {
        let mut m = sync.new_mutex(&name, options.clone()).unwrap();
        m.lock().await.unwrap();
        let token = m.fencing_token().unwrap();
        assert!(token > last);
        last = token;
        m.unlock().await.unwrap();
    }
    // Every node has seen every acquisition once its key is gone.
    no_key_left(&nodes, &format!("dsync:{name}")).await;
    nodes.servers[0].restart();
    nodes.servers[1].restart();
    nodes.servers[2].pause();
    let mut m = sync.new_mutex(&name, options).unwrap();
    m.lock().await.unwrap();
    let token = m.fencing_token().unwrap();
    nodes.servers[2].resume();
    m.unlock().await.unwrap();
    assert!(token > last, "token {token} after {last}");
}

/// Whether a client of `master` is blocked in a `WAIT` now.
fn in_wait(master: &support::RedisServer) -> bool {
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut master.connection())
        .unwrap();
    clients.contains("cmd=wait")
}

/// A master, its replica, and a `RedisSync` on the master that waits for
/// one replica, at most `wait`, after each acquisition and extension.
fn master_with_replica(wait: Duration) -> (support::RedisServer, support::RedisServer, RedisSync) {
    let master = support::RedisServer::start();
    let replica = support::RedisServer::start_replica_of(&master);
    let sync = RedisSync::builder()
        .url(master.url())
        .wait_replicas(1, wait)
        .build()
        .unwrap();
    (master, replica, sync)
}

/// `wait_replicas` on an independent master with one replica: an
/// acquisition returns only once the replica has the lock; while the
/// replica is stopped, extensions and acquisitions fail with a typed
/// shortfall, and the failed acquisition leaves no key; once it runs again,
/// they succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_on_a_master_with_a_replica() {
    let (master, mut replica, sync) = master_with_replica(Duration::from_millis(200));
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(60));
    let name = unique("replicated");
    let key = format!("dsync:{name}");
    let mut m = sync.new_mutex(&name, options.clone()).unwrap();
    m.lock().await.unwrap();
    // A sanity check (loopback replication is quick even without the
    // WAIT); the shortfalls below are what show the WAIT is there.
    let on_replica: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query(&mut replica.connection())
        .unwrap();
    assert_eq!(
        on_replica.as_deref(),
        Some(m.value()),
        "acknowledged by the replica"
    );
    m.extend().await.unwrap();

    replica.pause();
    let error = m.extend().await.unwrap_err();
    let shortfall = error.not_replicated().expect("a replication shortfall");
    assert_eq!((shortfall.wanted, shortfall.acknowledged), (1, 0));
    let other = unique("unreplicated");
    let mut n = sync.new_mutex(&other, options.with_tries(1)).unwrap();
    let error = n.lock().await.unwrap_err();
    assert!(error.not_replicated().is_some(), "{error}");
    assert!(
        !master.exists(&format!("dsync:{other}")),
        "the key was released"
    );
    replica.resume();

    eventually(
        Duration::from_secs(10),
        "extensions acknowledged again",
        async || m.extend().await.is_ok(),
    )
    .await;
    m.unlock().await.unwrap();
}

/// With `wait_replicas`, a release does not queue behind another lock's
/// `WAIT`: while the replica is stopped, one acquisition waits for it, and
/// a release of another lock of the same process completes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_do_not_queue_behind_a_wait() {
    let (master, mut replica, sync) = master_with_replica(Duration::from_secs(60));
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(120))
        .with_tries(1);
    let mut held = sync.new_mutex(&unique("held"), options.clone()).unwrap();
    held.lock().await.unwrap();
    replica.pause();
    let mut waiting = sync.new_mutex(&unique("waiting"), options).unwrap();
    let acquisition = tokio::spawn(async move {
        let outcome = waiting.lock().await;
        (waiting, outcome)
    });
    // The acquisition's script has run and its WAIT is pending.
    eventually(
        Duration::from_secs(10),
        "the acquisition is waiting",
        async || in_wait(&master),
    )
    .await;
    // Behind the WAIT, the release would time out (its per-node timeout
    // is 6 s, the WAIT's 60 s).
    held.unlock().await.unwrap();
    assert!(!acquisition.is_finished(), "the release went first");
    replica.resume();
    let (mut waiting, outcome) = acquisition.await.unwrap();
    outcome.unwrap();
    waiting.unlock().await.unwrap();
}

/// An acquisition that timed out on paused nodes is undone there once they
/// run again: the release goes after the late acquisition on each node, so
/// the key goes away long before its expiry, and the name can be locked
/// again. `paused` of `total` nodes are stopped (enough that the attempt
/// fails).
async fn timed_out_attempt_is_undone_on_resume(total: usize, paused: usize) {
    let mut nodes = RedisNodes::start(total);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(60))
        .with_tries(1);
    let name = unique("timed-out");
    let key = format!("dsync:{name}");
    // Connect to every node first, so the pause hits open connections.
    warm(&sync).await;
    for server in &mut nodes.servers[..paused] {
        server.pause();
    }
    let mut m = sync.new_mutex(&name, options.clone()).unwrap();
    let error = m.lock().await.unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    for server in &mut nodes.servers[..paused] {
        server.resume();
    }
    // Well within the 60 s expiry: only a release can remove the key.
    eventually(
        Duration::from_secs(10),
        "the late key released",
        async || nodes.count_key(&key) == 0,
    )
    .await;
    let mut again = sync.new_mutex(&name, options).unwrap();
    again.lock().await.unwrap();
    again.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_attempt_is_undone_on_resume_one_node() {
    timed_out_attempt_is_undone_on_resume(1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_attempt_is_undone_on_resume_three_nodes() {
    timed_out_attempt_is_undone_on_resume(3, 2).await;
}

/// With `wait_replicas`, the release of an acquisition that timed out while
/// queued behind other locks' `WAIT` goes after it: acquisitions wait in
/// line on the node's `WAIT` connection, and a release sent on the other
/// connection at the timeout would run first, find nothing, and leave the
/// late acquisition's key for its whole expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_of_a_timed_out_acquisition_waits_its_turn() {
    // Node timeout 1 s, WAIT 2 s: the third acquisition in line runs its
    // script 4 s after the first was sent, after its own 3 s timeout.
    let (master, mut replica, sync) = master_with_replica(Duration::from_secs(2));
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(20))
        .with_tries(1);
    warm(&sync).await;
    replica.pause();
    let names: Vec<String> = (0..3).map(|_| unique("in-line")).collect();
    let lock = |name: &str| {
        let mut m = sync.new_mutex(name, options.clone()).unwrap();
        tokio::spawn(async move { m.lock().await })
    };
    let first = lock(&names[0]);
    eventually(Duration::from_secs(10), "the first one waits", async || {
        in_wait(&master)
    })
    .await;
    let (second, third) = (lock(&names[1]), lock(&names[2]));
    for attempt in [first, second, third] {
        let error = attempt.await.unwrap().unwrap_err();
        assert!(error.is_unavailable(), "{error}");
    }
    // Once the queued commands have run, every name is free again, well
    // within the 20 s expiry: only a release can have removed the keys.
    replica.resume();
    for name in &names {
        let mut again = sync.new_mutex(name, options.clone()).unwrap();
        eventually(Duration::from_secs(10), "the name is free", async || {
            again.lock().await.is_ok()
        })
        .await;
        again.unlock().await.unwrap();
    }
}

/// A timeout reports how long the node was waited for: with
/// `wait_replicas`, the per-node timeout plus the `WAIT`, not the per-node
/// timeout alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_reports_the_time_waited() {
    let wait = Duration::from_millis(400);
    let (mut master, _replica, sync) = master_with_replica(wait);
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(2))
        .with_tries(1);
    let bound = options.node_timeout() + wait;
    warm(&sync).await;
    master.pause();
    let mut m = sync.new_mutex(&unique("slow"), options).unwrap();
    let start = Instant::now();
    let error = m.lock().await.unwrap_err();
    let took = start.elapsed();
    master.resume();
    let Error::Timeout { after, nodes } = error else {
        panic!("expected Timeout, got {error:?}");
    };
    assert_eq!(nodes.len(), 1);
    assert!(after >= bound, "after {after:?}, waited up to {bound:?}");
    assert!(after <= took, "after {after:?}, the call took {took:?}");
}

/// A held lock stays exclusive, and stays its holder's, while the nodes
/// that have it restart empty one after the other: after two of three
/// restarts the holder's key is on one node only, and after the third on
/// none, yet another process gets nothing (the restarted nodes take no new
/// lock for an expiry, and nothing tells them from a new deployment), and
/// the holder's next extension puts its key back on all three, so that it
/// still holds the name once they take new locks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_survives_its_nodes_restarting_empty_one_after_another() {
    let mut nodes = RedisNodes::start(3);
    let (one, two) = two_processes(&nodes);
    warm(&one).await;
    warm(&two).await;
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(2))
        .with_tries(1);
    let name = unique("restarts");
    let key = format!("dsync:{name}");
    let mut holder = one.new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    on_every_node(&nodes, &key).await;
    nodes.servers[0].restart();
    nodes.servers[1].restart();
    assert_eq!(nodes.count_key(&key), 1, "the key is left on one node");
    let mut other = two.new_mutex(&name, options.clone()).unwrap();
    let error = other.lock().await.expect_err("no second owner");
    assert!(error.is_unavailable(), "{error:?}");
    assert_eq!(nodes.count_value(&key, holder.value()), 1);
    nodes.servers[2].restart();
    let error = other.lock().await.expect_err("no second owner");
    assert!(error.is_unavailable(), "{error:?}");
    assert_eq!(nodes.count_key(&key), 0, "taken by nobody");
    // The holder's extension puts the key back where it was lost.
    holder.extend().await.expect("the holder keeps its lock");
    eventually(
        Duration::from_secs(10),
        "the key back on every node",
        async || nodes.count_value(&key, holder.value()) == 3,
    )
    .await;
    // Once the restarted nodes take new locks again (another name shows
    // it), the name is still the holder's, as long as it extends.
    let probe = unique("probe");
    eventually(
        Duration::from_secs(10),
        "the restarted nodes take new locks",
        async || {
            holder.extend().await.expect("extended");
            let mut m = two.new_mutex(&probe, options.clone()).unwrap();
            let taken = m.lock().await.is_ok();
            if taken {
                m.unlock().await.unwrap();
            }
            taken
        },
    )
    .await;
    assert!(matches!(other.lock().await, Err(Error::Held { .. })));
    holder.unlock().await.unwrap();
    other.lock().await.expect("free once released");
    other.unlock().await.unwrap();
}

/// Fencing tokens keep growing when a majority of the nodes restart empty
/// one after the other and the next quorum is made of those two alone: a
/// node that lost its counter starts it again at its clock, above every
/// token issued before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_grow_when_a_majority_restarts_empty_one_after_another() {
    let mut nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_millis(500))
        .with_tries(u32::MAX)
        .with_retry_delay(Duration::from_millis(10));
    let name = unique("majority-restarts");
    let mut m = sync.new_mutex(&name, options).unwrap();
    let mut last = 0;
    for _ in 0..10 {
        m.lock().await.unwrap();
        last = m.fencing_token().unwrap();
        m.unlock().await.unwrap();
    }
    no_key_left(&nodes, &format!("dsync:{name}")).await;
    nodes.servers[0].restart();
    nodes.servers[1].restart();
    // The next quorum can only be the two restarted nodes.
    nodes.servers[2].pause();
    m.lock().await.unwrap();
    let token = m.fencing_token().unwrap();
    assert!(token > last, "token {token} went back from {last}");
    m.unlock().await.unwrap();
    nodes.servers[2].resume();
}

/// `extend` puts a key back on a node that lost it only while the holder's
/// validity is ahead: past it, another owner may hold the name, and the
/// extension only resets the expiry where the key still holds our value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_repairs_nodes_only_within_the_validity() {
    let mut nodes = RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    warm(&sync).await;
    // The validity ends after half the expiry: the keys outlive it.
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(4))
        .with_drift_factor(0.5)
        .with_tries(1);
    let name = unique("late-repair");
    let key = format!("dsync:{name}");
    let mut m = sync.new_mutex(&name, options).unwrap();
    m.lock().await.unwrap();
    on_every_node(&nodes, &key).await;
    nodes.servers[0].restart();
    let until = m.until().unwrap();
    eventually(Duration::from_secs(10), "the validity passed", async || {
        Instant::now() >= until
    })
    .await;
    // The two other nodes still have the key; the restarted one stays
    // without it.
    m.extend().await.expect("extended where the key is ours");
    assert!(
        !nodes.servers[0].exists(&key),
        "re-created after the validity"
    );
    m.unlock().await.unwrap();
}

/// A one-node `RedisSync` on a node that Redlock also uses (same key
/// prefix) neither reads nor writes its restart marker: a restarted node
/// stays recovering for Redlock, whatever one-node locks it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_node_backend_does_not_end_a_nodes_recovery() {
    let mut nodes = RedisNodes::start(3);
    let redlock = RedisSync::new(nodes.urls()).unwrap();
    warm(&redlock).await;
    nodes.servers[0].restart();
    nodes.servers[1].kill();
    let once = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(30))
        .with_tries(1);
    let single = RedisSync::new([nodes.servers[0].url()]).unwrap();
    let mut m = single.new_mutex(&unique("single"), once.clone()).unwrap();
    m.lock()
        .await
        .expect("one node has nothing to recover from");
    m.unlock().await.unwrap();
    let mut m = redlock.new_mutex(&unique("redlock"), once).unwrap();
    let error = m.lock().await.expect_err("node 0 is still recovering");
    let restarted = format!(
        "node 127.0.0.1:{}: restarted empty",
        nodes.servers[0].port()
    );
    assert!(error.to_string().contains(&restarted), "{error}");
}

/// A key an extension put back on a node that kept its state (the key had
/// expired there during a pause, say) stays when the extension fails for
/// want of answers, and counts at the next try: a holder with two of five
/// nodes paused and a third that lost its key keeps its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_put_back_during_a_failed_extension_counts_at_the_next() {
    let mut nodes = RedisNodes::start(5);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    warm(&sync).await;
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(5))
        .with_timeout_factor(0.04)
        .with_tries(1);
    let name = unique("put-back");
    let key = format!("dsync:{name}");
    let mut holder = sync.new_mutex(&name, options).unwrap();
    holder.lock().await.unwrap();
    on_every_node(&nodes, &key).await;
    nodes.servers[2].del(&key);
    nodes.servers[0].pause();
    nodes.servers[1].pause();
    let first = holder.extend().await;
    assert!(
        first.as_ref().is_err_and(Error::is_unavailable),
        "{first:?}"
    );
    holder
        .extend()
        .await
        .expect("the key put back on node 2 counts now");
    nodes.servers[0].resume();
    nodes.servers[1].resume();
    holder.unlock().await.unwrap();
}

/// A waiter whose `lock()` is dropped at any point of its wait (before its
/// first attempt, during it, while it subscribes, while it waits for a
/// wake-up) leaves no entry of its process in the nodes' wait queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_dropped_at_any_point_leaves_no_queue_entry() {
    let nodes = RedisNodes::start(3);
    let (one, two) = (
        RedisSync::new(nodes.urls()).unwrap(),
        RedisSync::new(nodes.urls()).unwrap(),
    );
    let options = wake_only(1000);
    for polls in 1..40usize {
        let name = unique("drop-at");
        let queue = format!("dsync:{name}\u{1f}queue");
        let mut holder = two.new_mutex(&name, options.clone()).unwrap();
        holder.lock().await.unwrap();
        let mut waiter = one.new_mutex(&name, options.clone()).unwrap();
        {
            let mut waiting = pin!(waiter.lock());
            for _ in 0..polls {
                assert!(poll_once(waiting.as_mut()).await.is_none());
                tokio::task::yield_now().await;
            }
        }
        eventually(
            Duration::from_secs(10),
            &format!("no entry after {polls} polls"),
            async || nodes.count_key(&queue) == 0,
        )
        .await;
        holder.unlock().await.unwrap();
    }
}

/// A waiter whose process started waiting before the process first in a
/// name's queue takes the lock when it finds it free, on its first try:
/// it is first once it takes its place. (A release had woken the other
/// process; were the waiter refused, it would be first in line with nobody
/// to wake it, until its entry's renewal.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_started_first_takes_a_free_lock_at_once() {
    let nodes = RedisNodes::start(1);
    let (waiting, holding) = two_processes(&nodes);
    let options = wake_only(1000);
    // The waiting process subscribes to its wake-ups (one refused try),
    // so that a refusal would not be retried at once.
    let warmup = unique("subscribe");
    let mut held = holding.new_mutex(&warmup, options.clone()).unwrap();
    held.lock().await.unwrap();
    let mut first = waiting.new_mutex(&warmup, options.clone()).unwrap();
    let queued = format!("dsync:{warmup}\u{1f}queue");
    let warm = tokio::spawn(async move {
        first.lock().await.unwrap();
        first.unlock().await.unwrap();
    });
    eventually(
        Duration::from_secs(10),
        "the warm-up waiter queued",
        async || nodes.count_key(&queued) == 1,
    )
    .await;
    held.unlock().await.unwrap();
    warm.await.unwrap();
    // Another process is first in line for a free name, with a later
    // start: a release woke it, and it has not tried yet.
    let name = unique("started-first");
    let (queue, deadlines) = (
        format!("dsync:{name}\u{1f}queue"),
        format!("dsync:{name}\u{1f}leases"),
    );
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 600_000;
    let mut node = nodes.servers[0].connection();
    let _: () = redis::pipe()
        .cmd("ZADD")
        .arg(&queue)
        .arg(later as u64)
        .arg("later-process")
        .cmd("HSET")
        .arg(&deadlines)
        .arg("later-process")
        .arg(u64::MAX / 2)
        .query(&mut node)
        .unwrap();
    let before = nodes.servers[0].calls("evalsha");
    let mut waiter = waiting.new_mutex(&name, options).unwrap();
    waiter.lock().await.unwrap();
    assert_eq!(
        nodes.servers[0].calls("evalsha") - before,
        1,
        "taken on the first try"
    );
    waiter.unlock().await.unwrap();
}
