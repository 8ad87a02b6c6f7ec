//! Heap allocations per request, bare and through `DistLockLayer` over
//! `MemorySync`, counted by a global allocator.
//!
//! ```text
//! cargo bench --bench layer_allocs
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_dsync::layer::HeaderKey;
use tower_dsync::{DistLockLayer, MemorySync};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

async fn noop(_: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

fn request(i: u64) -> Request<()> {
    Request::get("/").header("x-key", i).body(()).unwrap()
}

const N: u64 = 100_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let bare = ServiceBuilder::new().service_fn(noop);
    let locked = ServiceBuilder::new()
        .layer(DistLockLayer::new(
            MemorySync::new(),
            HeaderKey::new("x-key"),
        ))
        .service_fn(noop);
    let (bare, locked) = runtime.block_on(async move {
        // Warm up: maps and queues reach their working size.
        for i in 0..N {
            let response = locked.clone().oneshot(request(i)).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
        let start = ALLOCS.load(Ordering::Relaxed);
        for i in 0..N {
            let response = bare.oneshot(request(i)).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
        let bare = ALLOCS.load(Ordering::Relaxed) - start;
        let start = ALLOCS.load(Ordering::Relaxed);
        for i in 0..N {
            let response = locked.clone().oneshot(request(i)).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
        (bare, ALLOCS.load(Ordering::Relaxed) - start)
    });
    let (bare, locked) = (bare as f64 / N as f64, locked as f64 / N as f64);
    println!(
        "allocations per request: bare {bare:.2}, DistLockLayer over MemorySync {locked:.2}, added {:.2}",
        locked - bare
    );
}
