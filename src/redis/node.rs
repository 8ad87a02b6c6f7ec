//! One Redis master: its shared connection and the commands a lock sends to
//! it, each bounded by the per-node timeout.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, RedisResult, ServerErrorKind};

use super::conn::Conn;
use super::keys::Keys;
use super::scripts::{
    ACQUIRE, Call, EXTEND, FENCE, LEAVE, LINE_UP, LOAD_RECORD, RELEASE, STORE_RECORD,
    UNSTORE_RECORD,
};
use crate::error::{NodeError, NotReplicated};

/// A node and its multiplexed, self-reconnecting connection, shared by every
/// mutex of a `RedisSync`. On a Redis Cluster, the node is the cluster: its
/// connection routes each command to the master of the name's slot.
#[derive(Clone)]
pub(crate) struct Node {
    /// `host:port` (for a cluster, its seeds), never the credentials.
    label: Arc<str>,
    conn: Conn,
    /// After an acquisition or an extension: `WAIT` for this many replicas,
    /// at most this long, on `durable`: a connection of their own, since
    /// Redis holds back every command of a connection while it waits, and
    /// releases must not queue behind it.
    replicas: Option<(usize, Duration)>,
    durable: Conn,
}

/// Why one node did not answer a command.
#[derive(Clone)]
pub(crate) struct Failure {
    pub(crate) node: Arc<str>,
    pub(crate) fault: Fault,
}

#[derive(Clone)]
pub(crate) enum Fault {
    Timeout(Duration),
    Redis(RedisError),
    NotReplicated(NotReplicated),
}

impl Failure {
    /// How long the node was waited for, if it timed out.
    pub(crate) fn timed_out_after(&self) -> Option<Duration> {
        match self.fault {
            Fault::Timeout(after) => Some(after),
            _ => None,
        }
    }

    pub(crate) fn into_node_error(self) -> NodeError {
        match self.fault {
            Fault::Timeout(after) => NodeError::new(&*self.node, TimedOut(after)),
            Fault::Redis(e) => NodeError::new(&*self.node, e),
            Fault::NotReplicated(e) => NodeError::new(&*self.node, e),
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

/// One node's answer to an acquisition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Set, with the node's next fencing token for the name.
    Acquired { token: u64 },
    /// Taken; the key's `PTTL` (`-1`: no expiry, `-2`: gone meanwhile,
    /// `-3`: free, but another process waits first).
    Held { pttl: i64 },
    /// Refused: the node lost its state (restarted empty) at `born` (its
    /// clock, ms) and takes new locks in `left`.
    Recovering { born: i64, left: Duration },
}

/// What an acquisition by a waiting process tells a node's wait queue.
#[derive(Clone, Debug)]
pub(crate) struct QueueEntry {
    /// The process's id (its `RedisSync`).
    pub(crate) client: Arc<str>,
    /// When the waiter started waiting, in ms since the Unix epoch.
    pub(crate) start: u64,
    /// The entry's TTL: how long the node keeps it without a renewal, in
    /// ms.
    pub(crate) ttl: u64,
    /// When acquired, the start of the process's next waiter, if any: its
    /// entry stays, with that start.
    pub(crate) next: Option<u64>,
}

/// What an undo (a release) undoes, which decides the connection it goes
/// on so that it runs on the node after what it undoes.
///
/// Why that orders them: a node runs the commands of one connection in the
/// order they were sent (one TCP stream, read in order; Redis runs a
/// client's commands one after the other, and holds the rest back while a
/// `WAIT` blocks it). A command whose answer came back has run, so a
/// command sent afterwards runs after it, on either connection. A command
/// that did not answer (it timed out, or failed on the way) may still be in
/// the node's input, or queued behind another lock's `WAIT` on the durable
/// connection: only a command sent after it on the same connection is sure
/// to run after it. So an undo of an answered command goes on the shared
/// connection (it does not queue behind other locks' `WAIT`), and an undo
/// of an unanswered one on the connection that command went on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Undoes {
    /// A command that answered (or none): the shared connection.
    Answered,
    /// An acquisition or an extension that did not answer: after it, on
    /// its connection.
    Unanswered,
}

/// Whom a release or a departure from the queue wakes: the channel prefix
/// of the processes' wake-up channels and the nonce of this event.
pub(crate) type Announce = (Arc<str>, u64);

/// What one acquisition attempt sends to every node, built once per
/// attempt.
#[derive(Clone, Debug)]
pub(crate) struct AcquireArgs {
    pub(crate) keys: Arc<Keys>,
    /// The attempt's value: fresh, or the `value` option's.
    pub(crate) value: Arc<str>,
    /// Whether `value` is the `value` option's: it may be another owner's.
    pub(crate) preset: bool,
    pub(crate) expiry: Duration,
    /// The waiting process's place in the name's wait queue, when the
    /// caller waits.
    pub(crate) entry: Option<QueueEntry>,
    /// How long a node that lost its state refuses new locks (`None`: it
    /// does not, with nothing to recover from).
    pub(crate) recovery: Option<Duration>,
    /// The per-node timeout.
    pub(crate) timeout: Duration,
}

/// What one release sends, the same to every node.
#[derive(Clone, Debug)]
pub(crate) struct ReleaseArgs {
    pub(crate) keys: Arc<Keys>,
    /// The value whose key goes.
    pub(crate) value: Arc<str>,
    /// How the process first in line is woken: the nonce is the same on
    /// every node, unique per release.
    pub(crate) announce: Announce,
    /// The waiter of a failed attempt that keeps waiting: the process is
    /// put back in line with that waiter's start.
    pub(crate) requeue: Option<QueueEntry>,
    /// The per-node timeout.
    pub(crate) timeout: Duration,
}

impl Node {
    /// A node; with `replicas`, acquisitions and extensions go over
    /// `durable` (else over `conn`).
    pub(crate) fn new(
        label: String,
        conn: Conn,
        replicas: Option<(usize, Duration)>,
        durable: Option<Conn>,
    ) -> Self {
        Node {
            label: label.into(),
            durable: durable.unwrap_or_else(|| conn.clone()),
            conn,
            replicas,
        }
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// `ACQUIRE` on the name's keys (see [`AcquireArgs`]). A resend after a
    /// dropped connection may claim a key that already holds the value only
    /// when the value is not preset: a generated value is this attempt's
    /// alone, a preset one may be another owner's. (A cluster connection
    /// resends on its own, unseen: there every attempt with a generated
    /// value claims a key that holds it.)
    ///
    /// With [`replicas`](Self::new) set, an acquisition whose replicas fall
    /// short is undone on this node, which then counts as failed.
    pub(crate) fn acquire(
        &self,
        args: &AcquireArgs,
    ) -> impl Future<Output = Reply<Claim>> + Send + 'static {
        let px = millis(args.expiry);
        let (node, lock, owner) = (self.clone(), args.keys.clone(), args.value.clone());
        let (keys, value) = (args.keys.clone(), args.value.clone());
        let (preset, entry, recovery) = (args.preset, args.entry.clone(), args.recovery);
        let timeout = args.timeout;
        let replicas = self.replicas;
        let unseen_resends = self.conn.resends_on_its_own();
        let claim = self.bounded(
            &self.durable,
            self.with_wait(timeout),
            move |mut conn, resent| {
                let settings = acquire_settings(
                    (resent || unseen_resends) && !preset,
                    entry.as_ref(),
                    recovery,
                );
                let call = ACQUIRE
                    .call(&[&keys.lock, &keys.node, &keys.queue, &keys.deadlines], 3)
                    .arg(&*value)
                    .arg(px)
                    .arg(settings);
                async move {
                    let (reply, acknowledged): (Vec<i64>, _) =
                        script_then_wait(&mut conn, call, replicas).await?;
                    Ok((claim_of(&reply)?, acknowledged))
                }
            },
        );
        async move {
            let (claim, acknowledged) = claim.await?;
            if let Claim::Acquired { .. } = claim
                && let Err(failure) = node.replicated(acknowledged)
            {
                // Not as durable as asked: the key goes, and the node
                // counts as failed.
                let undo = ReleaseArgs {
                    announce: (lock.wake.clone(), rand::random()),
                    keys: lock,
                    value: owner,
                    requeue: None,
                    timeout,
                };
                let _ = node.release(&undo, Undoes::Answered).await;
                return Err(failure);
            }
            Ok(claim)
        }
    }

    /// `LEAVE`: takes the process `client` out of the name's wait queue,
    /// unless a waiter that started after `start` renewed its entry.
    pub(crate) fn leave(
        &self,
        keys: Arc<Keys>,
        client: Arc<str>,
        start: u64,
        announce: Announce,
        timeout: Duration,
    ) -> impl Future<Output = Reply<i64>> + Send + 'static {
        self.bounded(&self.conn, timeout, move |mut conn, _| {
            let call = LEAVE
                .call(&[&keys.queue, &keys.deadlines, &keys.lock], 4)
                .arg(&*client)
                .arg(start)
                .arg(&*announce.0)
                .arg(announce.1);
            async move { script(&mut conn, call).await }
        })
    }

    /// `LINE_UP`: puts the process of `entry` in the name's wait queue, or
    /// renews its entry, without trying the lock.
    pub(crate) fn line_up(
        &self,
        keys: Arc<Keys>,
        entry: QueueEntry,
        timeout: Duration,
    ) -> impl Future<Output = Reply<i64>> + Send + 'static {
        self.bounded(&self.conn, timeout, move |mut conn, _| {
            let call = LINE_UP
                .call(&[&keys.queue, &keys.deadlines], 3)
                .arg(&*entry.client)
                .arg(entry.start)
                .arg(entry.ttl);
            async move { script(&mut conn, call).await }
        })
    }

    /// `FENCE`: raises the node's fencing counter (in the bookkeeping
    /// hash `node`) to at least `token`.
    pub(crate) fn fence(
        &self,
        node: Arc<str>,
        token: u64,
        timeout: Duration,
    ) -> impl Future<Output = Reply<i64>> + Send + 'static {
        self.bounded(&self.conn, timeout, move |mut conn, _| {
            let call = FENCE.call(&[&node], 1).arg(token);
            async move { script(&mut conn, call).await }
        })
    }

    /// `RELEASE` (see [`ReleaseArgs`]): 1 if our key was deleted, and then
    /// the process first in the name's wait queue woken. It goes on the
    /// connection that orders it after what it `undoes` (see [`Undoes`]).
    pub(crate) fn release(
        &self,
        args: &ReleaseArgs,
        undoes: Undoes,
    ) -> impl Future<Output = Reply<i64>> + Send + 'static {
        let conn = match undoes {
            Undoes::Answered => &self.conn,
            Undoes::Unanswered => &self.durable,
        };
        let requeue = args.requeue.as_ref().map_or_else(String::new, |l| {
            format!("{} {} {}", l.client, l.start, l.ttl)
        });
        let (keys, value) = (args.keys.clone(), args.value.clone());
        let (channel, nonce) = (args.announce.0.clone(), args.announce.1);
        self.bounded(conn, args.timeout, move |mut conn, _| {
            let call = RELEASE
                .call(&[&keys.lock, &keys.queue, &keys.deadlines], 4)
                .arg(&*value)
                .arg(&*channel)
                .arg(nonce)
                .arg(&requeue);
            async move { script(&mut conn, call).await }
        })
    }

    /// `EXTEND`: 1 if our key now has the new expiry (and counts), 2 if it
    /// was re-created on a node that kept its state (it counts only with a
    /// quorum of 1s), else 0. With `repair` (how long a node that lost its
    /// state recovers), a key that is gone is re-created. With
    /// [`replicas`](Self::new) set, an extension whose replicas fall short
    /// is a failure of this node.
    pub(crate) fn extend(
        &self,
        keys: Arc<Keys>,
        value: Arc<str>,
        expiry: Duration,
        repair: Option<Duration>,
        timeout: Duration,
    ) -> impl Future<Output = Reply<i64>> + Send + 'static {
        let px = millis(expiry);
        let node = self.clone();
        let replicas = self.replicas;
        let mut packed_repair = String::new();
        push_or_dash(&mut packed_repair, repair.map(millis));
        let repair = packed_repair;
        let extended = self.bounded(
            &self.durable,
            self.with_wait(timeout),
            move |mut conn, _| {
                let call = EXTEND
                    .call(&[&keys.lock, &keys.node], 3)
                    .arg(&*value)
                    .arg(px)
                    .arg(&repair);
                async move { script_then_wait(&mut conn, call, replicas).await }
            },
        );
        async move {
            let (extended, acknowledged): (i64, _) = extended.await?;
            if extended != 0 {
                node.replicated(acknowledged)?;
            }
            Ok(extended)
        }
    }

    /// The per-node timeout, plus the `WAIT` when one follows the command.
    fn with_wait(&self, timeout: Duration) -> Duration {
        timeout + self.replicas.map_or(Duration::ZERO, |(_, wait)| wait)
    }

    /// Whether the replicas that acknowledged a write (`WAIT`'s answer, when
    /// it was asked) are as many as [`replicas`](Self::new) asks.
    fn replicated(&self, acknowledged: Option<usize>) -> Reply<()> {
        let (Some((wanted, wait)), Some(acknowledged)) = (self.replicas, acknowledged) else {
            return Ok(());
        };
        if acknowledged >= wanted {
            return Ok(());
        }
        Err(Failure {
            node: self.label.clone(),
            fault: Fault::NotReplicated(NotReplicated {
                wanted,
                acknowledged,
                timeout: wait,
            }),
        })
    }

    /// `STORE_RECORD`: 1 if the record is kept, 0 if refused.
    /// `keys`: the lock's and the record's.
    pub(crate) fn store_record(
        &self,
        (lock, record_key): (Arc<str>, Arc<str>),
        value: Arc<str>,
        token: u64,
        ttl: Duration,
        record: bytes::Bytes,
        timeout: Duration,
    ) -> impl Future<Output = Reply<i64>> + Send + 'static {
        let ttl = millis(ttl).max(1);
        self.bounded(&self.conn, timeout, move |mut conn, _| {
            let call = STORE_RECORD
                .call(&[&lock, &record_key], 5)
                .arg(&*value)
                .arg(token)
                .arg(ttl)
                .arg(&record[..])
                .arg(record.get(..4).unwrap_or_default());
            async move { script(&mut conn, call).await }
        })
    }

    /// `UNSTORE_RECORD`: 1 if the record `record` written with `token` was
    /// deleted.
    pub(crate) fn unstore_record(
        &self,
        record: Arc<str>,
        token: u64,
        timeout: Duration,
    ) -> impl Future<Output = Reply<i64>> + Send + 'static {
        let mut prefix = String::with_capacity(21);
        push_number(&mut prefix, token);
        prefix.push(' ');
        self.bounded(&self.conn, timeout, move |mut conn, _| {
            let call = UNSTORE_RECORD.call(&[&record], 1).arg(&prefix);
            async move { script(&mut conn, call).await }
        })
    }

    /// `LOAD_RECORD`: the record at `record` (if any), and whether this
    /// node's answer counts (it did not lose its state within `horizon`).
    pub(crate) fn load_record(
        &self,
        (record, node): (Arc<str>, Arc<str>),
        horizon: Duration,
        timeout: Duration,
    ) -> impl Future<Output = Reply<(Option<Vec<u8>>, i64)>> + Send + 'static {
        let horizon = millis(horizon);
        self.bounded(&self.conn, timeout, move |mut conn, _| {
            let call = LOAD_RECORD.call(&[&record, &node], 1).arg(horizon);
            async move { script(&mut conn, call).await }
        })
    }

    /// `GET key`.
    pub(crate) fn get<T: FromRedisValue + Send + 'static>(
        &self,
        key: Arc<str>,
        timeout: Duration,
    ) -> impl Future<Output = Reply<Option<T>>> + Send + 'static {
        self.bounded(&self.conn, timeout, move |mut conn, _| {
            let cmd = redis::cmd("GET").arg(&*key).to_owned();
            async move { cmd.query_async(&mut conn).await }
        })
    }

    /// Runs `command` on `conn` within `timeout`. A command that failed
    /// because the connection was found dead (the node restarted, say) is
    /// sent once more, within the same deadline, on the connection the
    /// manager makes anew; `command` learns it is a resend (its first copy
    /// may have been applied before the connection died).
    fn bounded<T, F, Fut>(
        &self,
        conn: &Conn,
        timeout: Duration,
        command: F,
    ) -> impl Future<Output = Reply<T>> + Send + 'static
    where
        F: Fn(Conn, bool) -> Fut + Send + 'static,
        Fut: Future<Output = redis::RedisResult<T>> + Send,
        T: Send,
    {
        let conn = conn.clone();
        let node = self.label.clone();
        async move {
            let sent = tokio::time::Instant::now();
            let deadline = sent + timeout;
            let mut result = tokio::time::timeout_at(deadline, command(conn.clone(), false)).await;
            if let Ok(Err(e)) = &result
                && e.is_connection_dropped()
            {
                result = tokio::time::timeout_at(deadline, command(conn, true)).await;
            }
            match result {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(e)) => Err(Failure {
                    node,
                    fault: Fault::Redis(e),
                }),
                // How long the node was waited for, from sending to
                // giving up: what the caller's error reports.
                Err(_) => Err(Failure {
                    node,
                    fault: Fault::Timeout(sent.elapsed()),
                }),
            }
        }
    }
}

/// Runs a script call.
async fn script<T: FromRedisValue>(conn: &mut Conn, call: Call) -> RedisResult<T> {
    Ok(script_then_wait(conn, call, None).await?.0)
}

/// Runs a script call (`EVALSHA`, or `EVAL` where the node does not have
/// the script: that also caches it there, on the node that runs the call,
/// where `SCRIPT LOAD` would go to every master of a cluster), and, with
/// `replicas` asked, `WAIT` right after it in one pipeline: on the same
/// connection, so that the wait covers the script's writes, and resent with
/// it when the connection drops, so that a wait is never asked of a
/// connection that did not write.
async fn script_then_wait<T: FromRedisValue>(
    conn: &mut Conn,
    call: Call,
    replicas: Option<(usize, Duration)>,
) -> RedisResult<(T, Option<usize>)> {
    match eval_once(conn, call.evalsha(), replicas).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            eval_once(conn, &call.eval(), replicas).await
        }
        other => other,
    }
}

async fn eval_once<T: FromRedisValue>(
    conn: &mut Conn,
    cmd: &Cmd,
    replicas: Option<(usize, Duration)>,
) -> RedisResult<(T, Option<usize>)> {
    let Some((wanted, wait)) = replicas else {
        return Ok((cmd.query_async(conn).await?, None));
    };
    let mut pipe = redis::pipe();
    pipe.add_command(cmd.clone())
        .cmd("WAIT")
        .arg(wanted)
        .arg(millis(wait));
    let (reply, acknowledged): (T, usize) = pipe.query_async(conn).await?;
    Ok((reply, Some(acknowledged)))
}

/// `ACQUIRE`'s third argument: the next waiter's start, the resend flag,
/// the waiter's place in the queue (`-` for none), and how long a node
/// that lost its state refuses new locks (`-` for never).
///
/// Written digit by digit: built for every node of every attempt, where
/// the formatting machinery cost more than the rest of the command.
fn acquire_settings(
    resent: bool,
    entry: Option<&QueueEntry>,
    recovery: Option<Duration>,
) -> String {
    let mut packed = String::with_capacity(96);
    match entry {
        Some(entry) => {
            push_or_dash(&mut packed, entry.next);
            packed.push_str(if resent { " 1 " } else { " 0 " });
            packed.push_str(&entry.client);
            packed.push(' ');
            push_number(&mut packed, entry.start);
            packed.push(' ');
            push_number(&mut packed, entry.ttl);
            packed.push(' ');
        }
        None => packed.push_str(if resent { "- 1 - 0 0 " } else { "- 0 - 0 0 " }),
    }
    push_or_dash(&mut packed, recovery.map(millis));
    packed
}

/// Appends `n` in decimal, or `-` for none.
fn push_or_dash(packed: &mut String, n: Option<u64>) {
    match n {
        Some(n) => push_number(packed, n),
        None => packed.push('-'),
    }
}

/// Appends `n` in decimal.
fn push_number(packed: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    packed.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// `ACQUIRE`'s second word when the node refuses because it recovers from
/// lost state (`RECOVERING` in acquire.lua).
const RECOVERING: i64 = -4;

/// One node's answer to `ACQUIRE` (see its documentation for the shapes).
fn claim_of(reply: &[i64]) -> RedisResult<Claim> {
    match *reply {
        [1, token] => Ok(Claim::Acquired {
            token: token.max(0) as u64,
        }),
        [0, RECOVERING, born, left] => Ok(Claim::Recovering {
            born,
            left: Duration::from_millis(left.max(0) as u64),
        }),
        [0, pttl] => Ok(Claim::Held { pttl }),
        _ => Err(RedisError::from((
            ErrorKind::Parse,
            "unexpected reply to the acquire script",
            format!("{reply:?}"),
        ))),
    }
}

/// Milliseconds for `PX` / `PEXPIRE` and entry TTLs, at least 1.
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_packed_as_the_acquire_script_reads_them() {
        let entry = QueueEntry {
            client: "c0ffee".into(),
            start: 1_733_000_000_123,
            ttl: 8000,
            next: Some(1_733_000_000_456),
        };
        let last = QueueEntry {
            next: None,
            ..entry.clone()
        };
        let recovery = Some(Duration::from_millis(30_000));
        for (resent, entry, recovery, packed) in [
            (false, None, None, "- 0 - 0 0 -"),
            (true, None, recovery, "- 1 - 0 0 30000"),
            (
                false,
                Some(&entry),
                recovery,
                "1733000000456 0 c0ffee 1733000000123 8000 30000",
            ),
            (true, Some(&last), None, "- 1 c0ffee 1733000000123 8000 -"),
        ] {
            assert_eq!(acquire_settings(resent, entry, recovery), packed);
        }
        let mut zero = String::new();
        push_number(&mut zero, 0);
        push_or_dash(&mut zero, Some(u64::MAX));
        assert_eq!(zero, format!("0{}", u64::MAX));
    }
}
