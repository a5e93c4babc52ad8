//! A user's key as a store loads it, as the cache and the resolver hold it, and as
//! `list_user_api_keys` shows it.

use std::sync::Arc;

use crate::keys::Secret;

/// A user's key as loaded.
pub struct LoadedUserKey {
    /// `None` when absent, undecryptable or rejected.
    pub key: Option<Secret>,
    /// The key was reported unauthorized (`report_key_result`) and is not used until
    /// the user stores a new one.
    pub rejected: bool,
}

/// A user's own key as the resolver sees it.
#[derive(Clone, Default)]
pub struct UserKey {
    /// `None`: the user has none, or it was reported unauthorized.
    pub key: Option<Arc<Secret>>,
    /// The user's key was reported unauthorized and is skipped until they store a new one.
    pub rejected: bool,
    /// Served from an entry past its TTL because the store holding user keys (Redis)
    /// could not be asked: the answer is marked degraded.
    pub stale: bool,
}

/// One row of `list_user_api_keys`.
#[derive(serde::Serialize)]
pub struct UserKeyInfo {
    pub service: String,
    pub masked: String,
    pub updated_at: String,
}
