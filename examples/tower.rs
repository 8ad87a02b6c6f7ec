//! The layer without a framework: `DistLockLayer` around a `service_fn`,
//! keyed by the `Idempotency-Key` header.
//!
//! ```text
//! cargo run --example tower
//! ```

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_dsync::DistLockLayer;
use tower_dsync::layer::{HeaderKey, HeldLock};

/// Charges a payment; the layer makes sure one idempotency key is charged
/// by one request at a time.
async fn charge(request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = match request.extensions().get::<HeldLock>() {
        Some(lock) => {
            tokio::time::sleep(Duration::from_millis(50)).await;
            format!("charged under lock {}", lock.name())
        }
        None => "no idempotency key: served unlocked".to_owned(),
    };
    Ok(Response::new(Full::new(Bytes::from(text))))
}

fn request(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut builder = Request::post("/payments");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Full::default()).unwrap()
}

async fn show(label: &str, response: Response<tower_dsync::layer::LockBody<Full<Bytes>>>) {
    let status = response.status();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| format!(" (retry after {} s)", v.to_str().unwrap_or("?")))
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    println!(
        "{label}: {status}{retry} {}",
        String::from_utf8_lossy(&body).trim()
    );
}

#[tokio::main]
async fn main() -> tower_dsync::Result<()> {
    let (sync, backend) = common::backend();
    println!("backend: {backend}");

    // Settings that cannot work are an error here, at start-up.
    let layer = DistLockLayer::builder(sync, HeaderKey::new("idempotency-key"))
        .namespace("payments")
        .wait(Duration::ZERO)
        .build()?;
    let mut service = ServiceBuilder::new().layer(layer).service_fn(charge);

    // Two requests with the same key at once: one is charged, one is told
    // the key is busy (409, fail fast).
    let first = service.ready().await.unwrap().call(request(Some("pay-1")));
    let second = service.ready().await.unwrap().call(request(Some("pay-1")));
    let (first, second) = tokio::join!(first, second);
    let statuses = [
        first.as_ref().unwrap().status(),
        second.as_ref().unwrap().status(),
    ];
    show("pay-1, first ", first.unwrap()).await;
    show("pay-1, second", second.unwrap()).await;

    // Different keys run side by side; no key passes through.
    let other = service
        .clone()
        .oneshot(request(Some("pay-2")))
        .await
        .unwrap();
    show("pay-2        ", other).await;
    let none = service.clone().oneshot(request(None)).await.unwrap();
    show("no key       ", none).await;
    // Once the first request is done, the key is free again.
    let again = service
        .clone()
        .oneshot(request(Some("pay-1")))
        .await
        .unwrap();
    let again_status = again.status();
    show("pay-1, later ", again).await;

    assert!(statuses.contains(&http::StatusCode::OK));
    assert!(statuses.contains(&http::StatusCode::CONFLICT));
    assert_eq!(again_status, http::StatusCode::OK);
    println!("ok: one request per idempotency key at a time");
    Ok(())
}
