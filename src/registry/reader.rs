//! Where the registry's read operations read from.
//!
//! The user-facing reads ([`super::ops::unit_rows`], [`super::ops::machines`]
//! and the rest) take a [`Reader`]: the store's [`Client`] (a linearizable
//! range per prefix), or a double in tests. The HTTP API reads the
//! [`super::index::Index`] its copy of the registry keeps instead
//! ([`super::mirror`]), the same computation without reading any key.

use std::future::Future;

use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::KeyValue;
use crate::consensus::node::LeaseRenewal;

/// A source of registry keys.
pub trait Reader: Sync {
    /// Every key starting with `prefix`, in key order.
    fn read_prefix(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<KeyValue>, ClientError>> + Send;

    /// One key, if it exists.
    fn read_key(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<KeyValue>, ClientError>> + Send;

    /// When the member asked last applied each lease's keep-alive
    /// ([`Client::lease_renewals`]): in no key, so always the store's answer.
    fn lease_renewals(&self)
    -> impl Future<Output = Result<Vec<LeaseRenewal>, ClientError>> + Send;
}

impl Reader for Client {
    async fn read_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, ClientError> {
        Ok(self.range(prefix, true, false).await?.0)
    }

    async fn read_key(&self, key: &str) -> Result<Option<KeyValue>, ClientError> {
        self.get(key).await
    }

    async fn lease_renewals(&self) -> Result<Vec<LeaseRenewal>, ClientError> {
        Client::lease_renewals(self).await
    }
}
