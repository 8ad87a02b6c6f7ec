//! Test harness: a real Redis Cluster of `redis-server` processes.
//!
//! [`RedisCluster::start`] starts the nodes on loopback ports (each with its
//! cluster bus on port + 10000, both outside the ephemeral range when it
//! can, never 6379), joins them with `redis-cli --cluster create`, and
//! waits until every node agrees on who serves which slot. A test can then
//! move a slot live the way `redis-cli --cluster reshard` does
//! ([`RedisCluster::move_slot`], or [`RedisCluster::begin_move`] and
//! [`Migration::finish`] to act in the middle), kill a master and wait for
//! a replica to take over ([`RedisCluster::kill_master_and_wait_failover`]),
//! and bring a killed node back ([`RedisCluster::restart_node`]). Every
//! wait polls with a bound ([`BOUND`](super::BOUND)); none sleeps to order events.
//!
//! The harness talks to each node directly with a plain connection. A node
//! answers commands on keys in the slots it serves only: `EXISTS` on a
//! replica, or on a master for someone else's key, is a `MOVED` error, so
//! [`RedisCluster::has_key`] and [`RedisCluster::keys_on`] look with
//! `KEYS`, which no node redirects.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use super::{RedisServer, field, wait_for};

/// The number of hash slots.
pub const SLOTS: usize = 16384;

/// Keys moved per `MIGRATE`.
const MIGRATE_BATCH: usize = 100;

/// Ports (node and bus) the clusters of this process hold, killed nodes'
/// included, so that a parallel test never takes the port of a node that
/// is down for a restart.
static RESERVED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A Redis Cluster: `redis-server` processes with `cluster-enabled yes`,
/// all killed when the cluster is dropped (also when the test panics).
///
/// Nodes are numbered from 0 in the order they were started; a node keeps
/// its number (and its node id) across a restart.
pub struct RedisCluster {
    /// Dropped first: every process is killed before its ports are
    /// released.
    nodes: Vec<RedisServer>,
    /// `CLUSTER MYID` of each node.
    ids: Vec<String>,
    /// One cached connection per node, replaced when it fails.
    connections: Mutex<Vec<Option<redis::Connection>>>,
    ports: Ports,
}

/// A slot migration between [`RedisCluster::begin_move`], which marks the
/// slot `MIGRATING` on the source and `IMPORTING` on the target, and
/// [`Migration::finish`], which moves its keys and hands it over. In
/// between, the source serves the slot's existing keys and sends clients
/// to the target (`ASK`) for the others.
#[must_use = "the slot stays half-migrated until `finish` is called"]
pub struct Migration<'a> {
    cluster: &'a RedisCluster,
    slot: u16,
    from: usize,
    to: usize,
}

impl RedisCluster {
    /// Starts `masters * (1 + replicas_per_master)` nodes, creates the
    /// cluster with `redis-cli --cluster create` (`masters` masters with
    /// `replicas_per_master` replicas each, the slots split evenly), and
    /// waits until every node reports `cluster_state:ok`, all agree on who
    /// serves which slot and which node replicates which, and every
    /// replica's link to its master is up.
    ///
    /// Nodes have no persistence and a `cluster-node-timeout` of one
    /// second, so that a failover takes a couple of seconds; a replica
    /// takes over however long it was cut off
    /// (`cluster-replica-validity-factor 0`).
    ///
    /// Panics if `redis-cli` is missing or fails (with its output), or if
    /// the cluster is not ready within [`BOUND`](super::BOUND).
    pub fn start(masters: usize, replicas_per_master: usize) -> RedisCluster {
        Self::start_with(masters, replicas_per_master, &[])
    }

    /// [`start`](Self::start), with `extra` configuration arguments for
    /// every node (`["--rename-command", "SPUBLISH", ""]`, say).
    pub fn start_with(masters: usize, replicas_per_master: usize, extra: &[&str]) -> RedisCluster {
        assert!(
            masters >= 3,
            "redis-cli --cluster create needs at least 3 masters, not {masters}"
        );
        let args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            // Relative to `--dir`: the node's own directory, which a
            // restart keeps.
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
            "--cluster-replica-validity-factor",
            "0",
            // A replica (a restarted node, say) syncs at once, not after
            // the default 5 s wait for more replicas.
            "--repl-diskless-sync-delay",
            "0",
        ]
        .map(String::from)
        .into_iter()
        .chain(extra.iter().map(|arg| arg.to_string()))
        .collect();
        let mut ports = Ports(Vec::new());
        let count = masters * (1 + replicas_per_master);
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| RedisServer::start_with_args(|| ports.reserve(), &args))
            .collect();
        create_cluster(&nodes, replicas_per_master);
        let mut cluster = RedisCluster {
            connections: Mutex::new((0..count).map(|_| None).collect()),
            ids: Vec::new(),
            nodes,
            ports,
        };
        cluster.ids = (0..count)
            .map(|i| cluster.run(i, redis::cmd("CLUSTER").arg("MYID")))
            .collect();
        cluster.wait_stable("the new cluster is ready", |cluster| {
            let view = cluster.any_view()?;
            let found = view.masters().len();
            if found != masters {
                return Err(format!("{found} masters, not {masters}"));
            }
            for master in view.masters() {
                let found = view.replicas_of(master).len();
                if found != replicas_per_master {
                    return Err(format!(
                        "node {master} has {found} replicas, not {replicas_per_master}"
                    ));
                }
            }
            Ok(())
        });
        cluster
    }

    /// `redis://127.0.0.1:PORT` of every node, masters and replicas, killed
    /// or not, in node order.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Node `i`: to kill, pause, resume or restart it (see also
    /// [`RedisCluster::restart_node`]), or to talk to it directly.
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// Node `i`, mutably: to kill, pause, resume or restart it.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`, asked of a live node).
    pub fn slot_of(&self, key: &str) -> u16 {
        let i = self.some_live_node();
        self.run(i, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
    }

    /// The node serving `slot`, as a live node sees it now.
    pub fn master_of(&self, slot: u16) -> usize {
        let view = self.view_or_panic();
        view.slots[usize::from(slot)].unwrap_or_else(|| panic!("nobody serves slot {slot}"))
    }

    /// The masters, as a live node sees them now (killed ones the cluster
    /// has not failed over included), in node order.
    pub fn masters(&self) -> Vec<usize> {
        self.view_or_panic().masters()
    }

    /// The running replicas of `master` (paused ones included, killed ones
    /// not), as a live node sees them now, in node order.
    pub fn replicas_of(&self, master: usize) -> Vec<usize> {
        self.view_or_panic()
            .replicas_of(master)
            .into_iter()
            .filter(|&r| self.nodes[r].is_running())
            .collect()
    }

    /// Moves `slot` live to master `to`, the way `redis-cli --cluster
    /// reshard` does, and waits until every live node agrees that `to`
    /// serves it: [`RedisCluster::begin_move`], then
    /// [`Migration::finish`].
    pub fn move_slot(&self, slot: u16, to: usize) {
        self.begin_move(slot, to).finish();
    }

    /// Starts moving `slot` to master `to`: `CLUSTER SETSLOT slot
    /// IMPORTING <source>` on `to`, then `CLUSTER SETSLOT slot MIGRATING
    /// <to>` on the master serving it now, and nothing else.
    pub fn begin_move(&self, slot: u16, to: usize) -> Migration<'_> {
        let view = self.view_or_panic();
        let from =
            view.slots[usize::from(slot)].unwrap_or_else(|| panic!("nobody serves slot {slot}"));
        assert_ne!(from, to, "node {to} already serves slot {slot}");
        assert!(
            view.masters().contains(&to),
            "node {to} is not a master, it cannot take slot {slot}"
        );
        self.raise_epoch(to);
        let _: () = self.run(to, &setslot(slot, "IMPORTING", &self.ids[from]));
        let _: () = self.run(from, &setslot(slot, "MIGRATING", &self.ids[to]));
        Migration {
            cluster: self,
            slot,
            from,
            to,
        }
    }

    /// Makes `node`'s config epoch the highest in the cluster, in every
    /// live node's view, with `CLUSTER BUMPEPOCH` (refused while `node`
    /// ties for the highest: the cluster then separates the two by
    /// itself).
    ///
    /// A node's claim to a slot wins only over an owner with a lower
    /// epoch. Without this, a target whose epoch is below the source's
    /// can lose its new slot again to gossip from before the move, after
    /// every node agreed on it; it is then told (an `UPDATE` message) that
    /// the source owns it and gives it back, deleting the keys it imported,
    /// while the source says the target has it: each redirects to the
    /// other for good.
    fn raise_epoch(&self, node: usize) {
        wait_for(
            &format!("node {node}'s config epoch is the highest everywhere"),
            || {
                if !self.view(node)?.has_highest_epoch(node) {
                    let _: String = self.run(node, redis::cmd("CLUSTER").arg("BUMPEPOCH"));
                }
                for i in self.live_nodes() {
                    if !self.view(i)?.has_highest_epoch(node) {
                        return Err(format!("node {i} knows an epoch at least as high"));
                    }
                }
                Ok(())
            },
        );
    }

    /// Kills master `master` (`SIGKILL`) and waits until one of its
    /// replicas serves its slots, every live node agrees, and the cluster
    /// is `ok` again. Returns the new master.
    ///
    /// Panics if `master` is not a master or has no live replica.
    pub fn kill_master_and_wait_failover(&mut self, master: usize) -> usize {
        let view = self.view_or_panic();
        assert!(
            view.masters().contains(&master),
            "node {master} is not a master"
        );
        let replicas: Vec<usize> = view
            .replicas_of(master)
            .into_iter()
            .filter(|&r| self.nodes[r].is_live())
            .collect();
        assert!(
            !replicas.is_empty(),
            "node {master} has no live replica to fail over to"
        );
        let slots: Vec<usize> = (0..SLOTS)
            .filter(|&s| view.slots[s] == Some(master))
            .collect();
        assert!(!slots.is_empty(), "node {master} serves no slot");
        self.nodes[master].kill();
        let what = format!("a replica of node {master} ({replicas:?}) serves its slots");
        self.wait_stable(&what, |cluster| {
            let view = cluster.any_view()?;
            let owners: BTreeSet<Option<usize>> = slots.iter().map(|&s| view.slots[s]).collect();
            match owners.first() {
                Some(&Some(owner)) if owners.len() == 1 && replicas.contains(&owner) => Ok(owner),
                _ => Err(format!("its slots are served by {owners:?}")),
            }
        })
    }

    /// Restarts node `i` (killed or not) on its port with its `nodes.conf`,
    /// so that it rejoins the cluster (as a replica of the node that took
    /// over if it was a master that was failed over; empty, to sync from
    /// its master), and waits until the cluster is stable again: every
    /// live node `ok`, in agreement, none flagged as failing, and every
    /// replica's link up.
    pub fn restart_node(&mut self, i: usize) {
        self.nodes[i].restart();
        self.connections.lock().unwrap_or_else(|e| e.into_inner())[i] = None;
        self.wait_stable(&format!("node {i} rejoined"), |_| Ok(()));
    }

    /// The number of keys over the live masters (`DBSIZE`).
    pub fn total_keys(&self) -> u64 {
        self.live_masters()
            .into_iter()
            .map(|i| self.run::<u64>(i, &redis::cmd("DBSIZE")))
            .sum()
    }

    /// Every key on the live masters, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .live_masters()
            .into_iter()
            .flat_map(|i| self.keys_on(i))
            .collect();
        keys.sort();
        keys
    }

    /// Every key on node `i`, master or replica, sorted (`KEYS *`).
    pub fn keys_on(&self, i: usize) -> Vec<String> {
        let mut keys: Vec<String> = self.run(i, redis::cmd("KEYS").arg("*"));
        keys.sort();
        keys
    }

    /// Whether node `i`, master or replica, holds `key`, whichever node
    /// serves its slot (`KEYS` with the key as an escaped pattern, which no
    /// node redirects, where `EXISTS` would get `MOVED`).
    pub fn has_key(&self, i: usize, key: &str) -> bool {
        let mut pattern = String::with_capacity(key.len());
        for c in key.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        let keys: Vec<String> = self.run(i, redis::cmd("KEYS").arg(pattern));
        keys.iter().any(|k| k == key)
    }

    /// Waits until the cluster is stable (see [`RedisCluster::restart_node`])
    /// and `extra` holds, and returns what `extra` returned; panics after
    /// [`BOUND`](super::BOUND) with `what` and the last reason it was not.
    pub fn wait_stable<T>(
        &self,
        what: &str,
        mut extra: impl FnMut(&Self) -> Result<T, String>,
    ) -> T {
        wait_for(what, || {
            self.check_stable()?;
            extra(self)
        })
    }

    /// Why the cluster is not stable, if it is not.
    fn check_stable(&self) -> Result<(), String> {
        let live = self.live_nodes();
        let mut reference: Option<(usize, View)> = None;
        for &i in &live {
            let info: String = self.query(i, redis::cmd("CLUSTER").arg("INFO"))?;
            if field(&info, "cluster_state") != Some("ok") {
                return Err(format!("node {i} says cluster_state is not ok"));
            }
            let known = field(&info, "cluster_known_nodes");
            if known != Some(&self.nodes.len().to_string()) {
                return Err(format!("node {i} knows {known:?} nodes"));
            }
            let view = self.view(i)?;
            for &j in &live {
                let flags = &view.flags[j];
                if flags
                    .iter()
                    .any(|f| matches!(f.as_str(), "fail" | "fail?" | "handshake" | "noaddr"))
                {
                    return Err(format!("node {i} flags node {j} {flags:?}"));
                }
            }
            for (slot, owner) in view.slots.iter().enumerate() {
                match owner {
                    None => return Err(format!("node {i} says nobody serves slot {slot}")),
                    Some(o) if !self.nodes[*o].is_live() => {
                        return Err(format!("node {i} says node {o}, down, serves slot {slot}"));
                    }
                    Some(_) => {}
                }
            }
            if let Some(master) = view.master[i] {
                let replication: String = self.query(i, redis::cmd("INFO").arg("replication"))?;
                if field(&replication, "master_link_status") != Some("up") {
                    return Err(format!("node {i}'s link to its master {master} is not up"));
                }
                if !self.nodes[master].is_live() {
                    return Err(format!("node {i} replicates node {master}, down"));
                }
            }
            match &reference {
                None => reference = Some((i, view)),
                Some((r, first)) => {
                    if first.slots != view.slots {
                        return Err(format!("nodes {r} and {i} disagree on the slots"));
                    }
                    for &j in &live {
                        if first.master[j] != view.master[j] {
                            return Err(format!(
                                "node {r} says node {j} replicates {:?}, node {i} says {:?}",
                                first.master[j], view.master[j]
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Running, unpaused nodes.
    fn live_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_live())
            .collect()
    }

    fn some_live_node(&self) -> usize {
        *self
            .live_nodes()
            .first()
            .expect("every node of the cluster is down or paused")
    }

    /// Live nodes that say they are masters.
    fn live_masters(&self) -> Vec<usize> {
        self.live_nodes()
            .into_iter()
            .filter(|&i| {
                let replication: String = self.run(i, redis::cmd("INFO").arg("replication"));
                field(&replication, "role") == Some("master")
            })
            .collect()
    }

    /// The first live node's view that can be read.
    fn any_view(&self) -> Result<View, String> {
        let mut last = String::from("no live node");
        for i in self.live_nodes() {
            match self.view(i) {
                Ok(view) => return Ok(view),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn view_or_panic(&self) -> View {
        self.any_view()
            .unwrap_or_else(|e| panic!("cannot read the cluster's state: {e}"))
    }

    /// Node `i`'s `CLUSTER NODES`.
    fn view(&self, i: usize) -> Result<View, String> {
        let text: String = self.query(i, redis::cmd("CLUSTER").arg("NODES"))?;
        View::parse(&text, &self.ids).map_err(|e| format!("node {i}'s CLUSTER NODES: {e}"))
    }

    /// Runs `cmd` on node `i`; panics on an error.
    fn run<T: redis::FromRedisValue>(&self, i: usize, cmd: &redis::Cmd) -> T {
        self.query(i, cmd).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `cmd` on node `i` over its cached connection, once more over a
    /// new one if the cached one fails (the node was restarted, say).
    fn query<T: redis::FromRedisValue>(&self, i: usize, cmd: &redis::Cmd) -> Result<T, String> {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let cached = connections[i].take();
        let fresh = cached.is_none();
        let mut connection = match cached {
            Some(connection) => connection,
            None => connect(self.nodes[i].port()).map_err(|e| format!("node {i}: {e}"))?,
        };
        match cmd.query(&mut connection) {
            Ok(value) => {
                connections[i] = Some(connection);
                Ok(value)
            }
            Err(e) if e.code().is_some() => {
                // An error reply: the connection is fine.
                connections[i] = Some(connection);
                Err(format!("node {i}: {e}"))
            }
            Err(e) if !fresh && (e.is_io_error() || e.is_connection_dropped()) => {
                drop(connections);
                self.query(i, cmd)
            }
            Err(e) => Err(format!("node {i}: {e}")),
        }
    }
}

impl Migration<'_> {
    /// The node the slot is moving from.
    pub fn source(&self) -> usize {
        self.from
    }

    /// The node the slot is moving to.
    pub fn target(&self) -> usize {
        self.to
    }

    /// Moves the slot's keys in batches (`CLUSTER GETKEYSINSLOT`, then
    /// `MIGRATE 127.0.0.1 port "" 0 5000 KEYS ...`) until the source has
    /// none left, then `CLUSTER SETSLOT slot NODE <target>` on the target,
    /// the source and every other live master, and waits until every live
    /// node agrees that the target serves the slot.
    pub fn finish(self) {
        let Migration {
            cluster,
            slot,
            from,
            to,
        } = self;
        let port = cluster.nodes[to].port();
        loop {
            let keys: Vec<String> = cluster.run(
                from,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(MIGRATE_BATCH),
            );
            if keys.is_empty() {
                break;
            }
            let _: String = cluster.run(
                from,
                redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(port)
                    .arg("")
                    .arg(0)
                    .arg(5000)
                    .arg("KEYS")
                    .arg(&keys),
            );
        }
        let others: Vec<usize> = cluster
            .view_or_panic()
            .masters()
            .into_iter()
            .filter(|&m| m != from && m != to && cluster.nodes[m].is_live())
            .collect();
        for node in [to, from].into_iter().chain(others) {
            let _: () = cluster.run(node, &setslot(slot, "NODE", &cluster.ids[to]));
        }
        // A safety net behind `raise_epoch` (before it, moves in quick
        // succession could leave the slot with nobody: the source's claim,
        // gossiped with a config epoch the target had not heard of yet,
        // won over the target's on the target itself). If the slot is
        // still not agreed on, the target claims it again, with an epoch
        // above every one it knows by now.
        let mut polls = 0;
        wait_for(
            &format!("every live node says node {to} serves slot {slot}"),
            || {
                polls += 1;
                if polls % 25 == 0 {
                    let _: String = cluster.run(to, redis::cmd("CLUSTER").arg("BUMPEPOCH"));
                    let _: () = cluster.run(to, &setslot(slot, "NODE", &cluster.ids[to]));
                }
                for i in cluster.live_nodes() {
                    let owner = cluster.view(i)?.slots[usize::from(slot)];
                    if owner != Some(to) {
                        return Err(format!("node {i} says {owner:?}"));
                    }
                }
                Ok(())
            },
        );
    }
}

/// One node's `CLUSTER NODES`, by node number.
struct View {
    /// Who serves each slot.
    slots: Vec<Option<usize>>,
    /// Each node's master, for the replicas.
    master: Vec<Option<usize>>,
    /// Each node's flags (`master`, `slave`, `fail?`, `fail`, ...).
    flags: Vec<Vec<String>>,
    /// Each node's config epoch.
    epochs: Vec<u64>,
}

impl View {
    /// Parses lines of `<id> <ip:port@cport[,hostname]> <flags> <master>
    /// <ping-sent> <pong-recv> <config-epoch> <link-state> <slot>...`, where
    /// a slot is `N`, `N-M`, or an open slot (`[N->-id]`, `[N-<-id]`).
    fn parse(text: &str, ids: &[String]) -> Result<View, String> {
        let index = |id: &str| {
            ids.iter()
                .position(|known| known == id)
                .ok_or_else(|| format!("unknown node {id}"))
        };
        let mut view = View {
            slots: vec![None; SLOTS],
            master: vec![None; ids.len()],
            flags: vec![Vec::new(); ids.len()],
            epochs: vec![0; ids.len()],
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return Err(format!("short line {line:?}"));
            }
            let node = index(fields[0])?;
            view.flags[node] = fields[2].split(',').map(String::from).collect();
            if fields[3] != "-" {
                view.master[node] = Some(index(fields[3])?);
            }
            view.epochs[node] = fields[6]
                .parse()
                .map_err(|e| format!("config epoch in {line:?}: {e}"))?;
            for range in fields[8..].iter().filter(|r| !r.starts_with('[')) {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                let parse = |n: &str| {
                    n.parse::<usize>()
                        .map_err(|e| format!("slot {n:?} in {line:?}: {e}"))
                };
                for slot in parse(start)?..=parse(end)? {
                    view.slots[slot] = Some(node);
                }
            }
        }
        Ok(view)
    }

    /// Whether `node`'s config epoch is above every other master's (a
    /// replica shows its master's).
    fn has_highest_epoch(&self, node: usize) -> bool {
        let own = self.epochs[node];
        self.masters()
            .into_iter()
            .all(|other| other == node || self.epochs[other] < own)
    }

    fn is_master(&self, node: usize) -> bool {
        self.flags[node].iter().any(|f| f == "master")
    }

    /// The nodes flagged `master`, in node order.
    fn masters(&self) -> Vec<usize> {
        (0..self.flags.len())
            .filter(|&n| self.is_master(n))
            .collect()
    }

    /// The nodes flagged `slave` of `master`, in node order.
    fn replicas_of(&self, master: usize) -> Vec<usize> {
        (0..self.flags.len())
            .filter(|&n| !self.is_master(n) && self.master[n] == Some(master))
            .collect()
    }
}

/// Node and bus ports reserved in [`RESERVED`], released when dropped.
struct Ports(Vec<u16>);

impl Ports {
    /// A port for a node such that both it and its bus port (+ 10000) are
    /// free on 127.0.0.1 and not reserved, preferably both outside the
    /// ephemeral range (where clients' connections could take them while
    /// a node is down for a restart). Reserves both.
    fn reserve(&mut self) -> u16 {
        let (low, high) = ephemeral_range();
        let ephemeral = |p: u16| (low..=high).contains(&p);
        let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..20_000 {
            let port: u16 = rand::random_range(10_000..=55_535);
            let bus = port + 10_000;
            let usable = ![6379, 16379].contains(&port)
                && !reserved.contains(&port)
                && !reserved.contains(&bus)
                && (attempt >= 10_000 || !(ephemeral(port) || ephemeral(bus)))
                && bindable(port)
                && bindable(bus);
            if usable {
                reserved.insert(port);
                reserved.insert(bus);
                self.0.extend([port, bus]);
                return port;
            }
        }
        panic!("no free pair of loopback ports (port, port + 10000) for a cluster node");
    }
}

impl Drop for Ports {
    fn drop(&mut self) {
        let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
        for port in &self.0 {
            reserved.remove(port);
        }
    }
}

/// The kernel's ephemeral port range (`32768 60999` when unknown).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|n| n.parse().ok());
            Some((bounds.next()??, bounds.next()??))
        })
        .unwrap_or((32768, 60999))
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok()
}

/// `redis-cli --cluster create <nodes> --cluster-replicas R --cluster-yes`,
/// killed after a minute.
fn create_cluster(nodes: &[RedisServer], replicas_per_master: usize) {
    let mut command = Command::new("redis-cli");
    command.args(["--cluster", "create"]);
    command.args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())));
    command
        .args(["--cluster-replicas", &replicas_per_master.to_string()])
        .arg("--cluster-yes")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "redis-cli was not found on PATH. The cluster tests create their cluster with \
             `redis-cli --cluster create`: install it with `sudo apt-get install redis-tools` \
             (Debian, Ubuntu) or `brew install redis` (macOS), then run the tests again."
        ),
        Err(e) => panic!("could not run redis-cli: {e}"),
    };
    let pid = child.id();
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    let output = match outcome.recv_timeout(Duration::from_secs(60)) {
        Ok(output) => output.expect("wait for redis-cli"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("redis-cli --cluster create did not finish within a minute");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && !stdout.contains("[ERR]"),
        "redis-cli --cluster create failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
}

fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
    connection.set_read_timeout(Some(Duration::from_secs(10)))?;
    connection.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(connection)
}

fn setslot(slot: u16, state: &str, node: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("SETSLOT").arg(slot).arg(state).arg(node);
    cmd
}
