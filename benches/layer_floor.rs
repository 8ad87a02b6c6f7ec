//! What a request through `DistLockLayer` over `MemorySync` costs at
//! best, beside the same no-op handler called bare (distinct keys,
//! uncontended, as in `benches/layer.rs`):
//!
//! - heap allocations per request, counted by a global allocator;
//! - the fastest of many short chunks of requests, bare and through the
//!   layer in turn: a floor that other processes on a shared machine move
//!   far less than they move criterion's mean.
//!
//! ```text
//! cargo bench --bench layer_floor
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_dsync::layer::HeaderKey;
use tower_dsync::{DistLockLayer, MemorySync};

/// Counts allocations while `COUNTING` is set.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
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

const ALLOC_REQUESTS: u64 = 100_000;
/// How many chunks are timed; `DSYNC_FLOOR_CHUNKS` sets fewer, for a run
/// under an instruction counter such as callgrind.
const CHUNKS: u32 = 300;
const CHUNK: u64 = 5_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let bare = ServiceBuilder::new().service_fn(noop);
    let locked = ServiceBuilder::new()
        .layer(
            DistLockLayer::builder(MemorySync::new(), HeaderKey::new("x-key"))
                .build()
                .unwrap(),
        )
        .service_fn(noop);
    runtime.block_on(async move {
        // Distinct keys.
        let key = std::cell::Cell::new(0);
        let next = || {
            key.set(key.get() + 1);
            request(key.get())
        };
        let bare_once = async || {
            let response = bare.oneshot(next()).await.unwrap();
            response.into_body().collect().await.unwrap();
        };
        let locked_once = async || {
            let response = locked.clone().oneshot(next()).await.unwrap();
            response.into_body().collect().await.unwrap();
        };
        // Warm up: maps and queues reach their working size.
        for _ in 0..ALLOC_REQUESTS {
            locked_once().await;
        }

        let mut allocations = [0.0; 2];
        for (count, locked) in allocations.iter_mut().zip([false, true]) {
            let start = ALLOCS.load(Ordering::Relaxed);
            COUNTING.store(true, Ordering::Relaxed);
            for _ in 0..ALLOC_REQUESTS {
                if locked {
                    locked_once().await;
                } else {
                    bare_once().await;
                }
            }
            COUNTING.store(false, Ordering::Relaxed);
            *count = (ALLOCS.load(Ordering::Relaxed) - start) as f64 / ALLOC_REQUESTS as f64;
        }
        println!(
            "allocations per request: bare {:.2}, DistLockLayer over MemorySync {:.2}, added {:.2}",
            allocations[0],
            allocations[1],
            allocations[1] - allocations[0]
        );

        let mut fastest = [f64::MAX; 2];
        for _ in 0..chunks() {
            for (best, locked) in fastest.iter_mut().zip([false, true]) {
                let start = Instant::now();
                for _ in 0..CHUNK {
                    if locked {
                        locked_once().await;
                    } else {
                        bare_once().await;
                    }
                }
                let per_request = start.elapsed().as_nanos() as f64 / CHUNK as f64;
                *best = best.min(per_request);
            }
        }
        println!(
            "fastest of {} chunks of {CHUNK} requests: bare {:.0} ns, DistLockLayer over MemorySync {:.0} ns, added {:.0} ns",
            chunks(),
            fastest[0],
            fastest[1],
            fastest[1] - fastest[0]
        );
    });
}

/// [`CHUNKS`], or `DSYNC_FLOOR_CHUNKS`.
fn chunks() -> u32 {
    std::env::var("DSYNC_FLOOR_CHUNKS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CHUNKS)
}
