//! The layer's metrics (feature `metrics`): after known traffic through a
//! real HTTP server, the recorder holds the counts it caused, labelled by
//! namespace (never by key).

#![cfg(feature = "metrics")]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use http::StatusCode;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::http::{HttpClient, Server};
use tower_dsync::layer::meters::{
    ACQUISITIONS, EXTENSION_FAILURES, HELD, HOLD_SECONDS, LOST, REJECTIONS, WAIT_SECONDS,
};
use tower_dsync::layer::{HeaderKey, HeldLock, MissingKey};
use tower_dsync::{DistLockLayer, DistMutex, DistMutexOptions, DistSync, MemorySync};

/// Every metric of the snapshot, by name and labels (`k=v` pairs, sorted).
fn read(snapshotter: &Snapshotter) -> HashMap<(String, Vec<String>), DebugValue> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let mut labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            ((key.key().name().to_owned(), labels), value)
        })
        .collect()
}

fn counter(
    metrics: &HashMap<(String, Vec<String>), DebugValue>,
    name: &str,
    labels: &[&str],
) -> u64 {
    let key = (
        name.to_owned(),
        labels.iter().map(|l| (*l).to_owned()).collect(),
    );
    match metrics.get(&key) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name} {labels:?}: {other:?}"),
    }
}

fn samples(metrics: &HashMap<(String, Vec<String>), DebugValue>, name: &str) -> usize {
    match metrics.get(&(name.to_owned(), vec!["namespace=jobs".to_owned()])) {
        Some(DebugValue::Histogram(values)) => values.len(),
        other => panic!("{name}: {other:?}"),
    }
}

fn gauge(metrics: &HashMap<(String, Vec<String>), DebugValue>, name: &str) -> f64 {
    match metrics.get(&(name.to_owned(), vec!["namespace=jobs".to_owned()])) {
        Some(DebugValue::Gauge(value)) => value.into_inner(),
        other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_traffic_gives_known_counts() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let sync = MemorySync::new();
    // The handles are taken when the layer is built: the recorder is the
    // one in place then.
    let layer = metrics::with_local_recorder(&recorder, || {
        DistLockLayer::builder(sync.clone(), HeaderKey::new("x-key"))
            .namespace("jobs")
            .wait(Duration::ZERO)
            .on_missing_key(MissingKey::Reject)
            .max_hold(Duration::from_millis(50))
            .build()
            .unwrap()
    });
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/long",
            get(|lock: axum::Extension<HeldLock>| async move {
                // Past `max_hold`: the lock is lost.
                lock.lost().await;
                "lost"
            }),
        )
        .layer(layer);
    let server = Server::start(app).await;
    let client = HttpClient::default();

    for key in ["a", "b", "c"] {
        let (ok, _) = client.get(&server.url("/"), &[("x-key", key)]).await;
        assert_eq!(ok.status(), StatusCode::OK);
    }
    let mut holder = sync
        .new_mutex("jobs:a", DistMutexOptions::default())
        .unwrap();
    holder.lock().await.unwrap();
    let (busy, _) = client.get(&server.url("/"), &[("x-key", "a")]).await;
    assert_eq!(busy.status(), StatusCode::CONFLICT);
    holder.unlock().await.unwrap();
    let long = "k".repeat(2000);
    let (bad, _) = client.get(&server.url("/"), &[("x-key", &long)]).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let (missing, _) = client.get(&server.url("/"), &[]).await;
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    let (lost, _) = client.get(&server.url("/long"), &[("x-key", "d")]).await;
    assert_eq!(lost.status(), StatusCode::OK);

    // Releases may finish in the background: wait until none is held.
    let metrics = loop {
        let metrics = read(&snapshotter);
        if gauge(&metrics, HELD) == 0.0 {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let ns = "namespace=jobs";
    assert_eq!(counter(&metrics, ACQUISITIONS, &[ns]), 4);
    assert_eq!(samples(&metrics, WAIT_SECONDS), 4);
    assert_eq!(samples(&metrics, HOLD_SECONDS), 4);
    assert_eq!(counter(&metrics, REJECTIONS, &["kind=busy", ns]), 1);
    assert_eq!(counter(&metrics, REJECTIONS, &["kind=invalid_key", ns]), 1);
    assert_eq!(counter(&metrics, REJECTIONS, &["kind=missing_key", ns]), 1);
    assert_eq!(counter(&metrics, REJECTIONS, &["kind=unavailable", ns]), 0);
    assert_eq!(counter(&metrics, LOST, &[ns]), 1);
    assert!(counter(&metrics, EXTENSION_FAILURES, &[ns]) >= 1);
    // No metric carries a key.
    assert!(
        metrics.keys().all(|(_, labels)| labels
            .iter()
            .all(|l| l.starts_with("namespace=") || l.starts_with("kind="))),
        "{:?}",
        metrics.keys().collect::<Vec<_>>()
    );
}
