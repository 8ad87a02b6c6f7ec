//! `IdempotencyLayer` in a real axum server over loopback: a replayed
//! request against a handler run, on one spawned `redis-server` and on the
//! in-process backend. 16 keep-alive connections send `POST /charges` with
//! a small body, one request at a time each:
//!
//! - **run**: every request has a new `Idempotency-Key`, so the handler
//!   runs (fast-path read, lock, read again under the lock, handler,
//!   record written, release);
//! - **replay**: every request repeats a key whose response is kept, so
//!   it is answered from the record (one read) without the handler.
//!
//! The two take turns, 3 turns of 3 s each. Then, with `MONITOR` on the
//! node, 200 requests of each kind count the commands the server got from
//! clients (commands that scripts ran are left out).
//!
//! ```text
//! cargo bench --bench idempotency
//! DSYNC_BENCH_SECS=1 cargo bench --bench idempotency
//! ```

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::net::{TcpListener, TcpStream};
use tower_dsync::idempotency::IdempotencyLayer;
use tower_dsync::{AnySync, MemorySync, RedisSync};

use support::RedisNodes;

const CONNECTIONS: usize = 16;

/// Serves the charges app behind the layer on `sync`; counts handler runs.
async fn serve(sync: AnySync, runs: Arc<AtomicUsize>) -> SocketAddr {
    let layer = IdempotencyLayer::builder(sync)
        .namespace("bench")
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/charges",
            post(move |body: Bytes| {
                let n = runs.fetch_add(1, Ordering::Relaxed);
                async move { format!("ch_{n}: charged {} bytes", body.len()) }
            }),
        )
        .layer(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Sends requests over `CONNECTIONS` connections for `run` (or, with
/// `count`, that many per connection); `key` makes each request's key
/// from its connection and number. Returns the latencies in µs.
async fn load(
    addr: SocketAddr,
    run: Duration,
    count: Option<usize>,
    key: fn(usize, u64) -> String,
) -> Vec<u64> {
    let deadline = Instant::now() + run;
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|worker| {
            tokio::spawn(async move {
                let stream = TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let io = hyper_util::rt::TokioIo::new(stream);
                let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn);
                let mut latencies = Vec::new();
                let mut i = 0u64;
                while count.map_or(Instant::now() < deadline, |n| latencies.len() < n) {
                    let request = http::Request::post("/charges")
                        .header("host", "bench")
                        .header("idempotency-key", key(worker, i))
                        .body(Full::new(Bytes::from_static(b"{\"amount\":1000}")))
                        .unwrap();
                    let start = Instant::now();
                    let response = sender.send_request(request).await.unwrap();
                    assert!(response.status().is_success(), "{}", response.status());
                    response.into_body().collect().await.unwrap();
                    latencies.push(start.elapsed().as_micros() as u64);
                    i += 1;
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    all
}

/// A new key per request, never seen before: the handler runs.
fn fresh(_: usize, _: u64) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("run-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// One of 64 keys per connection, all completed in the warm-up: replays.
fn kept(worker: usize, i: u64) -> String {
    format!("kept-{worker}-{}", i % 64)
}

/// Requests per second, p50 and p99 (µs).
fn figures(latencies: &mut [u64], ran: Duration) -> (f64, f64, f64) {
    latencies.sort_unstable();
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize] as f64;
    (
        latencies.len() as f64 / ran.as_secs_f64(),
        at(0.50),
        at(0.99),
    )
}

/// Commands per request that clients sent to the node at `port` while
/// `requests` requests ran, from `MONITOR` (script commands, tagged `lua`,
/// left out).
fn commands_per_request(
    runtime: &tokio::runtime::Runtime,
    port: u16,
    requests: impl std::future::Future<Output = usize>,
) -> f64 {
    let mut monitor = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "monitor"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli monitor");
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stdout = monitor.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The monitor is on once it shows a marker sent after it started.
    let ping = |marker: &str| {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap();
        let _: String = redis::cmd("PING").arg(marker).query(&mut conn).unwrap();
    };
    let wait_for = |marker: &str| {
        let mut seen = 0;
        loop {
            ping(marker);
            while let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) {
                if line.contains(marker) {
                    return seen;
                }
                // This bench's own PINGs and KEYS polls are not counted.
                if !line.contains(" lua]")
                    && !line.contains("\"PING\"")
                    && !line.contains("\"KEYS\"")
                {
                    seen += 1;
                }
            }
        }
    };
    wait_for("dsync-bench-start");
    let sent = runtime.block_on(requests);
    // Releases finish in the background: let them land before the end
    // marker (a lock key left means one is still on its way).
    runtime.block_on(async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        loop {
            let locks: Vec<String> = redis::cmd("KEYS")
                .arg("dsync:bench:*[0-9]")
                .query_async(&mut conn)
                .await
                .unwrap();
            if locks.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let seen = wait_for("dsync-bench-end");
    let _ = monitor.kill();
    let _ = monitor.wait();
    seen as f64 / sent as f64
}

fn main() {
    let seconds = common::seconds(3);
    let turns = 3;
    let run = Duration::from_secs(seconds);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let nodes = RedisNodes::start(1);
    let port = nodes.servers[0].port();
    let redis_runs = Arc::new(AtomicUsize::new(0));
    let memory_runs = Arc::new(AtomicUsize::new(0));
    let (redis_addr, memory_addr) = runtime.block_on(async {
        let redis = serve(
            AnySync::new(RedisSync::new(nodes.urls()).unwrap()),
            redis_runs.clone(),
        )
        .await;
        let memory = serve(AnySync::new(MemorySync::new()), memory_runs.clone()).await;
        for addr in [redis, memory] {
            // Warm-up, and the kept responses the replays get.
            load(addr, Duration::ZERO, Some(64), kept).await;
            load(addr, Duration::from_millis(200), None, fresh).await;
        }
        (redis, memory)
    });
    let mut rows = Vec::new();
    for (label, addr) in [("1 Redis node", redis_addr), ("in-process", memory_addr)] {
        let (mut ran_handler, mut replayed) = (Vec::new(), Vec::new());
        runtime.block_on(async {
            for _ in 0..turns {
                ran_handler.extend(load(addr, run, None, fresh).await);
                replayed.extend(load(addr, run, None, kept).await);
            }
        });
        let ran = run * turns as u32;
        rows.push((
            label,
            figures(&mut ran_handler, ran),
            figures(&mut replayed, ran),
        ));
    }
    let before = redis_runs.load(Ordering::Relaxed);
    let per_run = commands_per_request(&runtime, port, async {
        load(redis_addr, Duration::ZERO, Some(200 / CONNECTIONS), fresh)
            .await
            .len()
    });
    let per_replay = commands_per_request(&runtime, port, async {
        load(redis_addr, Duration::ZERO, Some(200 / CONNECTIONS), kept)
            .await
            .len()
    });
    let replays_ran =
        redis_runs.load(Ordering::Relaxed) - before - (200 / CONNECTIONS) * CONNECTIONS;

    println!(
        "IdempotencyLayer in axum over loopback, {CONNECTIONS} connections, {} s per kind\n",
        (run * turns as u32).as_secs()
    );
    println!("| backend | request | requests/s | p50 | p99 |");
    println!("|---|---|---:|---:|---:|");
    for (label, handler, replay) in &rows {
        for (kind, (rps, p50, p99)) in [("handler run", handler), ("replay", replay)] {
            println!("| {label} | {kind} | {rps:.0} | {p50:.0} µs | {p99:.0} µs |");
        }
    }
    let mut csv = Vec::new();
    for (label, handler, replay) in &rows {
        let ratio = (
            replay.0 / handler.0,
            handler.1 / replay.1,
            handler.2 / replay.2,
        );
        println!(
            "\n{label}: replay against handler run: requests/s {:.2}, p50 {:.2}, p99 {:.2} (latency ratios: run / replay)",
            ratio.0, ratio.1, ratio.2
        );
        csv.push(format!(
            "idempotency,axum 16 connections {label},handler run,{:.3},{:.3},{:.3}",
            ratio.0, ratio.1, ratio.2
        ));
    }
    println!(
        "\ncommands per request sent to the node (MONITOR, scripts' own left out): handler run {per_run:.2}, replay {per_replay:.2}"
    );
    assert_eq!(replays_ran, 0, "a replay ran the handler");
    common::append_csv(&csv);
}
