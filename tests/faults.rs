//! Exclusion under faults, across processes (issue 7, item 1).
//!
//! Two worker processes (this test binary run again in worker mode, see
//! [`fault_worker`]) each serve HTTP through `DistLockLayer` over their own
//! `RedisSync` on five spawned nodes. Their handler works on a per-key record
//! in a witness store, a sixth node that no fault touches: Lua scripts mark
//! the request in flight for its key on entry (and record an overlap if
//! another request is marked), accept a write only with a fencing token
//! greater than the last one accepted for the key, and clear the mark on
//! exit, recording whether the request's lock was reported lost (or its
//! validity had passed, as the README tells handlers to check). The test
//! drives thousands of requests to both workers at once while a schedule,
//! paced by the number of completed requests, kills, pauses (`SIGSTOP`),
//! resumes and restarts at most two of the five nodes at a time.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, mpsc};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use redis::Script;
use redis::aio::ConnectionManager;
use support::counting::Counting;
use support::{RedisNodes, RedisServer};
use tower_dsync::layer::{DistLockLayer, HeldLock, PathSegment};
use tower_dsync::{DistMutexOptions, RedisSync};

/// Set in a worker process: its number. Absent, [`fault_worker`] is a no-op.
const WORKER: &str = "TOWER_DSYNC_FAULT_WORKER";
/// The five lock nodes' URLs, comma-separated.
const WORKER_NODES: &str = "TOWER_DSYNC_FAULT_NODES";
/// The witness store's URL.
const WORKER_WITNESS: &str = "TOWER_DSYNC_FAULT_WITNESS";

/// Requests, keys and worker processes.
const REQUESTS: usize = 5_000;
const KEYS: usize = 10;
const WORKERS: usize = 2;
/// Requests in flight at once, over both workers.
const CLIENTS: usize = 16;
/// One request in `LONG_EVERY` holds its key for `LONG_HOLD`, longer than
/// the expiry: it keeps its lock only through the keeper's extensions,
/// made while faults happen.
const LONG_EVERY: usize = 200;
const LONG_HOLD: Duration = Duration::from_millis(1200);
/// The lock expiry; each node gets `expiry * TIMEOUT_FACTOR` to answer.
const EXPIRY: Duration = Duration::from_secs(1);
const TIMEOUT_FACTOR: f64 = 0.1;
/// A fault step every this many completed requests.
const STEP_EVERY: usize = 100;
/// At most this many of the five nodes are faulty at once (a minority).
const MAX_FAULTY: usize = 2;
/// A killed node restarts (empty: the nodes run without persistence) only
/// after this long, past any lock it held: the README's rule "delay restarts
/// past the longest expiry". A lock's keys on the other nodes live at most
/// one expiry after its last extension, and the last one (successful or not)
/// starts at most one extension interval (`expiry / 3`) after the kill and
/// lasts at most a node timeout.
const RESTART_AFTER: Duration = Duration::from_secs(2);
/// Safety net around anything that waits on the network or a process.
const BOUND: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// The witness store: a per-key record behind fencing tokens, and what it saw.

/// On entry. `KEYS`: 1 the key's in-flight set, 2 the overlap log, 3 the
/// key's record. `ARGV`: 1 key, 2 request id. Logs one overlap per request
/// already in flight for the key, marks this one, returns the record's count.
static ENTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for _, other in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    redis.call('RPUSH', KEYS[2], ARGV[1] .. ' ' .. other .. ' ' .. ARGV[2])
end
redis.call('SADD', KEYS[1], ARGV[2])
return tonumber(redis.call('HGET', KEYS[3], 'count') or '0')
",
    )
});

/// The fenced write. `KEYS`: 1 the key's record, 2 the stale-write log, 3 the
/// accepted-write log. `ARGV`: 1 key, 2 request id, 3 fencing token, 4 the
/// new count. Accepted (1) only if the token is greater than the record's;
/// else logged as stale (0).
static WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local last = tonumber(redis.call('HGET', KEYS[1], 'token') or '0')
if tonumber(ARGV[3]) <= last then
    redis.call('RPUSH', KEYS[2], ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. last)
    return 0
end
redis.call('HSET', KEYS[1], 'token', ARGV[3], 'count', ARGV[4])
redis.call('RPUSH', KEYS[3], ARGV[1] .. ' ' .. ARGV[3] .. ' ' .. last)
return 1
",
    )
});

/// On exit. `KEYS`: 1 the key's in-flight set, 2 the lost-lock log, 3 the
/// long-hold log. `ARGV`: 1 key, 2 request id, 3 why the request's lock can
/// no longer be trusted: `lost` (reported by `HeldLock::is_lost`), `expired`
/// (its validity, `HeldLock::until`, has passed: the holder stalled longer
/// than the lease, which no lock library can prevent), or empty; 4 for a
/// long hold, how its lock was kept: `extended` (its validity moved
/// forward), `lost`, or `unkept` (neither: a keeper that failed silently).
static EXIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SREM', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then
    redis.call('RPUSH', KEYS[2], ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
end
if ARGV[4] ~= '' then
    redis.call('RPUSH', KEYS[3], ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. ARGV[4])
end
return 1
",
    )
});

fn inflight_key(key: &str) -> String {
    format!("w:inflight:{key}")
}
fn record_key(key: &str) -> String {
    format!("w:record:{key}")
}
const OVERLAPS: &str = "w:overlaps";
const STALE: &str = "w:stale";
const ACCEPTED: &str = "w:accepted";
const LOST: &str = "w:lost";
const LONG: &str = "w:long";

// ---------------------------------------------------------------------------
// Worker mode.

/// The entry point of a worker process, not a test on its own: without the
/// `TOWER_DSYNC_FAULT_WORKER` variable it returns at once. With it, it
/// serves `/work/{key}` through `DistLockLayer` over `RedisSync` on the
/// nodes given in the environment, prints `LISTENING <port>`, and serves
/// until its standard input closes.
#[test]
fn fault_worker() {
    let Ok(id) = std::env::var(WORKER) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(serve_worker(id));
}

#[derive(Clone)]
struct Witness {
    conn: ConnectionManager,
}

async fn serve_worker(id: String) {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let urls: Vec<String> = var(WORKER_NODES).split(',').map(str::to_owned).collect();
    let witness = redis::Client::open(var(WORKER_WITNESS)).expect("witness URL");
    let witness = Witness {
        conn: ConnectionManager::new(witness).await.expect("witness"),
    };
    let sync = Counting::new(RedisSync::new(urls).expect("RedisSync"));
    let options = DistMutexOptions::default()
        .with_expiry(EXPIRY)
        .with_timeout_factor(TIMEOUT_FACTOR);
    let layer = DistLockLayer::new(sync.clone(), PathSegment::new(1))
        .namespace("faults")
        .mutex_options(options);
    layer.validate().expect("a valid layer");
    let stats = {
        let (layer, sync) = (layer.clone(), sync.clone());
        move || {
            let counts = &sync.counts;
            let body = format!(
                "locks={} extends={} unlocks={} held={} local={}",
                counts.locks(),
                counts.extends(),
                counts.unlocks(),
                layer.held_locks(),
                layer.local_keys()
            );
            async move { body }
        }
    };
    let app = Router::new()
        .route("/work/{key}", get(work))
        .route_layer(layer)
        .route("/stats", get(stats.clone()))
        .with_state(witness);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    println!("LISTENING {port}");
    std::io::stdout().flush().expect("stdout");
    let stdin_closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut buf = [0u8; 64];
            while std::io::stdin().read(&mut buf).is_ok_and(|n| n > 0) {}
        })
        .await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(stdin_closed)
        .await
        .expect("serve");
    println!("STATS worker={id} {}", stats().await);
    std::io::stdout().flush().expect("stdout");
}

/// The protected work: read the key's record, hold it a while, write it back
/// with the fencing token.
async fn work(
    State(witness): State<Witness>,
    Path(key): Path<String>,
    lock: axum::Extension<HeldLock>,
    headers: HeaderMap,
) -> Result<&'static str, (StatusCode, String)> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        (StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e}"))
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let request = header("x-request");
    let hold: u64 = header("x-hold-ms").parse().unwrap_or(0);
    let token = lock
        .fencing_token()
        .ok_or_else(|| fail("no fencing token", &"RedisSync gives one"))?;
    let mut conn = witness.conn.clone();
    let count: u64 = ENTER
        .key(inflight_key(&key))
        .key(OVERLAPS)
        .key(record_key(&key))
        .arg(&key)
        .arg(&request)
        .invoke_async(&mut conn)
        .await
        .map_err(|e| fail("enter", &e))?;
    // The work itself: a long hold for some requests, a short one for most.
    let until_at_entry = lock.until();
    tokio::time::sleep(Duration::from_millis(hold.max(1))).await;
    let accepted: i64 = WRITE
        .key(record_key(&key))
        .key(STALE)
        .key(ACCEPTED)
        .arg(&key)
        .arg(&request)
        .arg(token)
        .arg(count + 1)
        .invoke_async(&mut conn)
        .await
        .map_err(|e| fail("write", &e))?;
    // As the README tells handlers: a lock is a lease; past its validity
    // it may be another owner's.
    let lost = if lock.is_lost() {
        "lost"
    } else if lock
        .until()
        .is_none_or(|until| tokio::time::Instant::now() >= until)
    {
        "expired"
    } else {
        ""
    };
    let kept = match () {
        () if hold == 0 => "",
        () if lock.until() > until_at_entry => "extended",
        () if lock.is_lost() => "lost",
        () => "unkept",
    };
    let _: i64 = EXIT
        .key(inflight_key(&key))
        .key(LOST)
        .key(LONG)
        .arg(&key)
        .arg(&request)
        .arg(lost)
        .arg(kept)
        .invoke_async(&mut conn)
        .await
        .map_err(|e| fail("exit", &e))?;
    Ok(if accepted == 1 { "accepted" } else { "stale" })
}

// ---------------------------------------------------------------------------
// The test process's side of a worker.

/// A worker process; killed when dropped, also when the test panics.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    port: u16,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn spawn(id: usize, nodes: &RedisNodes, witness: &RedisServer) -> Worker {
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args(["fault_worker", "--exact", "--nocapture", "--test-threads=1"])
            .env(WORKER, id.to_string())
            .env(WORKER_NODES, nodes.urls().join(","))
            .env(WORKER_WITNESS, witness.url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a worker process");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let port = loop {
            let line = lines
                .recv_timeout(BOUND)
                .expect("the worker says where it listens");
            // libtest prints `test fault_worker ... ` first, on the same line.
            if let Some((_, port)) = line.split_once("LISTENING ") {
                break port.trim().parse().expect("a port");
            }
        };
        Worker {
            child,
            stdin,
            port,
            lines,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Closes the worker's standard input, waits for it to finish serving,
    /// and returns its `STATS` line.
    fn finish(mut self) -> String {
        drop(self.stdin.take());
        let deadline = Instant::now() + BOUND;
        let stats = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some((_, stats)) = line.split_once("STATS ") {
                        break stats.to_owned();
                    }
                }
                Err(e) => panic!("worker {} did not report: {e}", self.port),
            }
        };
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "worker did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        stats
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A worker's `/stats` line parsed into its fields.
fn parse_stats(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------
// The fault schedule.

/// A small deterministic generator (SplitMix64), seeded per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum NodeState {
    Up,
    Paused,
    Down(Instant),
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill(usize),
    Pause(usize),
    Resume(usize),
    Restart(usize),
}

/// What the schedule did.
#[derive(Debug, Default)]
struct FaultLog {
    kills: usize,
    pauses: usize,
    resumes: usize,
    restarts: usize,
    /// Steps where nothing was allowed (two nodes down, too recently).
    skipped: usize,
    /// The most nodes faulty at once.
    max_faulty: usize,
}

/// Runs a fault step each time `STEP_EVERY` more requests have completed,
/// until `stop`; then brings every node back and returns them.
fn fault_schedule(
    mut nodes: RedisNodes,
    seed: u64,
    done: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> (RedisNodes, FaultLog) {
    let mut rng = Rng(seed);
    let mut state = vec![NodeState::Up; nodes.servers.len()];
    let mut log = FaultLog::default();
    let mut next = STEP_EVERY;
    while !stop.load(Ordering::Acquire) {
        if done.load(Ordering::Acquire) < next {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        next += STEP_EVERY;
        let faulty = state.iter().filter(|s| **s != NodeState::Up).count();
        let mut allowed = Vec::new();
        for (i, s) in state.iter().enumerate() {
            match s {
                NodeState::Up if faulty < MAX_FAULTY => {
                    allowed.extend([Fault::Kill(i), Fault::Pause(i)]);
                }
                NodeState::Up => {}
                NodeState::Paused => allowed.extend([Fault::Resume(i), Fault::Kill(i)]),
                NodeState::Down(since) if since.elapsed() >= RESTART_AFTER => {
                    allowed.push(Fault::Restart(i));
                }
                NodeState::Down(_) => {}
            }
        }
        if allowed.is_empty() {
            log.skipped += 1;
            continue;
        }
        match allowed[rng.below(allowed.len())] {
            Fault::Kill(i) => {
                nodes.servers[i].kill();
                state[i] = NodeState::Down(Instant::now());
                log.kills += 1;
            }
            Fault::Pause(i) => {
                nodes.servers[i].pause();
                state[i] = NodeState::Paused;
                log.pauses += 1;
            }
            Fault::Resume(i) => {
                nodes.servers[i].resume();
                state[i] = NodeState::Up;
                log.resumes += 1;
            }
            Fault::Restart(i) => {
                nodes.servers[i].restart();
                state[i] = NodeState::Up;
                log.restarts += 1;
            }
        }
        let faulty = state.iter().filter(|s| **s != NodeState::Up).count();
        assert!(faulty <= MAX_FAULTY);
        log.max_faulty = log.max_faulty.max(faulty);
    }
    // The load is over: every node comes back (a killed one empty, at once:
    // nothing takes a lock any more).
    for (i, s) in state.iter().enumerate() {
        match s {
            NodeState::Up => {}
            NodeState::Paused => nodes.servers[i].resume(),
            NodeState::Down(_) => nodes.servers[i].restart(),
        }
    }
    (nodes, log)
}

/// The fault schedule's thread, which owns the nodes meanwhile. Dropped
/// (the test failed), it stops the schedule, so that the nodes are killed.
struct Schedule {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(RedisNodes, FaultLog)>>,
}

impl Schedule {
    fn start(nodes: RedisNodes, seed: u64, done: Arc<AtomicUsize>) -> Schedule {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || fault_schedule(nodes, seed, done, stop))
        };
        Schedule {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the schedule; every node is back when it returns them.
    fn stop(mut self) -> (RedisNodes, FaultLog) {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().expect("running");
        thread.join().expect("the fault schedule panicked")
    }
}

impl Drop for Schedule {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------
// The test.

/// How each request ended, as the client saw it.
#[derive(Debug, Default)]
struct Outcomes {
    accepted: usize,
    /// 200, but the witness refused the write as stale.
    stale: usize,
    busy_409: usize,
    unavailable_503: usize,
    /// Anything else (status and body), or a transport error: never allowed.
    other: Vec<String>,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn send(client: &HttpClient, url: &str, request: &str, hold: Duration) -> (u16, String) {
    let request = http::Request::get(url)
        .header("x-request", request)
        .header("x-hold-ms", hold.as_millis().to_string())
        .body(Full::default())
        .expect("request");
    let response = match tokio::time::timeout(BOUND, client.request(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return (0, format!("transport error: {e}")),
        Err(_) => return (0, format!("no response within {BOUND:?}")),
    };
    let status = response.status().as_u16();
    match response.into_body().collect().await {
        Ok(body) => (
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        ),
        Err(e) => (status, format!("body error: {e}")),
    }
}

fn lrange(witness: &RedisServer, list: &str) -> Vec<Vec<String>> {
    let items: Vec<String> = redis::cmd("LRANGE")
        .arg(list)
        .arg(0)
        .arg(-1)
        .query(&mut witness.connection())
        .expect("LRANGE");
    items
        .iter()
        .map(|item| item.split(' ').map(str::to_owned).collect())
        .collect()
}

/// Keys a node keeps besides the fencing counters (which are kept forever
/// on purpose): lock keys, wait queues and their leases.
fn leftover_keys(nodes: &RedisNodes) -> Vec<String> {
    nodes
        .servers
        .iter()
        .flat_map(|server| {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("*")
                .query(&mut server.connection())
                .expect("KEYS");
            keys.into_iter()
                .filter(|k| !k.ends_with("\u{1f}fence"))
                .map(move |k| format!("{}: {k:?}", server.port()))
        })
        .collect()
}

/// Exclusion holds across processes while a minority of the Redlock nodes
/// fail: two worker processes, each with its own `RedisSync` over five nodes
/// and `DistLockLayer` in front of a handler, serve 5,000 requests over 10
/// keys (one in 200 holds its key past the expiry, kept by extensions) while a
/// schedule paced by completed requests kills, pauses, resumes and restarts
/// (empty, after `RESTART_AFTER`) at most two nodes at a time. The witness
/// store proves: no two requests for a key were ever inside the handler at
/// once unless one's lock was reported lost (or had outlived its validity
/// by the time the handler ended: a stalled holder); no write with a stale
/// fencing token came from a request whose lock was not reported lost
/// (nor expired), and none was
/// accepted (accepted tokens strictly grow per key, and no update was lost
/// on a key whose locks were all kept); every hold past the expiry was
/// extended or told its lock was lost (no keeper failed silently);
/// every request got 200, or 409 or 503 as the README documents; and no lock
/// key, wait queue or lease is left on any node afterwards, nor a held lock
/// or local queue entry in either worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusion_under_faults_across_processes() {
    let started = Instant::now();
    let seed = std::env::var("TOWER_DSYNC_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("fault schedule seed {seed} (set TOWER_DSYNC_FAULT_SEED to replay it)");
    let nodes = RedisNodes::start(5);
    let witness = RedisServer::start();
    let workers: Vec<Worker> = (0..WORKERS)
        .map(|id| Worker::spawn(id, &nodes, &witness))
        .collect();
    let urls: Arc<Vec<(String, String)>> = Arc::new(
        workers
            .iter()
            .map(|w| (w.url("/work/"), w.url("/stats")))
            .collect(),
    );
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // Warm-up, before any fault: every worker connects to every node.
    for (i, (work, _)) in urls.iter().enumerate() {
        for key in 0..KEYS {
            let (status, body) = send(
                &client,
                &format!("{work}k{key}"),
                &format!("warm-{i}-{key}"),
                Duration::ZERO,
            )
            .await;
            assert_eq!((status, body.as_str()), (200, "accepted"));
        }
    }

    let done = Arc::new(AtomicUsize::new(0));
    let schedule = Schedule::start(nodes, seed, done.clone());

    let load_started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (client, urls, next, done, outcomes) = (
                client.clone(),
                urls.clone(),
                next.clone(),
                done.clone(),
                outcomes.clone(),
            );
            let mut rng = Rng(seed ^ (c as u64 + 1).wrapping_mul(0x1000_0000_01b3));
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::AcqRel);
                    if n >= REQUESTS {
                        break;
                    }
                    let key = rng.below(KEYS);
                    // Alternate workers; the long holds alternate too.
                    let (work, _) = &urls[(n + n / LONG_EVERY) % WORKERS];
                    let hold = if n % LONG_EVERY == LONG_EVERY / 2 {
                        LONG_HOLD
                    } else {
                        Duration::ZERO
                    };
                    let (status, body) =
                        send(&client, &format!("{work}k{key}"), &format!("r{n}"), hold).await;
                    {
                        let mut o = outcomes.lock().unwrap();
                        match (status, body.as_str()) {
                            (200, "accepted") => o.accepted += 1,
                            (200, "stale") => o.stale += 1,
                            (409, _) => o.busy_409 += 1,
                            (503, _) => o.unavailable_503 += 1,
                            _ => o.other.push(format!("r{n} k{key}: {status} {body}")),
                        }
                    }
                    done.fetch_add(1, Ordering::AcqRel);
                }
            })
        })
        .collect();
    for task in clients {
        task.await.expect("client task");
    }
    let load_time = load_started.elapsed();
    let (nodes, faults) = tokio::task::spawn_blocking(move || schedule.stop())
        .await
        .expect("the fault schedule");

    // Cleanup: nothing held in either worker, no key left on any node.
    for (_, stats) in urls.iter() {
        let deadline = Instant::now() + BOUND;
        loop {
            let (status, body) = send(&client, stats, "stats", Duration::ZERO).await;
            assert_eq!(status, 200, "{body}");
            let fields = parse_stats(&body);
            if fields["held"] == "0" && fields["local"] == "0" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a worker still holds locks: {body}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let deadline = Instant::now() + BOUND;
    let mut left = leftover_keys(&nodes);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = leftover_keys(&nodes);
    }
    drop(client);
    let stats: Vec<String> = workers.into_iter().map(Worker::finish).collect();

    // What the witness saw.
    let lost = lrange(&witness, LOST);
    let expired = lost.iter().filter(|l| l[2] == "expired").count();
    let long = lrange(&witness, LONG);
    let long_kept = |how: &str| long.iter().filter(|l| l[2] == how).count();
    let unkept: Vec<String> = long
        .iter()
        .filter(|l| l[2] == "unkept")
        .map(|l| l.join(" "))
        .collect();
    let lost_keys: BTreeSet<&str> = lost.iter().map(|l| l[0].as_str()).collect();
    let lost_requests: BTreeSet<&str> = lost.iter().map(|l| l[1].as_str()).collect();
    let overlaps = lrange(&witness, OVERLAPS);
    // An overlap is excused only when one of the two requests was told its
    // lock was lost (stricter than excusing every overlap on such a key).
    let overlap_violations: Vec<_> = overlaps
        .iter()
        .filter(|o| {
            !lost_requests.contains(o[1].as_str()) && !lost_requests.contains(o[2].as_str())
        })
        .collect();
    let stale = lrange(&witness, STALE);
    let stale_violations: Vec<_> = stale
        .iter()
        .filter(|s| !lost_requests.contains(s[1].as_str()))
        .collect();
    let accepted = lrange(&witness, ACCEPTED);
    let mut accepted_per_key: BTreeMap<&str, usize> = BTreeMap::new();
    let mut last_token: BTreeMap<&str, u64> = BTreeMap::new();
    let mut accepted_stale = Vec::new();
    for a in &accepted {
        let token: u64 = a[1].parse().expect("token");
        let last = last_token.entry(a[0].as_str()).or_default();
        if token <= *last {
            accepted_stale.push(a.join(" "));
        }
        *last = token;
        *accepted_per_key.entry(a[0].as_str()).or_default() += 1;
    }
    let mut con = witness.connection();
    // An update is lost when two holders read the same count: only with an
    // overlap, so only on keys whose lock was reported lost.
    let mut lost_updates = 0;
    let mut still_inside = 0;
    for key in 0..KEYS {
        let key = format!("k{key}");
        let count: Option<usize> = redis::cmd("HGET")
            .arg(record_key(&key))
            .arg("count")
            .query(&mut con)
            .expect("HGET");
        if !lost_keys.contains(key.as_str()) {
            lost_updates += accepted_per_key
                .get(key.as_str())
                .copied()
                .unwrap_or(0)
                .abs_diff(count.unwrap_or(0));
        }
        let inside: usize = redis::cmd("SCARD")
            .arg(inflight_key(&key))
            .query(&mut con)
            .expect("SCARD");
        still_inside += inside;
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());

    let total = outcomes.accepted
        + outcomes.stale
        + outcomes.busy_409
        + outcomes.unavailable_503
        + outcomes.other.len();
    println!("--- exclusion under faults, across {WORKERS} processes ---");
    println!(
        "requests: {total} over {KEYS} keys, {CLIENTS} in flight, 1 in {LONG_EVERY} held {LONG_HOLD:?}; load {load_time:.1?}, whole test {:.1?}",
        started.elapsed()
    );
    println!(
        "faults: {} kills, {} pauses ({} resumes, {} restarts), at most {} nodes faulty at once, {} steps skipped",
        faults.kills,
        faults.pauses,
        faults.resumes,
        faults.restarts,
        faults.max_faulty,
        faults.skipped
    );
    println!(
        "outcomes: {} accepted, {} stale (200), {} rejected 409 busy, {} rejected 503 unavailable, {} other",
        outcomes.accepted,
        outcomes.stale,
        outcomes.busy_409,
        outcomes.unavailable_503,
        outcomes.other.len()
    );
    println!(
        "witness: {} writes accepted, {} stale writes refused, {} locks reported lost and {expired} past their validity at the end of the handler (on {} keys), {} overlaps",
        accepted.len(),
        stale.len(),
        lost.len() - expired,
        lost_keys.len(),
        overlaps.len()
    );
    for line in &stats {
        println!("worker: {line}");
    }
    println!(
        "long holds: {} extended, {} reported lost, {} neither",
        long_kept("extended"),
        long_kept("lost"),
        unkept.len()
    );
    println!(
        "violations: {} overlaps without a lost lock, {} stale writes from locks not reported lost, {} stale writes accepted, {} lost updates on keys never reported lost, {} long holds neither extended nor reported lost, {} requests still inside, {} other outcomes, {} keys left",
        overlap_violations.len(),
        stale_violations.len(),
        accepted_stale.len(),
        lost_updates,
        unkept.len(),
        still_inside,
        outcomes.other.len(),
        left.len()
    );

    assert!(faults.kills + faults.pauses > 0, "no fault was injected");
    assert_eq!(total, REQUESTS);
    assert!(
        overlap_violations.is_empty(),
        "overlaps: {overlap_violations:?}"
    );
    assert!(
        stale_violations.is_empty(),
        "stale writes: {stale_violations:?}"
    );
    assert!(
        accepted_stale.is_empty(),
        "stale writes accepted: {accepted_stale:?}"
    );
    assert_eq!(lost_updates, 0, "lost updates");
    assert!(unkept.is_empty(), "long holds not kept: {unkept:?}");
    assert_eq!(long.len(), REQUESTS / LONG_EVERY, "every long hold logged");
    assert_eq!(still_inside, 0, "requests still marked inside");
    assert!(
        outcomes.other.is_empty(),
        "undocumented outcomes: {:?}",
        outcomes.other
    );
    assert!(left.is_empty(), "keys left on the nodes: {left:?}");
    drop(nodes);
}
