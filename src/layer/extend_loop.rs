//! The extend loop of a held lock: once started (by the
//! [`lease`](super::lease), when the first extension falls due), it extends
//! the lock every interval while the request is in flight, until the
//! request lets go or the lock is lost.

use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until, timeout_at};

use super::held::LockView;
use super::release::HeldMutex;
use super::settings::MIN_EXTEND_EVERY;
use crate::error::Error;
use crate::sync::DistMutex;

/// A held lock and when to extend it.
pub(crate) struct ExtendLoop<M> {
    /// The lock, released when the request lets go or the lock is lost.
    pub(crate) held: HeldMutex<M>,
    interval: Duration,
    /// How long an extension may take, so that it starts early enough to
    /// be done before the validity ends: a node timeout at first, then the
    /// slowest extension seen.
    extend_takes: Duration,
    /// When the last extension started (none yet: `None`).
    last_attempt: Option<Instant>,
    /// When the first extension falls due: acquisition + interval.
    first_extend: Instant,
    /// No extension past this instant: the lock is then given up as lost.
    hold_until: Option<Instant>,
}

/// How an extension attempt ended.
enum Extension {
    /// Extended; the attempt started then.
    Done { started: Instant },
    /// Failed with validity left: try again.
    Retry(String),
    /// The lock can no longer be trusted.
    Lost(String),
}

/// Why the extend loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The request let go.
    LetGo,
    /// The lock is lost, and the handler was told.
    Lost,
}

impl<M: DistMutex> ExtendLoop<M> {
    /// Extends `held` every `interval` from `first_extend`, each extension
    /// started early enough to be done in time (`extend_takes` at first),
    /// none past `hold_until`.
    pub(crate) fn new(
        held: HeldMutex<M>,
        interval: Duration,
        extend_takes: Duration,
        first_extend: Instant,
        hold_until: Option<Instant>,
    ) -> Self {
        ExtendLoop {
            held,
            interval,
            extend_takes,
            last_attempt: None,
            first_extend,
            hold_until,
        }
    }

    /// When the extend loop must first act: the first extension (see
    /// [`due`](Self::due)), or the end of `max_hold` if that comes sooner.
    pub(crate) fn first_deadline(&self) -> Instant {
        self.due(self.first_extend)
    }

    /// Extends the lock until `let_go` is notified (the request let go) or
    /// the lock is lost; tells `view` of every extension and of a loss.
    pub(crate) async fn run(&mut self, view: &LockView, let_go: &Notify) -> Ended {
        let mut next = self.first_extend;
        loop {
            tokio::select! {
                biased;
                () = let_go.notified() => return Ended::LetGo,
                () = sleep_until(self.due(next)) => match self.extend_once().await {
                    Extension::Done { started } => {
                        let until = self.held.mutex.until();
                        self.held.place.hints().set_until(until);
                        view.set_until(until);
                        tracing::trace!(name = view.name(), "lock extended");
                        next = started + self.interval;
                    }
                    Extension::Retry(error) => {
                        self.held.meters().extension_failed();
                        tracing::debug!(name = view.name(), %error, "lock not extended; retrying");
                        next = Instant::now() + self.retry_every();
                    }
                    Extension::Lost(error) => {
                        self.held.meters().extension_failed();
                        self.held.meters().lost();
                        tracing::warn!(name = view.name(), %error, "lock lost: not extended");
                        view.set_lost();
                        return Ended::Lost;
                    }
                },
            }
        }
    }

    /// When the next extension starts: `next` (an interval after the start
    /// of the last one), but early enough that it can be done before the
    /// validity ends (it may take as long as the slowest so far, and at
    /// least a node timeout), and at the end of `max_hold`; never sooner
    /// than the shortest interval after the last attempt, so that a backend
    /// slower than the validity is not called in a busy loop.
    fn due(&self, next: Instant) -> Instant {
        let mut due = next;
        if let Some(until) = self.held.mutex.until() {
            due = due.min(until.checked_sub(self.extend_takes).unwrap_or(until));
        }
        if let Some(end) = self.hold_until {
            due = due.min(end);
        }
        match self.last_attempt {
            Some(last) => due.max(last + MIN_EXTEND_EVERY),
            None => due,
        }
    }

    /// How long to wait before retrying an extension that failed with
    /// validity left.
    fn retry_every(&self) -> Duration {
        (self.interval / 4).max(MIN_EXTEND_EVERY)
    }

    /// One extension, bounded by the end of the validity: past `max_hold`,
    /// past the validity, or refused by the backend (a quorum says the key
    /// is no longer ours), the lock is lost; any other failure with time
    /// left is retried.
    async fn extend_once(&mut self) -> Extension {
        let started = Instant::now();
        if self.hold_until.is_some_and(|end| started >= end) {
            return Extension::Lost("held longer than max_hold".to_owned());
        }
        let until = self.held.mutex.until();
        if until.is_some_and(|until| started >= until) {
            return Extension::Lost("the validity ended before an extension".to_owned());
        }
        self.last_attempt = Some(started);
        let extend = self.held.mutex.extend();
        let extended = match until {
            Some(until) => timeout_at(until, extend).await,
            None => Ok(extend.await),
        };
        self.extend_takes = self.extend_takes.max(started.elapsed());
        match extended {
            Ok(Ok(())) => Extension::Done { started },
            Ok(Err(error @ Error::NotAcquired)) => Extension::Lost(error.to_string()),
            Ok(Err(error)) if until.is_none_or(|until| Instant::now() < until) => {
                Extension::Retry(error.to_string())
            }
            Ok(Err(error)) => Extension::Lost(format!("{error}, and the validity ended")),
            Err(_) => Extension::Lost("the validity ended during an extension".to_owned()),
        }
    }
}
