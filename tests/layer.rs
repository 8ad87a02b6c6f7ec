//! `DistLockLayer` through a real HTTP server and client on loopback, on
//! `MemorySync`, on `RedisSync` over three spawned nodes, and (feature
//! `cluster`) on a three-master Redis Cluster.

mod support;

use std::any::Any;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::routing::get;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use support::counting::Counting;
use support::http::{HttpClient, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Barrier, mpsc};
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tower_dsync::layer::{
    DistLockLayer, DistLockLayerBuilder, HeaderKey, HeldLock, MissingKey, OnLost, ReleaseOn,
};
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, MemorySync, RedisSync};

/// A backend under test, with what must live as long as it.
struct Backend<D> {
    sync: Counting<D>,
    _guard: Box<dyn Any + Send>,
    nodes: Option<Arc<std::sync::Mutex<support::RedisNodes>>>,
}

fn memory() -> Backend<MemorySync> {
    Backend {
        sync: Counting::new(MemorySync::new()),
        _guard: Box::new(()),
        nodes: None,
    }
}

fn redis() -> Backend<RedisSync> {
    let nodes = support::RedisNodes::start(3);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let nodes = Arc::new(std::sync::Mutex::new(nodes));
    Backend {
        sync: Counting::new(sync),
        _guard: Box::new(nodes.clone()),
        nodes: Some(nodes),
    }
}

/// `RedisSync` on a three-master Redis Cluster.
#[cfg(feature = "cluster")]
fn cluster() -> Backend<RedisSync> {
    let cluster = support::cluster::RedisCluster::start(3, 0);
    let sync = RedisSync::cluster(cluster.seeds()).unwrap();
    Backend {
        sync: Counting::new(sync),
        _guard: Box::new(cluster),
        nodes: None,
    }
}

const KEY: &str = "x-resource";

fn layer<D: DistSync>(backend: &Backend<D>) -> DistLockLayerBuilder<Counting<D>, HeaderKey> {
    DistLockLayer::builder(backend.sync.clone(), HeaderKey::new(KEY))
        .namespace("test")
        .wait(Duration::from_secs(30))
}

/// Sends `GET path` with the key over a raw connection, which the test can
/// drop or read to the end.
async fn raw_get(server: &Server, path: &str, key: &str) -> tokio::net::TcpStream {
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n{KEY}: {key}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    socket
}

/// A response body that streams what the test sends on the channel.
fn channel_body(rx: mpsc::UnboundedReceiver<Bytes>) -> Body {
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    }))
}

fn held(request: &Request) -> HeldLock {
    request
        .extensions()
        .get::<HeldLock>()
        .cloned()
        .expect("the layer put a HeldLock in the request")
}

/// 20 concurrent requests with one key are served one at a time, and all
/// succeed within the wait budget.
async fn one_key_is_served_one_at_a_time<D: DistSync>(backend: Backend<D>) {
    let inside = Arc::new(AtomicUsize::new(0));
    let max_inside = Arc::new(AtomicUsize::new(0));
    let (i, m) = (inside.clone(), max_inside.clone());
    let app = Router::new()
        .route(
            "/work",
            get(move || async move {
                let now = i.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                for _ in 0..20 {
                    tokio::task::yield_now().await;
                }
                i.fetch_sub(1, Ordering::SeqCst);
                "done"
            }),
        )
        .layer(layer(&backend).build().unwrap());
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let mut requests = Vec::new();
    for _ in 0..20 {
        let (client, url) = (client.clone(), server.url("/work"));
        requests.push(tokio::spawn(async move {
            client.get(&url, &[(KEY, "order-1")]).await
        }));
    }
    for r in requests {
        let (response, body) = r.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{body}");
    }
    assert_eq!(
        max_inside.load(Ordering::SeqCst),
        1,
        "two requests overlapped"
    );
    assert_eq!(backend.sync.counts.locks(), 20);
}

/// Requests with different keys run at the same time: each handler waits on
/// a barrier that only opens when both are inside.
async fn different_keys_overlap<D: DistSync>(backend: Backend<D>) {
    let barrier = Arc::new(Barrier::new(2));
    let app = Router::new()
        .route(
            "/meet",
            get(move || async move {
                barrier.wait().await;
                "met"
            }),
        )
        .layer(layer(&backend).build().unwrap());
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let url = server.url("/meet");
    let (a, b) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(
            client.get(&url, &[(KEY, "a")]),
            client.get(&url, &[(KEY, "b")])
        )
    })
    .await
    .expect("different keys must not wait for each other");
    assert_eq!(a.0.status(), StatusCode::OK);
    assert_eq!(b.0.status(), StatusCode::OK);
}

/// A handler that signals when it is inside and then waits to be let go.
fn blocking_app<D: DistSync>(
    layer: DistLockLayer<Counting<D>, HeaderKey>,
) -> (
    Router,
    mpsc::UnboundedReceiver<HeldLock>,
    mpsc::UnboundedSender<()>,
) {
    let (entered_tx, entered_rx) = mpsc::unbounded_channel();
    let (go_tx, go_rx) = mpsc::unbounded_channel::<()>();
    let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
    let app = Router::new()
        .route(
            "/block",
            get(move |request: Request| async move {
                entered_tx.send(held(&request)).unwrap();
                go_rx.lock().await.recv().await;
                "released"
            }),
        )
        .route("/quick", get(|| async { "quick" }))
        .layer(layer);
    (app, entered_rx, go_tx)
}

/// Fail fast: a second request for a busy key gets 409 with `Retry-After`.
async fn busy_key_fails_fast_with_409<D: DistSync>(backend: Backend<D>) {
    let (app, mut entered, go) =
        blocking_app(layer(&backend).wait(Duration::ZERO).build().unwrap());
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let url = server.url("/block");
    let first = {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move { client.get(&url, &[(KEY, "k")]).await })
    };
    entered.recv().await.unwrap();
    let (response, body) = client.get(&server.url("/quick"), &[(KEY, "k")]).await;
    assert_eq!(response.status(), StatusCode::CONFLICT, "{body}");
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=8).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; charset=utf-8"
    );
    // Another key is not affected.
    let (other, _) = client.get(&server.url("/quick"), &[(KEY, "other")]).await;
    assert_eq!(other.status(), StatusCode::OK);
    go.send(()).unwrap();
    assert_eq!(first.await.unwrap().0.status(), StatusCode::OK);
}

/// A streaming response holds the lock until its last chunk is sent.
async fn streaming_response_holds_until_the_end<D: DistSync>(backend: Backend<D>) {
    let (held_tx, mut held_rx) = mpsc::unbounded_channel::<HeldLock>();
    let (chunks_tx, chunks_rx) = mpsc::unbounded_channel::<Bytes>();
    let chunks_rx = Arc::new(std::sync::Mutex::new(Some(chunks_rx)));
    let app = Router::new()
        .route(
            "/stream",
            get(move |request: Request| async move {
                held_tx.send(held(&request)).unwrap();
                let rx = chunks_rx.lock().unwrap().take().expect("one stream");
                channel_body(rx)
            }),
        )
        .route("/quick", get(|| async { "quick" }))
        .layer(layer(&backend).build().unwrap());
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let request = http::Request::get(server.url("/stream"))
        .header(KEY, "s")
        .body(Default::default())
        .unwrap();
    let response = client.send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    chunks_tx.send(Bytes::from_static(b"first")).unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first");
    let lock = held_rx.recv().await.unwrap();
    assert!(!lock.is_released(), "head sent, body open: still held");
    assert_eq!(
        backend.sync.counts.unlocks(),
        0,
        "no release before the end"
    );
    // And in the backend.
    let probe_options = DistMutexOptions::default().with_tries(1);
    let mut probe = backend
        .sync
        .inner
        .new_mutex("test:s", probe_options)
        .unwrap();
    assert!(matches!(
        probe.lock().await,
        Err(tower_dsync::Error::Held { .. })
    ));
    chunks_tx.send(Bytes::from_static(b"last")).unwrap();
    drop(chunks_tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "last");
    tokio::time::timeout(Duration::from_secs(20), lock.lost())
        .await
        .expect("released after the last chunk");
    // A waiting request gets in.
    let (after, _) = client.get(&server.url("/quick"), &[(KEY, "s")]).await;
    assert_eq!(after.status(), StatusCode::OK);
}

/// A client that disconnects mid-handler frees the lock at once: the next
/// request does not wait for the 60 s expiry.
async fn client_disconnect_frees_the_lock<D: DistSync>(backend: Backend<D>) {
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(60));
    let (app, mut entered, _go) = blocking_app(
        layer(&backend)
            .mutex_options(options)
            .wait(Duration::from_secs(20))
            .build()
            .unwrap(),
    );
    let server = Server::start(app).await;
    let socket = raw_get(&server, "/block", "gone").await;
    let lock = entered.recv().await.unwrap();
    drop(socket);
    // The handler is dropped with the connection, and the lock released.
    tokio::time::timeout(Duration::from_secs(20), lock.lost())
        .await
        .expect("released after the client left");
    assert!(!lock.is_lost(), "released, not lost");
    let client = HttpClient::default();
    let start = Instant::now();
    let (response, _) = client.get(&server.url("/quick"), &[(KEY, "gone")]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(start.elapsed() < Duration::from_secs(20));
}

/// A panicking handler frees the lock.
async fn panicking_handler_frees_the_lock<D: DistSync>(backend: Backend<D>) {
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(60));
    let app = Router::new()
        .route(
            "/panic",
            get(|| async {
                if true {
                    panic!("handler failure (expected by the test)");
                }
                "unreachable"
            }),
        )
        .route("/quick", get(|| async { "quick" }))
        .layer(
            layer(&backend)
                .mutex_options(options)
                .wait(Duration::from_secs(20))
                .build()
                .unwrap(),
        );
    let server = Server::start(app).await;
    let mut socket = raw_get(&server, "/panic", "boom").await;
    let mut sink = Vec::new();
    let _ = socket.read_to_end(&mut sink).await; // the connection dies
    let client = HttpClient::default();
    let (response, _) = client.get(&server.url("/quick"), &[(KEY, "boom")]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(backend.sync.counts.locks(), 2);
}

/// A handler that runs longer than three expiry periods keeps the lock:
/// extensions are observed and no other request gets in meanwhile. A short
/// handler causes no extension at all.
async fn long_handler_keeps_the_lock<D: DistSync>(backend: Backend<D>) {
    let expiry = Duration::from_millis(600);
    let options = DistMutexOptions::default()
        .with_expiry(expiry)
        .with_timeout_factor(0.3);
    let (app, mut entered, go) = blocking_app(
        layer(&backend)
            .mutex_options(options)
            .wait(Duration::ZERO)
            .build()
            .unwrap(),
    );
    let server = Server::start(app).await;
    let client = HttpClient::default();

    let (quick, _) = client.get(&server.url("/quick"), &[(KEY, "short")]).await;
    assert_eq!(quick.status(), StatusCode::OK);
    assert_eq!(
        backend.sync.counts.extends(),
        0,
        "a short request extends nothing"
    );

    let first = {
        let (client, url) = (client.clone(), server.url("/block"));
        tokio::spawn(async move { client.get(&url, &[(KEY, "long")]).await })
    };
    let lock = entered.recv().await.unwrap();
    let start = Instant::now();
    let mut untils = vec![lock.until().unwrap()];
    let probe_options = DistMutexOptions::default().with_tries(1);
    while start.elapsed() < expiry * 3 || untils.len() < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no extension seen: {untils:?}"
        );
        let (busy, _) = client.get(&server.url("/quick"), &[(KEY, "long")]).await;
        assert_eq!(busy.status(), StatusCode::CONFLICT, "someone else got in");
        // Not only the local queue: the backend still has the lock.
        let mut probe = backend
            .sync
            .inner
            .new_mutex("test:long", probe_options.clone())
            .unwrap();
        assert!(
            matches!(probe.lock().await, Err(tower_dsync::Error::Held { .. })),
            "the lock expired in the backend"
        );
        let until = lock.until().unwrap();
        if until != *untils.last().unwrap() {
            untils.push(until);
        }
        assert!(!lock.is_lost());
        tokio::time::sleep(expiry / 10).await;
    }
    assert!(backend.sync.counts.extends() >= 3);
    go.send(()).unwrap();
    assert_eq!(first.await.unwrap().0.status(), StatusCode::OK);
}

/// A lock lost behind the handler's back (another owner with its value
/// unlocked it) is seen by the handler; with `OnLost::Abort` the client gets
/// 503.
async fn lost_lock_is_reported_or_aborts<D: DistSync>(backend: Backend<D>) {
    let expiry = Duration::from_millis(600);
    let options = DistMutexOptions::default()
        .with_expiry(expiry)
        .with_timeout_factor(0.3);
    for abort in [false, true] {
        let lost_mode = if abort { OnLost::Abort } else { OnLost::Notify };
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<bool>();
        let (entered_tx, mut entered_rx) = mpsc::unbounded_channel::<HeldLock>();
        let app = Router::new()
            .route(
                "/watch",
                get(move |request: Request| async move {
                    let lock = held(&request);
                    entered_tx.send(lock.clone()).unwrap();
                    lock.lost().await;
                    seen_tx.send(lock.is_lost()).unwrap();
                    "saw the loss"
                }),
            )
            .layer(
                layer(&backend)
                    .mutex_options(options.clone())
                    .on_lost(lost_mode)
                    .build()
                    .unwrap(),
            );
        let server = Server::start(app).await;
        let client = HttpClient::default();
        let request = {
            let (client, url) = (client.clone(), server.url("/watch"));
            tokio::spawn(async move { client.get(&url, &[(KEY, "lose")]).await })
        };
        let lock = entered_rx.recv().await.unwrap();
        // Another owner, holding the value, releases the lock.
        let mut thief = backend
            .sync
            .inner
            .new_mutex(lock.name(), options.clone().with_value(lock.value()))
            .unwrap();
        thief.unlock().await.unwrap();
        let (response, body) = request.await.unwrap();
        if abort {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{body}");
            assert!(seen_rx.try_recv().is_err(), "the handler was dropped");
        } else {
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(body, "saw the loss");
            assert!(seen_rx.recv().await.unwrap(), "HeldLock::is_lost");
        }
        assert!(lock.is_lost());
    }
}

/// Empty, oversized, control-character and non-UTF-8 keys get 400 and take
/// no lock.
async fn bad_keys_get_400<D: DistSync>(backend: Backend<D>) {
    let service_layer = layer(&backend).build().unwrap();
    let app = Router::new()
        .route("/quick", get(|| async { "quick" }))
        .layer(service_layer.clone());
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let long = "k".repeat(5000);
    for key in ["", long.as_str(), "a\tb"] {
        let (response, body) = client.get(&server.url("/quick"), &[(KEY, key)]).await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{key:?}: {body}"
        );
        assert!(body.contains("lock key"), "{body}");
    }
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(
            b"GET /quick HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-resource: caf\xe9\r\n\r\n",
        )
        .await
        .unwrap();
    let mut reply = Vec::new();
    socket.read_to_end(&mut reply).await.unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert_eq!(backend.sync.counts.locks(), 0, "no lock was taken");
    assert_eq!(service_layer.stats().local_keys(), 0);
}

/// A request without a key passes through unlocked, or is rejected.
async fn missing_key_passes_or_is_rejected<D: DistSync>(backend: Backend<D>) {
    let handler = |request: Request| async move {
        if request.extensions().get::<HeldLock>().is_some() {
            "locked"
        } else {
            "unlocked"
        }
    };
    let app = Router::new()
        .route("/h", get(handler))
        .layer(layer(&backend).build().unwrap());
    let strict = Router::new().route("/h", get(handler)).layer(
        layer(&backend)
            .on_missing_key(MissingKey::Reject)
            .build()
            .unwrap(),
    );
    let (server, strict) = (Server::start(app).await, Server::start(strict).await);
    let client = HttpClient::default();
    let (response, body) = client.get(&server.url("/h"), &[]).await;
    assert_eq!(
        (response.status(), body.as_str()),
        (StatusCode::OK, "unlocked")
    );
    let (response, body) = client.get(&server.url("/h"), &[(KEY, "x")]).await;
    assert_eq!(
        (response.status(), body.as_str()),
        (StatusCode::OK, "locked")
    );
    let (response, _) = client.get(&strict.url("/h"), &[]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

/// gRPC calls get trailers-only rejections with gRPC status codes.
async fn grpc_rejections_are_trailers_only<D: DistSync>(backend: Backend<D>) {
    let (app, mut entered, go) =
        blocking_app(layer(&backend).wait(Duration::ZERO).build().unwrap());
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let first = {
        let (client, url) = (client.clone(), server.url("/block"));
        tokio::spawn(async move { client.get(&url, &[(KEY, "g")]).await })
    };
    entered.recv().await.unwrap();
    let grpc = [("content-type", "application/grpc")];
    let (busy, body) = client
        .get(&server.url("/quick"), &[grpc[0], (KEY, "g")])
        .await;
    assert_eq!(busy.status(), StatusCode::OK);
    assert_eq!(busy.headers()["grpc-status"], "10");
    assert!(busy.headers().contains_key("grpc-message"));
    assert_eq!(busy.headers()["content-type"], "application/grpc");
    assert!(body.is_empty());
    let (bad, _) = client
        .get(&server.url("/quick"), &[grpc[0], (KEY, "")])
        .await;
    assert_eq!(bad.headers()["grpc-status"], "3");
    go.send(()).unwrap();
    first.await.unwrap();
}

/// With `ReleaseOn::Head`, the key is free while the body still streams.
async fn release_on_head<D: DistSync>(backend: Backend<D>) {
    let (chunks_tx, chunks_rx) = mpsc::unbounded_channel::<Bytes>();
    let chunks_rx = Arc::new(std::sync::Mutex::new(Some(chunks_rx)));
    let app = Router::new()
        .route(
            "/stream",
            get(move || async move {
                let rx = chunks_rx.lock().unwrap().take().expect("one stream");
                channel_body(rx)
            }),
        )
        .route("/quick", get(|| async { "quick" }))
        .layer(layer(&backend).release_on(ReleaseOn::Head).build().unwrap());
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let request = http::Request::get(server.url("/stream"))
        .header(KEY, "h")
        .body(Default::default())
        .unwrap();
    let response = client.send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    // The body is still open, yet a waiting request gets the key.
    let (after, _) = client.get(&server.url("/quick"), &[(KEY, "h")]).await;
    assert_eq!(after.status(), StatusCode::OK);
    drop(chunks_tx);
    response.into_body().collect().await.unwrap();
}

/// Fail fast never rejects a request whose predecessor has answered: its
/// release may still be in flight, and is waited for.
async fn sequential_requests_are_never_busy<D: DistSync>(backend: Backend<D>) {
    let app = Router::new()
        .route("/quick", get(|| async { "quick" }))
        .layer(layer(&backend).wait(Duration::ZERO).build().unwrap());
    let server = Server::start(app).await;
    let client = HttpClient::default();
    for _ in 0..200 {
        let (response, body) = client.get(&server.url("/quick"), &[(KEY, "seq")]).await;
        assert_eq!(response.status(), StatusCode::OK, "{body}");
    }
}

macro_rules! layer_tests {
    ($backend:path; $($case:ident)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                super::$case($backend()).await;
            }
        )*
    };
}

macro_rules! all_layer_tests {
    ($backend:path) => {
        layer_tests!($backend;
            one_key_is_served_one_at_a_time different_keys_overlap busy_key_fails_fast_with_409
            streaming_response_holds_until_the_end client_disconnect_frees_the_lock
            panicking_handler_frees_the_lock long_handler_keeps_the_lock
            lost_lock_is_reported_or_aborts bad_keys_get_400 missing_key_passes_or_is_rejected
            grpc_rejections_are_trailers_only release_on_head sequential_requests_are_never_busy);
    };
}

mod on_memory {
    all_layer_tests!(crate::memory);
}

mod on_redis {
    all_layer_tests!(crate::redis);
}

#[cfg(feature = "cluster")]
mod on_cluster {
    all_layer_tests!(crate::cluster);
}

/// Redis down: 503 within the configured timeouts; when Redis is back,
/// requests succeed again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_gives_503_then_recovers() {
    let backend = redis();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(2))
        .with_timeout_factor(0.1);
    let app = Router::new()
        .route("/quick", get(|| async { "quick" }))
        .layer(
            layer(&backend)
                .mutex_options(options)
                .wait(Duration::from_secs(60))
                .build()
                .unwrap(),
        );
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let (ok, _) = client.get(&server.url("/quick"), &[(KEY, "r")]).await;
    assert_eq!(ok.status(), StatusCode::OK);
    let nodes = backend.nodes.clone().unwrap();
    for server in &mut nodes.lock().unwrap().servers {
        server.kill();
    }
    // A dead backend answers 503 at once, not after the 60 s wait budget.
    let (down, body) = tokio::time::timeout(
        Duration::from_secs(20),
        client.get(&server.url("/quick"), &[(KEY, "r")]),
    )
    .await
    .expect("503 without waiting for the wait budget");
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(down.headers().contains_key("retry-after"));
    for server in &mut nodes.lock().unwrap().servers {
        server.restart();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (response, _) = client.get(&server.url("/quick"), &[(KEY, "r")]).await;
        if response.status() == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery: {}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After 100,000 requests with distinct keys the per-key registry is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_is_empty_after_100k_distinct_keys() {
    let sync = MemorySync::new();
    let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
        .build()
        .unwrap();
    let service = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                Bytes::from_static(b"ok"),
            )))
        });
    for i in 0..100_000u32 {
        let request = http::Request::get("/")
            .header(KEY, i.to_string())
            .body(())
            .unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while layer.stats().local_keys() > 0 || sync.names_in_use() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} keys left",
            layer.stats().local_keys()
        );
        tokio::task::yield_now().await;
    }
}

/// The clone that was driven ready is the one that is called.
#[tokio::test]
async fn poll_ready_rules_are_followed() {
    #[derive(Default)]
    struct ReadyOnce {
        ready: bool,
    }
    impl Clone for ReadyOnce {
        // A clone has not been driven ready.
        fn clone(&self) -> Self {
            ReadyOnce { ready: false }
        }
    }
    impl Service<http::Request<()>> for ReadyOnce {
        type Response = http::Response<http_body_util::Empty<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            self.ready = true;
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            assert!(self.ready, "called without poll_ready");
            self.ready = false;
            std::future::ready(Ok(http::Response::new(Default::default())))
        }
    }
    let sync = MemorySync::new();
    let mut service = tower::ServiceBuilder::new()
        .layer(
            DistLockLayer::builder(sync, HeaderKey::new(KEY))
                .build()
                .unwrap(),
        )
        .service(ReadyOnce::default());
    for i in 0..3 {
        let request = http::Request::get("/")
            .header(KEY, format!("{i}"))
            .body(())
            .unwrap();
        let response = service.ready().await.unwrap().call(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}

/// The layer works on the dynamic backend handle too.
#[tokio::test]
async fn any_sync_backend() {
    let sync = tower_dsync::AnySync::new(MemorySync::new());
    let service = tower::ServiceBuilder::new()
        .layer(
            DistLockLayer::builder(sync, HeaderKey::new(KEY))
                .build()
                .unwrap(),
        )
        .service_fn(|request: http::Request<()>| async move {
            let name = request
                .extensions()
                .get::<HeldLock>()
                .unwrap()
                .name()
                .to_owned();
            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from(
                name,
            ))))
        });
    let request = http::Request::get("/").header(KEY, "a:b").body(()).unwrap();
    let response = service.oneshot(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "lock:a%3Ab");
}

/// A majority of nodes stopped while a handler runs: the extension fails and
/// the handler sees the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_majority_stopped_loses_the_lock() {
    let backend = redis();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_millis(600))
        .with_timeout_factor(0.3);
    let (entered_tx, mut entered_rx) = mpsc::unbounded_channel::<HeldLock>();
    let app = Router::new()
        .route(
            "/watch",
            get(move |request: Request| async move {
                let lock = held(&request);
                entered_tx.send(lock.clone()).unwrap();
                lock.lost().await;
                if lock.is_lost() { "lost" } else { "released" }
            }),
        )
        .layer(layer(&backend).mutex_options(options).build().unwrap());
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let request = {
        let (client, url) = (client.clone(), server.url("/watch"));
        tokio::spawn(async move { client.get(&url, &[(KEY, "majority")]).await })
    };
    let lock = entered_rx.recv().await.unwrap();
    let nodes = backend.nodes.clone().unwrap();
    nodes.lock().unwrap().servers[0].pause();
    nodes.lock().unwrap().servers[1].pause();
    let (response, body) = request.await.unwrap();
    assert_eq!((response.status(), body.as_str()), (StatusCode::OK, "lost"));
    assert!(lock.is_lost());
    nodes.lock().unwrap().servers[0].resume();
    nodes.lock().unwrap().servers[1].resume();
}

/// A custom rejection mapping replaces the default responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_rejection_mapping() {
    let backend = memory();
    let app = Router::new()
        .route("/quick", get(|| async { "quick" }))
        .layer(
            layer(&backend)
                .rejection_response(|rejection| {
                    let mut response = http::Response::new(Bytes::from(format!(
                        "{{\"error\":{:?}}}",
                        rejection.message()
                    )));
                    *response.status_mut() = rejection.http_status();
                    response
                        .headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    response
                })
                .build()
                .unwrap(),
        );
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let (response, body) = client.get(&server.url("/quick"), &[(KEY, "")]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(body, r#"{"error":"the lock key is empty"}"#);
}

/// Every spelling of a path segment is one resource: `/jobs/a` and
/// `/jobs/%61` take the same lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_segments_are_one_resource() {
    let (entered_tx, mut entered) = mpsc::unbounded_channel::<()>();
    let (go_tx, go_rx) = mpsc::unbounded_channel::<()>();
    let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
    let app = Router::new()
        .route(
            "/jobs/{id}",
            get(move || async move {
                entered_tx.send(()).unwrap();
                go_rx.lock().await.recv().await;
                "done"
            }),
        )
        .route_layer(
            DistLockLayer::builder(MemorySync::new(), tower_dsync::layer::PathSegment::new(1))
                .wait(Duration::ZERO)
                .build()
                .unwrap(),
        );
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let first = {
        let (client, url) = (client.clone(), server.url("/jobs/a"));
        tokio::spawn(async move { client.get(&url, &[]).await })
    };
    entered.recv().await.unwrap();
    let (second, _) = client.get(&server.url("/jobs/%61"), &[]).await;
    assert_eq!(second.status(), StatusCode::CONFLICT);
    let (bad, _) = client.get(&server.url("/jobs/%ff"), &[]).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    go_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap().0.status(), StatusCode::OK);
}

/// With `OnLost::Abort`, a streaming body whose lock is lost ends with an
/// error (or `UNAVAILABLE` trailers for gRPC), and nothing follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_stream_ends_for_good() {
    for grpc in [false, true] {
        let sync = MemorySync::new();
        let options = DistMutexOptions::default()
            .with_expiry(Duration::from_millis(600))
            .with_timeout_factor(0.3);
        let (chunks_tx, chunks_rx) = mpsc::unbounded_channel::<Bytes>();
        let chunks_rx = Arc::new(std::sync::Mutex::new(Some(chunks_rx)));
        let (held_tx, mut held_rx) = mpsc::unbounded_channel::<HeldLock>();
        let service = tower::ServiceBuilder::new()
            .layer(
                DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
                    .mutex_options(options.clone())
                    .on_lost(OnLost::Abort)
                    .build()
                    .unwrap(),
            )
            .service_fn(move |request: http::Request<()>| {
                held_tx
                    .send(request.extensions().get::<HeldLock>().cloned().unwrap())
                    .unwrap();
                let rx = chunks_rx.lock().unwrap().take().expect("one stream");
                async move {
                    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                        rx.recv()
                            .await
                            .map(|chunk| (Ok::<_, Infallible>(http_body::Frame::data(chunk)), rx))
                    });
                    Ok::<_, Infallible>(http::Response::new(http_body_util::StreamBody::new(
                        stream,
                    )))
                }
            });
        let mut request = http::Request::get("/").header(KEY, "abort");
        if grpc {
            request = request.header("content-type", "application/grpc");
        }
        let response = service.oneshot(request.body(()).unwrap()).await.unwrap();
        let lock = held_rx.recv().await.unwrap();
        let mut body = Box::pin(response.into_body());
        chunks_tx.send(Bytes::from_static(b"before")).unwrap();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        // Another owner with the value releases the lock: the next
        // extension fails.
        let mut thief = sync
            .new_mutex(lock.name(), options.clone().with_value(lock.value()))
            .unwrap();
        thief.unlock().await.unwrap();
        let end = body.frame().await.expect("a last frame");
        if grpc {
            let trailers = end.unwrap().into_trailers().expect("trailers");
            assert_eq!(trailers["grpc-status"], "14");
        } else {
            assert!(end.is_err(), "the body ends with an error");
        }
        chunks_tx.send(Bytes::from_static(b"after")).unwrap();
        assert!(body.frame().await.is_none(), "nothing after the abort");
        assert!(http_body::Body::is_end_stream(&*body));
    }
}

/// `max_hold` bounds how long a request keeps its lock: past it the lock
/// is no longer extended and the handler is told it is lost; the key then
/// frees up when the lock expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_hold_bounds_a_request() {
    let sync = MemorySync::new();
    let options = DistMutexOptions::default().with_expiry(Duration::from_millis(600));
    let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
        .mutex_options(options)
        .max_hold(Duration::from_millis(300))
        .build()
        .unwrap();
    let service = tower::ServiceBuilder::new().layer(layer).service_fn(
        |request: http::Request<()>| async move {
            let lock = request.extensions().get::<HeldLock>().cloned().unwrap();
            lock.lost().await;
            let text = if lock.is_lost() { "lost" } else { "released" };
            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from(
                text,
            ))))
        },
    );
    let request = http::Request::get("/")
        .header(KEY, "hold")
        .body(())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), service.oneshot(request))
        .await
        .expect("the hold was cut")
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "lost");
}

/// An uncontended request costs each node exactly one acquire and one
/// release (two `EVALSHA`), nothing else: no extension, no subscription,
/// no extra round trip, on one node and on three (`INFO commandstats`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_requests_cost_one_acquire_and_one_release_per_node() {
    for n in [1, 3] {
        let nodes = support::RedisNodes::start(n);
        let sync = RedisSync::new(nodes.urls()).unwrap();
        let app = Router::new()
            .route("/quick", get(|| async { "quick" }))
            .layer(
                // A long per-node timeout (3 s): no attempt times out on a
                // loaded machine, which would add a cleanup round.
                DistLockLayer::builder(sync, HeaderKey::new(KEY))
                    .mutex_options(DistMutexOptions::default().with_expiry(Duration::from_secs(60)))
                    .build()
                    .unwrap(),
            );
        let server = Server::start(app).await;
        let client = HttpClient::default();
        // Connections made, scripts loaded, the new deployment settled, and
        // the nodes' fencing counters in agreement: each started at its own
        // clock, and a quorum that disagrees writes its token back once.
        let mut warm = 0;
        loop {
            let (response, _) = client.get(&server.url("/quick"), &[(KEY, "warm")]).await;
            assert_eq!(response.status(), StatusCode::OK);
            warm += 1;
            // Released everywhere (its DEL ran on every node).
            support::wait_until(Duration::from_secs(10), "warm-up done", || {
                nodes.servers.iter().all(|s| s.calls("del") == warm)
            })
            .await;
            let fences: std::collections::HashSet<u64> =
                nodes.servers.iter().map(node_fence).collect();
            if fences.len() == 1 {
                break;
            }
            assert!(warm < 100, "the counters never agreed: {fences:?}");
        }
        for server in &nodes.servers {
            server.reset_stats();
        }
        let requests = 100;
        for i in 0..requests {
            let key = format!("order-{}", i % 7);
            let (response, body) = client.get(&server.url("/quick"), &[(KEY, &key)]).await;
            assert_eq!(response.status(), StatusCode::OK, "{body}");
        }
        // The slowest node's commands may finish after the response.
        support::wait_until(
            Duration::from_secs(10),
            "every node saw every request",
            || {
                nodes
                    .servers
                    .iter()
                    .all(|s| s.calls("evalsha") == 2 * requests)
            },
        )
        .await;
        // The restart marker is read under Redlock only.
        let own: &[&str] = if n == 1 {
            &["del", "evalsha", "exists", "get", "hincrby", "set"]
        } else {
            &["del", "evalsha", "exists", "get", "hget", "hincrby", "set"]
        };
        for server in &nodes.servers {
            let calls = server.command_calls();
            assert_eq!(
                calls.keys().map(String::as_str).collect::<Vec<_>>(),
                own,
                "only the scripts' own commands, on {n} node(s): {calls:?}"
            );
            assert_eq!(calls["evalsha"], 2 * requests);
        }
    }
}

/// A node's fencing counter (one per node, in its bookkeeping hash).
fn node_fence(server: &support::RedisServer) -> u64 {
    redis::cmd("HGET")
        .arg("dsync:\u{1f}node")
        .arg("fence")
        .query(&mut server.connection())
        .expect("HGET")
}

/// A no-op handler's service behind the layer, on `sync`.
fn quick_service<D: DistSync>(
    layer: DistLockLayer<D, HeaderKey>,
) -> impl tower::Service<
    http::Request<()>,
    Response = http::Response<tower_dsync::layer::LockBody<http_body_util::Full<Bytes>>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::ServiceBuilder::new()
        .layer(layer)
        .service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                Bytes::from_static(b"ok"),
            )))
        })
}

fn keyed(key: &str) -> http::Request<()> {
    http::Request::get("/").header(KEY, key).body(()).unwrap()
}

/// A short request on a backend that answers at once: no extend loop task is
/// ever spawned, no extension is made, and the lock is released inline: it
/// is free the moment the body has ended, before any task runs. Time that
/// passes afterwards starts no extend loop either.
#[tokio::test(start_paused = true)]
async fn short_request_spawns_no_task_and_releases_inline() {
    let sync = Counting::new(MemorySync::new());
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(3));
    let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
        .mutex_options(options)
        .build()
        .unwrap();
    let service = quick_service(layer.clone());
    let metrics = tokio::runtime::Handle::current().metrics();
    for i in 0..10 {
        let response = service
            .clone()
            .oneshot(keyed(&format!("k{i}")))
            .await
            .unwrap();
        let mut body = std::pin::pin!(response.into_body());
        assert!(body.frame().await.unwrap().unwrap().is_data());
        assert!(body.frame().await.is_none());
        // No await since the last frame: released inline.
        assert_eq!(sync.inner.names_in_use(), 0, "released with the body's end");
        assert_eq!(layer.stats().local_keys(), 0);
        assert_eq!(
            metrics.num_alive_tasks(),
            0,
            "no extend loop, no release task"
        );
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(metrics.num_alive_tasks(), 0, "no extend loop started later");
    assert_eq!(sync.counts.extends(), 0);
    assert_eq!(sync.counts.locks(), 10);
    assert_eq!(sync.counts.unlocks(), 10);
}

/// A response whose body is not polled for a long time (a slow client, a
/// long stream) is kept all the same: the extend loop starts when the first
/// extension falls due, driven by the runtime's timer, not by polls, and
/// extends every interval; the key stays taken. Dropping the body then
/// releases the lock through the extend loop.
#[tokio::test(start_paused = true)]
async fn response_whose_body_is_not_polled_is_kept() {
    let sync = Counting::new(MemorySync::new());
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(3));
    let (held_tx, mut held_rx) = mpsc::unbounded_channel::<HeldLock>();
    let service = tower::ServiceBuilder::new()
        .layer(
            DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
                .mutex_options(options.clone())
                .build()
                .unwrap(),
        )
        .service_fn(move |request: http::Request<()>| {
            held_tx
                .send(request.extensions().get::<HeldLock>().cloned().unwrap())
                .unwrap();
            async {
                let never =
                    futures_util::stream::pending::<Result<http_body::Frame<Bytes>, Infallible>>();
                Ok::<_, Infallible>(http::Response::new(http_body_util::StreamBody::new(never)))
            }
        });
    let response = service.oneshot(keyed("slow")).await.unwrap();
    let lock = held_rx.recv().await.unwrap();
    let first_until = lock.until().unwrap();
    // Three intervals pass; nothing polls the response's body.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        sync.counts.extends() >= 3,
        "extended: {}",
        sync.counts.extends()
    );
    assert!(lock.until().unwrap() > first_until + Duration::from_secs(2));
    assert!(!lock.is_released());
    let mut probe = sync
        .inner
        .new_mutex(lock.name(), options.clone().with_tries(1))
        .unwrap();
    assert!(
        matches!(probe.lock().await, Err(tower_dsync::Error::Held { .. })),
        "the key is still held in the backend"
    );
    drop(response);
    lock.lost().await;
    assert!(!lock.is_lost(), "released, not lost");
    assert_eq!(sync.inner.names_in_use(), 0);
}

/// A handler that runs for several intervals, without its future being
/// polled meanwhile, keeps its lock; one that ends before the first
/// interval causes no extension.
#[tokio::test(start_paused = true)]
async fn handler_that_is_not_polled_is_kept() {
    let sync = Counting::new(MemorySync::new());
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(3));
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let go_rx = Arc::new(std::sync::Mutex::new(Some(go_rx)));
    let service = tower::ServiceBuilder::new()
        .layer(
            DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
                .mutex_options(options)
                .build()
                .unwrap(),
        )
        .service_fn(move |_: http::Request<()>| {
            let go = go_rx.lock().unwrap().take();
            async move {
                if let Some(go) = go {
                    // Woken only when the test says so.
                    go.await.unwrap();
                }
                Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"done"),
                )))
            }
        });
    let request = tokio::spawn(service.clone().oneshot(keyed("long")));
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        sync.counts.extends() >= 3,
        "extended: {}",
        sync.counts.extends()
    );
    assert!(!request.is_finished());
    go_tx.send(()).unwrap();
    let response = request.await.unwrap().unwrap();
    response.into_body().collect().await.unwrap();
    let extends = sync.counts.extends();
    // A short one: no extension.
    let response = service.oneshot(keyed("short")).await.unwrap();
    response.into_body().collect().await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(sync.counts.extends(), extends);
    assert_eq!(sync.inner.names_in_use(), 0);
}

/// On a backend that cannot answer at once, the lock is acquired through
/// the future and released in a task: the body ends while the unlock still
/// waits, and the key is free once it is done.
#[tokio::test]
async fn release_goes_to_a_task_when_the_backend_cannot_answer_at_once() {
    let remote = support::remote::Remote::gated(MemorySync::new());
    let layer = DistLockLayer::builder(remote.clone(), HeaderKey::new(KEY))
        .build()
        .unwrap();
    let service = quick_service(layer.clone());
    let response = service.oneshot(keyed("remote")).await.unwrap();
    // The unlock cannot go through yet; the body ends all the same.
    response.into_body().collect().await.unwrap();
    assert_eq!(remote.inner.names_in_use(), 1, "the unlock is waiting");
    assert_eq!(
        layer.stats().local_keys(),
        1,
        "the next request waits for the release"
    );
    let unlocked = remote.unlocked.notified();
    remote.unlock_gate.add_permits(1);
    unlocked.await;
    assert_eq!(remote.inner.names_in_use(), 0);
    assert_eq!(layer.stats().local_keys(), 0);
}

/// A backend that panics as it releases at once does not take the response
/// down: the body ends, the handler is told the lock is released, the next
/// request for the key goes on (and gets the lock once it has expired).
#[tokio::test(start_paused = true)]
async fn a_release_that_panics_does_not_break_the_response() {
    let sync = support::remote::PanicOnRelease {
        inner: MemorySync::new(),
    };
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(3));
    let (held_tx, mut held_rx) = mpsc::unbounded_channel::<HeldLock>();
    let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
        .mutex_options(options)
        .build()
        .unwrap();
    let service = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(move |request: http::Request<()>| {
            held_tx
                .send(request.extensions().get::<HeldLock>().cloned().unwrap())
                .unwrap();
            async {
                Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"ok"),
                )))
            }
        });
    let response = service.clone().oneshot(keyed("boom")).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ok");
    let lock = held_rx.recv().await.unwrap();
    assert!(lock.is_released());
    assert_eq!(layer.stats().local_keys(), 0, "the turn passed on");
    // The backend still holds the name until it expires; then the next
    // request gets it.
    let response = service.oneshot(keyed("boom")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(sync.inner.names_in_use(), 1);
}

/// The wait budget alone bounds how long a request waits for a busy key;
/// the mutex options' `tries` only give way to it. With `tries` 1, a
/// request still waits for a holder that lets go within the budget and is
/// served; with `tries` 1000 (far past the budget at the retry delay), a
/// request for a key that stays held is rejected when the budget is spent,
/// at the same instant as with `tries` 1.
#[tokio::test(start_paused = true)]
async fn tries_do_not_change_how_long_a_request_waits() {
    let mut waited = Vec::new();
    for tries in [1, 1000] {
        let sync = MemorySync::new();
        let options = DistMutexOptions::default()
            .with_tries(tries)
            .with_retry_delay(Duration::from_millis(100));
        let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
            .mutex_options(options.clone())
            .wait(Duration::from_secs(2))
            .build()
            .unwrap();
        let service = quick_service(layer);
        let mut holder = sync.new_mutex("lock:k", options.clone()).unwrap();
        holder.lock().await.unwrap();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            holder.unlock().await.unwrap();
        });
        let response = service.clone().oneshot(keyed("k")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "tries {tries}");
        release.await.unwrap();

        let forever = options.clone().with_expiry(Duration::from_secs(3600));
        let mut blocker = sync.new_mutex("lock:busy", forever).unwrap();
        blocker.lock().await.unwrap();
        let started = Instant::now();
        let response = service.clone().oneshot(keyed("busy")).await.unwrap();
        assert_eq!(response.status(), StatusCode::CONFLICT, "tries {tries}");
        waited.push(started.elapsed());
    }
    assert_eq!(waited[0], waited[1], "the same wait whatever the tries");
}

/// Requests for one key are served in the order of `call`, not in the order
/// their futures are first polled: A is called before B, B is polled first,
/// and A still gets the key first once its holder lets go.
#[tokio::test(start_paused = true)]
async fn requests_are_served_in_the_order_of_call() {
    let sync = MemorySync::new();
    let service = tower::ServiceBuilder::new()
        .layer(
            DistLockLayer::builder(sync, HeaderKey::new(KEY))
                .build()
                .unwrap(),
        )
        .service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(String::new()))
        });
    // Polls `future` once, with this task's waker.
    async fn pending<F: std::future::Future + Unpin>(future: &mut F) -> bool {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::pin::Pin::new(&mut *future).poll(cx).is_pending())
        })
        .await
    }
    let holder = service.clone().oneshot(keyed("k")).await.unwrap();
    let mut svc = service.clone();
    let a = svc.ready().await.unwrap().call(keyed("k"));
    let b = svc.ready().await.unwrap().call(keyed("k"));
    let mut b = Box::pin(b);
    assert!(pending(&mut b).await);
    drop(holder);
    let a = a.await.unwrap();
    assert_eq!(a.status(), StatusCode::OK, "A came first");
    assert!(pending(&mut b).await, "A holds the key");
    drop(a);
    assert_eq!(b.await.unwrap().status(), StatusCode::OK);
}

/// A layer over `RedisSync` waits in the backend's own in-process line, one
/// line per request: a request for a key that a direct `lock()` caller of
/// the same `RedisSync` is first in line for waits behind it, without a
/// try at the nodes of its own, and gets the key once that caller is done
/// with it.
#[tokio::test]
async fn a_layer_over_redis_waits_in_the_backends_line() {
    let nodes = support::RedisNodes::start(1);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let counting = Counting::new(sync.clone());
    let layer = DistLockLayer::builder(counting.clone(), HeaderKey::new(KEY))
        .namespace("test")
        .wait(Duration::from_secs(30))
        .build()
        .unwrap();
    let service = quick_service(layer);
    let options = DistMutexOptions::default().with_tries(1_000);
    let mut holder = sync.new_mutex("test:k", options.clone()).unwrap();
    holder.lock().await.unwrap();
    // A direct caller takes its turn in the line and tries the nodes.
    let mut direct = Box::pin(async move {
        let mut mutex = sync.new_mutex("test:k", options).unwrap();
        mutex.lock().await.map(|()| mutex)
    });
    assert!(poll_once(&mut direct).await, "the holder has the key");
    let direct = tokio::spawn(direct);
    // The request lines up behind it: no lock call of its own yet.
    let mut request = Box::pin(service.clone().oneshot(keyed("k")));
    assert!(poll_once(&mut request).await);
    assert_eq!(
        counting.counts.locks(),
        0,
        "the request tried the nodes while a caller before it was in line"
    );
    holder.unlock().await.unwrap();
    let mut direct = direct.await.unwrap().expect("the direct caller's turn");
    assert!(
        poll_once(&mut request).await,
        "the direct caller holds the key"
    );
    direct.unlock().await.unwrap();
    let response = request.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(counting.counts.locks() >= 1);
}

/// `layer` over a handler that reports on `entered` when it starts, then
/// answers once told to through `go`.
fn gated_service<D: DistSync>(
    layer: DistLockLayer<D, HeaderKey>,
) -> Gated<
    impl tower::Service<
        http::Request<()>,
        Response = http::Response<tower_dsync::layer::LockBody<http_body_util::Full<Bytes>>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static,
> {
    let (entered_tx, entered) = mpsc::unbounded_channel();
    let go = Arc::new(tokio::sync::Notify::new());
    let gate = go.clone();
    let service =
        tower::ServiceBuilder::new()
            .layer(layer)
            .service_fn(move |_: http::Request<()>| {
                let (entered_tx, go) = (entered_tx.clone(), gate.clone());
                async move {
                    entered_tx.send(()).unwrap();
                    go.notified().await;
                    Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                }
            });
    Gated {
        service,
        entered,
        go,
    }
}

/// A service whose handler reports when it starts and waits to be told to
/// answer (see [`gated_service`]).
struct Gated<S> {
    service: S,
    entered: mpsc::UnboundedReceiver<()>,
    go: Arc<tokio::sync::Notify>,
}

/// The wall clock in ms since the Unix epoch.
fn epoch_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Returns once the wall clock has moved on, so that waiters that start
/// later start strictly later.
async fn clock_moves_on() {
    let from = epoch_ms();
    while epoch_ms() < from + 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A layer's request that waits in the line of a `RedisSync` behind a
/// direct caller, with another direct caller behind it, does not move its
/// process back in the nodes' wait queue when its own try is refused: the
/// process keeps the place of its earliest waiter, ahead of another
/// process whose waiter started later.
#[tokio::test]
async fn a_layer_request_does_not_move_its_process_back_in_the_nodes_queue() {
    let nodes = support::RedisNodes::start(1);
    let queue = "dsync:test:k\u{1f}queue";
    // This process, another one, and the first holder's.
    let a = RedisSync::new(nodes.urls()).unwrap();
    let b = RedisSync::new(nodes.urls()).unwrap();
    let c = RedisSync::new(nodes.urls()).unwrap();
    let long = Duration::from_secs(30);
    let patient = DistMutexOptions::default()
        .with_expiry(long)
        .with_tries(1_000)
        .with_retry_delay(Duration::from_secs(60));
    let (retry_tx, mut retries) = mpsc::unbounded_channel();
    let layer_options = DistMutexOptions::default()
        .with_expiry(long)
        .with_delay_fn(move |_| {
            let _ = retry_tx.send(());
            Duration::from_secs(60)
        });
    let layer = DistLockLayer::builder(a.clone(), HeaderKey::new(KEY))
        .namespace("test")
        .mutex_options(layer_options)
        .wait(long)
        .build()
        .unwrap();
    let Gated {
        service,
        mut entered,
        go,
    } = gated_service(layer);
    let direct = |sync: &RedisSync| {
        let (sync, options) = (sync.clone(), patient.clone());
        async move {
            let mut mutex = sync.new_mutex("test:k", options).unwrap();
            mutex.lock().await.map(|()| mutex)
        }
    };
    let mut holder = c.new_mutex("test:k", patient.clone()).unwrap();
    holder.lock().await.unwrap();
    // x is first in this process's line, and queues the process.
    let x = tokio::spawn(direct(&a));
    support::wait_until(support::BOUND, "x queued", || {
        nodes.servers[0].zcard(queue) == 1
    })
    .await;
    // The request lines up behind x, and d behind the request.
    let mut request = Box::pin(service.oneshot(keyed("k")));
    assert!(poll_once(&mut request).await);
    let request = tokio::spawn(request);
    let mut d = Box::pin(direct(&a));
    assert!(poll_once(&mut d).await);
    let mut d = tokio::spawn(d);
    clock_moves_on().await;
    // y, of the other process, starts after d.
    let mut y = tokio::spawn(direct(&b));
    support::wait_until(support::BOUND, "y queued", || {
        nodes.servers[0].zcard(queue) == 2
    })
    .await;
    clock_moves_on().await;
    while retries.try_recv().is_ok() {}
    holder.unlock().await.unwrap();
    let mut x = tokio::time::timeout(long, x)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(long, retries.recv())
        .await
        .expect("the request's refused try");
    // Every waiter of this process started before y: it is next.
    x.unlock().await.unwrap();
    tokio::select! {
        _ = entered.recv() => {}
        _ = &mut d => {}
        y_done = &mut y => panic!(
            "the other process's waiter, which started after this process's direct caller, \
             got the key first: {:?}",
            y_done.unwrap().map(|m| m.value().to_owned())
        ),
        () = tokio::time::sleep(long) => panic!("nobody got the key"),
    }
    go.notify_one();
    drop(request);
}

/// A direct `lock()` caller that waits in the line of a `RedisSync` behind
/// a layer's request holding the name keeps its process in the nodes'
/// wait queue meanwhile (the request keeps the turn until its release), so
/// that the release wakes this process before any other process's waiter
/// that started later; and the caller gets the key after the request.
#[tokio::test]
async fn a_direct_caller_behind_a_held_request_keeps_its_process_queued() {
    let nodes = support::RedisNodes::start(1);
    let queue = "dsync:test:k\u{1f}queue";
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
        .namespace("test")
        .wait(Duration::from_secs(30))
        .build()
        .unwrap();
    let Gated {
        service,
        mut entered,
        go,
    } = gated_service(layer);
    let request = tokio::spawn(service.oneshot(keyed("k")));
    entered.recv().await.unwrap();
    assert_eq!(nodes.servers[0].zcard(queue), 0, "nobody waits yet");
    let direct = tokio::spawn(async move {
        let options = DistMutexOptions::default().with_tries(1_000);
        let mut mutex = sync.new_mutex("test:k", options).unwrap();
        mutex.lock().await.map(|()| mutex)
    });
    support::wait_until(support::BOUND, "the direct caller's process queued", || {
        nodes.servers[0].zcard(queue) == 1
    })
    .await;
    go.notify_one();
    let response = request.await.unwrap().unwrap();
    response.into_body().collect().await.unwrap();
    let mut mutex = direct.await.unwrap().expect("the direct caller's turn");
    mutex.unlock().await.unwrap();
    support::wait_until(support::BOUND, "the queue gone", || {
        nodes.servers[0].zcard(queue) == 0
    })
    .await;
}

/// Polls `future` once, with this task's waker: whether it is pending.
async fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> bool {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::pin::Pin::new(&mut *future).poll(cx).is_pending())
    })
    .await
}

/// Failing fast, requests that come while the key's release is under way
/// wait for that release only: once the key has passed to the first of
/// them, the next one gets 409 at once (no time passes on the paused
/// clock), not after a node timeout.
#[tokio::test(start_paused = true)]
async fn fail_fast_waits_only_for_the_release_itself() {
    let remote = support::remote::Remote::gated(MemorySync::new());
    let layer = DistLockLayer::builder(remote.clone(), HeaderKey::new(KEY))
        .wait(Duration::ZERO)
        .build()
        .unwrap();
    let service = quick_service(layer.clone());
    let response = service.clone().oneshot(keyed("handoff")).await.unwrap();
    response.into_body().collect().await.unwrap();
    // The release waits at the gate; two requests come meanwhile.
    let start = Instant::now();
    let spawn = || {
        let service = service.clone();
        tokio::spawn(async move { service.oneshot(keyed("handoff")).await.unwrap().status() })
    };
    let first = spawn();
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let second = spawn();
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    remote.unlock_gate.add_permits(1);
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    assert_eq!(second.await.unwrap(), StatusCode::CONFLICT);
    assert_eq!(
        Instant::now(),
        start,
        "the second request waited past the release"
    );
}

/// A request that waits for a busy key holds none of the inner service's
/// capacity: with tower's `ConcurrencyLimit` of one inside the layer, a
/// request for a free key is served while another waits for a held key.
#[tokio::test(start_paused = true)]
async fn waiting_for_a_key_holds_no_inner_capacity() {
    let service = tower::ServiceBuilder::new()
        .layer(
            DistLockLayer::builder(MemorySync::new(), HeaderKey::new(KEY))
                .build()
                .unwrap(),
        )
        .concurrency_limit(1)
        .service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(String::new()))
        });
    // Its body holds the key; its handler is done, so the capacity is free.
    let holder = service.clone().oneshot(keyed("busy")).await.unwrap();
    let waiting = tokio::spawn(service.clone().oneshot(keyed("busy")));
    tokio::task::yield_now().await;
    let free = service.clone().oneshot(keyed("free")).await.unwrap();
    assert_eq!(free.status(), StatusCode::OK);
    assert!(
        !waiting.is_finished(),
        "the free key was served only once the waiting request gave up"
    );
    drop(holder);
    assert_eq!(waiting.await.unwrap().unwrap().status(), StatusCode::OK);
}

/// A real HTTP/2 client that reads a response's head and then stops
/// reading, keeping its connection open: once the flow-control window is
/// full the server no longer polls the body, and with `OnLost::Abort` and
/// a short `max_hold` the lost lock must still free the key in this
/// process (`held_locks()` back to zero) so that the next request for the
/// key, on another connection, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http2_reader_does_not_keep_the_key() {
    let layer = DistLockLayer::builder(MemorySync::new(), HeaderKey::new(KEY))
        .on_lost(OnLost::Abort)
        .max_hold(Duration::from_millis(300))
        .wait(Duration::ZERO)
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/stream",
            get(|| async {
                // Far more than any flow-control window, without end.
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let stream = futures_util::stream::repeat_with(move || {
                    Ok::<_, Infallible>(http_body::Frame::data(chunk.clone()))
                });
                Body::new(http_body_util::StreamBody::new(stream))
            }),
        )
        .route("/short", get(|| async { "ok" }))
        .layer(layer.clone());
    let server = Server::start(app).await;

    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake");
    let connection = tokio::spawn(connection);
    let request = http::Request::get(server.url("/stream"))
        .header(KEY, "stalled")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    // The head is read; the body is kept but never read.
    let stalled = sender.send_request(request).await.expect("response head");
    assert_eq!(stalled.status(), StatusCode::OK);

    let deadline = Instant::now() + Duration::from_secs(30);
    while layer.stats().held_locks() != 0 {
        assert!(
            Instant::now() < deadline,
            "the lock of the stalled response is still held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (next, body) = HttpClient::default()
        .get(&server.url("/short"), &[(KEY, "stalled")])
        .await;
    assert_eq!(next.status(), StatusCode::OK, "{body}");
    assert!(
        !connection.is_finished(),
        "the stalled connection stays open"
    );
    drop(stalled);
}

/// An HTTP request with a [`Deadline`] (put there by a layer in front)
/// waits for a held key no longer than shortly before it, then gets 503
/// with `Retry-After` that says so, however long the wait budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_no_longer_than_its_deadline() {
    let sync = MemorySync::new();
    let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new("x-key"))
        .namespace("d")
        .wait(Duration::from_secs(600))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(layer)
        .layer(axum::middleware::from_fn(
            |mut request: Request, next: axum::middleware::Next| async move {
                request
                    .extensions_mut()
                    .insert(tower_dsync::layer::Deadline::after(Duration::from_millis(
                        300,
                    )));
                next.run(request).await
            },
        ));
    let server = Server::start(app).await;
    let mut holder = sync.new_mutex("d:k", DistMutexOptions::default()).unwrap();
    holder.lock().await.unwrap();
    let client = HttpClient::default();
    let (late, body) = client.get(&server.url("/"), &[("x-key", "k")]).await;
    assert_eq!(late.status(), StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(late.headers().contains_key("retry-after"));
    assert!(body.contains("deadline"), "{body}");
    holder.unlock().await.unwrap();
    let (ok, _) = client.get(&server.url("/"), &[("x-key", "k")]).await;
    assert_eq!(ok.status(), StatusCode::OK);
}
