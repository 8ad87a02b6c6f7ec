//! One round of a command on every node at once, and how its answers add up
//! to a quorum decision.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::node::{Failure, Reply};
use crate::error::Error;

type NodeFuture<T> = Pin<Box<dyn Future<Output = Reply<T>> + Send>>;

/// The commands of a round still in flight, by node. A round has a
/// handful of nodes: polling each of them when any is ready costs less
/// than the bookkeeping of a `FuturesUnordered`.
struct Pending<T> {
    commands: Vec<Option<NodeFuture<T>>>,
    left: usize,
}

impl<T> Pending<T> {
    fn len(&self) -> usize {
        self.left
    }

    fn is_empty(&self) -> bool {
        self.left == 0
    }

    /// The next answer of a command in flight, `None` once all answered.
    async fn next(&mut self) -> Option<(usize, Reply<T>)> {
        if self.left == 0 {
            return None;
        }
        poll_fn(|cx| {
            for (node, slot) in self.commands.iter_mut().enumerate() {
                if let Some(command) = slot
                    && let Poll::Ready(answer) = command.as_mut().poll(cx)
                {
                    *slot = None;
                    self.left -= 1;
                    return Poll::Ready(Some((node, answer)));
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// A round: one command sent to every node at once, in flight, and the
/// answers so far.
pub(crate) struct Round<T> {
    pending: Pending<T>,
    /// Answers so far, with the index of the node that gave them.
    pub(crate) replies: Vec<(usize, T)>,
    pub(crate) failures: Vec<(usize, Failure)>,
    /// Answers that count towards the quorum.
    pub(crate) yes: usize,
    nodes: usize,
}

impl<T: Send + 'static> Round<T> {
    /// Sends one command per node; `commands` yields them in node order.
    pub(crate) fn start<F>(commands: impl IntoIterator<Item = F>) -> Self
    where
        F: Future<Output = Reply<T>> + Send + 'static,
    {
        let commands: Vec<Option<NodeFuture<T>>> = commands
            .into_iter()
            .map(|command| -> Option<NodeFuture<T>> { Some(Box::pin(command)) })
            .collect();
        let nodes = commands.len();
        let pending = Pending {
            commands,
            left: nodes,
        };
        Round {
            pending,
            replies: Vec::with_capacity(nodes),
            failures: Vec::new(),
            yes: 0,
            nodes,
        }
    }

    /// Collects answers until a quorum said yes (the outcome is decided:
    /// the other nodes' commands are left to finish), or until every node
    /// answered; with `fail_fast`, also as soon as a quorum is out of
    /// reach. Without it, a failed round hears every node, so that its
    /// error tells a busy lock from unavailable nodes.
    pub(crate) async fn settle(
        &mut self,
        quorum: usize,
        fail_fast: bool,
        is_yes: impl Fn(&T) -> bool,
    ) {
        while let Some((i, reply)) = self.pending.next().await {
            match reply {
                Ok(answer) => {
                    self.yes += usize::from(is_yes(&answer));
                    self.replies.push((i, answer));
                }
                Err(failure) => self.failures.push((i, failure)),
            }
            if self.yes >= quorum || (fail_fast && self.yes + self.pending.len() < quorum) {
                break;
            }
        }
    }

    /// The quorum's answer: `Ok(true)` when a quorum said yes, `Ok(false)`
    /// when the answers rule it out, and the failed nodes' error when they
    /// could have made the quorum (then the outcome is theirs, not a "no").
    pub(crate) fn verdict(&self, quorum: usize, timeout: Duration) -> Result<bool, Error> {
        if self.yes >= quorum {
            Ok(true)
        } else if self.yes + self.failures.len() + self.pending.len() >= quorum {
            Err(self.failure_error(quorum, timeout))
        } else {
            Ok(false)
        }
    }

    /// The nodes whose commands have not answered yet.
    pub(crate) fn unanswered(&self) -> usize {
        self.pending.len()
    }

    /// The nodes that have not answered (yet): failed, timed out or still
    /// in flight. Their command may still run, so an undo of it must go
    /// after it (see [`Undoes`](super::node::Undoes)).
    pub(crate) fn unanswered_nodes(&self) -> Vec<usize> {
        (0..self.nodes)
            .filter(|i| !self.replies.iter().any(|(node, _)| node == i))
            .collect()
    }

    /// The number of nodes in the round.
    pub(crate) fn nodes(&self) -> usize {
        self.nodes
    }

    /// Runs the round to its quorum decision ([`verdict`](Self::verdict)),
    /// then lets the commands still in flight finish in the background;
    /// the task that finishes them, if any, comes back with the verdict.
    pub(crate) async fn decide(
        mut self,
        quorum: usize,
        fail_fast: bool,
        timeout: Duration,
        is_yes: impl Fn(&T) -> bool,
    ) -> (Result<bool, Error>, Option<JoinHandle<()>>) {
        self.settle(quorum, fail_fast, is_yes).await;
        let verdict = self.verdict(quorum, timeout);
        (verdict, self.finish_in_background())
    }

    /// Lets the commands still in flight finish in the background, so that
    /// every node gets them even though the caller has decided. Returns the
    /// task that finishes them, if any: a later command of the same owner
    /// to the same nodes waits for it, since a straggler that had to be
    /// resent (a script loaded anew, a connection made anew) could
    /// otherwise reach its node after that command.
    pub(crate) fn finish_in_background(self) -> Option<JoinHandle<()>> {
        let mut pending = self.pending;
        if pending.is_empty() {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(runtime.spawn(async move { while pending.next().await.is_some() {} }))
    }

    /// Waits for the commands still in flight, then hands every answer and
    /// failure to `each`.
    pub(crate) async fn drain(mut self, mut each: impl FnMut(usize, Option<&T>)) {
        while let Some((i, reply)) = self.pending.next().await {
            match reply {
                Ok(answer) => self.replies.push((i, answer)),
                Err(failure) => self.failures.push((i, failure)),
            }
        }
        for (i, answer) in &self.replies {
            each(*i, Some(answer));
        }
        for (i, _) in &self.failures {
            each(*i, None);
        }
    }

    /// The error for a round that failed because nodes failed: `Timeout`
    /// when every failure was a timeout (with the longest time a node was
    /// waited for), else `Unavailable`. The failures
    /// stay in the round: the nodes that did not answer are the ones whose
    /// command may still run, and what undoes it needs to know them.
    pub(crate) fn failure_error(&self, quorum: usize, timeout: Duration) -> Error {
        let mut failures: Vec<&(usize, Failure)> = self.failures.iter().collect();
        failures.sort_by_key(|(i, _)| *i);
        let waited: Option<Vec<Duration>> =
            failures.iter().map(|(_, f)| f.timed_out_after()).collect();
        if let Some(waited) = waited {
            Error::Timeout {
                // The longest any node was waited for (the round's timeout
                // when none failed).
                after: waited.into_iter().max().unwrap_or(timeout),
                nodes: failures.iter().map(|(_, f)| f.node.to_string()).collect(),
            }
        } else {
            Error::Unavailable {
                quorum,
                failures: failures
                    .into_iter()
                    .map(|(_, f)| f.clone().into_node_error())
                    .collect(),
            }
        }
    }
}

/// `n / 2 + 1`.
pub(crate) fn quorum(nodes: usize) -> usize {
    nodes / 2 + 1
}
