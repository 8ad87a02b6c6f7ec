//! Commands that finish after their operation returned: the release of a
//! failed or abandoned attempt, an acquisition's stragglers, a failed
//! extension's re-created keys; and the wait for them before the next
//! command with the same value.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::keys::Keys;
use super::node::{AcquireArgs, Claim, QueueEntry, ReleaseArgs, Undoes};
use super::quorum::Round;
use super::state::RedisState;
use super::wait_queue::{leave_nodes, leave_queues};

/// Commands sent with `value` that finish in the background: a failed or
/// abandoned attempt's release, or the stragglers of an operation that
/// returned once a quorum said yes. The next command with the same value
/// waits for them, so that it reaches each node after them.
pub(crate) struct Cleanup {
    value: Arc<str>,
    /// Resolves once the nodes that had said yes when the attempt ended
    /// have been released (each within the node timeout).
    prompt: Option<oneshot::Receiver<()>>,
    task: JoinHandle<()>,
}

impl Cleanup {
    /// The commands of an operation with `value` still to finish, if any.
    pub(crate) fn of(task: Option<JoinHandle<()>>, value: &Arc<str>) -> Option<Cleanup> {
        task.map(|task| Cleanup {
            value: value.clone(),
            prompt: None,
            task,
        })
    }
}

/// Waits until a background release has released the nodes that had said
/// yes, so that the next command does not find this mutex's own leftover
/// keys in its way; and, when it could remove keys set with `value` (the
/// same value is about to be used again: a preset value, or a generator that
/// repeats), for the whole release. Then forgets the release unless it must
/// still be waited for. Cancel-safe: the release stays recorded until it
/// has done what is waited for.
pub(crate) async fn wait_for_cleanup(cleanup: &mut Option<Cleanup>, value: &Arc<str>) {
    if let Some(pending) = cleanup {
        if let Some(prompt) = &mut pending.prompt {
            let _ = prompt.await;
            pending.prompt = None;
        }
        if pending.value == *value {
            let _ = (&mut pending.task).await;
        }
        *cleanup = None;
    }
}

/// Lets an acquisition's remaining commands finish in the background. A
/// node that refused it (it was late, or another owner's key was still
/// there) queued this process with the waiter's start; with no next waiter
/// to keep it for, that entry must go, or it would hold the line up on
/// that node until its TTL ran out. It goes whatever waiters of the
/// process are in line by then (the acquiring one may still be among
/// them): a later waiter's entry carries its own, later start, which the
/// departure leaves alone (see [`LEAVE`](super::scripts::LEAVE)).
pub(crate) fn settle_acquired(
    round: Round<Claim>,
    shared: &Arc<RedisState>,
    keys: &Arc<Keys>,
    entry: Option<QueueEntry>,
    timeout: Duration,
) -> Option<JoinHandle<()>> {
    let refused = |claim: &Claim| matches!(claim, Claim::Held { .. });
    let Some(entry) = entry.filter(|l| l.next.is_none()) else {
        return round.finish_in_background();
    };
    if round.unanswered() == 0
        && round.failures.is_empty()
        && !round.replies.iter().any(|(_, c)| refused(c))
    {
        return None;
    }
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (shared, keys) = (shared.clone(), keys.clone());
    Some(runtime.spawn(async move {
        let mut queued = Vec::new();
        round
            .drain(|node, answer| {
                // Refused, or no answer (a command that timed out may
                // still have been applied): the entry may be there.
                if answer.is_none_or(refused) {
                    queued.push(node);
                }
            })
            .await;
        if !queued.is_empty() {
            leave_nodes(&shared, &keys, entry.start, timeout, queued).await;
        }
    }))
}

/// Lets a failed extension's commands finish in the background, and
/// releases the keys it re-created on nodes that kept their state (the
/// name was free there, and the mutex no longer holds it).
pub(crate) fn undo_repairs(
    round: Round<i64>,
    shared: &Arc<RedisState>,
    keys: &Arc<Keys>,
    value: &Arc<str>,
    timeout: Duration,
) -> Option<JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (shared, keys, value) = (shared.clone(), keys.clone(), value.clone());
    Some(runtime.spawn(async move {
        let mut recreated = Vec::new();
        round
            .drain(|node, answer| {
                if answer == Some(&2) {
                    recreated.push(node);
                }
            })
            .await;
        let release = ReleaseArgs {
            announce: (keys.wake.clone(), rand::random::<u64>()),
            keys,
            value,
            requeue: None,
            timeout,
        };
        join_all(
            recreated
                .into_iter()
                .map(|i| shared.nodes[i].release(&release, Undoes::Answered)),
        )
        .await;
    }))
}

/// Releases, in the background, the keys a failed or abandoned attempt may
/// have set: on nodes that said yes, on nodes that have not answered yet,
/// and (with a generated value) on nodes that failed, since a command that
/// timed out may still have been applied. Each release runs on its node
/// after the acquisition it undoes: on a node that did not answer, it goes
/// on the acquisition's own connection (see [`Undoes`]). A preset value is
/// not released on failed nodes: the key there may be its rightful owner's.
/// When the attempt queued this process (`entry`) and its waiter is done
/// (no `requeue`: it gave up or was dropped), or no waiter of the process
/// is left, the process leaves the queues once the attempt's commands are
/// done: the waiter's own departure may have reached a node before the
/// attempt did. (A waiter still in line then is a later one, whose own
/// start the departure leaves alone.)
/// When the waiter tries again (`requeue`), each release puts the process
/// back in line with the waiter's start, since the acquisition took it out
/// on the nodes that said yes (see [`RELEASE`](super::scripts::RELEASE)).
///
/// The nodes that had said yes when the attempt ended are released at
/// once, not after the slowest node has answered: with a node down or
/// paused, that takes the node timeout, and the next attempt (which waits
/// for this prompt part, see [`wait_for_cleanup`]) would find the keys of
/// this one in its way on those nodes, get another minority, and leave
/// that in the way of the one after: a livelock while the node stays down.
pub(crate) fn release_leftovers(
    round: Round<Claim>,
    shared: &Arc<RedisState>,
    args: &AcquireArgs,
    requeue: Option<&QueueEntry>,
) -> Option<Cleanup> {
    let unsure = !args.preset && !round.failures.is_empty();
    if round.yes == 0 && round.unanswered() == 0 && !unsure {
        return None;
    }
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let shared = shared.clone();
    let (preset, keys) = (args.preset, args.keys.clone());
    let queued = args.entry.as_ref().map(|entry| entry.start);
    let said_yes: Vec<usize> = round
        .replies
        .iter()
        .filter(|(_, claim)| matches!(claim, Claim::Acquired { .. }))
        .map(|(node, _)| *node)
        .collect();
    // Announced: contenders refused because of these keys may retry.
    // One nonce for both parts: they are one release.
    let release = ReleaseArgs {
        keys: args.keys.clone(),
        value: args.value.clone(),
        announce: (args.keys.wake.clone(), rand::random::<u64>()),
        requeue: requeue.cloned(),
        timeout: args.timeout,
    };
    let (prompt_done, prompt) = oneshot::channel();
    let task = runtime.spawn(async move {
        let release_on = |nodes: Vec<(usize, Undoes)>| {
            join_all(
                nodes
                    .into_iter()
                    .map(|(i, undoes)| shared.nodes[i].release(&release, undoes)),
            )
        };
        let prompt_part = async {
            let answered = said_yes.iter().map(|&i| (i, Undoes::Answered)).collect();
            release_on(answered).await;
            let _ = prompt_done.send(());
        };
        let late_part = async {
            let mut suspects = Vec::new();
            round
                .drain(|node, answer| match answer {
                    Some(Claim::Acquired { .. }) if !said_yes.contains(&node) => {
                        suspects.push((node, Undoes::Answered));
                    }
                    Some(_) => {}
                    // It timed out or failed on the way: it may still run,
                    // so the release goes after it, on its connection.
                    None if !preset => suspects.push((node, Undoes::Unanswered)),
                    None => {}
                })
                .await;
            release_on(suspects).await;
        };
        futures_util::future::join(prompt_part, late_part).await;
        let waiter_done = release.requeue.is_none();
        if let Some(start) = queued
            && (waiter_done || shared.waiters.get(&keys.lock).is_none_or(|s| s.is_idle()))
        {
            leave_queues(&shared, &keys, start, release.timeout);
        }
    });
    Some(Cleanup {
        value: args.value.clone(),
        prompt: Some(prompt),
        task,
    })
}
