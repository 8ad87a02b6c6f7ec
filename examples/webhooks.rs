//! The main example: an axum webhook receiver that processes deliveries for
//! one resource one at a time, and different resources in parallel.
//!
//! It starts a server on a loopback port, sends concurrent bursts of webhook
//! deliveries for a few resources, and prints a timeline and a summary.
//!
//! ```text
//! cargo run --example webhooks
//! DSYNC_REDIS_URLS=redis://127.0.0.1:6379 cargo run --example webhooks
//! ```

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::routing::post;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower_dsync::layer::{HeldLock, PathSegment};
use tower_dsync::{DistLockLayer, DistMutexOptions};

const RESOURCES: [&str; 3] = ["order-17", "order-42", "invoice-7"];
const DELIVERIES_PER_RESOURCE: usize = 4;

/// One delivery as the handler saw it.
#[derive(Clone, Debug)]
struct Span {
    resource: String,
    delivery: String,
    start: Duration,
    end: Duration,
}

#[derive(Clone)]
struct AppState {
    t0: Instant,
    spans: Arc<Mutex<Vec<Span>>>,
}

/// The webhook handler: the layer already holds the lock on the resource.
async fn receive(
    State(state): State<AppState>,
    Path(resource): Path<String>,
    request: Request,
) -> String {
    let lock = request.extensions().get::<HeldLock>().cloned();
    let delivery = request
        .headers()
        .get("x-delivery-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let start = state.t0.elapsed();
    // Processing a webhook: read the resource, apply the event, write back.
    tokio::time::sleep(Duration::from_millis(40)).await;
    let end = state.t0.elapsed();
    state.spans.lock().unwrap().push(Span {
        resource,
        delivery: delivery.clone(),
        start,
        end,
    });
    match lock {
        Some(lock) => format!("delivery {delivery} processed under {}", lock.name()),
        None => format!("delivery {delivery} processed unlocked"),
    }
}

#[tokio::main]
async fn main() -> tower_dsync::Result<()> {
    let (sync, backend) = common::backend();
    println!("backend: {backend}");

    let state = AppState {
        t0: Instant::now(),
        spans: Arc::default(),
    };
    // Path `/webhooks/{resource}`: segment 1 is the resource id. Settings
    // that cannot work are an error here, at start-up.
    let lock = DistLockLayer::builder(sync, PathSegment::new(1))
        .namespace("webhooks")
        .mutex_options(DistMutexOptions::default().with_expiry(Duration::from_secs(10)))
        .wait(Duration::from_secs(10))
        .build()?;
    let app = Router::new()
        .route("/webhooks/{resource}", post(receive))
        .route_layer(lock)
        .with_state(state.clone());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    println!("server: http://{addr}/webhooks/{{resource}}");

    // The sender: every delivery of every resource at once.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let started = Instant::now();
    let mut sends = Vec::new();
    for n in 0..DELIVERIES_PER_RESOURCE {
        for resource in RESOURCES {
            let client = client.clone();
            let request = http::Request::post(format!("http://{addr}/webhooks/{resource}"))
                .header("x-delivery-id", format!("{resource}#{}", n + 1))
                .body(Full::new(bytes::Bytes::from_static(
                    b"{\"event\":\"updated\"}",
                )))
                .unwrap();
            sends.push(tokio::spawn(async move {
                let response = client.request(request).await.expect("delivery");
                let status = response.status();
                let _ = response.into_body().collect().await;
                status
            }));
        }
    }
    let mut ok = 0;
    for send in sends {
        if send.await.unwrap().is_success() {
            ok += 1;
        }
    }
    let elapsed = started.elapsed();

    let mut spans = state.spans.lock().unwrap().clone();
    spans.sort_by_key(|s| s.start);
    println!();
    println!("timeline (ms since start; one column per resource):");
    let mut events: Vec<(Duration, bool, &Span)> = spans
        .iter()
        .flat_map(|s| [(s.start, true, s), (s.end, false, s)])
        .collect();
    events.sort_by_key(|(at, is_start, _)| (*at, *is_start));
    for (at, is_start, span) in &events {
        let column = RESOURCES.iter().position(|r| *r == span.resource).unwrap();
        let mark = if *is_start { "start" } else { "end  " };
        let cell = format!("{mark} {}", span.delivery);
        println!(
            "{:>7.1}  {}{}",
            at.as_secs_f64() * 1000.0,
            " ".repeat(column * 24),
            cell
        );
    }

    let total = RESOURCES.len() * DELIVERIES_PER_RESOURCE;
    let per_resource = RESOURCES
        .iter()
        .map(|r| max_concurrent(spans.iter().filter(|s| s.resource == *r)))
        .max()
        .unwrap_or(0);
    let overall = max_concurrent(spans.iter());
    println!();
    println!("deliveries: {total} sent, {ok} succeeded");
    println!("max concurrent per resource: {per_resource}");
    println!("max concurrent overall: {overall}");
    println!("elapsed: {} ms", elapsed.as_millis());
    assert_eq!(ok, total, "every delivery must succeed");
    assert_eq!(per_resource, 1, "deliveries for one resource overlapped");
    assert!(overall > 1, "different resources should run in parallel");
    println!("ok: deliveries for one resource never overlapped");
    Ok(())
}

/// The most spans open at the same time.
fn max_concurrent<'a>(spans: impl Iterator<Item = &'a Span>) -> usize {
    let mut events: Vec<(Duration, i32)> =
        spans.flat_map(|s| [(s.start, 1), (s.end, -1)]).collect();
    // Ends sort before starts at the same instant: touching is not overlap.
    events.sort();
    let (mut open, mut max) = (0, 0);
    for (_, delta) in events {
        open += delta;
        max = max.max(open);
    }
    max as usize
}
