//! Configuration and start-up errors: malformed URLs, a Redis that is not
//! there at start, a wrong password, TLS to a plain port, options and layer
//! settings out of range. Each is a typed error (matched on `Error`
//! variants) whose `Display` names the problem, never a panic or a hang;
//! layer settings that cannot work are refused when the layer is built; a
//! layer that cannot reach Redis answers 503 and recovers on its own when
//! Redis comes up. Redis cases run on real `redis-server` processes on
//! loopback ports.

mod conformance;
mod support;

use std::convert::Infallible;
use std::error::Error as _;
use std::future::Future;
use std::time::Duration;

use conformance::eventually;
use http::{Request, Response, StatusCode};
use support::http::{HttpClient, Server};
use support::{RedisServer, free_port};
use tower::{ServiceBuilder, ServiceExt};
use tower_dsync::layer::{DistLockLayer, HeaderKey, LockBody};
use tower_dsync::{
    DistMutex, DistMutexOptions, DistSync, Error, MAX_EXPIRY, MemorySync, NodeError, RedisSync,
};

const KEY: &str = "x-job";
/// A password that must never show in an error message.
const SECRET: &str = "s3cret-pw";
/// Safety net around anything that waits on the network: the crate's own
/// timeouts (a 1 s connect timeout, `expiry * timeout_factor` per command)
/// end every case long before.
const BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {BOUND:?}"))
}

/// One try, the default 8 s expiry: each node gets 400 ms per command.
fn once() -> DistMutexOptions {
    DistMutexOptions::default().with_tries(1)
}

/// The redis-rs error behind a node's failure.
fn redis_cause(failure: &NodeError) -> &redis::RedisError {
    failure
        .source()
        .and_then(|e| e.downcast_ref::<redis::RedisError>())
        .unwrap_or_else(|| panic!("not a Redis error: {failure:?}"))
}

/// Locks once on a backend that cannot work; returns the failures of an
/// `Unavailable`, after checking that it names every node in its `Display`
/// and never shows the secret.
async fn unavailable(sync: &RedisSync, nodes: &[String]) -> Vec<NodeError> {
    let mut mutex = sync.new_mutex("start-up", once()).unwrap();
    let err = bounded("lock", mutex.lock()).await.unwrap_err();
    let text = err.to_string();
    assert!(!text.contains(SECRET), "{text}");
    for node in nodes {
        assert!(text.contains(node.as_str()), "{node} not named: {text}");
    }
    // Nothing was acquired: releasing is refused at once, nothing is valid.
    assert!(matches!(mutex.unlock().await, Err(Error::NotAcquired)));
    assert!(matches!(mutex.extend().await, Err(Error::NotAcquired)));
    assert!(!mutex.valid().await.unwrap());
    match err {
        Error::Unavailable { quorum, failures } => {
            assert_eq!(quorum, nodes.len() / 2 + 1);
            let named: Vec<&str> = failures.iter().map(NodeError::node).collect();
            assert_eq!(named.len(), nodes.len(), "{text}");
            failures
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// Sends one keyed request (as gRPC when `grpc`) through a layer around a
/// handler that answers 200, and returns the response.
async fn one_request<D: DistSync>(
    layer: DistLockLayer<D, HeaderKey>,
    grpc: bool,
) -> Response<LockBody<String>> {
    let service = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new("ok".to_owned())) });
    let mut request = Request::builder().header(KEY, "job-1");
    if grpc {
        request = request.header("content-type", "application/grpc");
    }
    service.oneshot(request.body(()).unwrap()).await.unwrap()
}

/// Layer settings out of range: each refused when the layer is built, with
/// the documented variant and a message naming the setting (a namespace
/// that is empty, holds a control character or leaves no room for a key, a
/// separator with a control character), so no such layer ever serves a
/// request.
#[tokio::test]
async fn layer_settings_out_of_range() {
    let long = "n".repeat(tower_dsync::MAX_NAME_LEN);
    let nearly = "n".repeat(tower_dsync::MAX_NAME_LEN - 1);
    // (namespace, separator, refused as an invalid name (else as an
    // invalid configuration), what the message names)
    let cases = [
        ("", ":", true, "empty"),
        ("a\nb", ":", true, "control"),
        (long.as_str(), ":", false, "no room for a key"),
        (nearly.as_str(), "::", false, "no room for a key"),
        ("jobs", "\u{1}", false, "no room for a key"),
    ];
    for (namespace, separator, as_name, named) in cases {
        let sync = MemorySync::new().with_separator(separator);
        let err = DistLockLayer::builder(sync, HeaderKey::new(KEY))
            .namespace(namespace)
            .build()
            .unwrap_err();
        let variant = if as_name {
            matches!(err, Error::InvalidName { .. })
        } else {
            matches!(err, Error::InvalidConfig { .. })
        };
        assert!(variant, "{namespace:.20?}: {err:?}");
        assert!(err.to_string().contains(named), "{err}");
    }
    // The longest namespace that leaves room for a one-byte key works.
    let fits = "n".repeat(tower_dsync::MAX_NAME_LEN - 2);
    DistLockLayer::builder(MemorySync::new(), HeaderKey::new(KEY))
        .namespace(fits)
        .build()
        .unwrap();
}

/// URLs that do not parse (bad port, bad database number, no host, no
/// scheme, unknown protocol version, broken IPv6 literal, a NUL in the
/// host): `build` fails with `InvalidConfig` whose message names the node
/// by its position and says its URL is invalid, with the redis-rs error as
/// typed source, and never shows the password the URL carried.
#[tokio::test]
async fn malformed_urls_are_refused_at_build() {
    let bad = [
        format!("redis://user:{SECRET}@127.0.0.1:notaport"),
        "redis://127.0.0.1:99999".to_owned(),
        format!("redis://:{SECRET}@127.0.0.1:6379/notadb"),
        "redis://".to_owned(),
        "127.0.0.1:6379".to_owned(),
        "redis://127.0.0.1:6379/0?protocol=resp9".to_owned(),
        "redis://[::1".to_owned(),
        "redis://h\0st:6379".to_owned(),
    ];
    for url in &bad {
        for position in [1, 3] {
            let mut urls = vec!["redis://127.0.0.1:6379".to_owned(); 3];
            urls[position - 1] = url.clone();
            let err = RedisSync::new(&urls).unwrap_err();
            let text = err.to_string();
            assert!(!text.contains(SECRET), "{text}");
            assert!(
                text.contains(&format!("node #{position} has an invalid URL")),
                "{url:?}: {text}"
            );
            let Error::InvalidConfig {
                source: Some(source),
                ..
            } = &err
            else {
                panic!("{url:?}: expected InvalidConfig with a source, got {err:?}");
            };
            let cause = source.downcast_ref::<redis::RedisError>().unwrap();
            assert_eq!(
                cause.kind(),
                redis::ErrorKind::InvalidClientConfig,
                "{url:?}"
            );
        }
    }
}

/// Redis not there at start: a loopback port with nothing listening, port
/// 0, a missing Unix socket, three such nodes, a listener that accepts
/// connections and never answers. `RedisSync` builds (connections are lazy,
/// so a node may come up later), and the first `lock` fails, bounded by the
/// crate's own timeouts, with `Unavailable` naming each node (a refused
/// connection is a typed connection refusal) or, for the silent listener,
/// `Timeout` naming it after the per-node timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_not_there_at_start() {
    let port = free_port();
    let sync = RedisSync::new([format!("redis://127.0.0.1:{port}")]).unwrap();
    let failures = unavailable(&sync, &[format!("127.0.0.1:{port}")]).await;
    assert!(
        redis_cause(&failures[0]).is_connection_refusal(),
        "{failures:?}"
    );

    let ports = [free_port(), free_port(), free_port()];
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    let labels: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let sync = RedisSync::new(&urls).unwrap();
    unavailable(&sync, &labels).await;

    let sync = RedisSync::new(["redis://127.0.0.1:0"]).unwrap();
    unavailable(&sync, &["127.0.0.1:0".to_owned()]).await;
    let socket = std::env::temp_dir().join("tower-dsync-no-such-dir/redis.sock");
    let sync = RedisSync::new([format!("unix://{}", socket.display())]).unwrap();
    unavailable(&sync, &[socket.display().to_string()]).await;

    // Accepts connections (the kernel does), never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let label = silent.local_addr().unwrap().to_string();
    let sync = RedisSync::new([format!("redis://{label}")]).unwrap();
    let mut mutex = sync.new_mutex("start-up", once()).unwrap();
    let err = bounded("lock", mutex.lock()).await.unwrap_err();
    assert!(err.to_string().contains(&label), "{err}");
    match err {
        Error::Timeout { after, nodes } => {
            assert!(after >= once().node_timeout(), "after {after:?}");
            assert_eq!(nodes, [label]);
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
}

/// A server with `requirepass`: no password is refused by the server
/// (`NOAUTH`), a wrong password or user fails authentication (a typed
/// `AuthenticationFailed`), each an `Unavailable` naming the node and never
/// the password, and a layer over it answers 503; the right password
/// works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_an_authentication_error() {
    let server = RedisServer::start_with_password(SECRET);
    let node = format!("127.0.0.1:{}", server.port());
    let no_password = server.url();
    let wrong = [
        format!("redis://:wrong-{SECRET}@{node}"),
        format!("redis://default:{SECRET}-x@{node}"),
        format!("redis://nobody:{SECRET}@{node}"),
    ];
    let sync = RedisSync::new([&no_password]).unwrap();
    let failures = unavailable(&sync, std::slice::from_ref(&node)).await;
    assert_eq!(redis_cause(&failures[0]).code(), Some("NOAUTH"));
    for url in &wrong {
        let sync = RedisSync::new([url]).unwrap();
        let failures = unavailable(&sync, std::slice::from_ref(&node)).await;
        assert_eq!(
            redis_cause(&failures[0]).kind(),
            redis::ErrorKind::AuthenticationFailed,
            "{url}"
        );
        let response = bounded(
            "request",
            one_request(
                DistLockLayer::builder(sync, HeaderKey::new(KEY))
                    .build()
                    .unwrap(),
                false,
            ),
        )
        .await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let sync = RedisSync::new([server.authenticated_url()]).unwrap();
    let mut mutex = sync.new_mutex("start-up", once()).unwrap();
    mutex.lock().await.unwrap();
    mutex.unlock().await.unwrap();
    assert_eq!(server.dbsize(), 1, "only the fencing counter is left");
}

/// `rediss://` (TLS) to a plain Redis port, and to a port with nothing
/// listening: `Unavailable` naming the node, within the crate's timeouts,
/// and a layer over it answers 503 (`UNAVAILABLE` for gRPC); the plain
/// server got no lock key.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_plain_port_is_unavailable() {
    let server = RedisServer::start();
    let node = format!("127.0.0.1:{}", server.port());
    for (url, label) in [
        (format!("rediss://{node}/#insecure"), node.clone()),
        (format!("rediss://{node}"), node.clone()),
        {
            let port = free_port();
            (
                format!("rediss://127.0.0.1:{port}/#insecure"),
                format!("127.0.0.1:{port}"),
            )
        },
    ] {
        let sync = RedisSync::new([&url]).unwrap();
        let mut mutex = sync.new_mutex("tls", once()).unwrap();
        let err = bounded("lock", mutex.lock()).await.unwrap_err();
        assert!(err.is_unavailable(), "{url}: {err:?}");
        assert!(err.to_string().contains(&label), "{err}");
        for grpc in [false, true] {
            let layer = DistLockLayer::builder(sync.clone(), HeaderKey::new(KEY))
                .build()
                .unwrap();
            let response = bounded("request", one_request(layer, grpc)).await;
            if grpc {
                assert_eq!(response.headers()["grpc-status"], "14");
            } else {
                assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            }
        }
    }
    assert_eq!(server.dbsize(), 0);
}

/// Mutex options out of range, given to the layer: building it fails with
/// `InvalidOptions` naming the option. Extreme values that are in
/// range (the longest expiry, waits, holds and intervals of
/// `Duration::MAX`, a connect timeout of `Duration::MAX`) work without a
/// panic. A connect timeout of zero is refused by `RedisSync`'s builder
/// with `InvalidConfig` naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_out_of_range() {
    let base = DistMutexOptions::default;
    let cases = [
        (base().with_expiry(Duration::ZERO), "expiry"),
        (
            base().with_expiry(MAX_EXPIRY + Duration::from_nanos(1)),
            "expiry",
        ),
        (base().with_expiry(Duration::from_millis(1)), "drift"),
        (base().with_tries(0), "tries"),
        (base().with_drift_factor(1.0), "drift_factor"),
        (base().with_drift_factor(-0.1), "drift_factor"),
        (base().with_drift_factor(f64::NAN), "drift_factor"),
        (base().with_timeout_factor(0.0), "timeout_factor"),
        (base().with_timeout_factor(1.0), "timeout_factor"),
        (base().with_timeout_factor(f64::INFINITY), "timeout_factor"),
        (base().with_timeout_factor(f64::NAN), "timeout_factor"),
        (base().with_value(""), "value"),
    ];
    for (options, named) in cases {
        let err = DistLockLayer::builder(MemorySync::new(), HeaderKey::new(KEY))
            .mutex_options(options)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidOptions { .. }), "{err:?}");
        assert!(err.to_string().contains(named), "{named}: {err}");
    }

    let extreme = DistLockLayer::builder(MemorySync::new(), HeaderKey::new(KEY))
        .mutex_options(
            base()
                .with_expiry(MAX_EXPIRY)
                .with_timeout_factor(0.999)
                .with_drift_factor(0.999),
        )
        .wait(Duration::MAX)
        .max_hold(Duration::MAX)
        .extend_every(Duration::MAX)
        .build()
        .unwrap();
    assert_eq!(one_request(extreme, false).await.status(), StatusCode::OK);

    let err = RedisSync::builder()
        .url("redis://127.0.0.1:6379")
        .connect_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    assert!(err.to_string().contains("connect_timeout"), "{err}");
    let server = RedisServer::start();
    let sync = RedisSync::builder()
        .url(server.url())
        .connect_timeout(Duration::MAX)
        .build()
        .unwrap();
    let layer = DistLockLayer::builder(sync, HeaderKey::new(KEY))
        .build()
        .unwrap();
    let response = bounded("request", one_request(layer, false)).await;
    assert_eq!(response.status(), StatusCode::OK);
}

/// A running service whose only Redis node is down from the start answers
/// 503 with `Retry-After` at once; when the node comes up on the same port
/// it recovers on its own, goes back to 503 when the node is killed, and
/// recovers again when it is restarted: no restart of the service, no
/// fixed sleeps (each change is polled for, with a generous bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_answers_503_until_redis_comes_up() {
    let mut node = RedisServer::start();
    node.kill();
    let sync = RedisSync::new([node.url()]).unwrap();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(2))
        .with_timeout_factor(0.1);
    let app = axum::Router::new()
        .route("/jobs", axum::routing::get(|| async { "served" }))
        .layer(
            DistLockLayer::builder(sync, HeaderKey::new(KEY))
                .mutex_options(options)
                .wait(Duration::from_secs(60))
                .build()
                .unwrap(),
        );
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let status = async || {
        let (response, body) =
            bounded("request", client.get(&server.url("/jobs"), &[(KEY, "j")])).await;
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert!(response.headers().contains_key("retry-after"), "{body}");
        }
        response.status()
    };
    assert_eq!(status().await, StatusCode::SERVICE_UNAVAILABLE);
    for round in 0..2 {
        node.restart();
        eventually(
            Duration::from_secs(20),
            "served once Redis is up",
            async || status().await == StatusCode::OK,
        )
        .await;
        if round == 0 {
            node.kill();
            eventually(
                Duration::from_secs(20),
                "503 once Redis is gone",
                async || status().await == StatusCode::SERVICE_UNAVAILABLE,
            )
            .await;
        }
    }
}
