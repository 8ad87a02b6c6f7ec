//! Defects a second review found in the recorded body of IdempotencyLayer
//! (its drain after a drop), each a regression test that failed before its
//! fix.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use support::http::{HttpClient, Server};
use tower_dsync::MemorySync;
use tower_dsync::idempotency::IdempotencyLayer;

fn layer(sync: MemorySync) -> IdempotencyLayer<MemorySync, tower_dsync::layer::HeaderKey> {
    IdempotencyLayer::builder(sync)
        .namespace("review")
        .build()
        .unwrap()
}

fn post_with_key(url: String) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("idempotency-key", "k1")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

async fn wait_no_lock(sync: &MemorySync, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while sync.names_in_use() > 0 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// A response body whose frame closure panics on the first run: hyper's
/// connection task unwinds, tokio drops the connection future afterwards,
/// `IdempotentBody`'s drop hands the body to `drain`, which polls it again:
/// the underlying iterator moved on, so it yields the rest and ends. The
/// record holds part0 + part1 + part3, a body nobody ever got (part2 is missing),
/// and every retry is answered with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_panicked_is_not_recorded() {
    let sync = MemorySync::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = move || {
        let r = r.clone();
        async move {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            let stream = futures_util::stream::iter(0..4u8)
                .then(|i| async move {
                    if i == 1 {
                        // The head and part0 go out first.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    i
                })
                .map(move |i| {
                    if i == 2 && n == 1 {
                        panic!("the response body fails mid-stream");
                    }
                    Ok::<_, Infallible>(Frame::data(Bytes::from(format!("part{i} run{n};"))))
                });
            Response::new(axum::body::Body::new(StreamBody::new(stream)))
        }
    };
    let app = Router::new()
        .route("/r", post(handler))
        .layer(layer(sync.clone()));
    let server = Server::start(app).await;
    let client = HttpClient::default();

    let first = client.send(post_with_key(server.url("/r"))).await;
    assert!(
        first.into_body().collect().await.is_err(),
        "the first body broke"
    );
    assert!(wait_no_lock(&sync, Duration::from_secs(10)).await);
    let retry = client.send(post_with_key(server.url("/r"))).await;
    let replayed = retry.headers().contains_key("idempotent-replayed");
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    assert!(
        !replayed && sync.records_kept() <= 1,
        "a body that panicked was recorded and replayed: {body:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A body whose frames are always ready (work done inline, no await), dropped
/// mid-stream by its client: `drain` loops over `poll_frame` without ever
/// returning `Pending`, so `tokio::time::timeout(DRAIN_LIMIT, ..)` never gets
/// polled again: the 10 s limit does not hold, a worker thread is taken for
/// as long as the body goes on (forever for an endless one), and the lock
/// stays held (and extended) all that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_limit_holds_for_an_always_ready_body() {
    let sync = MemorySync::new();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let handler = move || {
        let stop = s.clone();
        async move {
            let stream = futures_util::stream::poll_fn(move |_| {
                if stop.load(Ordering::SeqCst) {
                    return Poll::Ready(None);
                }
                // CPU work for each chunk (a generated export, say).
                std::thread::sleep(Duration::from_millis(1));
                Poll::Ready(Some(Ok::<_, Infallible>(Frame::data(Bytes::from_static(
                    b"row\n",
                )))))
            });
            Response::new(axum::body::Body::new(StreamBody::new(stream)))
        }
    };
    let app = Router::new()
        .route("/r", post(handler))
        .layer(layer(sync.clone()));
    let server = Server::start(app).await;
    let client = HttpClient::default();

    let response = client.send(post_with_key(server.url("/r"))).await;
    let mut body = response.into_body();
    let _ = body.frame().await;
    // The client goes away.
    drop(body);
    drop(client);
    let released = wait_no_lock(&sync, Duration::from_secs(60)).await;
    stop.store(true, Ordering::SeqCst);
    assert!(
        released,
        "the lock is still held 60 s after the client left (drain limit: 10 s)"
    );
}
