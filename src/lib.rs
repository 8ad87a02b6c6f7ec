//! Distributed mutexes for Rust services, and a Tower middleware that holds
//! one per request key.
//!
//! [`DistLockLayer`] takes a key from each request (a path segment or
//! parameter, a header such as `Idempotency-Key`, a gRPC metadata entry, any
//! closure) and holds a distributed lock on it while the handler runs, so two
//! requests for the same resource never run at the same time, on one replica
//! or on fifty. In an axum app:
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::post};
//! use tower_dsync::{DistLockLayer, MemorySync};
//! use tower_dsync::layer::{HeldLock, PathSegment};
//!
//! async fn deliver(lock: axum::Extension<HeldLock>) -> String {
//!     // Only one delivery for this resource runs at a time.
//!     format!("processed under {}", lock.name())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> tower_dsync::Result<()> {
//! let sync = MemorySync::new(); // or RedisSync::new(["redis://..."])?
//! // An invalid configuration is an error here, at start-up.
//! let layer = DistLockLayer::builder(sync, PathSegment::new(1))
//!     .namespace("webhooks")
//!     .wait(Duration::from_secs(10))
//!     .build()?;
//! let app: Router = Router::new()
//!     .route("/webhooks/{resource}", post(deliver))
//!     .route_layer(layer);
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! # drop((app, listener));
//! # Ok(()) }
//! ```
//!
//! See the [`layer`] module for the request lifecycle, the rejections (409,
//! 503, 400, and their gRPC equivalents) and the options.
//!
//! A lock only serializes. [`IdempotencyLayer`](idempotency::IdempotencyLayer),
//! in the [`idempotency`] module, also keeps the first response of each
//! `Idempotency-Key`, so that a retry gets that response back instead of
//! running the handler again, on any replica.
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
//! - `RedisSync` (feature `redis`, on by default): one Redis node,
//!   Redlock over several independent masters, or (feature `cluster`) a
//!   Redis Cluster;
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
//!
//! Features: `redis` (default) for `RedisSync`; `cluster` for Redis
//! Cluster mode; `tls` for `rediss://`;
//! `axum` for [`HeldLock`](layer::HeldLock) as an axum extractor and
//! `axum::PathParam` keys.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(
    clippy::too_many_lines,
    clippy::fn_params_excessive_bools,
    clippy::dbg_macro,
    clippy::todo,
    clippy::mem_forget,
    clippy::unused_self,
    clippy::needless_continue,
    clippy::match_wildcard_for_single_variants,
    clippy::await_holding_lock,
    clippy::if_let_mutex,
    clippy::inefficient_to_string,
    clippy::macro_use_imports,
    clippy::option_option,
    clippy::unnested_or_patterns,
    clippy::rest_pat_in_fully_bound_structs,
    rust_2018_idioms,
    future_incompatible,
    nonstandard_style,
    missing_debug_implementations
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod acquisition;
mod any;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod axum;
mod by_name;
mod error;
mod hashed;
mod holder_hints;
pub mod idempotency;
pub mod layer;
mod local_queue;
mod memory;
mod options;
mod records;
#[cfg(feature = "redis")]
mod redis;
mod sync;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisMutex, RedisSync, RedisSyncBuilder};
pub use any::{AnyMutex, AnySync};
pub use error::{BoxError, Error, NodeError, NotReplicated, Recovering, Result};
pub use layer::DistLockLayer;
pub use memory::{MemoryMutex, MemorySync};
pub use options::{DelayFn, DistMutexOptions, GenValueFn, MAX_EXPIRY, random_value};
#[doc(hidden)]
pub use records::Records;
pub use sync::{DistMutex, DistSync, MAX_NAME_LEN, validate_name};
#[doc(hidden)]
pub use sync::{FastPath, LocalLine};

/// The README's Rust snippets compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
