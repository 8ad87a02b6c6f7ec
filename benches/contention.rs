//! Hand-off between waiters: 8 contenders on one name, each holding it for
//! 1 ms, spread over two independent lock clients (as two processes would
//! be), on 1 and on 3 spawned `redis-server` nodes. This crate side by side
//! with rslock (defaults: 3 tries, random 0-200 ms retry delay, looping in
//! `acquire`) and rslock with a 2 ms retry delay, same servers, same run.
//! Then this crate on a 3-master Redis Cluster (rslock has no cluster
//! mode): its figures read against this crate's on one node.
//!
//! ```text
//! cargo bench --features cluster --bench contention  # 5 s per case
//! DSYNC_BENCH_SECS=10 cargo bench --features cluster --bench contention
//! ```
//!
//! For each case it prints acquisitions per second, the hand-off share (the
//! share of acquisitions that went to a different contender than the last
//! holder), the wait (from calling `lock` to holding the lock) at p50, p99
//! and max, the FIFO bound (7 hold cycles: what a waiter would wait in a
//! perfect queue, `7 / acquisitions per second`) and the p99 as a multiple
//! of it, and Redis commands per acquisition.
//!
//! Commands are what the clients sent, counted from `INFO commandstats` on
//! every node: Redis also counts the commands a Lua script runs, so the
//! commands only a library's scripts call are left out of its count
//! (`SET`, `INCR`, `HINCRBY` (the fencing counter), `PTTL`, `GET`,
//! `PEXPIRE`, `DEL`, `PUBLISH`, `SPUBLISH` and the wait queue's commands for
//! this crate, whose every lock command is a script; `GET`, `DEL` for rslock,
//! which sends `SET NX PX` itself and releases with a script).
//!
//! With `DSYNC_BENCH_CSV=path` it appends, per node count and rslock mode,
//! tower-dsync's acquisitions/s over rslock's, rslock's wait p99 over
//! tower-dsync's, and rslock's commands per acquisition over tower-dsync's
//! (above 1: tower-dsync is better) to a CSV file (see
//! `scripts/bench-report.py`).
//!
//! Every run also checks exclusion: a contender that finds another one
//! inside the critical section counts an overlap, and the bench fails if
//! there is any.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Barrier;
use tokio::time::Instant;
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, RedisSync};

use common::Servers;

const CONTENDERS: usize = 8;
const CLIENTS: usize = 2;
const HOLD: Duration = Duration::from_millis(1);
const NAME: &str = "orders:17";

/// One library under test: builds a client over the nodes and runs one
/// contender's loop on it.
#[derive(Clone, Copy)]
enum Library {
    TowerDsync,
    Rslock { retry: Option<Duration> },
}

impl Library {
    fn label(self) -> String {
        match self {
            Library::TowerDsync => "tower-dsync".into(),
            Library::Rslock { retry: None } => "rslock (default retry)".into(),
            Library::Rslock { retry: Some(d) } => format!("rslock ({} ms retry)", d.as_millis()),
        }
    }

    /// Commands that only this library's scripts call (see the module doc).
    fn script_only_commands(self) -> &'static [&'static str] {
        match self {
            Library::TowerDsync => &[
                "set", "incr", "hincrby", "pttl", "get", "pexpire", "del", "publish", "spublish",
                "time", "exists", "zrange", "zadd", "zrem", "zscore", "hget", "hset", "hdel",
            ],
            Library::Rslock { .. } => &["get", "del"],
        }
    }
}

/// What the contenders saw.
#[derive(Default)]
struct Record {
    /// Wait of each acquisition made before the deadline, in microseconds.
    waits_us: Vec<u64>,
    /// Contender ids in the order they held the lock.
    holders: Vec<usize>,
    /// From a holder starting its release to the next holder holding, in
    /// microseconds.
    gaps_us: Vec<u64>,
    /// When the last holder started its release.
    left_at: Option<Instant>,
    /// Every acquisition, also those after the deadline.
    all: usize,
    overlaps: usize,
}

struct Shared {
    record: Mutex<Record>,
    inside: AtomicUsize,
    deadline: Instant,
    start: Barrier,
}

impl Shared {
    /// Called with the lock held, after waiting `waited`; holds it for
    /// `HOLD`. Returns false once the run is over.
    async fn critical_section(&self, id: usize, waited: Duration) -> bool {
        let overlap = self.inside.fetch_add(1, Ordering::SeqCst) != 0;
        let now = Instant::now();
        {
            let mut record = self.record.lock().unwrap();
            record.overlaps += usize::from(overlap);
            record.all += 1;
            if now <= self.deadline {
                record.waits_us.push(waited.as_micros() as u64);
                record.holders.push(id);
                if let Some(left) = record.left_at.take() {
                    record.gaps_us.push((now - left).as_micros() as u64);
                }
            }
        }
        tokio::time::sleep(HOLD).await;
        self.inside.fetch_sub(1, Ordering::SeqCst);
        self.record.lock().unwrap().left_at = Some(Instant::now());
        now <= self.deadline
    }
}

/// Runs `contender(client, id, shared)` for every contender, spreading them
/// over the clients, for `run` from now; returns what they saw.
async fn run_contenders<C, F, Fut>(clients: Vec<C>, run: Duration, contender: F) -> Record
where
    C: Clone + Send + 'static,
    F: Fn(C, usize, Arc<Shared>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let shared = Arc::new(Shared {
        record: Mutex::default(),
        inside: AtomicUsize::new(0),
        deadline: Instant::now() + run,
        start: Barrier::new(CONTENDERS),
    });
    let tasks: Vec<_> = (0..CONTENDERS)
        .map(|id| {
            let client = clients[id % clients.len()].clone();
            tokio::spawn(contender(client, id, shared.clone()))
        })
        .collect();
    for task in tasks {
        task.await.expect("contender panicked");
    }
    std::mem::take(&mut *shared.record.lock().unwrap())
}

async fn run_tower_dsync(servers: &Servers, run: Duration) -> Record {
    let clients: Vec<RedisSync> = (0..CLIENTS).map(|_| servers.sync()).collect();
    // Waiters never give up: the retry delay is only a fallback, the
    // release message wakes them.
    let options = DistMutexOptions::default().with_tries(u32::MAX);
    for client in &clients {
        let mut warm = client.new_mutex("warm-up", options.clone()).unwrap();
        warm.lock().await.unwrap();
        warm.unlock().await.unwrap();
    }
    run_contenders(clients, run, move |client, id, shared| {
        let options = options.clone();
        async move {
            let mut mutex = client.new_mutex(NAME, options).unwrap();
            shared.start.wait().await;
            loop {
                let asked = Instant::now();
                mutex.lock().await.expect("lock");
                let more = shared.critical_section(id, asked.elapsed()).await;
                mutex.unlock().await.expect("unlock");
                if !more {
                    break;
                }
            }
        }
    })
    .await
}

async fn run_rslock(urls: Vec<String>, retry: Option<Duration>, run: Duration) -> Record {
    let clients: Vec<rslock::LockManager> = (0..CLIENTS)
        .map(|_| {
            let mut manager = rslock::LockManager::new(urls.clone());
            if let Some(delay) = retry {
                manager.set_retry(3, delay);
            }
            manager
        })
        .collect();
    let ttl = Duration::from_secs(8);
    for client in &clients {
        let guard = client.acquire("warm-up", ttl).await.unwrap();
        guard.release().await;
    }
    run_contenders(clients, run, move |client, id, shared| async move {
        shared.start.wait().await;
        loop {
            let asked = Instant::now();
            let guard = client.acquire(NAME, ttl).await.expect("acquire");
            let more = shared.critical_section(id, asked.elapsed()).await;
            guard.release().await;
            if !more {
                break;
            }
        }
    })
    .await
}

/// `INFO commandstats` of every node, summed: calls per command.
fn command_calls(servers: &Servers) -> HashMap<String, u64> {
    let mut calls = HashMap::new();
    for server in servers.servers() {
        for (name, count) in server.command_calls() {
            *calls.entry(name).or_default() += count;
        }
    }
    calls
}

/// Empties every node and zeroes its command counts.
fn reset(servers: &Servers) {
    for server in servers.servers() {
        let _: () = redis::cmd("FLUSHALL")
            .query(&mut server.connection())
            .unwrap();
        server.reset_stats();
    }
}

/// The `p` quantile of sorted microseconds, in milliseconds.
fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank] as f64 / 1000.0
}

/// One case's figures.
struct Figures {
    per_second: f64,
    handoff: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    fifo_ms: f64,
    gap_p50_ms: f64,
    gap_p99_ms: f64,
    commands: f64,
}

fn run_case(
    runtime: &tokio::runtime::Runtime,
    servers: &Servers,
    library: Library,
    run: Duration,
) -> Figures {
    reset(servers);
    let mut record = runtime.block_on(async move {
        match library {
            Library::TowerDsync => run_tower_dsync(servers, run).await,
            Library::Rslock { retry } => run_rslock(servers.urls(), retry, run).await,
        }
    });
    assert_eq!(
        record.overlaps,
        0,
        "{}: two contenders held the lock at once",
        library.label()
    );
    let calls = command_calls(servers);
    if std::env::var_os("DSYNC_BENCH_VERBOSE").is_some() {
        let mut sorted: Vec<_> = calls.iter().collect();
        sorted.sort();
        eprintln!(
            "{}: {} acquisitions, {sorted:?}",
            library.label(),
            record.all
        );
    }
    let skipped = library.script_only_commands();
    let commands: u64 = calls
        .iter()
        .filter(|(name, _)| !skipped.contains(&name.as_str()))
        .map(|(_, n)| n)
        .sum();
    let acquisitions = record.holders.len();
    let handoffs = record.holders.windows(2).filter(|w| w[0] != w[1]).count();
    record.waits_us.sort_unstable();
    record.gaps_us.sort_unstable();
    let per_second = acquisitions as f64 / run.as_secs_f64();
    Figures {
        per_second,
        handoff: handoffs as f64 / (acquisitions.max(2) - 1) as f64,
        p50_ms: percentile_ms(&record.waits_us, 0.50),
        p99_ms: percentile_ms(&record.waits_us, 0.99),
        max_ms: percentile_ms(&record.waits_us, 1.0),
        fifo_ms: (CONTENDERS - 1) as f64 * 1000.0 / per_second,
        gap_p50_ms: percentile_ms(&record.gaps_us, 0.50),
        gap_p99_ms: percentile_ms(&record.gaps_us, 0.99),
        commands: commands as f64 / record.all.max(1) as f64,
    }
}

fn main() {
    let seconds = common::seconds(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let libraries = [
        Library::TowerDsync,
        Library::Rslock { retry: None },
        Library::Rslock {
            retry: Some(Duration::from_millis(2)),
        },
    ];
    println!(
        "{CONTENDERS} contenders on one name over {CLIENTS} clients, {} ms holds, {seconds} s per case\n",
        HOLD.as_millis()
    );
    println!(
        "| nodes | library | acquisitions/s | hand-off | wait p50 | wait p99 | wait max | FIFO bound | p99 / FIFO | release to next hold p50 / p99 | commands/acq |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // DSYNC_BENCH_FILTER=tower runs only the cases whose label contains it.
    let filter = std::env::var("DSYNC_BENCH_FILTER").unwrap_or_default();
    let mut rows = Vec::new();
    // tower-dsync on one node: the reference of the cluster's row.
    let mut single: Option<Figures> = None;
    for servers in Servers::selected() {
        let servers = servers();
        let label = servers.label();
        let mut ours: Option<(f64, f64, f64, f64)> = None;
        for library in libraries {
            if !library.label().contains(&filter)
                || (servers.is_cluster() && !matches!(library, Library::TowerDsync))
            {
                continue;
            }
            let f = run_case(&runtime, &servers, library, Duration::from_secs(seconds));
            match (library, ours) {
                (Library::TowerDsync, _) => {
                    ours = Some((f.per_second, f.p99_ms, f.commands, f.handoff));
                }
                (Library::Rslock { .. }, Some((per_second, p99, commands, handoff))) => {
                    rows.push(format!(
                        "contention,{},tower-dsync vs {},{:.3},{:.3},{:.3},{:.3}",
                        servers.nodes(),
                        library.label(),
                        per_second / f.per_second,
                        f.p99_ms / p99,
                        f.commands / commands,
                        handoff / f.handoff.max(0.001),
                    ));
                }
                _ => {}
            }
            println!(
                "| {label} | {} | {:.0} | {:.1} % | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} | {:.2} / {:.2} ms | {:.1} |",
                library.label(),
                f.per_second,
                f.handoff * 100.0,
                f.p50_ms,
                f.p99_ms,
                f.max_ms,
                f.fifo_ms,
                f.p99_ms / f.fifo_ms,
                f.gap_p50_ms,
                f.gap_p99_ms,
                f.commands,
            );
            match (&servers, &single, library) {
                (Servers::Nodes(nodes), None, Library::TowerDsync) if nodes.servers.len() == 1 => {
                    single = Some(f);
                }
                (Servers::Cluster(_), Some(one), Library::TowerDsync) => {
                    println!(
                        "\ncluster vs one node (tower-dsync): acquisitions/s {:.2}, wait p99 {:.2} (one node's / the cluster's), release to next hold p50 {:.2}",
                        f.per_second / one.per_second,
                        one.p99_ms / f.p99_ms,
                        one.gap_p50_ms / f.gap_p50_ms,
                    );
                    rows.push(format!(
                        "contention,{label},tower-dsync on a cluster vs on one node,{:.3},{:.3},{:.3},{:.3}",
                        f.per_second / one.per_second,
                        one.p99_ms / f.p99_ms,
                        one.commands / f.commands,
                        f.handoff / one.handoff.max(0.001),
                    ));
                }
                _ => {}
            }
        }
    }
    common::append_csv(&rows);
}
