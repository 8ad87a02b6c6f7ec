//! The in-process backend's uncontended cycle (`lock` + `unlock` on a free
//! name) next to its floor: taking and releasing a plain `std::sync::Mutex`
//! around a `HashMap` insert and remove, the least any in-process lock table
//! can do.
//!
//! ```text
//! cargo bench --bench memory
//! ```

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, MemorySync};

fn cycle(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("uncontended lock+unlock");

    let table: Mutex<HashMap<String, u128>> = Mutex::new(HashMap::new());
    group.bench_function("floor: Mutex<HashMap> insert+remove", |b| {
        b.iter(|| {
            let name = black_box("orders:17").to_owned();
            table.lock().unwrap().insert(name.clone(), 1);
            table.lock().unwrap().remove(&name);
        })
    });

    let sync = MemorySync::new();
    group.bench_function("MemorySync", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let options = DistMutexOptions::default();
                let mut mutex = sync.new_mutex("orders:17", options).unwrap();
                let start = Instant::now();
                for _ in 0..iters {
                    mutex.lock().await.unwrap();
                    mutex.unlock().await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, cycle);
criterion_main!(benches);
