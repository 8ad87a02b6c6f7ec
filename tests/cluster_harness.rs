//! The Redis Cluster harness itself (`support::cluster`): a live slot
//! migration carries a key and its expiry along, a failover keeps a
//! replicated key, and a killed master rejoins as a replica.

#![cfg(feature = "redis")]

mod support;

use std::time::Instant;

use support::cluster::RedisCluster;

/// Sets `key` to `value` with `PX ttl_ms` on the master serving it; returns
/// the master and the connection that wrote (for `WAIT`).
fn set_px(
    cluster: &RedisCluster,
    key: &str,
    value: &str,
    ttl_ms: u64,
) -> (usize, redis::Connection) {
    let master = cluster.master_of(cluster.slot_of(key));
    let mut connection = cluster.node(master).connection();
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(ttl_ms)
        .query(&mut connection)
        .expect("SET on the key's master");
    (master, connection)
}

fn get(cluster: &RedisCluster, node: usize, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut cluster.node(node).connection())
        .expect("GET on the key's master")
}

#[test]
fn a_moved_slot_takes_its_keys_and_their_expiry() {
    let started = Instant::now();
    let cluster = RedisCluster::start(3, 0);
    eprintln!("3 masters ready in {:?}", started.elapsed());
    assert_eq!(cluster.masters(), vec![0, 1, 2]);
    let key = "harness:{moved}";
    let slot = cluster.slot_of(key);
    let (from, _) = set_px(&cluster, key, "v", 60_000);
    let to = (from + 1) % 3;
    assert_eq!(cluster.keys(), vec![key.to_owned()]);

    // In the middle of the migration, the key is still on the source,
    // which still serves the slot; the target redirects plain clients.
    let migration = cluster.begin_move(slot, to);
    assert_eq!((migration.source(), migration.target()), (from, to));
    assert_eq!(cluster.master_of(slot), from);
    assert!(cluster.has_key(from, key));
    let moved = redis::cmd("GET")
        .arg(key)
        .query::<Option<String>>(&mut cluster.node(to).connection())
        .expect_err("the target does not serve the slot yet");
    assert_eq!(moved.code(), Some("MOVED"), "{moved}");
    let started = Instant::now();
    migration.finish();
    eprintln!("slot {slot} moved in {:?}", started.elapsed());

    assert_eq!(cluster.master_of(slot), to);
    assert!(!cluster.has_key(from, key));
    assert_eq!(get(&cluster, to, key).as_deref(), Some("v"));
    let ttl: i64 = redis::cmd("PTTL")
        .arg(key)
        .query(&mut cluster.node(to).connection())
        .expect("PTTL");
    assert!((50_000..=60_000).contains(&ttl), "PTTL {ttl}");
    assert_eq!(cluster.total_keys(), 1);
    assert_eq!(cluster.keys(), vec![key.to_owned()]);

    // And back, in one call, with a few more keys in the slot.
    for n in 0..250 {
        set_px(&cluster, &format!("harness:{{moved}}:{n}"), "w", 60_000);
    }
    cluster.move_slot(slot, from);
    assert_eq!(cluster.master_of(slot), from);
    assert_eq!(cluster.node(from).dbsize(), 251);
    assert_eq!(cluster.node(to).dbsize(), 0);
    assert_eq!(cluster.total_keys(), 251);
}

#[test]
fn a_replica_takes_over_a_killed_master_and_the_master_rejoins() {
    let started = Instant::now();
    let mut cluster = RedisCluster::start(3, 1);
    eprintln!("3 masters and 3 replicas ready in {:?}", started.elapsed());
    assert_eq!(cluster.masters().len(), 3);
    let key = "harness:{failover}";
    let slot = cluster.slot_of(key);
    let (master, mut writer) = set_px(&cluster, key, "v", 60_000);
    let replicas = cluster.replicas_of(master);
    assert_eq!(replicas.len(), 1, "{replicas:?}");
    // WAIT on the connection that wrote: it waits for that client's last
    // write (on a new connection it would return at once).
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(1000)
        .query(&mut writer)
        .expect("WAIT");
    drop(writer);
    assert_eq!(acked, 1, "the replica acknowledged the write");
    assert!(cluster.has_key(replicas[0], key));

    let started = Instant::now();
    let promoted = cluster.kill_master_and_wait_failover(master);
    eprintln!("failover in {:?}", started.elapsed());
    assert_eq!(promoted, replicas[0]);
    assert!(!cluster.node(master).is_running());
    assert_eq!(cluster.master_of(slot), promoted);
    assert_eq!(get(&cluster, promoted, key).as_deref(), Some("v"));
    assert!(cluster.replicas_of(promoted).is_empty());

    let started = Instant::now();
    cluster.restart_node(master);
    eprintln!("rejoined in {:?}", started.elapsed());
    assert_eq!(cluster.master_of(slot), promoted);
    assert!(!cluster.masters().contains(&master));
    assert_eq!(cluster.replicas_of(promoted), vec![master]);
    // Restarted empty, it synced the key from its new master.
    assert!(cluster.has_key(master, key));
    assert_eq!(cluster.keys(), vec![key.to_owned()]);
}
