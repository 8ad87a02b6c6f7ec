//! The records of a `RedisSync` (see `DistSync::records`): kept on the
//! nodes beside the lock, under the lock key followed by a control
//! character and `record` (on a Redis Cluster, in the lock's slot), each
//! with its TTL as a Redis expiry.
//!
//! A record is written on every node where the writer still holds the lock
//! and no record of a later holder is kept, and counts as kept once a
//! quorum of nodes kept it. A read asks every node and decides once a
//! quorum answered: of the records found, the one with the highest
//! fencing token. A quorum that kept it and a quorum that answered share a
//! node, so a kept record is found, unless that node lost its state since.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::quorum::Round;
use super::state::RedisState;
use crate::error::Result;
use crate::records::{BoxFuture, RecordBackend, Writer};

/// The records of one `RedisSync`.
pub(crate) struct RedisRecords(pub(crate) Arc<RedisState>);

impl RedisRecords {
    /// The lock key and the record key of `name`.
    fn keys(&self, name: &str) -> (Arc<str>, Arc<str>) {
        let keys = self.0.keys(name);
        let record = [&*keys.lock, "\u{1f}record"].concat().into();
        (keys.lock, record)
    }
}

impl RecordBackend for RedisRecords {
    fn load(&self, name: Arc<str>, timeout: Duration) -> BoxFuture<Result<Option<Bytes>>> {
        let (_, key) = self.keys(&name);
        let state = self.0.clone();
        Box::pin(async move {
            let mut round = Round::start(
                state
                    .nodes
                    .iter()
                    .map(|node| node.get::<Vec<u8>>(key.clone(), timeout)),
            );
            let quorum = state.quorum;
            round.settle(quorum, state.fail_fast, |_| true).await;
            if round.replies.len() < quorum {
                return Err(round.failure_error(quorum, timeout));
            }
            let newest = round
                .replies
                .iter()
                .filter_map(|(_, kept)| kept.as_deref())
                .filter_map(|kept| match split_token(kept) {
                    Some(found) => Some(found),
                    None => {
                        tracing::warn!(key = %key, "a record without its token prefix: ignored");
                        None
                    }
                })
                .max_by_key(|(token, _)| *token);
            let record = newest.map(|(_, record)| Bytes::copy_from_slice(record));
            round.finish_in_background();
            Ok(record)
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
        let (lock, key) = self.keys(&name);
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
            let (kept, _) = round
                .decide(state.quorum, state.fail_fast, timeout, |kept| *kept == 1)
                .await;
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
