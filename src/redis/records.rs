//! The records of a `RedisSync` (see `DistSync::records`): kept on the
//! nodes beside the lock, under the lock key followed by a control
//! character and `record` (on a Redis Cluster, in the lock's slot), each
//! with its TTL as a Redis expiry.
//!
//! A record is written on every node where the writer still holds the lock
//! and no record of a later holder is kept, and counts as kept once a
//! quorum of nodes kept it (the lock is released only once every node
//! answered); a write that did not reach a quorum is taken back from the
//! nodes that kept it. A read asks every node: of the records found, the one with
//! the highest fencing token. "No record" takes a quorum of nodes that
//! can tell: with Redlock, a node that lost its state within the records'
//! TTL cannot (it may have lost the record), and without such a quorum the
//! read fails (503) instead of running the handler again. A quorum that
//! kept the record and a quorum that can tell share a node that kept it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::quorum::Round;
use super::state::RedisState;
use crate::error::{Error, NodeError, Result};
use crate::records::{BoxFuture, RecordBackend, Writer};

/// The records of one `RedisSync`.
pub(crate) struct RedisRecords(pub(crate) Arc<RedisState>);

impl RedisRecords {
    /// The lock key, the record key and the node's bookkeeping hash of
    /// `name`.
    fn keys(&self, name: &str) -> (Arc<str>, Arc<str>, Arc<str>) {
        let (lock, node) = self.0.lock_and_node(name);
        let record = [&*lock, "\u{1f}record"].concat().into();
        (lock.into(), record, node)
    }
}

impl RecordBackend for RedisRecords {
    fn load(
        &self,
        name: Arc<str>,
        ttl: Duration,
        timeout: Duration,
    ) -> BoxFuture<Result<Option<Bytes>>> {
        let (_, key, node) = self.keys(&name);
        let state = self.0.clone();
        // With Redlock, a node that lost its state within the records' TTL
        // cannot tell that a record is absent; one node, or a Cluster, has
        // no other copy to fall back on anyway.
        let redlock = state.recovery(ttl).is_some();
        Box::pin(async move {
            let mut round = Round::start(state.nodes.iter().map(|n| {
                let (n, key, node) = (n.clone(), key.clone(), node.clone());
                async move {
                    if redlock {
                        n.load_record((key, node), ttl, timeout).await
                    } else {
                        Ok((n.get::<Vec<u8>>(key, timeout).await?, 1))
                    }
                }
            }));
            let quorum = state.quorum;
            round
                .settle(quorum, state.fail_fast, |(_, counts)| *counts == 1)
                .await;
            let newest = round
                .replies
                .iter()
                .filter_map(|(_, (kept, _))| kept.as_deref())
                .filter_map(|kept| match split_token(kept) {
                    Some(found) => Some(found),
                    None => {
                        tracing::warn!(key = %key, "a record without its token prefix: ignored");
                        None
                    }
                })
                .max_by_key(|(token, _)| *token);
            if let Some((_, record)) = newest {
                let record = Bytes::copy_from_slice(record);
                round.finish_in_background();
                return Ok(Some(record));
            }
            if round.yes >= quorum {
                round.finish_in_background();
                return Ok(None);
            }
            if round.replies.len() < quorum {
                return Err(round.failure_error(quorum, timeout));
            }
            // Enough nodes answered, but too few of them can tell.
            let failures = round
                .replies
                .iter()
                .filter(|(_, (_, counts))| *counts != 1)
                .map(|(i, _)| {
                    NodeError::new(
                        state.nodes[*i].label(),
                        "lost its state within the records' TTL: cannot tell that a record is absent",
                    )
                })
                .collect();
            Err(Error::Unavailable { quorum, failures })
        })
    }

    fn store(
        &self,
        name: Arc<str>,
        writer: Writer,
        record: Bytes,
        ttl: Duration,
        timeout: Duration,
    ) -> BoxFuture<Result<bool>> {
        let (lock, key, _) = self.keys(&name);
        let state = self.0.clone();
        Box::pin(async move {
            let token = writer.token.unwrap_or(0);
            let round = Round::start(state.nodes.iter().map(|node| {
                node.store_record(
                    (lock.clone(), key.clone()),
                    writer.value.clone(),
                    token,
                    ttl,
                    record.clone(),
                    timeout,
                )
            }));
            let (kept, stragglers) = round
                .decide(state.quorum, state.fail_fast, timeout, |kept| *kept == 1)
                .await;
            // Every node that answers gets the record before the lock is
            // released: the more copies, the more node failures it
            // survives.
            if let Some(stragglers) = stragglers {
                let _ = stragglers.await;
            }
            if !matches!(kept, Ok(true)) {
                // Not kept: no node keeps a copy that a read could find.
                Round::start(
                    state
                        .nodes
                        .iter()
                        .map(|node| node.unstore_record(key.clone(), token, timeout)),
                )
                .drain(|_, _| {})
                .await;
            }
            kept
        })
    }
}

/// A kept record's token and bytes: `<token> <bytes>`.
fn split_token(kept: &[u8]) -> Option<(u64, &[u8])> {
    let space = kept.iter().position(|&b| b == b' ')?;
    let token = std::str::from_utf8(&kept[..space]).ok()?.parse().ok()?;
    Some((token, &kept[space + 1..]))
}

#[cfg(test)]
mod tests {
    use super::split_token;

    #[test]
    fn kept_records_carry_their_token() {
        assert_eq!(split_token(b"12 \x00ab"), Some((12, &b"\x00ab"[..])));
        assert_eq!(split_token(b"12"), None);
        assert_eq!(split_token(b"x1 ab"), None);
    }
}
