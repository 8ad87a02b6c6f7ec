//! `IdempotencyLayer` in a real axum server, with a real HTTP client over
//! TCP, on the in-process backend and on Redis (one node, Redlock, a
//! Cluster) with two servers as two replicas; and in a real tonic server.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::RedisNodes;
use support::http::{HttpClient, Server};
use tokio::sync::Notify;
use tower_dsync::idempotency::IdempotencyLayer;
use tower_dsync::layer::HeaderKey;
use tower_dsync::{DistSync, MemorySync, RedisSync};

/// What the handlers share: how many times they ran, and what the slow one
/// waits for.
#[derive(Clone, Default)]
struct Handlers {
    runs: Arc<AtomicUsize>,
    /// Requests that reached the server (before the layer).
    arrived: Arc<AtomicUsize>,
    arrivals: Arc<Notify>,
    /// The slow handler answers once this many requests arrived.
    wait_for: Arc<AtomicUsize>,
}

impl Handlers {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

/// A charges API: `/charges` answers 201 with a charge number, `/fail` 500,
/// `/panic` panics on its first run, `/big` answers 4 KiB, `/slow` answers
/// once enough requests arrived, `/lose` deletes its own lock key first.
fn app<D: DistSync>(
    layer: IdempotencyLayer<D, HeaderKey>,
    handlers: &Handlers,
    redis: Option<String>,
) -> Router {
    let h = handlers.clone();
    let charge = move |body: String| {
        let h = h.clone();
        async move {
            let n = h.runs.fetch_add(1, Ordering::SeqCst) + 1;
            (
                StatusCode::CREATED,
                [("x-charge", n.to_string())],
                format!("charge {n} for {body}"),
            )
        }
    };
    let h = handlers.clone();
    let fail = move || {
        let h = h.clone();
        async move {
            h.runs.fetch_add(1, Ordering::SeqCst);
            (StatusCode::BAD_GATEWAY, "upstream down")
        }
    };
    let h = handlers.clone();
    let panic = move || {
        let h = h.clone();
        async move {
            if h.runs.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("the first run of /panic panics");
            }
            (StatusCode::CREATED, "charged after a panic")
        }
    };
    let h = handlers.clone();
    let big = move || {
        let h = h.clone();
        async move {
            h.runs.fetch_add(1, Ordering::SeqCst);
            "x".repeat(4096)
        }
    };
    let h = handlers.clone();
    let slow = move || {
        let h = h.clone();
        async move {
            let n = h.runs.fetch_add(1, Ordering::SeqCst) + 1;
            loop {
                let arrived = h.arrivals.notified();
                if h.arrived.load(Ordering::SeqCst) >= h.wait_for.load(Ordering::SeqCst) {
                    break;
                }
                arrived.await;
            }
            format!("slow charge {n}")
        }
    };
    let h = handlers.clone();
    let lose = move |lock: axum::Extension<tower_dsync::layer::HeldLock>| {
        let (h, redis) = (h.clone(), redis.clone());
        async move {
            h.runs.fetch_add(1, Ordering::SeqCst);
            // The lock's key is gone: the record must not be written.
            let client = redis::Client::open(redis.expect("a Redis URL")).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let _: () = redis::cmd("DEL")
                .arg(format!("dsync:{}", lock.name()))
                .query_async(&mut conn)
                .await
                .unwrap();
            "done without a lock"
        }
    };
    let counter = handlers.clone();
    Router::new()
        .route("/charges", post(charge))
        .route("/fail", post(fail))
        .route("/panic", post(panic))
        .route("/big", post(big))
        .route("/slow", post(slow))
        .route("/lose", post(lose))
        .layer(layer)
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let counter = counter.clone();
                async move {
                    counter.arrived.fetch_add(1, Ordering::SeqCst);
                    counter.arrivals.notify_waiters();
                    next.run(request).await
                }
            },
        ))
}

/// A response, read whole.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    /// The response as a replay repeats it: all but the server's `date`
    /// and the replay mark.
    fn essence(&self) -> (StatusCode, Vec<(String, Vec<u8>)>, Bytes) {
        let mut headers: Vec<_> = self
            .headers
            .iter()
            .filter(|(name, _)| *name != "date" && *name != "idempotent-replayed")
            .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
            .collect();
        headers.sort();
        (self.status, headers, self.body.clone())
    }
}

async fn send(client: &HttpClient, url: String, key: Option<&str>, body: &str) -> Answer {
    let mut request = Request::post(url);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = client.send(request).await;
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

/// Waits until no lock is held: the last release waits for its record's
/// write, in the background.
async fn no_lock_left(sync: &MemorySync) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sync.names_in_use() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a lock is left held"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn layer<D: DistSync>(sync: D) -> IdempotencyLayer<D, HeaderKey> {
    IdempotencyLayer::builder(sync)
        .namespace("charges")
        .build()
        .unwrap()
}

/// 50 retries after the first request completed: the handler ran once,
/// and every retry got the first response, marked as a replay.
async fn retries_get_the_first_response(servers: &[Server], handlers: &Handlers, retries: usize) {
    let client = HttpClient::default();
    let first = send(
        &client,
        servers[0].url("/charges"),
        Some("order-1"),
        "{\"amount\":10}",
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    for i in 0..retries {
        let server = &servers[i % servers.len()];
        let retry = send(
            &client,
            server.url("/charges"),
            Some("order-1"),
            "{\"amount\":10}",
        )
        .await;
        assert!(retry.replayed(), "retry {i}: {retry:?}");
        assert_eq!(retry.essence(), first.essence(), "retry {i}");
    }
    assert_eq!(handlers.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_retries_get_the_first_response() {
    let handlers = Handlers::default();
    let sync = MemorySync::new();
    let server = Server::start(app(layer(sync.clone()), &handlers, None)).await;
    retries_get_the_first_response(&[server], &handlers, 50).await;
    assert_eq!(sync.records_kept(), 1);
    no_lock_left(&sync).await;
}

/// Two replicas on one Redis node: a retry on either gets the response
/// the other kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_redis_share_the_first_response() {
    let nodes = RedisNodes::start(1);
    let handlers = Handlers::default();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let sync = RedisSync::new(nodes.urls()).unwrap();
        servers.push(Server::start(app(layer(sync), &handlers, None)).await);
    }
    retries_get_the_first_response(&servers, &handlers, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_redlock_share_the_first_response() {
    let nodes = RedisNodes::start(3);
    let handlers = Handlers::default();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let sync = RedisSync::new(nodes.urls()).unwrap();
        servers.push(Server::start(app(layer(sync), &handlers, None)).await);
    }
    retries_get_the_first_response(&servers, &handlers, 20).await;
}

#[cfg(feature = "cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_a_cluster_share_the_first_response() {
    let cluster = support::cluster::RedisCluster::start(3, 0);
    let handlers = Handlers::default();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let sync = RedisSync::cluster(cluster.seeds()).unwrap();
        servers.push(Server::start(app(layer(sync), &handlers, None)).await);
    }
    retries_get_the_first_response(&servers, &handlers, 20).await;
}

/// 20 duplicates at once, over two replicas: the handler runs once (it
/// answers only once all 20 arrived), and every duplicate gets its
/// response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_once() {
    let nodes = RedisNodes::start(1);
    let handlers = Handlers::default();
    handlers.wait_for.store(20, Ordering::SeqCst);
    let mut servers = Vec::new();
    for _ in 0..2 {
        let sync = RedisSync::new(nodes.urls()).unwrap();
        servers.push(Server::start(app(layer(sync), &handlers, None)).await);
    }
    let client = HttpClient::default();
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let (client, url) = (client.clone(), servers[i % 2].url("/slow"));
            tokio::spawn(async move { send(&client, url, Some("dup"), "{}").await })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    assert_eq!(handlers.runs(), 1);
    let first: Vec<_> = answers.iter().filter(|a| !a.replayed()).collect();
    assert_eq!(first.len(), 1, "{answers:?}");
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(answer.essence(), first[0].essence());
    }
}

/// Same key with another body: 422, and the handler does not run; no key:
/// 400; a key too long: 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused() {
    let handlers = Handlers::default();
    let server = Server::start(app(layer(MemorySync::new()), &handlers, None)).await;
    let client = HttpClient::default();
    let first = send(
        &client,
        server.url("/charges"),
        Some("k"),
        "{\"amount\":10}",
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let other = send(
        &client,
        server.url("/charges"),
        Some("k"),
        "{\"amount\":11}",
    )
    .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{other:?}");
    let elsewhere = send(&client, server.url("/fail"), Some("k"), "{\"amount\":10}").await;
    assert_eq!(
        elsewhere.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "another path"
    );
    let missing = send(&client, server.url("/charges"), None, "{}").await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    let long = "k".repeat(2000);
    let too_long = send(&client, server.url("/charges"), Some(&long), "{}").await;
    assert_eq!(too_long.status, StatusCode::BAD_REQUEST);
    assert_eq!(handlers.runs(), 1);
}

/// Keys within a scope: the same key from two accounts runs twice; a
/// request without its scope is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_keys_never_meet() {
    let handlers = Handlers::default();
    let layer = IdempotencyLayer::builder(MemorySync::new())
        .scope_header("x-account")
        .build()
        .unwrap();
    let server = Server::start(app(layer, &handlers, None)).await;
    let client = HttpClient::default();
    let post = |account: Option<&'static str>| {
        let mut request = Request::post(server.url("/charges")).header("idempotency-key", "same");
        if let Some(account) = account {
            request = request.header("x-account", account);
        }
        client.send(request.body(Full::new(Bytes::from_static(b"{}"))).unwrap())
    };
    assert_eq!(post(Some("acme")).await.status(), StatusCode::CREATED);
    assert_eq!(post(Some("globex")).await.status(), StatusCode::CREATED);
    let again = post(Some("acme")).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(post(None).await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(handlers.runs(), 2);
}

/// A 5xx is not kept, a panic keeps nothing: the retry runs again, and its
/// own response is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_not_kept() {
    let handlers = Handlers::default();
    let sync = MemorySync::new();
    let server = Server::start(app(layer(sync.clone()), &handlers, None)).await;
    let client = HttpClient::default();
    for _ in 0..2 {
        let failed = send(&client, server.url("/fail"), Some("f"), "{}").await;
        assert_eq!(failed.status, StatusCode::BAD_GATEWAY);
        assert!(!failed.replayed());
    }
    assert_eq!(handlers.runs(), 2);
    assert_eq!(sync.records_kept(), 0);

    let handlers = Handlers::default();
    let server = Server::start(app(layer(sync.clone()), &handlers, None)).await;
    let request = Request::post(server.url("/panic"))
        .header("idempotency-key", "p")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    // The panic drops the connection: the client sees no response.
    let unanswered =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<Full<Bytes>>()
            .request(request)
            .await;
    assert!(unanswered.is_err(), "{unanswered:?}");
    assert_eq!(sync.records_kept(), 0);
    let retry = send(&client, server.url("/panic"), Some("p"), "{}").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    let again = send(&client, server.url("/panic"), Some("p"), "{}").await;
    assert!(again.replayed());
    assert_eq!(handlers.runs(), 2);
    no_lock_left(&sync).await;
}

/// A record lives for its TTL, then the key runs again; nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_expire_at_their_ttl() {
    let handlers = Handlers::default();
    let sync = MemorySync::new();
    let layer = IdempotencyLayer::builder(sync.clone())
        .ttl(Duration::from_millis(200))
        .build()
        .unwrap();
    let server = Server::start(app(layer, &handlers, None)).await;
    let client = HttpClient::default();
    for key in ["a", "b", "c"] {
        send(&client, server.url("/charges"), Some(key), "{}").await;
    }
    // A retry waits for its key's record (written before the lock is let
    // go) or finds it.
    for key in ["a", "b", "c"] {
        assert!(
            send(&client, server.url("/charges"), Some(key), "{}")
                .await
                .replayed()
        );
    }
    assert_eq!(sync.records_kept(), 3);
    // Polls the count until the TTL passed: what expires is checked, not
    // when.
    while sync.records_kept() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = send(&client, server.url("/charges"), Some("a"), "{}").await;
    assert!(!again.replayed());
    assert_eq!(handlers.runs(), 4);
}

/// On Redis the record carries the TTL as its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_records_expire_with_their_ttl() {
    let nodes = RedisNodes::start(1);
    let handlers = Handlers::default();
    let layer = IdempotencyLayer::builder(RedisSync::new(nodes.urls()).unwrap())
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let server = Server::start(app(layer, &handlers, None)).await;
    let client = HttpClient::default();
    send(&client, server.url("/charges"), Some("t"), "{}").await;
    // The record is written after the response, before the lock is let
    // go: a retry waits for it.
    assert!(
        send(&client, server.url("/charges"), Some("t"), "{}")
            .await
            .replayed()
    );
    let mut conn = nodes.servers[0].connection();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*record").query(&mut conn).unwrap();
    assert_eq!(keys, vec!["dsync:idempotency:t\u{1f}record".to_owned()]);
    let pttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query(&mut conn).unwrap();
    assert!(pttl > 0 && pttl <= 60_000, "{pttl}");
    // Nothing else is left but the node's own bookkeeping, once the lock's
    // release (in the background, after the response) is done.
    loop {
        let all: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        assert!(all.len() <= 3, "{all:?}");
        if all.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A handler that lost its lock (its key deleted under it): its response
/// goes to its client but is not kept, and a retry runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lock_keeps_nothing() {
    let nodes = RedisNodes::start(1);
    let handlers = Handlers::default();
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let server = Server::start(app(layer(sync), &handlers, Some(nodes.urls()[0].clone()))).await;
    let client = HttpClient::default();
    let first = send(&client, server.url("/lose"), Some("l"), "{}").await;
    assert_eq!(first.status, StatusCode::OK);
    // The retry gets the lock once the first's write (refused) is done.
    let retry = send(&client, server.url("/lose"), Some("l"), "{}").await;
    assert!(!retry.replayed());
    assert_eq!(handlers.runs(), 2);
    assert!(!nodes.servers[0].exists("dsync:charges:l\u{1f}record"));
}

/// A response over the size limit streams whole to its client; a retry
/// gets 409 without `Retry-After` and the handler does not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_over_the_limit_are_not_replayed() {
    let handlers = Handlers::default();
    let layer = IdempotencyLayer::builder(MemorySync::new())
        .max_body(1024)
        .build()
        .unwrap();
    let server = Server::start(app(layer, &handlers, None)).await;
    let client = HttpClient::default();
    let first = send(&client, server.url("/big"), Some("b"), "{}").await;
    assert_eq!(first.body.len(), 4096);
    let retry = send(&client, server.url("/big"), Some("b"), "{}").await;
    assert_eq!(retry.status, StatusCode::CONFLICT, "{retry:?}");
    assert!(retry.headers.get("retry-after").is_none());
    assert!(String::from_utf8_lossy(&retry.body).contains("too large"));
    assert_eq!(handlers.runs(), 1);
}

/// A request body over the limit: 413, nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_over_the_limit_are_refused() {
    let handlers = Handlers::default();
    let layer = IdempotencyLayer::builder(MemorySync::new())
        .max_request_body(16)
        .build()
        .unwrap();
    let server = Server::start(app(layer, &handlers, None)).await;
    let client = HttpClient::default();
    let refused = send(&client, server.url("/charges"), Some("r"), &"y".repeat(17)).await;
    assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(handlers.runs(), 0);
}

/// Redis down: 503 and nothing runs; back (empty): the request runs, and
/// its retry gets its response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_is_503_then_work_resumes() {
    let mut nodes = RedisNodes::start(1);
    let handlers = Handlers::default();
    let sync = RedisSync::builder().urls(nodes.urls()).build().unwrap();
    let layer = IdempotencyLayer::builder(sync)
        .mutex_options(tower_dsync::DistMutexOptions::default().with_tries(1))
        .build()
        .unwrap();
    let server = Server::start(app(layer, &handlers, None)).await;
    let client = HttpClient::default();
    nodes.servers[0].kill();
    let down = send(&client, server.url("/charges"), Some("d"), "{}").await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE, "{down:?}");
    assert!(down.headers.contains_key("retry-after"));
    assert_eq!(handlers.runs(), 0);
    nodes.servers[0].restart();
    let first = send(&client, server.url("/charges"), Some("d"), "{}").await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let retry = send(&client, server.url("/charges"), Some("d"), "{}").await;
    assert!(retry.replayed());
    assert_eq!(handlers.runs(), 1);
}

/// A malformed record (written by something else) is no record: the
/// request runs, and its own record replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_record_is_treated_as_absent() {
    let nodes = RedisNodes::start(1);
    let handlers = Handlers::default();
    let server = Server::start(app(
        layer(RedisSync::new(nodes.urls()).unwrap()),
        &handlers,
        None,
    ))
    .await;
    let key = "dsync:charges:m\u{1f}record";
    let _: () = redis::cmd("SET")
        .arg(key)
        // A token above any real one: it must not keep the real record out.
        .arg("99999999999999999 not a record")
        .query(&mut nodes.servers[0].connection())
        .unwrap();
    let client = HttpClient::default();
    let first = send(&client, server.url("/charges"), Some("m"), "{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    let retry = send(&client, server.url("/charges"), Some("m"), "{}").await;
    assert!(retry.replayed());
    assert_eq!(handlers.runs(), 1);
}

/// gRPC: a unary call is replayed with its trailers, marked in its
/// metadata; another request message with the same key is
/// `INVALID_ARGUMENT`; no key is `INVALID_ARGUMENT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_replayed_with_their_trailers() {
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::{Channel, Server as GrpcServer};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tower_dsync::layer::GrpcMetadataKey;

    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::builder_with_key(
        MemorySync::new(),
        GrpcMetadataKey::new("idempotency-key"),
    )
    .build()
    .unwrap();
    let counted = runs.clone();
    let stack =
        tower::ServiceBuilder::new()
            .layer(layer)
            .map_request(move |request: http::Request<_>| {
                counted.fetch_add(1, Ordering::SeqCst);
                request
            });
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _reporter = reporter;
        GrpcServer::builder()
            .layer(stack)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let check = |key: Option<&str>, service: &str| {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: service.to_owned(),
        });
        if let Some(key) = key {
            request
                .metadata_mut()
                .insert("idempotency-key", key.parse().unwrap());
        }
        request
    };

    let first = client.check(check(Some("g1"), "")).await.unwrap();
    assert!(first.metadata().get("idempotent-replayed").is_none());
    assert_eq!(first.into_inner().status, 1, "SERVING");
    for _ in 0..5 {
        let retry = client.check(check(Some("g1"), "")).await.unwrap();
        assert_eq!(retry.metadata().get("idempotent-replayed").unwrap(), "true");
        assert_eq!(retry.into_inner().status, 1);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let other = client.check(check(Some("g1"), "other")).await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::InvalidArgument, "{other:?}");
    let missing = client.check(check(None, "")).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument, "{missing:?}");
    // An error status of the handler's own (`NOT_FOUND`, a client error)
    // is replayed too.
    let unknown = client.check(check(Some("g2"), "nope")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let again = client.check(check(Some("g2"), "nope")).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);
    assert_eq!(again.metadata().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A response without a body (204): its record is written before its head
/// goes out, since a server never polls an empty body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_responses_are_kept() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let app = Router::new()
        .route(
            "/touch",
            post(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { StatusCode::NO_CONTENT }
            }),
        )
        .layer(layer(MemorySync::new()));
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let first = send(&client, server.url("/touch"), Some("e"), "").await;
    assert_eq!(first.status, StatusCode::NO_CONTENT);
    let retry = send(&client, server.url("/touch"), Some("e"), "").await;
    assert_eq!(retry.status, StatusCode::NO_CONTENT);
    assert!(retry.replayed());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A client that goes away while its handler runs: the handler is dropped,
/// nothing is kept, and the retry runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_handler_keeps_nothing() {
    struct Dropped(tokio::sync::mpsc::UnboundedSender<()>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let runs = Arc::new(AtomicUsize::new(0));
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (dropped_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel::<()>();
    let counted = runs.clone();
    let sync = MemorySync::new();
    let app = Router::new()
        .route(
            "/hang",
            post(move || {
                let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
                let (entered_tx, dropped_tx) = (entered_tx.clone(), dropped_tx.clone());
                async move {
                    if first {
                        let _guard = Dropped(dropped_tx);
                        entered_tx.send(()).unwrap();
                        std::future::pending::<()>().await;
                    }
                    "done"
                }
            }),
        )
        .layer(layer(sync.clone()));
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let (c, url) = (client.clone(), server.url("/hang"));
    let gone = tokio::spawn(async move { send(&c, url, Some("h"), "{}").await });
    entered.recv().await.unwrap();
    gone.abort();
    dropped.recv().await.unwrap();
    let retry = send(&client, server.url("/hang"), Some("h"), "{}").await;
    assert_eq!(retry.status, StatusCode::OK);
    assert!(!retry.replayed());
    assert!(
        send(&client, server.url("/hang"), Some("h"), "{}")
            .await
            .replayed()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(sync.records_kept(), 1);
}

/// A body that tells when it is dropped, and otherwise passes its inner
/// body on.
struct DropSignal<B>(
    std::pin::Pin<Box<B>>,
    Option<tokio::sync::oneshot::Sender<()>>,
);

impl<B: http_body::Body> http_body::Body for DropSignal<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.0.as_mut().poll_frame(cx)
    }
}

impl<B> Drop for DropSignal<B> {
    fn drop(&mut self) {
        if let Some(tx) = self.1.take() {
            let _ = tx.send(());
        }
    }
}

/// The handler completed, but its client went away while the body
/// streamed: the response is still its outcome. The rest of the body is
/// read for the record, the lock waits for it, and the retry gets the
/// whole first response without running the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_whose_client_left_mid_body_is_kept() {
    let runs = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(Notify::new());
    let (first_chunk_tx, mut first_chunk) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
    let dropped_tx = Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    let (counted, gate) = (runs.clone(), go.clone());
    let app =
        Router::new()
            .route(
                "/stream",
                post(move || {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let (gate, first_chunk_tx) = (gate.clone(), first_chunk_tx.clone());
                    async move {
                        // One chunk at once, the second once the test lets it go.
                        let chunks = futures_util::stream::unfold(0, move |n| {
                            let (gate, first_chunk_tx) = (gate.clone(), first_chunk_tx.clone());
                            async move {
                                match n {
                                    0 => {
                                        let _ = first_chunk_tx.send(());
                                        Some((
                                            Ok::<_, std::io::Error>(Bytes::from_static(b"first,")),
                                            1,
                                        ))
                                    }
                                    1 => {
                                        gate.notified().await;
                                        Some((Ok(Bytes::from_static(b"second")), 2))
                                    }
                                    _ => None,
                                }
                            }
                        });
                        axum::body::Body::from_stream(chunks)
                    }
                }),
            )
            .layer(layer(MemorySync::new()))
            .layer(axum::middleware::map_response(
                move |response: axum::response::Response| {
                    let tx = dropped_tx.lock().unwrap().take();
                    async move {
                        response.map(|body| axum::body::Body::new(DropSignal(Box::pin(body), tx)))
                    }
                },
            ));
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let request = Request::post(server.url("/stream"))
        .header("idempotency-key", "s")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = client.send(request).await;
    first_chunk.recv().await.unwrap();
    // The client leaves mid-body; the server drops the response body.
    drop(response);
    drop(client);
    dropped.await.unwrap();
    go.notify_one();
    let retry = send(
        &HttpClient::default(),
        server.url("/stream"),
        Some("s"),
        "{}",
    )
    .await;
    assert_eq!(retry.status, StatusCode::OK);
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(&retry.body[..], b"first,second");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
