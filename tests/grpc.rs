//! The layer in a tonic server, with a real tonic client: rejections arrive
//! as gRPC status codes with a message. Uses tonic-health's service, which
//! ships its generated code (no `protoc`).

mod support;

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_dsync::layer::{GrpcMetadataKey, MethodPath};
use tower_dsync::{DistLockLayer, DistMutex, DistMutexOptions, DistSync, MemorySync, RedisSync};

async fn serve<D: DistSync, K>(layer: DistLockLayer<D, K>) -> HealthClient<Channel>
where
    K: tower_dsync::layer::KeyExtractor<tonic::body::Body>,
{
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _reporter = reporter;
        Server::builder()
            .layer(layer)
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
    HealthClient::new(channel)
}

fn check(job: Option<&str>) -> tonic::Request<HealthCheckRequest> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if let Some(job) = job {
        request
            .metadata_mut()
            .insert("x-job-id", job.parse().unwrap());
    }
    request
}

/// Keyed by a metadata entry: a busy key is `ABORTED`, a bad key
/// `INVALID_ARGUMENT`, both with a message; a free key is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_keys_and_grpc_status_codes() {
    let sync = MemorySync::new();
    let layer = DistLockLayer::builder(sync.clone(), GrpcMetadataKey::new("x-job-id"))
        .namespace("grpc")
        .wait(Duration::ZERO)
        .build()
        .unwrap();
    let mut client = serve(layer).await;

    let ok = client.check(check(Some("job-1"))).await.unwrap();
    assert_eq!(ok.into_inner().status, 1, "SERVING");

    let mut holder = sync
        .new_mutex("grpc:job-1", DistMutexOptions::default())
        .unwrap();
    holder.lock().await.unwrap();
    let busy = client.check(check(Some("job-1"))).await.unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    assert!(busy.message().contains("locked"), "{busy:?}");
    let other = client.check(check(Some("job-2"))).await;
    assert!(other.is_ok(), "another job is not affected");
    holder.unlock().await.unwrap();

    let bad = client.check(check(Some(""))).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("empty"), "{bad:?}");
    // No key: passes through unlocked by default.
    assert!(client.check(check(None)).await.is_ok());
}

/// Keyed by the method path: one call of a method at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_path_keys() {
    let sync = MemorySync::new();
    let layer = DistLockLayer::builder(sync.clone(), MethodPath)
        .namespace("grpc")
        .wait(Duration::ZERO)
        .build()
        .unwrap();
    let mut client = serve(layer).await;
    let mut holder = sync
        .new_mutex(
            "grpc:/grpc.health.v1.Health/Check",
            DistMutexOptions::default(),
        )
        .unwrap();
    holder.lock().await.unwrap();
    let busy = client.check(check(None)).await.unwrap_err();
    assert_eq!(busy.code(), Code::Aborted);
    holder.unlock().await.unwrap();
    assert!(client.check(check(None)).await.is_ok());
}

/// Redis down: `UNAVAILABLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_is_unavailable() {
    let mut nodes = support::RedisNodes::start(1);
    let sync = RedisSync::new(nodes.urls()).unwrap();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(2))
        .with_timeout_factor(0.1);
    let layer = DistLockLayer::builder(sync, GrpcMetadataKey::new("x-job-id"))
        .mutex_options(options)
        .wait(Duration::ZERO)
        .build()
        .unwrap();
    let mut client = serve(layer).await;
    assert!(client.check(check(Some("j"))).await.is_ok());
    nodes.servers[0].kill();
    let down = client.check(check(Some("j"))).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    assert!(!down.message().is_empty());
}

/// A call with a timeout (`grpc-timeout`) waits for a held key no longer
/// than shortly before it, then gets `DEADLINE_EXCEEDED` from the layer,
/// however long the layer's own wait budget; the server's own timeout
/// (tonic answers "Timeout expired") never comes into play.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waits_no_longer_than_its_deadline() {
    let sync = MemorySync::new();
    let layer = DistLockLayer::builder(sync.clone(), GrpcMetadataKey::new("x-job-id"))
        .namespace("grpc")
        .wait(Duration::from_secs(600))
        .build()
        .unwrap();
    let mut client = serve(layer).await;
    let mut holder = sync
        .new_mutex("grpc:job-1", DistMutexOptions::default())
        .unwrap();
    holder.lock().await.unwrap();
    let mut call = check(Some("job-1"));
    call.set_timeout(Duration::from_millis(300));
    let late = client.check(call).await.unwrap_err();
    assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
    assert!(late.message().contains("deadline"), "{late:?}");
    // Once the key is free, a call with a deadline is served.
    holder.unlock().await.unwrap();
    let mut call = check(Some("job-1"));
    call.set_timeout(Duration::from_secs(30));
    assert!(client.check(call).await.is_ok());
}
