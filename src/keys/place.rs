//! `Place`: where a sealed value lives, which becomes its associated data, so that a
//! ciphertext copied to another place does not open.

/// Where a ciphertext lives. It becomes the associated data, so a ciphertext copied
/// to another place does not open.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    /// A per-user key in the keystore.
    User { user_id: &'a str, service: &'a str },
    /// A pool key: `channel` is `None` for the global pool. `namespace` is `"sqlite"`
    /// for the embedded store, or the Redis prefix in Redis mode. `key_id` is the
    /// field or row the value is stored under, so a value written back under another
    /// key's id does not open.
    Pool {
        namespace: &'a str,
        channel: Option<&'a str>,
        service: &'a str,
        key_id: &'a str,
    },
    /// A per-user key in Redis (`{namespace}:user_api_keys:{user_id}`, field = service):
    /// bound to the prefix too, so a value copied to another fleet's prefix, user or
    /// service does not open, nor does a keystore row copied into Redis.
    RedisUser {
        namespace: &'a str,
        user_id: &'a str,
        service: &'a str,
    },
    /// A row of the keystore's own bookkeeping.
    Meta(&'a str),
}

impl Place<'_> {
    pub(super) fn associated_data(&self) -> Vec<u8> {
        match *self {
            Place::User { user_id, service } => aad(b"apikeyd/1", &["user", "", user_id, service]),
            // Pools bind the key_id too; the label is bumped so that no pool value of
            // either form opens as the other.
            Place::Pool {
                namespace,
                channel,
                service,
                key_id,
            } => {
                let kind = if channel.is_some() {
                    "channel_pool"
                } else {
                    "pool"
                };
                aad(
                    b"apikeyd/2",
                    &[kind, namespace, channel.unwrap_or(""), service, key_id],
                )
            }
            Place::RedisUser {
                namespace,
                user_id,
                service,
            } => aad(b"apikeyd/2", &["redis_user", namespace, user_id, service]),
            Place::Meta(name) => aad(b"apikeyd/1", &["meta", "", name, ""]),
        }
    }

    /// The associated data pool values were sealed with before they were bound to
    /// their key_id (label `apikeyd/1`, no key_id); `None` for other places.
    pub(super) fn unbound_pool_data(&self) -> Option<Vec<u8>> {
        match *self {
            Place::Pool {
                namespace,
                channel,
                service,
                ..
            } => {
                let kind = if channel.is_some() {
                    "channel_pool"
                } else {
                    "pool"
                };
                Some(aad(
                    b"apikeyd/1",
                    &[kind, namespace, channel.unwrap_or(""), service],
                ))
            }
            _ => None,
        }
    }
}

/// `label` then each part length-prefixed, so no two places share an encoding.
fn aad(label: &[u8], parts: &[&str]) -> Vec<u8> {
    let mut out = label.to_vec();
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p.as_bytes());
    }
    out
}
