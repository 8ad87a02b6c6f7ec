//! A tonic gRPC server whose `Start` method is guarded per job id: a second
//! start of a job that is already running gets `ABORTED`.
//!
//! The service is written by hand with a small UTF-8 codec, so neither
//! `protoc` nor generated code is needed. The job id travels in the
//! `x-job-id` metadata entry, which the layer reads.
//!
//! ```text
//! cargo run --example jobs_grpc
//! ```

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Status};
use tower_dsync::DistLockLayer;
use tower_dsync::layer::{GrpcMetadataKey, HeldLock};

const START: &str = "/jobs.Jobs/Start";

/// Messages are plain UTF-8 strings.
#[derive(Clone, Copy, Default)]
struct Utf8Codec;

impl Codec for Utf8Codec {
    type Encode = String;
    type Decode = String;
    type Encoder = Utf8Codec;
    type Decoder = Utf8Codec;
    fn encoder(&mut self) -> Self::Encoder {
        Utf8Codec
    }
    fn decoder(&mut self) -> Self::Decoder {
        Utf8Codec
    }
}

impl Encoder for Utf8Codec {
    type Item = String;
    type Error = Status;
    fn encode(&mut self, item: String, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.as_bytes());
        Ok(())
    }
}

impl Decoder for Utf8Codec {
    type Item = String;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<String>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| Status::invalid_argument("the message is not UTF-8"))
    }
}

/// The `jobs.Jobs` service: `Start(job id) -> status text`.
#[derive(Clone, Default)]
struct Jobs;

/// The `Start` handler. The layer holds the job's lock while it runs.
struct StartJob;

impl UnaryService<String> for StartJob {
    type Response = String;
    type Future = Pin<Box<dyn Future<Output = Result<tonic::Response<String>, Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<String>) -> Self::Future {
        Box::pin(async move {
            let lock = request.extensions().get::<HeldLock>().cloned();
            let job = request.into_inner();
            // The job's work.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let held = lock.map_or("no lock".to_owned(), |l| l.name().to_owned());
            Ok(tonic::Response::new(format!(
                "job {job} finished (held {held})"
            )))
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Jobs {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            if request.uri().path() == START {
                let mut grpc = tonic::server::Grpc::new(Utf8Codec);
                Ok(grpc.unary(StartJob, request).await)
            } else {
                Ok(Status::unimplemented("no such method").into_http())
            }
        })
    }
}

impl NamedService for Jobs {
    const NAME: &'static str = "jobs.Jobs";
}

/// Calls `Start` for `job`.
async fn start(channel: Channel, job: &str) -> Result<String, Status> {
    let mut client = tonic::client::Grpc::new(channel);
    client
        .ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(job.to_owned());
    request.metadata_mut().insert(
        "x-job-id",
        job.parse()
            .map_err(|_| Status::invalid_argument("job id"))?,
    );
    let path = http::uri::PathAndQuery::from_static(START);
    Ok(client.unary(request, path, Utf8Codec).await?.into_inner())
}

#[tokio::main]
async fn main() -> tower_dsync::Result<()> {
    let (sync, backend) = common::backend();
    println!("backend: {backend}");

    // Settings that cannot work stop the server here, before it serves.
    let layer = DistLockLayer::builder(sync, GrpcMetadataKey::new("x-job-id"))
        .namespace("jobs")
        .wait(Duration::ZERO)
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        Server::builder()
            .layer(layer)
            .add_service(Jobs)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    println!("server: grpc://{addr} (jobs.Jobs/Start)");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // job-1 started twice at once, job-2 once, all concurrently.
    let (a, b, c) = tokio::join!(
        start(channel.clone(), "job-1"),
        start(channel.clone(), "job-1"),
        start(channel.clone(), "job-2"),
    );
    let mut aborted = 0;
    for (label, result) in [("job-1", &a), ("job-1 (duplicate)", &b), ("job-2", &c)] {
        match result {
            Ok(text) => println!("{label}: OK {text}"),
            Err(status) => {
                println!("{label}: {:?} {}", status.code(), status.message());
                if status.code() == Code::Aborted {
                    aborted += 1;
                }
            }
        }
    }
    assert_eq!(aborted, 1, "exactly one duplicate start is refused");
    assert!(c.is_ok(), "another job runs in parallel");
    // Once job-1 has finished, it can be started again.
    let again = start(channel.clone(), "job-1").await;
    println!("job-1 again: {}", again.as_deref().unwrap_or("failed"));
    assert!(again.is_ok());
    println!("duplicate start: ABORTED");
    Ok(())
}
