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
            DistLockLayer::new(MemorySync::new(), PathParam::new("id"))
                .namespace("jobs")
                .wait(Duration::ZERO),
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
        .layer(DistLockLayer::new(
            MemorySync::new(),
            HeaderKey::new("x-id"),
        ));
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
    let layer = || DistLockLayer::new(MemorySync::new(), PathParam::new("id"));
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
