//! Lock, extend, check and unlock a name on the in-process backend, printing
//! each step, then show what a second owner sees while the name is held.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::time::Duration;

use tokio::time::Instant;
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, Error, MemorySync};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let sync = MemorySync::new();
    let name = ["invoices", "2026-11", "42"].join(sync.separator());
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(5));

    let mut mutex = sync.new_mutex(&name, options.clone())?;
    println!(
        "mutex {:?} created; value {:?}",
        mutex.name(),
        mutex.value()
    );

    mutex.lock().await?;
    println!(
        "locked: value {}, valid for {} ms, fencing token {:?}",
        mutex.value(),
        remaining_ms(&mutex),
        mutex.fencing_token()
    );

    let mut rival = sync.new_mutex(&name, options.with_tries(3))?;
    match rival.lock().await {
        Err(e @ Error::Held { .. }) => println!("a second owner is refused: {e}"),
        other => panic!("the name should be held, got {other:?}"),
    }
    match rival.unlock().await {
        Err(e) => println!("and cannot unlock it: {e}"),
        Ok(()) => panic!("a non-owner unlocked the name"),
    }

    tokio::time::sleep(Duration::from_millis(100)).await;
    mutex.extend().await?;
    println!("extended: valid for {} ms again", remaining_ms(&mutex));

    println!("valid: {}", mutex.valid().await?);

    mutex.unlock().await?;
    println!("unlocked; valid: {}", mutex.valid().await?);

    rival.lock().await?;
    println!("the second owner now holds it: value {}", rival.value());
    rival.unlock().await?;
    println!("done");
    Ok(())
}

fn remaining_ms(mutex: &impl DistMutex) -> u128 {
    mutex.until().map_or(0, |until| {
        until.saturating_duration_since(Instant::now()).as_millis()
    })
}
