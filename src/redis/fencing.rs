//! Fencing tokens: which nodes vouch for an acquisition's token, and the
//! round that makes it durable on a quorum of them. Why tokens strictly
//! grow is argued on [`RedisMutex`](crate::RedisMutex#fencing-tokens); the
//! counters themselves are kept by the acquire script and raised by
//! `lua/fence.lua`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use super::node::Claim;
use super::quorum::Round;
use super::state::RedisState;
use crate::error::{Error, Result};

/// The fencing token of an acquisition that reached a quorum: the highest
/// token the nodes that granted it returned, made durable on a quorum of
/// those nodes. See [`Fencing`] for why tokens only grow.
pub(crate) async fn fence(
    shared: &RedisState,
    counter: &Arc<str>,
    fencing: &Fencing,
    timeout: Duration,
) -> Result<Option<u64>> {
    let token = fencing.token;
    let Some(needed) = shared
        .quorum
        .checked_sub(fencing.at_token)
        .filter(|n| *n > 0)
    else {
        return Ok(Some(token));
    };
    // Every node gets the FENCE (it raises a refusing or restarted node's
    // counter too), but only the acknowledgements of nodes that granted
    // the acquisition count.
    let round = Round::start(shared.nodes.iter().enumerate().map(|(node, command)| {
        let counts = fencing.counts(node);
        command
            .fence(counter.clone(), token, timeout)
            .map(move |reply| reply.map(|done| done == 1 && counts))
    }));
    // A late FENCE only raises a counter further: nothing to wait for.
    match round
        .decide(needed, true, timeout, |counts| *counts)
        .await
        .0
    {
        Ok(true) => Ok(Some(token)),
        Ok(false) => Err(Error::Unavailable {
            quorum: shared.quorum,
            failures: Vec::new(),
        }),
        Err(Error::Unavailable { failures, .. }) => Err(Error::Unavailable {
            quorum: shared.quorum,
            failures,
        }),
        Err(error) => Err(error),
    }
}

/// Which nodes vouch for an acquisition's fencing token.
///
/// Each node has one fencing counter (per hash slot on a Redis Cluster),
/// shared by every name. The acquire script increments it when it sets the
/// lock key; a counter that is missing (its node lost its state) starts at
/// the node's clock in microseconds. The token is the highest value that
/// the nodes which granted the acquisition (their `SET NX` succeeded)
/// returned. It counts as issued once a quorum of those granting nodes hold
/// a counter of at least the token: the nodes that returned it, and the
/// others once they acknowledged `FENCE token` (which raises a counter,
/// never lowers it, and leaves a missing one to start at the clock). A node
/// that refused the acquisition never counts, whatever it acknowledges.
/// The argument for why tokens grow is on
/// [`RedisMutex`](crate::RedisMutex#fencing-tokens).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Fencing {
    /// The highest token the granting nodes returned.
    token: u64,
    /// How many granting nodes returned it: their counters are at it.
    at_token: usize,
    /// The granting nodes whose counter was below it: each vouches once it
    /// acknowledged `FENCE token`.
    behind: Vec<usize>,
}

impl Fencing {
    /// The fencing of the acquisition whose nodes gave `replies`.
    pub(crate) fn of(replies: &[(usize, Claim)]) -> Fencing {
        let granted = || {
            replies.iter().filter_map(|(node, claim)| match claim {
                Claim::Acquired { token } => Some((*node, *token)),
                Claim::Held { .. } | Claim::Recovering { .. } => None,
            })
        };
        let token = granted().map(|(_, t)| t).max().unwrap_or(0);
        Fencing {
            token,
            at_token: granted().filter(|(_, t)| *t == token).count(),
            behind: granted()
                .filter(|(_, t)| *t < token)
                .map(|(node, _)| node)
                .collect(),
        }
    }

    /// Whether `node`'s acknowledgement of `FENCE token` vouches for the
    /// token: only a granting node below it.
    pub(crate) fn counts(&self, node: usize) -> bool {
        self.behind.contains(&node)
    }

    /// How many nodes vouch for the token once the nodes `acknowledged`
    /// have acknowledged `FENCE token`.
    #[cfg(test)]
    fn vouching(&self, acknowledged: &[usize]) -> usize {
        self.at_token
            + self
                .behind
                .iter()
                .filter(|n| acknowledged.contains(n))
                .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nodes_that_granted_the_acquisition_vouch_for_its_token() {
        // X granted with 1, Y refused (another acquisition's key was
        // there), Z granted with 11.
        let (x, y, z) = (0, 1, 2);
        let replies = [
            (x, Claim::Acquired { token: 1 }),
            (y, Claim::Held { pttl: 5000 }),
            (z, Claim::Acquired { token: 11 }),
        ];
        let fencing = Fencing::of(&replies);
        assert_eq!(fencing.token, 11);
        assert_eq!(fencing.at_token, 1, "Z is at the token already");
        assert!(fencing.counts(x), "X granted it, below the token");
        assert!(!fencing.counts(y), "Y refused: its FENCE is not ordered");
        assert!(!fencing.counts(z), "Z is counted once, at the token");
        assert!(!fencing.counts(3), "a node that did not answer");
        // The write-back to X is lost; Y and Z acknowledge it: one node
        // vouches, short of a quorum of two.
        assert_eq!(fencing.vouching(&[y, z]), 1);
        assert_eq!(fencing.vouching(&[x]), 2);
    }

    #[test]
    fn a_quorum_at_the_highest_token_needs_no_write_back() {
        let replies = [
            (0, Claim::Acquired { token: 7 }),
            (2, Claim::Acquired { token: 7 }),
            (1, Claim::Held { pttl: -3 }),
        ];
        let fencing = Fencing::of(&replies);
        assert_eq!(
            fencing,
            Fencing {
                token: 7,
                at_token: 2,
                behind: Vec::new(),
            }
        );
        // Counters that disagree: the lower ones must acknowledge.
        let fencing = Fencing::of(&[
            (0, Claim::Acquired { token: 3 }),
            (1, Claim::Acquired { token: 9 }),
            (2, Claim::Acquired { token: 5 }),
        ]);
        assert_eq!((fencing.token, fencing.at_token), (9, 1));
        assert_eq!(fencing.behind, vec![0, 2]);
    }
}
