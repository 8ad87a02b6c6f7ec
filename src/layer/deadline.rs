//! A request's deadline: how long its caller waits for it, which bounds how
//! long it waits for its lock.

use std::time::Duration;

use http::Request;
use tokio::time::Instant;

/// A request's deadline, as a request extension: the layer waits for the
/// lock no longer than shortly before it, and a request still waiting then
/// is rejected with
/// [`RejectionKind::DeadlineExceeded`](super::RejectionKind::DeadlineExceeded)
/// (503 with `Retry-After`, or `DEADLINE_EXCEEDED`) while its caller still
/// listens. gRPC calls carry theirs in the `grpc-timeout` header, which
/// the layer reads itself; for HTTP, a layer in front (or the server) puts
/// one in the request.
///
/// An outer `tower::timeout::Timeout` does not tell the layer its limit: when
/// it fires it drops the request (and its place in the line) and answers
/// with its own error. Put a `Deadline` in the request as well to get the
/// layer's rejection before it.
///
/// ```
/// use std::time::Duration;
/// use tower_dsync::layer::Deadline;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(Deadline::after(Duration::from_secs(2)));
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// The deadline `timeout` from now.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let deadline = tower_dsync::layer::Deadline::after(std::time::Duration::from_millis(250));
    /// assert!(deadline.0 > tokio::time::Instant::now());
    /// # }
    /// ```
    pub fn after(timeout: Duration) -> Self {
        let now = Instant::now();
        Deadline(now.checked_add(timeout).unwrap_or(now))
    }

    /// When a request with this deadline stops waiting for its lock: a
    /// tenth of the time left before it (at most 50 ms), so that the
    /// rejection reaches the caller in time.
    pub(crate) fn stop_waiting(self) -> Instant {
        let left = self.0.saturating_duration_since(Instant::now());
        self.0 - (left / 10).min(Duration::from_millis(50))
    }
}

/// The deadline of `request`: its [`Deadline`] extension, else, for a gRPC
/// call, its `grpc-timeout` header.
pub(crate) fn of<B>(request: &Request<B>, grpc: bool) -> Option<Deadline> {
    if let Some(deadline) = request.extensions().get::<Deadline>() {
        return Some(*deadline);
    }
    if !grpc {
        return None;
    }
    let timeout = request.headers().get("grpc-timeout")?.to_str().ok()?;
    grpc_timeout(timeout).map(Deadline::after)
}

/// A `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`,
/// `m`, `u`, `n`). Anything else is no timeout.
fn grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().next_back()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_as_the_spec_writes_them() {
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", "１S", "1é"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_stops_before_the_deadline() {
        let deadline = Deadline::after(Duration::from_millis(100));
        assert_eq!(
            deadline.0 - deadline.stop_waiting(),
            Duration::from_millis(10)
        );
        let far = Deadline::after(Duration::from_secs(10));
        assert_eq!(far.0 - far.stop_waiting(), Duration::from_millis(50));
        let request = http::Request::builder()
            .header("grpc-timeout", "2S")
            .body(())
            .unwrap();
        assert_eq!(
            of(&request, true),
            Some(Deadline::after(Duration::from_secs(2)))
        );
        assert_eq!(of(&request, false), None);
    }
}
