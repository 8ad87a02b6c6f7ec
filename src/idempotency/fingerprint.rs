//! The fingerprint of a request: what a retry must repeat to get the first
//! response back.

use std::fmt;
use std::sync::Arc;

use http::request::Parts;

/// A custom fingerprint: from the request head and its whole body.
type Custom = dyn Fn(&Parts, &[u8]) -> u128 + Send + Sync;

/// How a request's fingerprint is made. A retry with the same key and
/// another fingerprint is refused (422, or `INVALID_ARGUMENT` for gRPC)
/// instead of being answered with a response to a different request.
///
/// The default takes the method, the path and query, and the body. The
/// hash is 128-bit FNV-1a: stable across versions and machines (replicas
/// compare each other's fingerprints), fast, and not cryptographic. A
/// collision needs the same client's key, so it can at worst replay that
/// client's own first response; use [`custom`](Self::custom) with a
/// cryptographic hash where that matters.
///
/// ```
/// use tower_dsync::idempotency::Fingerprint;
///
/// // Method, path and query, and body (the default).
/// let full = Fingerprint::default();
/// // Method, path and query only: the body is not read before the handler.
/// let head_only = Fingerprint::without_body();
/// // Your own: here, the body alone.
/// let body_only = Fingerprint::custom(|_, body| Fingerprint::hash(&[body]));
/// # let _ = (full, head_only, body_only);
/// ```
#[derive(Clone)]
pub struct Fingerprint {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Head { body: bool },
    Custom(Arc<Custom>),
}

impl Default for Fingerprint {
    fn default() -> Self {
        Fingerprint {
            kind: Kind::Head { body: true },
        }
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Head { body } => f.debug_struct("Fingerprint").field("body", body).finish(),
            Kind::Custom(_) => f.write_str("Fingerprint::custom"),
        }
    }
}

impl Fingerprint {
    /// The method and the path and query, without the body: the body then
    /// streams to the handler unread.
    ///
    /// ```
    /// let fingerprint = tower_dsync::idempotency::Fingerprint::without_body();
    /// assert!(!fingerprint.reads_body());
    /// ```
    pub fn without_body() -> Self {
        Fingerprint {
            kind: Kind::Head { body: false },
        }
    }

    /// A fingerprint of your own, from the request head and its whole body
    /// (read, up to the layer's request body limit, before the handler).
    ///
    /// ```
    /// use tower_dsync::idempotency::Fingerprint;
    /// let by_tenant_and_body = Fingerprint::custom(|head, body| {
    ///     let tenant = head.headers.get("x-tenant").map_or(&b""[..], |v| v.as_bytes());
    ///     Fingerprint::hash(&[tenant, body])
    /// });
    /// assert!(by_tenant_and_body.reads_body());
    /// ```
    pub fn custom(f: impl Fn(&Parts, &[u8]) -> u128 + Send + Sync + 'static) -> Self {
        Fingerprint {
            kind: Kind::Custom(Arc::new(f)),
        }
    }

    /// Whether the body is read before the handler to make the fingerprint.
    ///
    /// ```
    /// assert!(tower_dsync::idempotency::Fingerprint::default().reads_body());
    /// ```
    pub fn reads_body(&self) -> bool {
        match &self.kind {
            Kind::Head { body } => *body,
            Kind::Custom(_) => true,
        }
    }

    /// The 128-bit FNV-1a hash of `parts`, each ended by its length, so
    /// that moving bytes from one part to the next changes the hash.
    ///
    /// ```
    /// use tower_dsync::idempotency::Fingerprint;
    /// assert_ne!(Fingerprint::hash(&[b"ab", b"c"]), Fingerprint::hash(&[b"a", b"bc"]));
    /// assert_eq!(Fingerprint::hash(&[b"x"]), Fingerprint::hash(&[b"x"]));
    /// ```
    pub fn hash(parts: &[&[u8]]) -> u128 {
        const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
        const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
        let mut hash = OFFSET;
        let mut eat = |bytes: &[u8]| {
            for &byte in bytes {
                hash ^= u128::from(byte);
                hash = hash.wrapping_mul(PRIME);
            }
        };
        for part in parts {
            eat(part);
            eat(&(part.len() as u64).to_be_bytes());
        }
        hash
    }

    /// The fingerprint of a request with head `parts` and body `body`
    /// (empty when the body is not read).
    pub(crate) fn of(&self, parts: &Parts, body: &[u8]) -> u128 {
        match &self.kind {
            Kind::Head { body: with_body } => {
                let target = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |target| target.as_str());
                let body: &[u8] = if *with_body { body } else { b"" };
                Self::hash(&[parts.method.as_str().as_bytes(), target.as_bytes(), body])
            }
            Kind::Custom(f) => f(parts, body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, uri: &str) -> Parts {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn the_default_covers_method_target_and_body() {
        let f = Fingerprint::default();
        let base = f.of(&head("POST", "/charges?x=1"), b"{}");
        assert_eq!(base, f.of(&head("POST", "/charges?x=1"), b"{}"));
        assert_ne!(base, f.of(&head("PUT", "/charges?x=1"), b"{}"));
        assert_ne!(base, f.of(&head("POST", "/charges?x=2"), b"{}"));
        assert_ne!(base, f.of(&head("POST", "/charges?x=1"), b"{ }"));
        let without = Fingerprint::without_body();
        assert_eq!(
            without.of(&head("POST", "/a"), b"1"),
            without.of(&head("POST", "/a"), b"2")
        );
    }

    #[test]
    fn the_hash_is_stable() {
        // FNV-1a 128 of the empty input is its offset basis; the value of
        // one part is pinned, since replicas compare their fingerprints.
        assert_eq!(
            Fingerprint::hash(&[]),
            0x6c62_272e_07bb_0142_62b8_2175_6295_c58d
        );
        // "a" then its length, 1, as 8 big-endian bytes (FNV-1a 128 of "a"
        // alone is the published 0xd228cb696f1a8caf78912b704e4a8964).
        assert_eq!(
            Fingerprint::hash(&[b"a"]),
            0xd64a_ad8c_4e06_1a57_2021_bcd1_0a18_ae1f
        );
    }
}
