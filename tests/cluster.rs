//! `RedisSync` on a real Redis Cluster (three `redis-server
//! --cluster-enabled yes` masters joined by `redis-cli --cluster create`):
//! the conformance suite, where each name's keys live, sharded wake-ups and
//! fair hand-off across processes, a slot moving under a held lock, a
//! master failing over with and without `wait_replicas`.

#![cfg(feature = "cluster")]

mod conformance;
mod support;

use std::time::Duration;

use conformance::{
    Suite, eventually, poll_once, real_time_options, served_in_start_order, unique, wake_only,
};
use support::cluster::RedisCluster;
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, Error, RedisMutex, RedisSync};

fn suite() -> Suite<RedisSync> {
    let cluster = RedisCluster::start(3, 0);
    Suite {
        sync: RedisSync::cluster(cluster.seeds()).unwrap(),
        other: RedisSync::cluster(cluster.seeds()).unwrap(),
        base: real_time_options(),
        guard: Box::new(cluster),
    }
}

mod conformance_on_a_cluster {
    use super::*;
    conformance_tests!(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        suite()
    );
}

/// The lock key of `name` with the default prefix: the name's hash tag.
fn lock_key(name: &str) -> String {
    format!("{{dsync:{name}}}")
}

/// Two `RedisSync`s on the cluster, as two processes would have.
fn two_processes(cluster: &RedisCluster) -> (RedisSync, RedisSync) {
    (
        RedisSync::cluster(cluster.seeds()).unwrap(),
        RedisSync::cluster(cluster.seeds()).unwrap(),
    )
}

/// `mutex.lock()` in a task of its own; the task gives the mutex back once
/// it holds the lock.
fn lock_in_background(mut mutex: RedisMutex) -> tokio::task::JoinHandle<RedisMutex> {
    tokio::spawn(async move {
        mutex.lock().await.unwrap();
        mutex
    })
}

/// The mutex of [`lock_in_background`] once it holds the lock; panics with
/// `what` if that takes 20 s (the waiters here have an hour-long retry
/// delay: only a wake-up serves them).
async fn woken(waiting: tokio::task::JoinHandle<RedisMutex>, what: &str) -> RedisMutex {
    tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect(what)
        .unwrap()
}

/// Waits until the process of `waiting` has subscribed to its channel on
/// `master` (the one of the name's slot), releases `holder`, and returns
/// the waiter once that release woke it.
async fn release_to_subscribed(
    cluster: &RedisCluster,
    master: usize,
    holder: &mut RedisMutex,
    waiting: tokio::task::JoinHandle<RedisMutex>,
) -> RedisMutex {
    eventually(
        Duration::from_secs(10),
        &format!("the waiter's process subscribed on node {master}"),
        async || shard_channels(cluster, master) == 1,
    )
    .await;
    holder.unlock().await.unwrap();
    woken(waiting, "woken by the release").await
}

/// Every key of a name (lock, wait queue, its entries' deadlines) lives on
/// the master of the name's slot, with the slot's bookkeeping key (its
/// fencing counter), and names spread over the masters. After the release only the bookkeeping
/// keys are left, one per slot used, whatever the number of names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_a_name_live_on_the_master_of_its_slot() {
    let cluster = RedisCluster::start(3, 0);
    let (a, b) = two_processes(&cluster);
    assert!(a.is_cluster());
    assert_eq!((a.nodes(), a.quorum()), (1, 1));
    let options = wake_only(10);
    let names: Vec<String> = (0..12).map(|i| unique(&format!("spread-{i}"))).collect();
    let mut masters = std::collections::HashSet::new();
    for name in &names {
        let key = lock_key(name);
        let mut holder = a.new_mutex(name, options.clone()).unwrap();
        holder.lock().await.unwrap();
        assert_eq!(holder.key(), key);
        // A waiter of another process queues on the same master.
        let mut waiter = b.new_mutex(name, options.clone()).unwrap();
        let mut waiting = Box::pin(async move {
            waiter.lock().await.unwrap();
            waiter.unlock().await.unwrap();
        });
        assert!(poll_once(waiting.as_mut()).await.is_none());
        let master = cluster.master_of(cluster.slot_of(&key));
        masters.insert(master);
        let suffixes = ["", "\u{1f}queue", "\u{1f}leases"];
        eventually(Duration::from_secs(10), "the waiter queued", async || {
            cluster.has_key(master, &format!("{key}\u{1f}queue"))
        })
        .await;
        for suffix in suffixes {
            let k = format!("{key}{suffix}");
            assert!(cluster.has_key(master, &k), "{k:?} on the slot's master");
        }
        let slot = cluster.slot_of(&key);
        assert!(
            cluster
                .keys_on(master)
                .iter()
                .any(|k| k.ends_with("dsync:\u{1f}node") && cluster.slot_of(k) == slot),
            "the slot's bookkeeping key on its master"
        );
        holder.unlock().await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("the waiter was woken by the release");
    }
    assert!(masters.len() >= 2, "12 names all on one master");
    let slots: std::collections::BTreeSet<u16> = names
        .iter()
        .map(|n| cluster.slot_of(&lock_key(n)))
        .collect();
    eventually(
        Duration::from_secs(10),
        "only the slots' bookkeeping keys left",
        async || {
            let keys = cluster.keys();
            keys.len() == slots.len()
                && keys
                    .iter()
                    .all(|k| k.ends_with("dsync:\u{1f}node") && slots.contains(&cluster.slot_of(k)))
        },
    )
    .await;
}

/// How many of this crate's wake-up channels have subscribers on node
/// `i`: shard channels (`PUBSUB SHARDCHANNELS`), or plain ones
/// (`PUBSUB CHANNELS`).
fn wake_channels(cluster: &RedisCluster, i: usize, subcommand: &str) -> usize {
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg(subcommand)
        .arg("*dsync:\u{1f}wake\u{1f}*")
        .query(&mut cluster.node(i).connection())
        .unwrap();
    channels.len()
}

/// [`wake_channels`] for shard channels.
fn shard_channels(cluster: &RedisCluster, i: usize) -> usize {
    wake_channels(cluster, i, "SHARDCHANNELS")
}

/// A waiter is woken by its release over sharded pub/sub (the retry delay
/// is an hour): `SPUBLISH` on the master of the name's slot, to a channel
/// of that slot, and never a cluster-wide `PUBLISH`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_wake_on_sharded_messages() {
    let cluster = RedisCluster::start(3, 0);
    let (a, b) = two_processes(&cluster);
    let options = wake_only(3);
    let name = unique("sharded");
    let master = cluster.master_of(cluster.slot_of(&lock_key(&name)));
    let mut holder = a.new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    for i in cluster.masters() {
        cluster.node(i).reset_stats();
    }
    let waiter = b.new_mutex(&name, options).unwrap();
    let waiting = lock_in_background(waiter);
    let mut waiter = release_to_subscribed(&cluster, master, &mut holder, waiting).await;
    waiter.unlock().await.unwrap();
    assert!(cluster.node(master).calls("spublish") >= 1);
    for i in cluster.masters() {
        assert_eq!(cluster.node(i).calls("publish"), 0, "node {i}");
        if i != master {
            assert_eq!(cluster.node(i).calls("spublish"), 0, "node {i}");
            assert_eq!(shard_channels(&cluster, i), 0, "node {i}");
        }
    }
}

/// On a server without sharded pub/sub (here `SPUBLISH` and `SSUBSCRIBE`
/// are renamed away, as before Redis 7), wake-ups fall back to `PUBLISH`
/// and `SUBSCRIBE`: a waiter is still woken by the release (the retry delay
/// is an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sharded_pubsub_wake_ups_fall_back_to_plain_pubsub() {
    let cluster = RedisCluster::start_with(
        3,
        0,
        &[
            "--rename-command",
            "SPUBLISH",
            "",
            "--rename-command",
            "SSUBSCRIBE",
            "",
        ],
    );
    let (a, b) = two_processes(&cluster);
    let options = wake_only(3);
    let name = unique("unsharded");
    let master = cluster.master_of(cluster.slot_of(&lock_key(&name)));
    let mut holder = a.new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    let waiter = b.new_mutex(&name, options).unwrap();
    let waiting = lock_in_background(waiter);
    eventually(
        Duration::from_secs(10),
        "b subscribed and queued",
        async || {
            let subscribed = cluster
                .masters()
                .iter()
                .any(|&i| wake_channels(&cluster, i, "CHANNELS") > 0);
            subscribed && cluster.has_key(master, &format!("{}\u{1f}queue", lock_key(&name)))
        },
    )
    .await;
    holder.unlock().await.unwrap();
    let mut waiter = woken(
        waiting,
        "woken by the release, not by the hour-long retry delay",
    )
    .await;
    waiter.unlock().await.unwrap();
    assert!(cluster.node(master).calls("publish") >= 1);
}

/// Waiters of two processes are served in the order they started waiting,
/// woken only by releases (the retry delay is an hour); the holder lets go
/// once both processes are in line on the master of the name's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_fifo_across_processes() {
    let cluster = RedisCluster::start(3, 0);
    let (a, b) = two_processes(&cluster);
    let processes = [a, b];
    let options = wake_only(1000);
    let name = unique("fifo");
    let queue = format!("{}\u{1f}queue", lock_key(&name));
    let master = cluster.master_of(cluster.slot_of(&queue));
    let mut holder = processes[0].new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    served_in_start_order(&processes, &name, holder, &options, async || {
        cluster.node(master).zcard(&queue) == 2
    })
    .await;
}

/// The slot of `key`, the master serving it, and the next master after
/// that one (in node order, round the end), where the slot can move.
fn slot_and_next_master(cluster: &RedisCluster, key: &str) -> (u16, usize, usize) {
    let slot = cluster.slot_of(key);
    let from = cluster.master_of(slot);
    let masters = cluster.masters();
    let next = masters.iter().position(|&m| m == from).unwrap() + 1;
    (slot, from, masters[next % masters.len()])
}

/// A held lock survives its slot moving to another master, in the middle of
/// the migration and after it: the other process stays out, the holder
/// extends and releases, a waiter that subscribes after the move (on the
/// new master) is woken, and fencing tokens keep growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_survives_its_slot_moving() {
    let cluster = RedisCluster::start(3, 0);
    let (a, b) = two_processes(&cluster);
    let options = wake_only(3);
    let name = unique("moving");
    let key = lock_key(&name);
    let (slot, _, to) = slot_and_next_master(&cluster, &key);
    let mut holder = a.new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    let first = holder.fencing_token().unwrap();
    let try_once = options.clone().with_tries(1);
    let mut other = b.new_mutex(&name, try_once.clone()).unwrap();

    // Mid-migration: the slot is importing on `to`, migrating on `from`,
    // and the keys have not moved yet. A script on keys of which some are
    // missing (no wait queue yet) gets `TRYAGAIN` until the slot has moved:
    // refused or unavailable, never acquired.
    let migration = cluster.begin_move(slot, to);
    match other.lock().await {
        Err(Error::Held { .. }) => {}
        Err(e) if e.is_unavailable() => {}
        outcome => panic!("acquired a held lock mid-migration: {outcome:?}"),
    }
    holder.extend().await.unwrap();
    migration.finish();
    assert_eq!(cluster.master_of(slot), to);
    assert!(cluster.has_key(to, &key), "the lock moved with its slot");

    // After: a waiter of b subscribes (on the new master), a refusal from b,
    // the holder extends, then releases and wakes the waiter.
    assert!(matches!(other.lock().await, Err(Error::Held { .. })));
    holder.extend().await.unwrap();
    assert!(holder.valid().await.unwrap());
    let waiter = b.new_mutex(&name, options.clone()).unwrap();
    let waiting = lock_in_background(waiter);
    let mut waiter = release_to_subscribed(&cluster, to, &mut holder, waiting).await;
    assert!(waiter.fencing_token().unwrap() > first);
    waiter.unlock().await.unwrap();
}

/// A waiter subscribed to its slot's channel before the slot moves is still
/// woken by a release after the move: the old master drops the shard
/// channel, and the process subscribes again where the slot went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_woken_after_its_slot_moved() {
    let cluster = RedisCluster::start(3, 0);
    let (a, b) = two_processes(&cluster);
    let options = wake_only(3);
    let name = unique("moved-waiter");
    let key = lock_key(&name);
    let (slot, from, to) = slot_and_next_master(&cluster, &key);
    let mut holder = a.new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    let waiter = b.new_mutex(&name, options).unwrap();
    let waiting = lock_in_background(waiter);
    eventually(
        Duration::from_secs(10),
        "b subscribed on the old master",
        async || {
            shard_channels(&cluster, from) == 1
                && cluster.has_key(from, &format!("{key}\u{1f}queue"))
        },
    )
    .await;
    cluster.move_slot(slot, to);
    let mut waiter = release_to_subscribed(&cluster, to, &mut holder, waiting).await;
    waiter.unlock().await.unwrap();
}

/// With `wait_replicas(1, …)`, an acquisition returns only once a replica
/// has the lock, so killing the master fails over to a replica that still
/// holds it: the other process stays out. The new master has no replica
/// until the old one rejoins as one: until then the holder's extensions
/// report the shortfall; afterwards they succeed, and the holder releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_a_lock_survives_a_failover() {
    let mut cluster = RedisCluster::start(3, 1);
    let build = || {
        RedisSync::builder()
            .cluster(cluster.seeds())
            .wait_replicas(1, Duration::from_secs(2))
            .build()
            .unwrap()
    };
    let (a, b) = (build(), build());
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(60))
        .with_timeout_factor(0.1);
    let name = unique("durable");
    let key = lock_key(&name);
    let mut holder = a.new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    let first = holder.fencing_token().unwrap();
    holder.extend().await.unwrap();
    let master = cluster.master_of(cluster.slot_of(&key));
    let promoted = cluster.kill_master_and_wait_failover(master);
    assert!(cluster.has_key(promoted, &key), "the replica had the lock");
    let mut other = b.new_mutex(&name, options.clone().with_tries(1)).unwrap();
    eventually(
        Duration::from_secs(20),
        "the other process reaches the new master",
        async || match other.lock().await {
            Err(Error::Held { .. }) => true,
            Err(e) if e.is_unavailable() => false,
            outcome => panic!("the lock was lost in the failover: {outcome:?}"),
        },
    )
    .await;
    // The promoted master has no replica left (its old master is down):
    // extending works on it, but cannot be acknowledged by a replica, and
    // says so.
    eventually(
        Duration::from_secs(20),
        "the holder's extension is refused",
        async || match holder.extend().await {
            Err(e) => e.not_replicated().is_some(),
            Ok(()) => panic!("extended without a replica"),
        },
    )
    .await;
    // The old master comes back as the new one's replica: extensions are
    // acknowledged again.
    cluster.restart_node(master);
    assert_eq!(cluster.replicas_of(promoted), vec![master]);
    eventually(
        Duration::from_secs(20),
        "the holder extends again",
        async || holder.extend().await.is_ok(),
    )
    .await;
    holder.unlock().await.unwrap();
    other.lock().await.unwrap();
    assert!(other.fencing_token().unwrap() > first);
    other.unlock().await.unwrap();
}

/// `wait_replicas` asks for more replicas than the masters have: the
/// acquisition fails with a typed shortfall, and leaves no lock behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_replicas_fail_the_acquisition_and_leave_nothing() {
    let cluster = RedisCluster::start(3, 0);
    let sync = RedisSync::builder()
        .cluster(cluster.seeds())
        .wait_replicas(1, Duration::from_millis(50))
        .build()
        .unwrap();
    let name = unique("shortfall");
    // A minute's expiry: a key left behind would not expire meanwhile.
    let options = real_time_options().with_expiry(Duration::from_secs(60));
    let mut m = sync.new_mutex(&name, options.clone()).unwrap();
    let error = m.lock().await.unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    let shortfall = error.not_replicated().expect("a replication shortfall");
    assert_eq!((shortfall.wanted, shortfall.acknowledged), (1, 0));
    assert!(error.to_string().contains("replicas"), "{error}");
    assert!(m.value().is_empty() && m.until().is_none());
    // Each failed attempt released its key before it returned.
    assert!(!cluster.keys().contains(&lock_key(&name)), "no lock left");
    // Without the option the same cluster serves the lock.
    let plain = RedisSync::cluster(cluster.seeds()).unwrap();
    let mut m = plain.new_mutex(&name, options).unwrap();
    m.lock().await.unwrap();
    m.unlock().await.unwrap();
}

/// Without replicas, killing the master of a held lock's slot makes the
/// name unavailable (an error, never a hang or a second owner); the
/// master restarted empty has forgotten the lock, as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_is_unavailable_then_forgets_its_locks() {
    let mut cluster = RedisCluster::start(3, 0);
    let (a, b) = two_processes(&cluster);
    // Node timeout: 1.2 s.
    let options = real_time_options()
        .with_expiry(Duration::from_secs(60))
        .with_timeout_factor(0.02);
    let name = unique("dead-master");
    let key = lock_key(&name);
    let mut holder = a.new_mutex(&name, options.clone()).unwrap();
    holder.lock().await.unwrap();
    let master = cluster.master_of(cluster.slot_of(&key));
    cluster.node_mut(master).kill();
    let mut other = b.new_mutex(&name, options.clone().with_tries(1)).unwrap();
    let error = other.lock().await.unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    assert!(holder.extend().await.unwrap_err().is_unavailable());
    cluster.restart_node(master);
    eventually(
        Duration::from_secs(20),
        "the restarted master serves the slot",
        async || other.lock().await.is_ok(),
    )
    .await;
    assert!(matches!(holder.extend().await, Err(Error::NotAcquired)));
    other.unlock().await.unwrap();
}

/// A master that lost its script cache (restarted, promoted, `SCRIPT
/// FLUSH`) gets each script whole on its first call, and it alone: locks
/// on its slots work while another master is down (`SCRIPT LOAD` would go
/// to every master, the dead one too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_without_the_scripts_gets_them_while_another_is_down() {
    let mut cluster = RedisCluster::start_with(3, 0, &["--cluster-require-full-coverage", "no"]);
    let sync = RedisSync::cluster(cluster.seeds()).unwrap();
    let names: Vec<String> = (0..64).map(|i| unique(&format!("scripts-{i}"))).collect();
    let master_of = |name: &str| cluster.master_of(cluster.slot_of(&lock_key(name)));
    let down = master_of(&names[0]);
    let name = names
        .iter()
        .find(|name| master_of(name) != down)
        .unwrap()
        .clone();
    let up = master_of(&name);
    let mut m = sync.new_mutex(&name, real_time_options()).unwrap();
    m.lock().await.unwrap();
    m.unlock().await.unwrap();
    cluster.node_mut(down).kill();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut cluster.node(up).connection())
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "a lock on the live master",
        async || m.lock().await.is_ok(),
    )
    .await;
    m.unlock().await.unwrap();
}

/// Cluster mode refuses what cannot work: no seed, a key prefix whose
/// braces would break the hash tag, seeds mixed with independent nodes.
#[tokio::test]
async fn cluster_configuration_errors() {
    let invalid = |r: tower_dsync::Result<RedisSync>| matches!(r, Err(Error::InvalidConfig { .. }));
    assert!(invalid(RedisSync::cluster(Vec::<String>::new())));
    assert!(invalid(RedisSync::cluster(["not a url"])));
    for prefix in ["", "{app}:", "a}"] {
        assert!(invalid(
            RedisSync::builder()
                .cluster(["redis://127.0.0.1:1"])
                .key_prefix(prefix)
                .build()
        ));
    }
    assert!(invalid(
        RedisSync::builder()
            .cluster(["redis://127.0.0.1:1"])
            .url("redis://127.0.0.1:2")
            .build()
    ));
    assert!(invalid(
        RedisSync::builder()
            .cluster(["redis://127.0.0.1:1"])
            .wait_replicas(1, Duration::ZERO)
            .build()
    ));
}

/// Exclusion while slots move: 8 tasks over two processes lock and unlock 4
/// names, with a try-again on every refusal and unavailability, while their
/// slots move round the masters (24 moves, one after every 10
/// acquisitions). No two holders of a name overlap, each name's fencing
/// tokens only grow, every release finds its lock, and afterwards no lock
/// key is left.
///
/// This test found that a RESP3 connection carrying both the commands and
/// the shard subscriptions gets its replies shifted when a moving slot's
/// channels are dropped by the server (see `src/redis/cluster.rs`):
/// acquisitions with another's token, releases that found no lock, and
/// locks left to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusion_holds_while_slots_move() {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[derive(Default)]
    struct Tally {
        acquired: AtomicUsize,
        failed: AtomicUsize,
        overlaps: AtomicUsize,
        stale_tokens: AtomicUsize,
        releases_not_found: AtomicUsize,
        releases_tried_again: AtomicUsize,
        last_failure: std::sync::Mutex<String>,
    }
    let count = |counter: &AtomicUsize| counter.load(Ordering::SeqCst);

    let cluster = Arc::new(RedisCluster::start(3, 0));
    let (a, b) = two_processes(&cluster);
    let processes = [a, b];
    let names: Vec<String> = (0..4).map(|i| unique(&format!("moving-{i}"))).collect();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(10))
        .with_retry_delay(Duration::from_millis(5))
        // Seconds of tries: a lock() that keeps failing returns, and the
        // stall report below says with what.
        .with_tries(1_000);
    let inside: Arc<HashMap<String, AtomicUsize>> = Arc::new(
        names
            .iter()
            .map(|n| (n.clone(), AtomicUsize::new(0)))
            .collect(),
    );
    let last_token: Arc<std::sync::Mutex<HashMap<String, u64>>> = Arc::default();
    let tally = Arc::new(Tally::default());
    let done = Arc::new(AtomicBool::new(false));

    let mover = {
        let (cluster, names, done, tally) =
            (cluster.clone(), names.clone(), done.clone(), tally.clone());
        tokio::task::spawn_blocking(move || {
            for round in 0..24 {
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while tally.acquired.load(Ordering::SeqCst) < 10 * (round + 1) {
                    if std::time::Instant::now() >= deadline {
                        panic!(
                            "no progress after {} acquisitions ({} failed attempts, the last: {}); {}",
                            tally.acquired.load(Ordering::SeqCst),
                            tally.failed.load(Ordering::SeqCst),
                            tally.last_failure.lock().unwrap(),
                            describe(&cluster, &names)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                let key = lock_key(&names[round % names.len()]);
                let (slot, _, to) = slot_and_next_master(&cluster, &key);
                cluster.move_slot(slot, to);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            let sync = processes[task % 2].clone();
            let (names, options) = (names.clone(), options.clone());
            let (inside, last_token) = (inside.clone(), last_token.clone());
            let (tally, done) = (tally.clone(), done.clone());
            tokio::spawn(async move {
                let mut i = task;
                while !done.load(Ordering::SeqCst) {
                    i += 1;
                    let name = &names[i % names.len()];
                    let mut m = sync.new_mutex(name, options.clone()).unwrap();
                    if let Err(e) = m.lock().await {
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                        *tally.last_failure.lock().unwrap() = e.to_string();
                        continue;
                    }
                    if inside[name].fetch_add(1, Ordering::SeqCst) != 0 {
                        tally.overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    let token = m.fencing_token().unwrap();
                    let previous = last_token
                        .lock()
                        .unwrap()
                        .insert(name.clone(), token)
                        .unwrap_or(0);
                    if token <= previous {
                        tally.stale_tokens.fetch_add(1, Ordering::SeqCst);
                    }
                    tally.acquired.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    inside[name].fetch_sub(1, Ordering::SeqCst);
                    match m.unlock().await {
                        Ok(()) => {}
                        Err(Error::NotAcquired) => {
                            tally.releases_not_found.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            // Unavailable (a migration outlasted the node
                            // timeout): tried again, where the first try may
                            // have gone through after all.
                            assert!(e.is_unavailable(), "unlock: {e}");
                            tally.releases_tried_again.fetch_add(1, Ordering::SeqCst);
                            let released = async {
                                loop {
                                    match m.unlock().await {
                                        Ok(()) | Err(Error::NotAcquired) => break,
                                        Err(e) => assert!(e.is_unavailable(), "unlock: {e}"),
                                    }
                                }
                            };
                            tokio::time::timeout(Duration::from_secs(20), released)
                                .await
                                .expect("the release went through within 20 s");
                        }
                    }
                }
            })
        })
        .collect();
    mover.await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    eprintln!(
        "acquired {}, failed attempts {}, releases tried again {}",
        count(&tally.acquired),
        count(&tally.failed),
        count(&tally.releases_tried_again),
    );
    assert_eq!(count(&tally.overlaps), 0, "two holders at once");
    assert_eq!(count(&tally.stale_tokens), 0, "a token that did not grow");
    assert_eq!(
        count(&tally.releases_not_found),
        0,
        "a release found no lock"
    );
    assert!(count(&tally.acquired) >= 240);
    // Well within the 10 s expiry: a lock key left behind (not released,
    // left to expire) is still there.
    eventually(Duration::from_secs(2), "no lock key left", async || {
        cluster
            .keys()
            .iter()
            .all(|k| !names.iter().any(|n| *k == lock_key(n)))
    })
    .await;
}

/// What the cluster holds for `names`: each lock key's value and `PTTL`,
/// and each wait queue, on the master of the name's slot.
fn describe(cluster: &RedisCluster, names: &[String]) -> String {
    let mut out = Vec::new();
    for name in names {
        let key = lock_key(name);
        let slot = cluster.slot_of(&key);
        let master = cluster.master_of(slot);
        let mut conn = cluster.node(master).connection();
        let value: redis::RedisResult<Option<String>> =
            redis::cmd("GET").arg(&key).query(&mut conn);
        let pttl: redis::RedisResult<i64> = redis::cmd("PTTL").arg(&key).query(&mut conn);
        let queue: redis::RedisResult<Vec<String>> = redis::cmd("ZRANGE")
            .arg(format!("{key}\u{1f}queue"))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query(&mut conn);
        out.push(format!(
            "{name} (slot {slot} on node {master}): value {value:?} pttl {pttl:?} queue {queue:?}"
        ));
    }
    out.join("; ")
}
