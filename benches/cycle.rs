//! The uncontended lock cycle (`lock` + `unlock` of a free name) on 1 and 3
//! spawned `redis-server` nodes, from 1 and from 16 tasks, side by side in
//! one run on the same servers:
//!
//! - **floor**: what any Redlock client must do, with raw redis-rs on one
//!   multiplexed connection per node: `SET key value NX PX` on every node,
//!   then a compare-and-delete script on every node, waiting for every
//!   node's answer;
//! - **tower-dsync**: `RedisMutex::lock` + `unlock` with default options,
//!   on a mutex made for the cycle (as the layer makes one per request);
//! - **rslock**: `LockManager::lock` + `unlock`.
//!
//! Then the same on a 3-master Redis Cluster: the floor sends the same two
//! commands over a redis-rs cluster connection (each to the master of the
//! key's slot), tower-dsync runs `RedisSync::cluster`; rslock has no
//! cluster mode.
//!
//! ```text
//! cargo bench --features cluster --bench cycle       # 3 s per case
//! DSYNC_BENCH_SECS=10 cargo bench --features cluster --bench cycle
//! ```
//!
//! Each task locks and unlocks its own name in a loop; the bench prints
//! cycles per second and the cycle's p50 and p99 for every case, and the
//! ratio of each to the floor's (for latencies, floor / library, so above
//! 1 is faster than the floor). With `DSYNC_BENCH_CSV=path` it also
//! appends the figures to a CSV file (see `scripts/bench-report.py`).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use tower_dsync::{DistMutex, DistMutexOptions, DistSync};

use common::Servers;

/// One lock client under test.
#[derive(Clone, Copy, PartialEq)]
enum Library {
    Floor,
    TowerDsync,
    Rslock,
}

impl Library {
    fn label(self) -> &'static str {
        match self {
            Library::Floor => "floor (raw SET NX PX + compare-and-delete)",
            Library::TowerDsync => "tower-dsync",
            Library::Rslock => "rslock",
        }
    }
}

/// Cycles per second and cycle latency quantiles, in microseconds.
#[derive(Clone, Copy)]
struct Figures {
    per_second: f64,
    p50_us: f64,
    p99_us: f64,
    /// Redis CPU time (user + system, all nodes) per cycle.
    server_us: f64,
    /// This process's CPU time per cycle.
    client_us: f64,
}

/// What one measurement saw: every cycle's latency in microseconds, and
/// how long it ran.
#[derive(Default)]
struct Samples {
    latencies: Vec<u64>,
    ran: Duration,
    cycles: u64,
}

impl Samples {
    fn figures(&mut self, server_seconds: f64, client_seconds: f64) -> Figures {
        let all = &mut self.latencies;
        if all.is_empty() {
            all.push(0);
        }
        all.sort_unstable();
        let at = |p: f64| all[((all.len() - 1) as f64 * p).round() as usize] as f64;
        Figures {
            per_second: self.cycles as f64 / self.ran.as_secs_f64(),
            p50_us: at(0.50),
            p99_us: at(0.99),
            server_us: server_seconds * 1e6 / self.cycles as f64,
            client_us: client_seconds * 1e6 / self.cycles as f64,
        }
    }
}

/// This process's CPU seconds (user + system) so far, from `/proc/self/stat`
/// (0 where there is none).
fn client_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the
    // 12th, stime the 13th, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Redis CPU seconds (user + system) used so far, summed over the nodes.
fn server_cpu(servers: &Servers) -> f64 {
    servers
        .servers()
        .into_iter()
        .map(|server| {
            let info: String = redis::cmd("INFO")
                .arg("cpu")
                .query(&mut server.connection())
                .unwrap();
            info.lines()
                .filter_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    matches!(name, "used_cpu_sys" | "used_cpu_user")
                        .then(|| value.trim().parse::<f64>().ok())?
                })
                .sum::<f64>()
        })
        .sum()
}

/// Runs `cycle(task, i)` in `tasks` tasks for `run`, after one warm-up
/// cycle per task; adds what it saw to `samples`.
async fn measure<F, Fut>(tasks: usize, run: Duration, cycle: F) -> Samples
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let cycle = Arc::new(cycle);
    join_all((0..tasks).map(|task| cycle(task, 0))).await;
    let deadline = Instant::now() + run;
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let cycle = cycle.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = 1;
                while Instant::now() < deadline {
                    let start = Instant::now();
                    cycle(task, i).await;
                    latencies.push(start.elapsed().as_micros() as u64);
                    i += 1;
                }
                latencies
            })
        })
        .collect();
    let mut samples = Samples {
        ran: run,
        ..Samples::default()
    };
    for handle in handles {
        samples
            .latencies
            .extend(handle.await.expect("task panicked"));
    }
    samples.cycles = samples.latencies.len() as u64;
    samples
}

const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
";

/// The floor's connections: one multiplexed connection per node, or one
/// redis-rs cluster connection that sends each command to the master of
/// the key's slot.
async fn floor(servers: &Servers, tasks: usize, run: Duration) -> Samples {
    match servers {
        Servers::Nodes(nodes) => {
            let mut conns: Vec<MultiplexedConnection> = Vec::new();
            for url in nodes.urls() {
                let client = redis::Client::open(url.as_str()).unwrap();
                conns.push(client.get_multiplexed_async_connection().await.unwrap());
            }
            floor_on(conns, tasks, run).await
        }
        Servers::Cluster(cluster) => {
            let client = redis::cluster::ClusterClient::new(cluster.seeds()).unwrap();
            let conn = client.get_async_connection().await.unwrap();
            floor_on(vec![conn], tasks, run).await
        }
    }
}

/// `SET NX PX` over every connection, then the compare-and-delete script
/// over every connection.
async fn floor_on<C>(conns: Vec<C>, tasks: usize, run: Duration) -> Samples
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let conns = Arc::new(conns);
    let script = Arc::new(redis::Script::new(RELEASE_SCRIPT));
    measure(tasks, run, move |task, i| {
        let (conns, script) = (conns.clone(), script.clone());
        async move {
            let key = format!("floor:{task}");
            let value = format!("{task}-{i}");
            let set = join_all(conns.iter().map(|conn| {
                let mut conn = conn.clone();
                let (key, value) = (&key, &value);
                async move {
                    let reply: Option<String> = redis::cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("NX")
                        .arg("PX")
                        .arg(8000)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    reply.is_some()
                }
            }))
            .await;
            assert!(set.iter().all(|ok| *ok), "uncontended SET refused");
            join_all(conns.iter().map(|conn| {
                let mut conn = conn.clone();
                let mut invocation = script.key(&key);
                invocation.arg(&value);
                async move {
                    let _: i64 = invocation.invoke_async(&mut conn).await.unwrap();
                }
            }))
            .await;
        }
    })
    .await
}

async fn tower_dsync(servers: &Servers, tasks: usize, run: Duration) -> Samples {
    let sync = servers.sync();
    let names: Arc<Vec<String>> = Arc::new(
        (0..tasks)
            .map(|task| format!("dsync-bench:{task}"))
            .collect(),
    );
    // A new mutex per cycle, as the layer makes one per request.
    measure(tasks, run, move |task, _| {
        let (sync, names) = (sync.clone(), names.clone());
        async move {
            let mut mutex = sync
                .new_mutex(&names[task], DistMutexOptions::default())
                .unwrap();
            mutex.lock().await.expect("lock");
            mutex.unlock().await.expect("unlock");
        }
    })
    .await
}

async fn rslock(urls: &[String], tasks: usize, run: Duration) -> Samples {
    let manager = Arc::new(rslock::LockManager::new(urls.to_vec()));
    let ttl = Duration::from_secs(8);
    measure(tasks, run, move |task, _| {
        let manager = manager.clone();
        async move {
            let resource = format!("rslock:{task}");
            let lock = manager.lock(resource.as_str(), ttl).await.expect("lock");
            manager.unlock(&lock).await;
        }
    })
    .await
}

const LIBRARIES: [Library; 3] = [Library::Floor, Library::TowerDsync, Library::Rslock];

/// Rounds per case: the libraries take turns, one second each, so that
/// drift over the run (caches, CPU frequency, other load) hits all alike.
fn main() {
    let rounds = common::seconds(3) as u32;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("uncontended lock + unlock, {rounds} s per case (1 s turns)\n");
    println!(
        "| nodes | tasks | library | cycles/s | p50 | p99 | Redis CPU / cycle | client CPU / cycle | cycles/s vs floor | p50 vs floor | p99 vs floor |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    // DSYNC_BENCH_FILTER=tower measures only the libraries whose label
    // contains it (for profiling; the ratios then mean nothing).
    let filter = std::env::var("DSYNC_BENCH_FILTER").unwrap_or_default();
    let mut rows = Vec::new();
    for servers in Servers::selected() {
        let servers = servers();
        let n = servers.label();
        for tasks in common::tasks(&[1, 16]) {
            let mut samples: Vec<Samples> = LIBRARIES.iter().map(|_| Samples::default()).collect();
            let mut server = [0.0; 3];
            let mut client = [0.0; 3];
            for _ in 0..rounds {
                for (i, library) in LIBRARIES.into_iter().enumerate() {
                    if !library.label().contains(&filter)
                        || (servers.is_cluster() && library == Library::Rslock)
                    {
                        continue;
                    }
                    let (before, before_client) = (server_cpu(&servers), client_cpu());
                    let round = runtime.block_on(async {
                        let turn = Duration::from_secs(1);
                        match library {
                            Library::Floor => floor(&servers, tasks, turn).await,
                            Library::TowerDsync => tower_dsync(&servers, tasks, turn).await,
                            Library::Rslock => rslock(&servers.urls(), tasks, turn).await,
                        }
                    });
                    if std::env::var_os("DSYNC_BENCH_VERBOSE").is_some() {
                        for server in servers.servers() {
                            let calls = server.command_calls();
                            server.reset_stats();
                            eprintln!("{} ({} cycles): {calls:?}", library.label(), round.cycles);
                        }
                    }
                    server[i] += server_cpu(&servers) - before;
                    client[i] += client_cpu() - before_client;
                    samples[i].latencies.extend(round.latencies);
                    samples[i].cycles += round.cycles;
                    samples[i].ran += round.ran;
                }
            }
            let figures: Vec<Figures> = samples
                .iter_mut()
                .zip(server.into_iter().zip(client))
                .map(|(s, (server, client))| s.figures(server, client))
                .collect();
            let base = figures[0];
            for (library, figures) in LIBRARIES.into_iter().zip(figures) {
                if !figures.per_second.is_finite() || figures.per_second == 0.0 {
                    continue;
                }
                let ratio = (
                    figures.per_second / base.per_second,
                    base.p50_us / figures.p50_us,
                    base.p99_us / figures.p99_us,
                );
                println!(
                    "| {n} | {tasks} | {} | {:.0} | {:.0} µs | {:.0} µs | {:.1} µs | {:.1} µs | {:.2} | {:.2} | {:.2} |",
                    library.label(),
                    figures.per_second,
                    figures.p50_us,
                    figures.p99_us,
                    figures.server_us,
                    figures.client_us,
                    ratio.0,
                    ratio.1,
                    ratio.2,
                );
                rows.push(format!(
                    "cycle,{} {tasks} task{},{},{:.3},{:.3},{:.3}",
                    servers.nodes(),
                    if tasks == 1 { "" } else { "s" },
                    library.label().split(' ').next().unwrap_or_default(),
                    ratio.0,
                    ratio.1,
                    ratio.2
                ));
            }
        }
    }
    common::append_csv(&rows);
}
