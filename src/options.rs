//! Per-mutex options, with the Go package's defaults.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;

use crate::error::{BoxError, Error, Result};

/// Computes the delay before try number `tries` (the first retry is `1`).
/// Set with [`DistMutexOptions::with_delay_fn`].
pub type DelayFn = Arc<dyn Fn(u32) -> Duration + Send + Sync>;

/// Generates the random value that identifies one acquisition. Set with
/// [`DistMutexOptions::with_gen_value_fn`].
pub type GenValueFn = Arc<dyn Fn() -> std::result::Result<String, BoxError> + Send + Sync>;

/// The longest accepted expiry (one year): longer ones are refused rather
/// than risk arithmetic overflow on deadlines.
///
/// ```
/// use tower_dsync::{DistMutexOptions, MAX_EXPIRY};
/// let too_long = DistMutexOptions::default().with_expiry(MAX_EXPIRY * 2);
/// assert!(too_long.validate().is_err());
/// ```
pub const MAX_EXPIRY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Options of one [`DistMutex`](crate::DistMutex), a port of Go's
/// `DistMutexOptions`.
///
/// | option | Go | default |
/// |---|---|---|
/// | [`with_expiry`](Self::with_expiry) | `Expiry` | 8 s |
/// | [`with_tries`](Self::with_tries) | `Tries` | 32 |
/// | [`with_delay_fn`](Self::with_delay_fn), [`with_retry_delay`](Self::with_retry_delay) | `DelayFunc` | uniform in [50 ms, 250 ms) |
/// | [`with_drift_factor`](Self::with_drift_factor) | `DriftFactor` | 0.01 |
/// | [`with_timeout_factor`](Self::with_timeout_factor) | `TimeoutFactor` | 0.05 |
/// | [`with_gen_value_fn`](Self::with_gen_value_fn) | `GenValueFunc` | 128 bits from a CSPRNG, as 32 hex digits |
/// | [`with_value`](Self::with_value) | `Value` | none |
///
/// Setters never fail; out-of-range values are reported as
/// [`Error::InvalidOptions`] by [`validate`](Self::validate), which every
/// backend calls in `new_mutex`.
///
/// ```
/// use std::time::Duration;
/// use tower_dsync::DistMutexOptions;
///
/// let options = DistMutexOptions::default()
///     .with_expiry(Duration::from_secs(2))
///     .with_tries(5)
///     .with_retry_delay(Duration::from_millis(10));
/// assert!(options.validate().is_ok());
/// assert_eq!(options.validity(), Duration::from_millis(2000 - 20 - 2));
///
/// let bad = DistMutexOptions::default().with_tries(0);
/// assert!(bad.validate().is_err());
/// ```
#[derive(Clone)]
pub struct DistMutexOptions {
    expiry: Duration,
    tries: u32,
    delay_fn: DelayFn,
    /// The longest delay `delay_fn` returns, when it is random and its
    /// range is known (the default); `None`: its value is its longest.
    delay_ceiling: Option<Duration>,
    drift_factor: f64,
    timeout_factor: f64,
    /// `None`: the default, [`random_value`].
    gen_value_fn: Option<GenValueFn>,
    value: Option<String>,
}

impl Default for DistMutexOptions {
    fn default() -> Self {
        DistMutexOptions {
            expiry: Duration::from_secs(8),
            tries: 32,
            delay_fn: Arc::new(default_delay),
            delay_ceiling: Some(DEFAULT_DELAY_CEILING),
            drift_factor: 0.01,
            timeout_factor: 0.05,
            gen_value_fn: None,
            value: None,
        }
    }
}

impl fmt::Debug for DistMutexOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistMutexOptions")
            .field("expiry", &self.expiry)
            .field("tries", &self.tries)
            .field("drift_factor", &self.drift_factor)
            .field("timeout_factor", &self.timeout_factor)
            .field("value", &self.value.as_ref().map(|_| "<preset>"))
            .finish_non_exhaustive()
    }
}

impl DistMutexOptions {
    /// How long an acquired lock lives unless extended. Must be positive,
    /// longer than the drift, and at most [`MAX_EXPIRY`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// let o = tower_dsync::DistMutexOptions::default().with_expiry(Duration::from_secs(30));
    /// assert_eq!(o.expiry(), Duration::from_secs(30));
    /// ```
    pub fn with_expiry(mut self, expiry: Duration) -> Self {
        self.expiry = expiry;
        self
    }

    /// How many times `lock` tries before it gives up with
    /// [`Error::Held`]. Must be at least 1. `DistLockLayer` does not use
    /// it: its wait budget bounds a request's wait.
    ///
    /// Between two tries `lock` waits for the retry delay (or less, when
    /// woken by a release), so its tries take about
    /// [`longest_wait`](Self::longest_wait) at most. A caller of the Redis
    /// backend that lines up behind another caller of its process for the
    /// same name waits for its turn at most that long; if the turn has not
    /// come by then, it gives up with [`Error::Held`] without a try of its
    /// own (the caller ahead is still making its tries).
    ///
    /// ```
    /// let o = tower_dsync::DistMutexOptions::default().with_tries(1);
    /// assert_eq!(o.tries(), 1);
    /// ```
    pub fn with_tries(mut self, tries: u32) -> Self {
        self.tries = tries;
        self
    }

    /// The delay before each retry, as a function of the retry number
    /// (1 for the first retry). A waiter also wakes early when the name is
    /// released or the holder's lock expires.
    ///
    /// ```
    /// # use std::time::Duration;
    /// // Exponential back-off, capped at one second.
    /// let o = tower_dsync::DistMutexOptions::default()
    ///     .with_delay_fn(|n| Duration::from_millis(10u64 << n.min(6)).min(Duration::from_secs(1)));
    /// assert_eq!(o.delay(1), Duration::from_millis(20));
    /// ```
    pub fn with_delay_fn(
        mut self,
        delay: impl Fn(u32) -> Duration + Send + Sync + 'static,
    ) -> Self {
        self.delay_fn = Arc::new(delay);
        self.delay_ceiling = None;
        self
    }

    /// A constant delay between tries (Go: `WithRetryDelay`).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let o = tower_dsync::DistMutexOptions::default().with_retry_delay(Duration::from_millis(5));
    /// assert_eq!(o.delay(3), Duration::from_millis(5));
    /// ```
    pub fn with_retry_delay(self, delay: Duration) -> Self {
        self.with_delay_fn(move |_| delay)
    }

    /// The share of the expiry assumed lost to clock drift between nodes.
    /// Must be in `[0, 1)`.
    ///
    /// ```
    /// let o = tower_dsync::DistMutexOptions::default().with_drift_factor(0.0);
    /// assert_eq!(o.drift_factor(), 0.0);
    /// ```
    pub fn with_drift_factor(mut self, factor: f64) -> Self {
        self.drift_factor = factor;
        self
    }

    /// The share of the expiry each backend node gets to answer one command.
    /// Must be in `(0, 1)`: zero would make every node time out at once.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let o = tower_dsync::DistMutexOptions::default().with_timeout_factor(0.1);
    /// assert_eq!(o.node_timeout(), Duration::from_millis(800));
    /// ```
    pub fn with_timeout_factor(mut self, factor: f64) -> Self {
        self.timeout_factor = factor;
        self
    }

    /// The generator of the random value that identifies each acquisition.
    /// Values must be unpredictable and unique: whoever knows a value can
    /// unlock or extend that lock.
    ///
    /// ```
    /// let o = tower_dsync::DistMutexOptions::default()
    ///     .with_gen_value_fn(|| Ok(format!("worker-7:{}", tower_dsync::random_value())));
    /// assert!(o.gen_value().unwrap().starts_with("worker-7:"));
    /// ```
    pub fn with_gen_value_fn(
        mut self,
        gen_value: impl Fn() -> std::result::Result<String, BoxError> + Send + Sync + 'static,
    ) -> Self {
        self.gen_value_fn = Some(Arc::new(gen_value));
        self
    }

    /// A preset value: the mutex then acts on the lock that carries this
    /// value, so another process can `extend` or `unlock` a lock it was
    /// handed (ownership transfer), and `lock` acquires with this value.
    /// Once any mutex with the value unlocks, the others must stop
    /// extending: with Redis, an extension within the validity puts the
    /// key back on nodes that lost it (see `RedisSyncBuilder::set_nx_on_extend`),
    /// and cannot tell a node restarted empty from one whose key another
    /// holder of the value released.
    ///
    /// ```
    /// let o = tower_dsync::DistMutexOptions::default().with_value("3f2a");
    /// assert_eq!(o.value(), Some("3f2a"));
    /// ```
    pub fn with_value(mut self, value: impl Into<String>) -> Self {
        self.value = Some(value.into());
        self
    }

    /// The expiry.
    ///
    /// ```
    /// # use std::time::Duration;
    /// assert_eq!(tower_dsync::DistMutexOptions::default().expiry(), Duration::from_secs(8));
    /// ```
    pub fn expiry(&self) -> Duration {
        self.expiry
    }

    /// The number of tries.
    ///
    /// ```
    /// assert_eq!(tower_dsync::DistMutexOptions::default().tries(), 32);
    /// ```
    pub fn tries(&self) -> u32 {
        self.tries
    }

    /// The delay before retry number `retry` (1 for the first retry).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let d = tower_dsync::DistMutexOptions::default().delay(1);
    /// assert!(d >= Duration::from_millis(50) && d < Duration::from_millis(250));
    /// ```
    pub fn delay(&self, retry: u32) -> Duration {
        (self.delay_fn)(retry)
    }

    /// The longest [`delay`](Self::delay) before retry number `retry` can
    /// be: for the default random delay, the top of its range (250 ms);
    /// for a delay function, what it returns.
    ///
    /// ```
    /// # use std::time::Duration;
    /// use tower_dsync::DistMutexOptions;
    /// assert_eq!(DistMutexOptions::default().longest_delay(1), Duration::from_millis(250));
    /// let fixed = DistMutexOptions::default().with_retry_delay(Duration::ZERO);
    /// assert_eq!(fixed.longest_delay(1), Duration::ZERO);
    /// ```
    pub fn longest_delay(&self, retry: u32) -> Duration {
        self.delay_ceiling.unwrap_or_else(|| self.delay(retry))
    }

    /// The longest time the tries of one `lock` can take: one
    /// [`node_timeout`](Self::node_timeout) per try (an attempt waits for
    /// its nodes at most that long) and the
    /// [`longest_delay`](Self::longest_delay) before each retry. Never zero
    /// with more than one try, whatever the delay.
    ///
    /// The sum is made lazily, try by try, by callers that wait: with
    /// `u32::MAX` tries it is effectively unbounded, and computing it here
    /// walks every try (a delay function is called once per retry).
    ///
    /// ```
    /// # use std::time::Duration;
    /// use tower_dsync::DistMutexOptions;
    /// let o = DistMutexOptions::default()
    ///     .with_expiry(Duration::from_secs(1))
    ///     .with_tries(3)
    ///     .with_retry_delay(Duration::ZERO);
    /// // Three node timeouts of 50 ms, no delay.
    /// assert_eq!(o.longest_wait(), Duration::from_millis(150));
    /// ```
    pub fn longest_wait(&self) -> Duration {
        (1..=self.tries).fold(Duration::ZERO, |sum, try_number| {
            sum.saturating_add(self.try_slot(try_number))
        })
    }

    /// The longest try number `try_number` (from 1) of `lock` can take:
    /// the attempt, and the delay after it unless it is the last. At least
    /// a millisecond, so that a wait made of slots always ends.
    pub(crate) fn try_slot(&self, try_number: u32) -> Duration {
        let delay = if try_number < self.tries {
            self.longest_delay(try_number)
        } else {
            Duration::ZERO
        };
        self.node_timeout()
            .saturating_add(delay)
            .max(Duration::from_millis(1))
    }

    /// The drift factor.
    ///
    /// ```
    /// assert_eq!(tower_dsync::DistMutexOptions::default().drift_factor(), 0.01);
    /// ```
    pub fn drift_factor(&self) -> f64 {
        self.drift_factor
    }

    /// The timeout factor.
    ///
    /// ```
    /// assert_eq!(tower_dsync::DistMutexOptions::default().timeout_factor(), 0.05);
    /// ```
    pub fn timeout_factor(&self) -> f64 {
        self.timeout_factor
    }

    /// The preset value, if any.
    ///
    /// ```
    /// assert_eq!(tower_dsync::DistMutexOptions::default().value(), None);
    /// ```
    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }

    /// The clock drift allowance: `expiry * drift_factor + 2 ms`.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let o = tower_dsync::DistMutexOptions::default();
    /// assert_eq!(o.drift(), Duration::from_millis(82));
    /// ```
    pub fn drift(&self) -> Duration {
        scale(self.expiry, self.drift_factor).saturating_add(Duration::from_millis(2))
    }

    /// The longest validity an acquisition can have: `expiry - drift`
    /// (zero if the drift is larger).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let o = tower_dsync::DistMutexOptions::default();
    /// assert_eq!(o.validity(), Duration::from_millis(8000 - 82));
    /// ```
    pub fn validity(&self) -> Duration {
        self.expiry.saturating_sub(self.drift())
    }

    /// How long one node gets to answer one command:
    /// `expiry * timeout_factor`.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let o = tower_dsync::DistMutexOptions::default();
    /// assert_eq!(o.node_timeout(), Duration::from_millis(400));
    /// ```
    pub fn node_timeout(&self) -> Duration {
        scale(self.expiry, self.timeout_factor)
    }

    /// The value for a new acquisition: the preset value if there is one,
    /// else a fresh one from the generator.
    ///
    /// ```
    /// let o = tower_dsync::DistMutexOptions::default();
    /// assert_ne!(o.gen_value().unwrap(), o.gen_value().unwrap());
    /// ```
    pub fn gen_value(&self) -> Result<String> {
        if let Some(value) = &self.value {
            return Ok(value.clone());
        }
        let Some(gen_value) = &self.gen_value_fn else {
            return Ok(random_value());
        };
        let value = gen_value().map_err(Error::GenValue)?;
        if value.is_empty() {
            return Err(Error::GenValue(
                "the value generator returned an empty value".into(),
            ));
        }
        Ok(value)
    }

    /// [`gen_value`](Self::gen_value), shared: what backends keep, made in
    /// one allocation for the default generator.
    pub(crate) fn gen_shared_value(&self) -> Result<Arc<str>> {
        if self.value.is_none() && self.gen_value_fn.is_none() {
            let hex = hex128(rand::rng().random::<u128>());
            return Ok(Arc::from(hex_str(&hex)));
        }
        self.gen_value().map(Arc::from)
    }

    /// Checks every option's range; backends call this in `new_mutex`.
    ///
    /// ```
    /// use tower_dsync::{DistMutexOptions, Error};
    ///
    /// let err = DistMutexOptions::default().with_drift_factor(1.0).validate().unwrap_err();
    /// assert!(matches!(err, Error::InvalidOptions { .. }));
    /// assert!(err.to_string().contains("drift_factor"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.check(self.drift())
    }

    /// [`validate`](Self::validate), and the [`drift`](Self::drift),
    /// computed once.
    pub(crate) fn validated_drift(&self) -> Result<Duration> {
        let drift = self.drift();
        self.check(drift)?;
        Ok(drift)
    }

    /// The checks of [`validate`](Self::validate), given the drift.
    fn check(&self, drift: Duration) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidOptions { reason });
        if self.expiry.is_zero() {
            return invalid("expiry must be greater than zero".into());
        }
        if self.expiry > MAX_EXPIRY {
            return invalid(format!("expiry must be at most {} s", MAX_EXPIRY.as_secs()));
        }
        if self.tries == 0 {
            return invalid("tries must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.drift_factor) {
            return invalid(format!(
                "drift_factor must be in [0, 1), got {}",
                self.drift_factor
            ));
        }
        if !(self.timeout_factor > 0.0 && self.timeout_factor < 1.0) {
            return invalid(format!(
                "timeout_factor must be in (0, 1), got {}",
                self.timeout_factor
            ));
        }
        if self.expiry.saturating_sub(drift).is_zero() {
            return invalid(format!(
                "expiry ({:?}) must be longer than the drift allowance ({drift:?})",
                self.expiry,
            ));
        }
        if self.value.as_deref() == Some("") {
            return invalid("a preset value must not be empty".into());
        }
        Ok(())
    }
}

/// `d * factor`, never panicking: a factor that is not a positive finite
/// number gives zero, an overflow the largest duration.
fn scale(d: Duration, factor: f64) -> Duration {
    if factor.is_finite() && factor > 0.0 {
        Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
    } else {
        Duration::ZERO
    }
}

/// The default delay: uniformly random in [50 ms, 250 ms), as in Go.
fn default_delay(_retry: u32) -> Duration {
    Duration::from_millis(rand::rng().random_range(50..250))
}

/// The top of [`default_delay`]'s range.
const DEFAULT_DELAY_CEILING: Duration = Duration::from_millis(250);

/// 128 random bits from a CSPRNG (the thread-local ChaCha generator seeded
/// by the operating system), as 32 lowercase hex digits. The default value
/// generator.
///
/// ```
/// let v = tower_dsync::random_value();
/// assert_eq!(v.len(), 32);
/// assert!(v.bytes().all(|b| b.is_ascii_hexdigit()));
/// ```
pub fn random_value() -> String {
    hex_str(&hex128(rand::rng().random::<u128>())).to_owned()
}

/// The digits of `format!("{bits:032x}")`, written out directly: std's
/// formatter costs about 430 more instructions per value (callgrind on
/// `benches/layer_floor.rs`), once per lock.
fn hex128(bits: u128) -> [u8; 32] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 32];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = DIGITS[((bits >> (124 - 4 * i)) & 0xf) as usize];
    }
    hex
}

fn hex_str(hex: &[u8; 32]) -> &str {
    std::str::from_utf8(hex).expect("hex digits are ASCII")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::DistMutexOptions;

    #[test]
    fn the_longest_wait_is_fixed_and_never_zero_with_retries() {
        // The default delay is random; the bound counts the top of its
        // range, the same on every call.
        let default = DistMutexOptions::default();
        let expected = Duration::from_millis(32 * 400 + 31 * 250);
        for _ in 0..100 {
            assert_eq!(default.longest_wait(), expected);
        }
        let zero = default.clone().with_retry_delay(Duration::ZERO);
        assert_eq!(zero.longest_wait(), Duration::from_millis(32 * 400));
        let zero_first = default.with_tries(3).with_delay_fn(|retry| {
            if retry == 1 {
                Duration::ZERO
            } else {
                Duration::from_secs(1)
            }
        });
        assert_eq!(
            zero_first.longest_wait(),
            Duration::from_millis(3 * 400 + 1000),
            "the last try has no delay after it"
        );
        let one_try = DistMutexOptions::default().with_tries(1);
        assert_eq!(one_try.longest_wait(), Duration::from_millis(400));
    }

    #[test]
    fn hex128_is_zero_padded_lowercase_hex() {
        for bits in [
            0,
            1,
            0xabc,
            u128::MAX,
            0x0123_4567_89ab_cdef << 60,
            1 << 127,
        ] {
            assert_eq!(super::hex_str(&super::hex128(bits)), format!("{bits:032x}"));
        }
    }
}
