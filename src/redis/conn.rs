//! The connection a node's commands go over: one self-reconnecting
//! multiplexed connection to an independent master, or a Redis Cluster
//! connection that routes each command to the master of its keys' slot.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A node's connection, cheap to clone (clones share it).
#[derive(Clone)]
pub(crate) enum Conn {
    /// One master.
    Single(ConnectionManager),
    /// A Redis Cluster: commands follow their keys' slot (`MOVED`, `ASK`).
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    /// Whether the connection resends a command on its own after the
    /// connection it went out on dropped (redis-rs's cluster connection
    /// does), so that a script may run twice without the caller knowing.
    pub(crate) fn resends_on_its_own(&self) -> bool {
        !matches!(self, Conn::Single(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}
