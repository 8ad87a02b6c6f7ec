//! Time the layer adds per request: the same no-op handler called through
//! `tower::ServiceExt::oneshot`, bare and behind `DistLockLayer` over
//! `MemorySync` (distinct keys, uncontended).
//!
//! ```text
//! cargo bench --bench layer
//! ```

use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_dsync::layer::HeaderKey;
use tower_dsync::{DistLockLayer, MemorySync};

async fn noop(_: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

fn request(i: u64) -> Request<()> {
    Request::get("/").header("x-key", i).body(()).unwrap()
}

fn overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("request through a no-op handler");
    let bare = ServiceBuilder::new().service_fn(noop);
    group.bench_function("bare service", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let response = bare.oneshot(request(i)).await.unwrap();
                    response.into_body().collect().await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    let locked = ServiceBuilder::new()
        .layer(
            DistLockLayer::builder(MemorySync::new(), HeaderKey::new("x-key"))
                .build()
                .unwrap(),
        )
        .service_fn(noop);
    group.bench_function("DistLockLayer over MemorySync", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let response = locked.clone().oneshot(request(i)).await.unwrap();
                    response.into_body().collect().await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
