//! Defects an adversarial review found in IdempotencyLayer, each a
//! regression test that failed before its fix.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Full};
use support::RedisNodes;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_dsync::idempotency::{IdempotencyLayer, RequestBody};
use tower_dsync::{DistMutexOptions, DistSync, MemorySync, RedisSync};

type Req = Request<RequestBody<Full<Bytes>>>;

fn post(key: &str, account: Option<&str>, body: &'static str) -> Request<Full<Bytes>> {
    let mut request = Request::post("/charges").header("idempotency-key", key);
    if let Some(account) = account {
        request = request.header("x-account", account);
    }
    request
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// A scoped and an unscoped layer in one namespace: the unscoped key
/// `acme:k1` and the scoped pair (acme, k1) get the same lock and record
/// name, so a client of the unscoped route can plant the response that
/// account acme's own request then gets replayed (or, with another body,
/// turn acme's request into a 422).
#[tokio::test]
async fn scoped_and_unscoped_layers_do_not_share_names() {
    let sync = MemorySync::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = |who: &'static str| {
        let runs = runs.clone();
        service_fn(move |_: Req| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(who)))) }
        })
    };
    let unscoped = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::builder(sync.clone())
                .namespace("charges")
                .build()
                .unwrap(),
        )
        .service(handler("planted by mallory"));
    let scoped = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::builder(sync.clone())
                .namespace("charges")
                .scope_header("x-account")
                .build()
                .unwrap(),
        )
        .service(handler("acme's own charge"));

    let planted = unscoped.oneshot(post("acme:k1", None, "{}")).await.unwrap();
    planted.into_body().collect().await.unwrap();
    let victim = scoped
        .oneshot(post("k1", Some("acme"), "{}"))
        .await
        .unwrap();
    let replayed = victim.headers().contains_key("idempotent-replayed");
    let body = victim.into_body().collect().await.unwrap().to_bytes();
    assert!(
        !replayed,
        "acme's scoped request got the unscoped request's response: {body:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A gRPC trailers-only response (status in the headers, empty body) is
/// turned into headers without END_STREAM, `content-length: 0`, then an
/// empty DATA frame with END_STREAM and no trailers: hyper's HTTP/2 server
/// ends the stream on the HEADERS frame only when `is_end_stream()` is true
/// at head time. Clients that read `grpc-status` only from trailers
/// (grpc-go: "server closed the stream without sending trailers") see
/// INTERNAL instead of the handler's status. The replay of the same
/// response is trailers-only again, so first answer and replay differ.
#[tokio::test]
async fn grpc_trailers_only_responses_stay_trailers_only() {
    let layer = IdempotencyLayer::builder(MemorySync::new())
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|_: Req| async {
            let mut response = Response::new(Empty::<Bytes>::new());
            response
                .headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            response
                .headers_mut()
                .insert("grpc-status", "5".parse().unwrap());
            Ok::<_, Infallible>(response)
        });
    let call = || {
        Request::post("/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .header("idempotency-key", "g")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    let first = service.clone().oneshot(call()).await.unwrap();
    let first_ends = first.body().is_end_stream();
    first.into_body().collect().await.unwrap();
    let replay = service.oneshot(call()).await.unwrap();
    assert!(replay.headers().contains_key("idempotent-replayed"));
    assert!(replay.body().is_end_stream(), "the replay is trailers-only");
    assert!(
        first_ends,
        "the first response is no longer trailers-only (HEADERS without END_STREAM)"
    );
}

/// Redlock, within the fault model (one node faulty at a time): node C is
/// down while the first request runs, so its record is on A and B; C
/// comes back empty, then B restarts empty; with A paused, B and C could
/// answer "no record", and the handler ran a second time. They lost their
/// state within the records' TTL, so they cannot tell: the retry gets 503
/// until A answers again, then the first response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_record_survives_minority_restarts() {
    let mut nodes = RedisNodes::start(3);
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let layer = IdempotencyLayer::builder(sync)
        .mutex_options(DistMutexOptions::default().with_expiry(Duration::from_millis(500)))
        .wait(Duration::from_secs(10))
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |_: Req| {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(201)
                        .body(Full::new(Bytes::from(format!("charge {n}"))))
                        .unwrap(),
                )
            }
        });

    nodes.servers[2].kill();
    let first = service
        .clone()
        .oneshot(post("r1", None, "{}"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    first.into_body().collect().await.unwrap();
    // The record is written before the lock is let go: a retry waits for
    // it.
    let replay = service
        .clone()
        .oneshot(post("r1", None, "{}"))
        .await
        .unwrap();
    assert!(replay.headers().contains_key("idempotent-replayed"));
    assert_eq!(nodes.count_key("dsync:idempotency:r1\u{1f}record"), 2);
    nodes.servers[2].restart();
    nodes.servers[1].restart();
    nodes.servers[0].pause();

    let unknowable = service
        .clone()
        .oneshot(post("r1", None, "{}"))
        .await
        .unwrap();
    assert_eq!(unknowable.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(unknowable.headers().contains_key("retry-after"));
    nodes.servers[0].resume();
    let retry = service
        .clone()
        .oneshot(post("r1", None, "{}"))
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(retry.headers().contains_key("idempotent-replayed"));
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"charge 1");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran again");
}

/// Quick sanity: `DistSync` is used only to name the bound.
#[allow(dead_code)]
fn _bound<D: DistSync>(_: D) {}

/// A body of one data frame then trailers, whose size is announced.
struct SizedWithTrailers(u8);

impl http_body::Body for SizedWithTrailers {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0 += 1;
        std::task::Poll::Ready(match self.0 {
            1 => Some(Ok(http_body::Frame::data(Bytes::from_static(b"ok")))),
            2 => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-checksum", "abc".parse().unwrap());
                Some(Ok(http_body::Frame::trailers(trailers)))
            }
            _ => None,
        })
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(2)
    }
}

/// A body with an announced length and trailers: once the announced bytes
/// are seen the body is cut, so the trailers reach neither the client nor
/// the record.
#[tokio::test]
async fn trailers_after_a_sized_body_are_kept() {
    let layer = IdempotencyLayer::builder(MemorySync::new())
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|_: Req| async { Ok::<_, Infallible>(Response::new(SizedWithTrailers(0))) });
    let first = service
        .clone()
        .oneshot(post("t", None, "{}"))
        .await
        .unwrap();
    let collected = first.into_body().collect().await.unwrap();
    assert!(
        collected.trailers().is_some(),
        "the client lost the trailers"
    );
}

/// Redlock: a record whose write reached only a minority (the lock was
/// taken from the other nodes meanwhile) did not count, but stayed on that
/// minority, where a read could find it and replay a response that was
/// never kept. It is taken back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_kept_by_a_minority_is_taken_back() {
    let nodes = RedisNodes::start(3);
    let urls = nodes.urls();
    let sync = RedisSync::new(urls.clone()).unwrap();
    let layer = IdempotencyLayer::builder(sync).build().unwrap();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |_: Req| {
            let urls = urls.clone();
            async move {
                // The lock is lost on two of the three nodes.
                for url in &urls[1..] {
                    let client = redis::Client::open(url.as_str()).unwrap();
                    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                    let _: () = redis::cmd("DEL")
                        .arg("dsync:idempotency:m1")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"charged"))))
            }
        });
    let first = service
        .clone()
        .oneshot(post("m1", None, "{}"))
        .await
        .unwrap();
    first.into_body().collect().await.unwrap();
    // The release follows the record's write (and its taking back).
    while nodes.count_key("dsync:idempotency:m1") > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(nodes.count_key("dsync:idempotency:m1\u{1f}record"), 0);
}
