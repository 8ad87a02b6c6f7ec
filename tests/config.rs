//! Configuration and start-up errors: malformed URLs, a Redis that is not
//! there at start, a wrong password, TLS to a plain port, options and layer
//! settings out of range. Each is a typed error (matched on `Error`
//! variants) whose `Display` names the problem, never a panic or a hang;
//! a layer that cannot lock answers 503 or 500 and recovers on its own when
//! Redis comes up. Redis cases run on real `redis-server` processes on
//! loopback ports.

mod support;

use std::convert::Infallible;

use http::{Request, Response, StatusCode};
use support::counting::Counting;
use tower::{ServiceBuilder, ServiceExt};
use tower_dsync::layer::{DistLockLayer, HeaderKey, LockBody};
use tower_dsync::{DistSync, Error, MemorySync};

const KEY: &str = "x-job";

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

/// Layer settings out of range: each refused by `validate` with the
/// documented variant and a message naming the setting (a namespace that is
/// empty, holds a control character or leaves no room for a key, a
/// separator with a control character); keyed requests then get 500
/// (`INTERNAL` for gRPC) and take no lock, never a misleading 400.
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
        let sync = Counting::new(MemorySync::new().with_separator(separator));
        let layer = DistLockLayer::new(sync.clone(), HeaderKey::new(KEY)).namespace(namespace);
        let err = layer.validate().unwrap_err();
        let variant = if as_name {
            matches!(err, Error::InvalidName { .. })
        } else {
            matches!(err, Error::InvalidConfig { .. })
        };
        assert!(variant, "{namespace:.20?}: {err:?}");
        assert!(err.to_string().contains(named), "{err}");
        for grpc in [false, true] {
            let response = one_request(layer.clone(), grpc).await;
            if grpc {
                assert_eq!(response.headers()["grpc-status"], "13");
            } else {
                assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
            }
        }
        assert_eq!(sync.counts.locks(), 0);
    }
    // The longest namespace that leaves room for a one-byte key works.
    let fits = "n".repeat(tower_dsync::MAX_NAME_LEN - 2);
    let layer = DistLockLayer::new(MemorySync::new(), HeaderKey::new(KEY)).namespace(fits);
    layer.validate().unwrap();
}
