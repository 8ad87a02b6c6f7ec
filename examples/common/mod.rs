//! What the examples share: the backend, picked from the environment.

use tower_dsync::{AnySync, MemorySync, RedisSync};

/// `MemorySync` by default; `RedisSync` over the comma-separated URLs in
/// `DSYNC_REDIS_URLS` (one node, or Redlock over several) when set; with
/// the `cluster` feature, on the Redis Cluster whose seed URLs are in
/// `DSYNC_REDIS_CLUSTER`.
pub fn backend() -> (AnySync, String) {
    let list = |var: &str| {
        std::env::var(var)
            .ok()
            .filter(|urls| !urls.trim().is_empty())
            .map(|urls| {
                urls.split(',')
                    .map(|url| url.trim().to_owned())
                    .collect::<Vec<_>>()
            })
    };
    #[cfg(feature = "cluster")]
    if let Some(seeds) = list("DSYNC_REDIS_CLUSTER") {
        let sync =
            RedisSync::cluster(&seeds).unwrap_or_else(|e| panic!("DSYNC_REDIS_CLUSTER: {e}"));
        return (AnySync::new(sync), "Redis Cluster".to_owned());
    }
    match list("DSYNC_REDIS_URLS") {
        Some(urls) => {
            let sync = RedisSync::new(&urls).unwrap_or_else(|e| panic!("DSYNC_REDIS_URLS: {e}"));
            let label = format!("Redis, {} node(s), quorum {}", sync.nodes(), sync.quorum());
            (AnySync::new(sync), label)
        }
        None => (
            AnySync::new(MemorySync::new()),
            "in-process (MemorySync)".to_owned(),
        ),
    }
}
