//! A real axum server over loopback, driven by an HTTP/1.1 load generator
//! in the same run: 32 keep-alive connections, each sending `GET /orders`
//! with a distinct `x-key` per request, one at a time. Three servers take
//! turns:
//!
//! - bare axum;
//! - with `DistLockLayer` over `RedisSync` (one spawned `redis-server`);
//! - with what a user would write instead: an axum middleware that takes
//!   an rslock lock on the key around the handler (`lock`, run the
//!   handler, `unlock`), on the same `redis-server`.
//!
//! ```text
//! cargo bench --bench http                 # 3 s per turn, 3 turns each
//! DSYNC_BENCH_SECS=5 cargo bench --bench http
//! ```
//!
//! Prints requests per second and the request latency at p50 and p99 for
//! each server, and the layer's ratios to the bare server and to the
//! rslock middleware. With `DSYNC_BENCH_CSV=path` it
//! appends the ratios to a CSV file (see `scripts/bench-report.py`).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http::StatusCode;
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

/// The baseline: a hand-written middleware over rslock, as a user would
/// write it without this crate. The lock's TTL is the layer's default
/// expiry; a key that is taken gets 409 once rslock's retries are spent.
async fn rslock_middleware(
    State(manager): State<Arc<rslock::LockManager>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = request
        .headers()
        .get("x-key")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
    else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Ok(lock) = manager.lock(key.as_str(), Duration::from_secs(8)).await else {
        return StatusCode::CONFLICT.into_response();
    };
    let response = next.run(request).await;
    manager.unlock(&lock).await;
    response
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
    let (mut bare, mut locked, mut baseline) = (Vec::new(), Vec::new(), Vec::new());
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
        let manager = Arc::new(rslock::LockManager::new(nodes.urls()));
        let baseline_addr = serve(
            Router::new()
                .route("/orders", get(handler))
                .layer(from_fn_with_state(manager, rslock_middleware)),
        )
        .await;
        // Warm-up: connections, scripts.
        for addr in [bare_addr, locked_addr, baseline_addr] {
            load(addr, Duration::from_millis(200), 0).await;
        }
        for turn in 1..=turns {
            bare.extend(load(bare_addr, run, turn).await);
            locked.extend(load(locked_addr, run, turn).await);
            baseline.extend(load(baseline_addr, run, turn).await);
        }
    });
    let ran = run * turns as u32;
    let (bare, locked, baseline) = (
        figures(&mut bare, ran),
        figures(&mut locked, ran),
        figures(&mut baseline, ran),
    );
    println!(
        "axum over loopback, {CONNECTIONS} connections, distinct keys, {} s per server\n",
        ran.as_secs()
    );
    println!("| server | requests/s | p50 | p99 |");
    println!("|---|---:|---:|---:|");
    for (label, (rps, p50, p99)) in [
        ("bare axum", bare),
        ("with DistLockLayer over RedisSync (1 node)", locked),
        ("with an rslock middleware (1 node)", baseline),
    ] {
        println!("| {label} | {rps:.0} | {p50:.0} µs | {p99:.0} µs |");
    }
    // Latency ratios are theirs over ours: above 1 is faster.
    let against =
        |other: (f64, f64, f64)| (locked.0 / other.0, other.1 / locked.1, other.2 / locked.2);
    let (vs_bare, vs_rslock) = (against(bare), against(baseline));
    for (label, ratio) in [("bare", vs_bare), ("rslock middleware", vs_rslock)] {
        println!(
            "\nlayer against {label}: requests/s {:.2}, p50 {:.2}, p99 {:.2} (latency ratios: {label} / layer)",
            ratio.0, ratio.1, ratio.2
        );
    }
    common::append_csv(&[
        format!(
            "http,axum 32 connections 1 node,bare axum,{:.3},{:.3},{:.3}",
            vs_bare.0, vs_bare.1, vs_bare.2
        ),
        format!(
            "http,axum 32 connections 1 node,rslock middleware,{:.3},{:.3},{:.3}",
            vs_rslock.0, vs_rslock.1, vs_rslock.2
        ),
    ]);
}
