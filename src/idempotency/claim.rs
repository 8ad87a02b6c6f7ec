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
    /// The key, scoped: the lock's name is the layer's namespace and this.
    pub(crate) key: Arc<str>,
    /// The lock's (and the record's) name.
    pub(crate) name: Arc<str>,
    pub(crate) fingerprint: u128,
    pub(crate) grpc: bool,
}

/// The lock's key extractor: the key the front service put in the request.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CarriedKey;

impl<B> KeyExtractor<B> for CarriedKey {
    fn extract<'r>(&self, request: &'r Request<B>) -> Result<Option<Cow<'r, str>>, KeyError> {
        Ok(request
            .extensions()
            .get::<Claim>()
            .map(|claim| Cow::Borrowed(&*claim.key)))
    }
}
