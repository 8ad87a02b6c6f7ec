//! A real axum server over loopback, with and without `DistLockLayer` over
//! `RedisSync` (one spawned `redis-server`), driven by an HTTP/1.1 load
//! generator in the same run: 32 keep-alive connections, each sending
//! `GET /orders` with a distinct `x-key` per request, one at a time.
//!
//! ```text
//! cargo bench --bench http                 # 3 s per turn, 3 turns each
//! DSYNC_BENCH_SECS=5 cargo bench --bench http
//! ```
//!
//! Prints requests per second and the request latency at p50 and p99 for
//! both servers, and the ratio layer / bare. With `DSYNC_BENCH_CSV=path` it
//! appends the ratios to a CSV file (see `scripts/bench-report.py`).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::net::{TcpListener, TcpStream};
use tower_dsync::layer::HeaderKey;
use tower_dsync::{DistLockLayer, RedisSync};

use support::RedisNodes;

const CONNECTIONS: usize = 32;

/// Serves `app` on a loopback port until the runtime ends.
async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Sends requests over `CONNECTIONS` connections for `run`; returns each
/// request's latency in microseconds.
async fn load(addr: SocketAddr, run: Duration, turn: u64) -> Vec<u64> {
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
                while Instant::now() < deadline {
                    let request = http::Request::get("/orders")
                        .header("host", "bench")
                        .header("x-key", format!("{turn}-{worker}-{i}"))
                        .body(Empty::<Bytes>::new())
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
    let (mut bare, mut locked) = (Vec::new(), Vec::new());
    runtime.block_on(async {
        let handler = || async { "ok" };
        let bare_addr = serve(Router::new().route("/orders", get(handler))).await;
        let sync = RedisSync::new(nodes.urls()).unwrap();
        let locked_addr = serve(
            Router::new().route("/orders", get(handler)).layer(
                DistLockLayer::builder(sync, HeaderKey::new("x-key"))
                    .build()
                    .unwrap(),
            ),
        )
        .await;
        // Warm-up: connections, scripts.
        load(bare_addr, Duration::from_millis(200), 0).await;
        load(locked_addr, Duration::from_millis(200), 0).await;
        for turn in 1..=turns {
            bare.extend(load(bare_addr, run, turn).await);
            locked.extend(load(locked_addr, run, turn).await);
        }
    });
    let ran = run * turns as u32;
    let (bare, locked) = (figures(&mut bare, ran), figures(&mut locked, ran));
    println!(
        "axum over loopback, {CONNECTIONS} connections, distinct keys, {} s per server\n",
        ran.as_secs()
    );
    println!("| server | requests/s | p50 | p99 |");
    println!("|---|---:|---:|---:|");
    for (label, (rps, p50, p99)) in [
        ("bare axum", bare),
        ("with DistLockLayer over RedisSync (1 node)", locked),
    ] {
        println!("| {label} | {rps:.0} | {p50:.0} µs | {p99:.0} µs |");
    }
    let ratio = (locked.0 / bare.0, bare.1 / locked.1, bare.2 / locked.2);
    println!(
        "\nlayer / bare: requests/s {:.2}, p50 {:.2}, p99 {:.2} (latency ratios: bare / layer)",
        ratio.0, ratio.1, ratio.2
    );
    common::append_csv(&[format!(
        "http,axum 32 connections,layer over RedisSync,{:.3},{:.3},{:.3}",
        ratio.0, ratio.1, ratio.2
    )]);
}
