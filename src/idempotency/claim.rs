//! What the front service of the idempotency layer tells the services
//! behind it, in the request's extensions, and the lock's key extractor
//! that reads it.

use std::borrow::Cow;
use std::sync::Arc;

use http::Request;

use crate::layer::KeyExtractor;
use crate::layer::extract::KeyError;

/// What the front service tells the ones behind it, in the request's
/// extensions: the key the lock is on, and what the record needs.
#[derive(Clone)]
pub(crate) struct Claim {
    /// The lock's (and the record's) name, built by the front service: the
    /// lock layer takes it as it is.
    pub(crate) name: Arc<str>,
    pub(crate) fingerprint: u128,
    pub(crate) grpc: bool,
}

/// The lock's key extractor: the name the front service put in the
/// request (the lock layer takes its keys as names).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CarriedKey;

impl<B> KeyExtractor<B> for CarriedKey {
    fn extract<'r>(&self, request: &'r Request<B>) -> Result<Option<Cow<'r, str>>, KeyError> {
        Ok(request
            .extensions()
            .get::<Claim>()
            .map(|claim| Cow::Borrowed(&*claim.name)))
    }
}
