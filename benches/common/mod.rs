//! What the bench binaries share: their run length, their CSV output
//! (read by `scripts/bench-report.py`), and the Redis deployments they
//! run on. Each bench uses part of it.

#![allow(dead_code)]

use std::io::Write;

#[cfg(feature = "cluster")]
#[allow(unused_imports)]
pub use deployments::Servers;

/// `DSYNC_BENCH_SECS`, or `default`.
pub fn seconds(default: u64) -> u64 {
    std::env::var("DSYNC_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The task counts to measure: `DSYNC_BENCH_TASKS` (a comma-separated
/// list) for profiling one case, else `default`.
pub fn tasks(default: &[usize]) -> Vec<usize> {
    std::env::var("DSYNC_BENCH_TASKS")
        .ok()
        .map(|list| {
            list.split(',')
                .filter_map(|t| t.trim().parse().ok())
                .collect()
        })
        .unwrap_or_else(|| default.to_vec())
}

/// Appends `rows` to the CSV file named by `DSYNC_BENCH_CSV`, if set.
pub fn append_csv(rows: &[String]) {
    let Ok(path) = std::env::var("DSYNC_BENCH_CSV") else {
        return;
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the CSV file");
    for row in rows {
        writeln!(file, "{row}").expect("write the CSV file");
    }
}

/// The deployments the lock benches compare (they need the `cluster`
/// feature).
#[cfg(feature = "cluster")]
mod deployments {
    use tower_dsync::RedisSync;

    use crate::support::cluster::RedisCluster;
    use crate::support::{RedisNodes, RedisServer};

    /// Where the locks live.
    pub enum Servers {
        /// Independent nodes: one, or Redlock over several.
        Nodes(RedisNodes),
        /// A Redis Cluster.
        Cluster(RedisCluster),
    }

    impl Servers {
        /// The deployments every Redis bench measures, in order: one node,
        /// Redlock over three, a 3-master cluster (started when called).
        pub fn all() -> [fn() -> Servers; 3] {
            [
                || Servers::Nodes(RedisNodes::start(1)),
                || Servers::Nodes(RedisNodes::start(3)),
                || Servers::Cluster(RedisCluster::start(3, 0)),
            ]
        }

        /// The deployments of [`all`](Self::all) that `DSYNC_BENCH_SERVERS`
        /// names (a comma-separated list of `1`, `3` and `cluster`), or all
        /// of them: for profiling one case.
        pub fn selected() -> Vec<fn() -> Servers> {
            let wanted = std::env::var("DSYNC_BENCH_SERVERS").unwrap_or_default();
            ["1", "3", "cluster"]
                .into_iter()
                .zip(Self::all())
                .filter(|(name, _)| {
                    wanted.is_empty() || wanted.split(',').any(|w| w.trim() == *name)
                })
                .map(|(_, servers)| servers)
                .collect()
        }

        /// Whether this is a Redis Cluster (which rslock cannot use).
        pub fn is_cluster(&self) -> bool {
            matches!(self, Servers::Cluster(_))
        }

        /// The tables' "nodes" column: `1`, `3`, `cluster of 3`.
        pub fn label(&self) -> String {
            match self {
                Servers::Nodes(nodes) => nodes.servers.len().to_string(),
                Servers::Cluster(cluster) => format!("cluster of {}", cluster.masters().len()),
            }
        }

        /// The label with its noun, for the CSV rows: `1 node`, `3 nodes`,
        /// `cluster of 3 nodes`.
        pub fn nodes(&self) -> String {
            let label = self.label();
            let plural = if label == "1" { "" } else { "s" };
            format!("{label} node{plural}")
        }

        /// The servers that take commands.
        pub fn servers(&self) -> Vec<&RedisServer> {
            match self {
                Servers::Nodes(nodes) => nodes.servers.iter().collect(),
                Servers::Cluster(cluster) => cluster
                    .masters()
                    .into_iter()
                    .map(|i| cluster.node(i))
                    .collect(),
            }
        }

        /// A `RedisSync` on these servers (inside a Tokio runtime).
        pub fn sync(&self) -> RedisSync {
            match self {
                Servers::Nodes(nodes) => RedisSync::new(nodes.urls()),
                Servers::Cluster(cluster) => RedisSync::cluster(cluster.seeds()),
            }
            .expect("RedisSync")
        }

        pub fn urls(&self) -> Vec<String> {
            match self {
                Servers::Nodes(nodes) => nodes.urls(),
                Servers::Cluster(_) => unreachable!("rslock has no cluster mode"),
            }
        }
    }
}
