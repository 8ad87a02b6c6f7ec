//! What the examples share: the backend, picked from the environment.

use tower_dsync::{AnySync, MemorySync, RedisSync};

/// `MemorySync` by default; `RedisSync` over the comma-separated URLs in
/// `DSYNC_REDIS_URLS` (one node, or Redlock over several) when set.
pub fn backend() -> (AnySync, String) {
    match std::env::var("DSYNC_REDIS_URLS") {
        Ok(urls) if !urls.trim().is_empty() => {
            let urls: Vec<&str> = urls.split(',').map(str::trim).collect();
            let sync = RedisSync::new(&urls).unwrap_or_else(|e| panic!("DSYNC_REDIS_URLS: {e}"));
            let label = format!("Redis, {} node(s), quorum {}", sync.nodes(), sync.quorum());
            (AnySync::new(sync), label)
        }
        _ => (
            AnySync::new(MemorySync::new()),
            "in-process (MemorySync)".to_owned(),
        ),
    }
}
