//! axum integration: `HeldLock` as an extractor, `PathParam` keys with
//! `route_layer`, through a real server and client.

#![cfg(feature = "axum")]

mod support;

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use http::StatusCode;
use support::http::{HttpClient, Server};
use tokio::sync::mpsc;
use tower_dsync::axum::PathParam;
use tower_dsync::layer::{HeaderKey, HeldLock};
use tower_dsync::{DistLockLayer, MemorySync};

/// `route_layer` + `PathParam`: one lock per job id; the handler takes
/// `HeldLock` as an extractor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_parameter_keys_and_held_lock_extractor() {
    let (entered_tx, mut entered) = mpsc::unbounded_channel::<()>();
    let (go_tx, go_rx) = mpsc::unbounded_channel::<()>();
    let go_rx = std::sync::Arc::new(tokio::sync::Mutex::new(go_rx));
    let jobs = Router::new()
        .route(
            "/jobs/{id}/start",
            post(move |lock: HeldLock| async move {
                entered_tx.send(()).unwrap();
                go_rx.lock().await.recv().await;
                lock.name().to_owned()
            }),
        )
        .route(
            "/jobs/{id}",
            get(|lock: HeldLock| async move { lock.name().to_owned() }),
        )
        .route_layer(
            DistLockLayer::builder(MemorySync::new(), PathParam::new("id"))
                .namespace("jobs")
                .wait(Duration::ZERO)
                .build()
                .unwrap(),
        );
    let app = Router::new().nest("/api", jobs);
    let server = Server::start(app).await;
    let client = HttpClient::default();

    let start = |id: &str| {
        let (client, url) = (client.clone(), server.url(&format!("/api/jobs/{id}/start")));
        tokio::spawn(async move {
            let request = http::Request::post(url).body(Default::default()).unwrap();
            let response = client.send(request).await;
            response.status()
        })
    };
    let first = start("7");
    entered.recv().await.unwrap();
    // Same id: busy; another id: its own lock.
    let (busy, _) = client.get(&server.url("/api/jobs/7"), &[]).await;
    assert_eq!(busy.status(), StatusCode::CONFLICT);
    let (other, body) = client.get(&server.url("/api/jobs/8"), &[]).await;
    assert_eq!((other.status(), body.as_str()), (StatusCode::OK, "jobs:8"));
    go_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap(), StatusCode::OK);
}

/// `HeldLock` without the layer is a 500 that says why; `Option<HeldLock>`
/// serves requests without a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_held_lock() {
    let app = Router::new()
        .route(
            "/strict",
            get(|lock: HeldLock| async move { lock.name().to_owned() }),
        )
        .route(
            "/lenient",
            get(|lock: Option<HeldLock>| async move {
                lock.map_or("unlocked".to_owned(), |l| l.name().to_owned())
            }),
        )
        .layer(
            DistLockLayer::builder(MemorySync::new(), HeaderKey::new("x-id"))
                .build()
                .unwrap(),
        );
    let server = Server::start(app).await;
    let client = HttpClient::default();
    let (response, body) = client.get(&server.url("/strict"), &[]).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("DistLockLayer"), "{body}");
    let (response, body) = client.get(&server.url("/lenient"), &[]).await;
    assert_eq!(
        (response.status(), body.as_str()),
        (StatusCode::OK, "unlocked")
    );
    let (response, body) = client.get(&server.url("/lenient"), &[("x-id", "a")]).await;
    assert_eq!(
        (response.status(), body.as_str()),
        (StatusCode::OK, "lock:a")
    );
}

/// Why `route_layer`: with `Router::layer`, the layer also runs for requests
/// that match no route, which have no path parameter; they get a 400 that
/// names the fix instead of a 404. With `route_layer` they get the 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_param_wants_route_layer() {
    let layer = || {
        DistLockLayer::builder(MemorySync::new(), PathParam::new("id"))
            .build()
            .unwrap()
    };
    let wide = Router::new()
        .route("/jobs/{id}", get(|| async { "ok" }))
        .layer(layer());
    let narrow = Router::new()
        .route("/jobs/{id}", get(|| async { "ok" }))
        .route_layer(layer());
    let (wide, narrow) = (Server::start(wide).await, Server::start(narrow).await);
    let client = HttpClient::default();
    let (response, body) = client.get(&wide.url("/nowhere"), &[]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(body.contains("route_layer"), "{body}");
    let (response, _) = client.get(&narrow.url("/nowhere"), &[]).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let (response, _) = client.get(&narrow.url("/jobs/1"), &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
}

/// Answers with the name of the lock it runs under, or `unlocked`.
async fn lock_name(lock: Option<HeldLock>) -> String {
    lock.map_or("unlocked".to_owned(), |l| l.name().to_owned())
}

/// axum's router accepts a static prefix inside a segment, for a parameter
/// and for a wildcard: the key is what the router extracted for the
/// parameter (percent-decoded), so every such route is served locked. The
/// same holds with `Router::layer` for a matched route, and in a nested
/// router for a parameter of the prefix it is nested under.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_param_with_a_prefix_inside_its_segment() {
    let layer = |name| {
        DistLockLayer::builder(MemorySync::new(), PathParam::new(name))
            .namespace("jobs")
            .wait(Duration::ZERO)
            .build()
            .unwrap()
    };
    let app = Router::new()
        .route("/jobs/job-{id}", get(lock_name))
        .route("/jobs/{id}/start", get(lock_name))
        .route_layer(layer("id"))
        .merge(
            Router::new()
                .route("/files/v{*rest}", get(lock_name))
                .route_layer(layer("rest")),
        )
        .merge(
            Router::new()
                .route("/wide/w-{id}", get(lock_name))
                .layer(layer("id")),
        )
        .nest(
            "/tenants/t-{tenant}",
            Router::new()
                .route("/jobs", get(lock_name))
                .route_layer(layer("tenant")),
        );
    let server = Server::start(app).await;
    let client = HttpClient::default();
    for (path, name) in [
        ("/jobs/job-7", "jobs:7"),
        ("/jobs/job-%37", "jobs:7"),
        ("/jobs/8/start", "jobs:8"),
        ("/files/v1/a/b", "jobs:1/a/b"),
        ("/wide/w-9", "jobs:9"),
        ("/tenants/t-acme/jobs", "jobs:acme"),
    ] {
        let (response, body) = client.get(&server.url(path), &[]).await;
        assert_eq!(
            (response.status(), body.as_str()),
            (StatusCode::OK, name),
            "{path}"
        );
    }
}

/// Counts the `ERROR` events emitted on this thread while it is the
/// default subscriber.
#[derive(Default, Clone)]
struct Errors(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl tracing::Subscriber for Errors {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::ERROR {
            let target = event.metadata().target().to_owned();
            self.0.lock().unwrap().push(target);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A parameter name that the matched route does not have (a typo) is the
/// server's mistake: every request gets a 500 that names it, an error is
/// logged, and the handler never runs unlocked. A layer outside any router
/// (it sees no route and no parameters) is the same mistake.
#[tokio::test]
async fn path_param_missing_from_the_route_is_a_500() {
    let errors = Errors::default();
    let _default = tracing::subscriber::set_default(errors.clone());
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = {
        let ran = ran.clone();
        move || async move {
            ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            "ran"
        }
    };
    let typo = Router::new()
        .route("/jobs/{job_id}", get(handler.clone()))
        .route_layer(
            DistLockLayer::builder(MemorySync::new(), PathParam::new("id"))
                .build()
                .unwrap(),
        );
    let typo = Server::start(typo).await;
    let outside = tower::ServiceBuilder::new()
        .map_response(|response: http::Response<_>| response.map(axum::body::Body::new))
        .layer(
            DistLockLayer::builder(MemorySync::new(), PathParam::new("id"))
                .build()
                .unwrap(),
        )
        .service(Router::new().route("/jobs/{id}", get(handler)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outside_addr = listener.local_addr().unwrap();
    let outside = tokio::spawn(async move {
        let service =
            axum::ServiceExt::<http::Request<axum::body::Body>>::into_make_service(outside);
        axum::serve(listener, service).await.unwrap();
    });
    let client = HttpClient::default();
    for url in [typo.url("/jobs/7"), format!("http://{outside_addr}/jobs/7")] {
        let (response, body) = client.get(&url, &[]).await;
        assert_eq!(
            response.status(),
            StatusCode::INTERNAL_SERVER_ERROR,
            "{url}: {body}"
        );
        assert!(body.contains("\"id\""), "{body}");
    }
    outside.abort();
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(errors.0.lock().unwrap().len(), 2, "one error per request");
}
