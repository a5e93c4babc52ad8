//! `Secret`: a decrypted key, with no `Debug` or `Display`, zeroed on drop.

use zeroize::Zeroizing;

/// A decrypted key. It has no `Debug` or `Display`, and its bytes are zeroed on drop.
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Takes ownership of `s`; the string's buffer is zeroed when the secret is dropped.
    pub fn new(s: String) -> Self {
        Secret(Zeroizing::new(s))
    }

    /// The key in clear, for sealing or for the one response that returns it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The masked form (docs/protocol.md, "list_user_api_keys"): first 4 and last 4
    /// characters, or `****` below 12.
    pub fn masked(&self) -> String {
        let n = self.0.chars().count();
        if n < 12 {
            return "****".into();
        }
        let head: String = self.0.chars().take(4).collect();
        let tail: String = self.0.chars().skip(n - 4).collect();
        format!("{head}…{tail}")
    }
}
