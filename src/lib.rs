//! Distributed mutexes for Rust services, and (in coming releases) a Tower
//! middleware that holds one per request key.
//!
//! The core is a port of the Go package `dsync`: a [`DistSync`] makes
//! [`DistMutex`]es by name; a mutex can [`lock`](DistMutex::lock),
//! [`unlock`](DistMutex::unlock), [`extend`](DistMutex::extend) and check
//! that it is still [`valid`](DistMutex::valid). Options and their defaults
//! follow Go's `DistMutexOptions` ([`DistMutexOptions`]), and errors are one
//! typed [`Error`] whose messages start with `dsync: `.
//!
//! Backends:
//! - [`MemorySync`]: in-process, the embedded default, no setup;
//! - `RedisSync` (feature `redis`, on by default): one Redis node, or
//!   Redlock over several independent masters;
//! - [`AnySync`]: a handle over any backend, picked at run time.
//!
//! ```
//! use std::time::Duration;
//! use tower_dsync::{DistMutex, DistMutexOptions, DistSync, MemorySync};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> tower_dsync::Result<()> {
//! let sync = MemorySync::new();
//! let options = DistMutexOptions::default().with_expiry(Duration::from_secs(10));
//! let mut mutex = sync.new_mutex("payments:order-17", options)?;
//!
//! mutex.lock().await?;
//! // ... only one holder of "payments:order-17" runs this at a time ...
//! assert!(mutex.valid().await?);
//! mutex.extend().await?;
//! mutex.unlock().await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod any;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod axum;
mod error;
pub mod layer;
mod memory;
mod options;
#[cfg(feature = "redis")]
mod redis;
mod sync;

#[cfg(feature = "redis")]
pub use self::redis::{RedisMutex, RedisSync, RedisSyncBuilder};
pub use any::{AnyMutex, AnySync};
pub use error::{BoxError, Error, NodeError, Result};
pub use layer::DistLockLayer;
pub use memory::{MemoryMutex, MemorySync};
pub use options::{DelayFn, DistMutexOptions, GenValueFn, MAX_EXPIRY, random_value};
pub use sync::{DistMutex, DistSync, MAX_NAME_LEN, validate_name};

/// The README's Rust snippets compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
