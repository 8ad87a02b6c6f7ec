//! `RedisMutex`: the Redlock algorithm over the nodes of a `RedisSync`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Shared;
use super::quorum::Round;
use super::scripts::ACQUIRED;
use crate::error::{Error, Result};
use crate::options::DistMutexOptions;
use crate::sync::DistMutex;

/// A mutex of [`RedisSync`](super::RedisSync).
///
/// `lock` sends `SET key value NX PX expiry` (as a script that also reads
/// the holder's remaining time) to every node at once, each bounded by the
/// per-node timeout `expiry * timeout_factor`, and succeeds when
/// `n / 2 + 1` nodes agreed and validity remains:
/// `expiry - elapsed - drift > 0` with `drift = expiry * drift_factor + 2 ms`.
/// Then `until = start + expiry - elapsed - drift`. A failed attempt, or a
/// `lock()` future dropped mid-attempt, releases what it got in the
/// background. Each attempt uses a fresh value, so such a release can never
/// remove a later attempt's key; with a preset value, the next attempt
/// waits for it instead.
///
/// ```no_run
/// use tower_dsync::{DistMutex, DistMutexOptions, DistSync, RedisSync};
///
/// # #[tokio::main] async fn main() -> tower_dsync::Result<()> {
/// let sync = RedisSync::new(["redis://127.0.0.1:6379"])?;
/// let mut mutex = sync.new_mutex("reports:daily", DistMutexOptions::default())?;
/// mutex.lock().await?;
/// mutex.unlock().await?;
/// # Ok(()) }
/// ```
pub struct RedisMutex {
    shared: Arc<Shared>,
    name: String,
    key: Arc<str>,
    options: DistMutexOptions,
    /// Empty until acquired, unless preset.
    value: Arc<str>,
    until: Option<Instant>,
    /// The release of a failed or abandoned attempt, with its value, while
    /// it may still run.
    cleanup: Option<Cleanup>,
}

impl fmt::Debug for RedisMutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisMutex")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("until", &self.until)
            .finish_non_exhaustive()
    }
}

impl RedisMutex {
    pub(super) fn new(shared: Arc<Shared>, name: &str, options: DistMutexOptions) -> Self {
        let key = format!("{}{}", shared.key_prefix, name);
        RedisMutex {
            shared,
            name: name.to_owned(),
            key: key.into(),
            value: options.value().unwrap_or_default().into(),
            options,
            until: None,
            cleanup: None,
        }
    }

    /// The Redis key of this lock: the key prefix followed by the name.
    ///
    /// ```no_run
    /// # use tower_dsync::{DistMutexOptions, DistSync, RedisSync};
    /// # #[tokio::main] async fn main() -> tower_dsync::Result<()> {
    /// let sync = RedisSync::new(["redis://127.0.0.1:6379"])?;
    /// let mutex = sync.new_mutex("a", DistMutexOptions::default())?;
    /// assert_eq!(mutex.key(), "dsync:a");
    /// # Ok(()) }
    /// ```
    pub fn key(&self) -> &str {
        &self.key
    }

    /// `start + expiry - elapsed - drift`, if that is still ahead.
    fn validity_end(&self, start: Instant) -> Option<Instant> {
        let elapsed = start.elapsed();
        let validity = self
            .options
            .expiry()
            .checked_sub(elapsed + self.options.drift())?;
        (!validity.is_zero()).then(|| start + validity)
    }
}

impl DistMutex for RedisMutex {
    fn name(&self) -> &str {
        &self.name
    }

    fn value(&self) -> &str {
        &self.value
    }

    fn until(&self) -> Option<Instant> {
        self.until
    }

    async fn lock(&mut self) -> Result<()> {
        let preset = self.options.value().is_some();
        let expiry = self.options.expiry();
        let timeout = self.options.node_timeout();
        let quorum = self.shared.quorum;
        // How long the holder keeps the name, as its nodes told us.
        let mut holder_left = Duration::MAX;
        let mut last_error = None;
        for attempt in 0..self.options.tries() {
            if attempt > 0 {
                tokio::time::sleep(self.options.delay(attempt).min(holder_left)).await;
            }
            let value: Arc<str> = self.options.gen_value()?.into();
            wait_for_cleanup(&mut self.cleanup, &value).await;
            let start = Instant::now();
            let mut attempt = Attempt {
                round: Some(Round::start(self.shared.nodes.iter().map(|node| {
                    node.acquire(self.key.clone(), value.clone(), expiry, timeout)
                }))),
                shared: &self.shared,
                key: &self.key,
                value: &value,
                preset,
                timeout,
                cleanup: &mut self.cleanup,
            };
            attempt
                .round
                .as_mut()
                .expect("armed")
                .settle(quorum, self.shared.fail_fast, |reply| *reply == ACQUIRED)
                .await;
            let mut round = attempt.round.take().expect("armed");
            drop(attempt);
            if round.yes >= quorum
                && let Some(until) = self.validity_end(start)
            {
                round.finish_in_background();
                self.value = value;
                self.until = Some(until);
                return Ok(());
            }
            let error = acquire_error(&mut round, quorum, timeout, start.elapsed());
            holder_left = match &error {
                Error::Held {
                    remaining: Some(left),
                } => *left,
                _ => Duration::MAX,
            };
            self.cleanup =
                release_leftovers(round, &self.shared, &self.key, &value, preset, timeout);
            last_error = Some(error);
        }
        Err(last_error.expect("tries is at least 1"))
    }

    async fn unlock(&mut self) -> Result<()> {
        if self.value.is_empty() {
            return Err(Error::NotAcquired);
        }
        wait_for_cleanup(&mut self.cleanup, &self.value).await;
        let timeout = self.options.node_timeout();
        let quorum = self.shared.quorum;
        let mut round = Round::start(
            self.shared
                .nodes
                .iter()
                .map(|node| node.release(self.key.clone(), self.value.clone(), timeout)),
        );
        round
            .settle(quorum, self.shared.fail_fast, |deleted| *deleted == 1)
            .await;
        let verdict = round.verdict(quorum, timeout);
        round.finish_in_background();
        if !verdict? {
            return Err(Error::NotAcquired);
        }
        self.until = None;
        Ok(())
    }

    async fn extend(&mut self) -> Result<()> {
        if self.value.is_empty() {
            return Err(Error::NotAcquired);
        }
        wait_for_cleanup(&mut self.cleanup, &self.value).await;
        let expiry = self.options.expiry();
        let timeout = self.options.node_timeout();
        let quorum = self.shared.quorum;
        let set_nx = self.shared.set_nx_on_extend;
        let start = Instant::now();
        let mut round = Round::start(self.shared.nodes.iter().map(|node| {
            node.extend(
                self.key.clone(),
                self.value.clone(),
                expiry,
                set_nx,
                timeout,
            )
        }));
        round
            .settle(quorum, self.shared.fail_fast, |extended| *extended == 1)
            .await;
        let verdict = round.verdict(quorum, timeout);
        round.finish_in_background();
        if !verdict? {
            return Err(Error::NotAcquired);
        }
        let until = self.validity_end(start).ok_or_else(|| Error::Timeout {
            after: start.elapsed(),
            nodes: Vec::new(),
        })?;
        self.until = Some(until);
        Ok(())
    }

    async fn valid(&self) -> Result<bool> {
        if self.value.is_empty() {
            return Ok(false);
        }
        let timeout = self.options.node_timeout();
        let quorum = self.shared.quorum;
        let mut round = Round::start(
            self.shared
                .nodes
                .iter()
                .map(|node| node.get(self.key.clone(), timeout)),
        );
        let value = &*self.value;
        round
            .settle(quorum, self.shared.fail_fast, |current| {
                current.as_deref() == Some(value)
            })
            .await;
        let verdict = round.verdict(quorum, timeout);
        round.finish_in_background();
        verdict
    }
}

/// A background release of keys set with `value`.
struct Cleanup {
    value: Arc<str>,
    task: JoinHandle<()>,
}

/// Waits for a background release that could remove keys set with `value`
/// (the same value is about to be used again: a preset value, or a
/// generator that repeats); forgets one that is done or cannot collide.
/// Cancel-safe: the release stays recorded until it has finished.
async fn wait_for_cleanup(cleanup: &mut Option<Cleanup>, value: &Arc<str>) {
    if let Some(pending) = cleanup {
        if pending.value == *value {
            let _ = (&mut pending.task).await;
        }
        *cleanup = None;
    }
}

/// An acquisition round in flight. Dropped while armed (the `lock()` future
/// was dropped), it releases whatever the round got, in the background.
struct Attempt<'a> {
    round: Option<Round<i64>>,
    shared: &'a Arc<Shared>,
    key: &'a Arc<str>,
    value: &'a Arc<str>,
    preset: bool,
    timeout: Duration,
    cleanup: &'a mut Option<Cleanup>,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if let Some(round) = self.round.take() {
            *self.cleanup = release_leftovers(
                round,
                self.shared,
                self.key,
                self.value,
                self.preset,
                self.timeout,
            );
        }
    }
}

/// Why an attempt failed: the failed nodes' error when they alone make a
/// quorum impossible; otherwise `Held`, with the time until enough of the
/// held nodes expire for a quorum to be possible.
fn acquire_error(
    round: &mut Round<i64>,
    quorum: usize,
    timeout: Duration,
    elapsed: Duration,
) -> Error {
    if round.yes >= quorum {
        // A quorum, but too late: no validity left.
        return Error::Timeout {
            after: elapsed,
            nodes: Vec::new(),
        };
    }
    let nodes = round.nodes();
    let failed = round.failures.len();
    let mut held: Vec<Option<Duration>> = round
        .replies
        .iter()
        .filter(|(_, reply)| *reply != ACQUIRED)
        .map(|(_, pttl)| match *pttl {
            // -1: the key has no expiry; -2: it vanished meanwhile.
            -1 => None,
            ms => Some(Duration::from_millis(ms.max(0) as u64)),
        })
        .collect();
    if held.is_empty() || failed + quorum > nodes {
        return round.failure_error(quorum, timeout);
    }
    // Nodes that said yes or did not answer count as free.
    let free = nodes - held.len() - failed;
    let need = quorum.saturating_sub(free).max(1);
    held.sort_by_key(|left| left.unwrap_or(Duration::MAX));
    Error::Held {
        remaining: held.get(need - 1).copied().flatten(),
    }
}

/// Releases, in the background, the keys a failed or abandoned attempt may
/// have set: on nodes that said yes, on nodes that have not answered yet,
/// and (with a generated value) on nodes that failed, since a command that
/// timed out may still have been applied. A preset value is not released on
/// failed nodes: the key there may be its rightful owner's.
fn release_leftovers(
    round: Round<i64>,
    shared: &Arc<Shared>,
    key: &Arc<str>,
    value: &Arc<str>,
    preset: bool,
    timeout: Duration,
) -> Option<Cleanup> {
    let unsure = !preset && !round.failures.is_empty();
    if round.yes == 0 && round.unanswered() == 0 && !unsure {
        return None;
    }
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (shared, key, released) = (shared.clone(), key.clone(), value.clone());
    let task = runtime.spawn(async move {
        let value = released;
        let mut suspects = Vec::new();
        round
            .drain(|node, answer| match answer {
                Some(reply) if *reply == ACQUIRED => suspects.push(node),
                Some(_) => {}
                None if !preset => suspects.push(node),
                None => {}
            })
            .await;
        join_all(
            suspects
                .into_iter()
                .map(|i| shared.nodes[i].release(key.clone(), value.clone(), timeout)),
        )
        .await;
    });
    Some(Cleanup {
        value: value.clone(),
        task,
    })
}
