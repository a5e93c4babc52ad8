//! A user's key as a store loads it, and as `list_user_api_keys` shows it.

use crate::keys::Secret;

/// A user's key as loaded.
pub struct LoadedUserKey {
    /// `None` when absent, undecryptable or rejected.
    pub key: Option<Secret>,
    /// The key was reported unauthorized (`report_key_result`) and is not used until
    /// the user stores a new one.
    pub rejected: bool,
}

/// One row of `list_user_api_keys`.
#[derive(serde::Serialize)]
pub struct UserKeyInfo {
    pub service: String,
    pub masked: String,
    pub updated_at: String,
}
