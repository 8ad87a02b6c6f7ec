//! One Redis master: its shared connection and the commands a lock sends to
//! it, each bounded by the per-node timeout.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{FromRedisValue, RedisError, ScriptInvocation};

use super::scripts::{ACQUIRE, EXTEND, RELEASE};
use crate::error::NodeError;

/// A node and its multiplexed, self-reconnecting connection, shared by every
/// mutex of a `RedisSync`.
#[derive(Clone)]
pub(crate) struct Node {
    /// `host:port`, never the credentials.
    label: Arc<str>,
    conn: ConnectionManager,
}

/// Why one node did not answer a command.
pub(crate) struct Failure {
    pub(crate) node: Arc<str>,
    pub(crate) fault: Fault,
}

pub(crate) enum Fault {
    Timeout(Duration),
    Redis(RedisError),
}

impl Failure {
    pub(crate) fn is_timeout(&self) -> bool {
        matches!(self.fault, Fault::Timeout(_))
    }

    pub(crate) fn into_node_error(self) -> NodeError {
        match self.fault {
            Fault::Timeout(after) => NodeError::new(&*self.node, TimedOut(after)),
            Fault::Redis(e) => NodeError::new(&*self.node, e),
        }
    }
}

/// The cause of a per-node timeout.
#[derive(Debug)]
struct TimedOut(Duration);

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no answer within {} ms", self.0.as_millis())
    }
}

impl std::error::Error for TimedOut {}

/// A command's answer from one node.
pub(crate) type Reply<T> = Result<T, Failure>;

impl Node {
    pub(crate) fn new(label: String, conn: ConnectionManager) -> Self {
        Node {
            label: label.into(),
            conn,
        }
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// `ACQUIRE`: [`ACQUIRED`](super::scripts::ACQUIRED) or the holder's
    /// `PTTL`.
    pub(crate) fn acquire(
        &self,
        key: Arc<str>,
        value: Arc<str>,
        expiry: Duration,
        timeout: Duration,
    ) -> impl Future<Output = Reply<i64>> + Send + 'static {
        let mut invocation = ACQUIRE.prepare_invoke();
        invocation.key(&*key).arg(&*value).arg(millis(expiry));
        self.invoke(invocation, timeout)
    }

    /// `RELEASE`: 1 if our key was deleted.
    pub(crate) fn release(
        &self,
        key: Arc<str>,
        value: Arc<str>,
        timeout: Duration,
    ) -> impl Future<Output = Reply<i64>> + Send + 'static {
        let mut invocation = RELEASE.prepare_invoke();
        invocation.key(&*key).arg(&*value);
        self.invoke(invocation, timeout)
    }

    /// `EXTEND`: 1 if our key now has the new expiry.
    pub(crate) fn extend(
        &self,
        key: Arc<str>,
        value: Arc<str>,
        expiry: Duration,
        set_nx: bool,
        timeout: Duration,
    ) -> impl Future<Output = Reply<i64>> + Send + 'static {
        let mut invocation = EXTEND.prepare_invoke();
        invocation
            .key(&*key)
            .arg(&*value)
            .arg(millis(expiry))
            .arg(if set_nx { "1" } else { "0" });
        self.invoke(invocation, timeout)
    }

    /// `GET key`.
    pub(crate) fn get(
        &self,
        key: Arc<str>,
        timeout: Duration,
    ) -> impl Future<Output = Reply<Option<String>>> + Send + 'static {
        let mut conn = self.conn.clone();
        let label = self.label.clone();
        let cmd = redis::cmd("GET").arg(&*key).to_owned();
        bounded(
            label,
            timeout,
            async move { cmd.query_async(&mut conn).await },
        )
    }

    fn invoke<T: FromRedisValue + Send + 'static>(
        &self,
        invocation: ScriptInvocation<'static>,
        timeout: Duration,
    ) -> impl Future<Output = Reply<T>> + Send + 'static {
        let mut conn = self.conn.clone();
        let label = self.label.clone();
        bounded(label, timeout, async move {
            invocation.invoke_async(&mut conn).await
        })
    }
}

async fn bounded<T>(
    node: Arc<str>,
    timeout: Duration,
    command: impl Future<Output = redis::RedisResult<T>>,
) -> Reply<T> {
    match tokio::time::timeout(timeout, command).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => Err(Failure {
            node,
            fault: Fault::Redis(e),
        }),
        Err(_) => Err(Failure {
            node,
            fault: Fault::Timeout(timeout),
        }),
    }
}

/// Milliseconds for `PX` / `PEXPIRE`, at least 1.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
