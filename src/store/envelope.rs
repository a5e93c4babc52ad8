//! The envelope format of values apikeyd seals into Redis: `akd1:` + base64 of a
//! sealed value, bound to its place (prefix, pool and key_id, or user and service).
//! Shared by the Redis store and the tools (rotation, import, migration, fleet check).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use crate::keys::{MasterKey, Place, Secret};
use crate::model::pool::PoolRef;

/// Marks a pool value as an apikeyd envelope: `akd1:` + base64 of the sealed bytes.
/// Anything else in a pool hash is a legacy value in clear.
pub const ENVELOPE: &str = "akd1:";

/// The error code a guarded write script answers when the value it would write is
/// sealed with a retired key version (see [`RETIRED_GUARD`]).
pub const RETIRED_CODE: &str = "APIKEYD_RETIRED";

/// Lua prelude of every script that writes a sealed value into Redis: refuses the
/// write, atomically with it, when the value's key version is listed in the fleet's
/// `retired` field. Convention: `KEYS[1]` is `{prefix}:apikeyd:keycheck` and
/// `ARGV[1]` the value's key version; the script's own keys and arguments follow.
/// Rotation marks versions retired before its last re-seal pass, so no value sealed
/// with a retired version can land after that pass, whatever the heartbeats said.
pub const RETIRED_GUARD: &str = r"
local retired = redis.call('HGET', KEYS[1], 'retired')
if retired and string.find(',' .. string.gsub(retired, ' ', '') .. ',', ',' .. ARGV[1] .. ',', 1, true) then
  return redis.error_reply('APIKEYD_RETIRED key version ' .. ARGV[1] .. ' is retired')
end
";

/// The key version of an `akd1:` value (0 when it is not one).
pub fn envelope_version(value: &[u8]) -> u32 {
    value
        .strip_prefix(ENVELOPE.as_bytes())
        .and_then(|b64| B64.decode(b64).ok())
        .as_deref()
        .and_then(crate::keys::sealed_version)
        .unwrap_or(0)
}

/// The place a pool value is sealed for in Redis: bound to prefix, scope, channel,
/// service and the field (key_id) it is stored under.
pub fn pool_place<'a>(prefix: &'a str, pool: &'a PoolRef, key_id: &'a str) -> Place<'a> {
    Place::Pool {
        namespace: prefix,
        channel: pool.channel.as_deref(),
        service: &pool.service,
        key_id,
    }
}

/// Seals a pool key into the text stored in its hash, under the field of its key_id.
pub fn envelope(master: &MasterKey, prefix: &str, pool: &PoolRef, key: &Secret) -> String {
    let key_id = master.key_id(key);
    let sealed = master.seal(key.expose().as_bytes(), pool_place(prefix, pool, &key_id));
    format!("{ENVELOPE}{}", B64.encode(sealed))
}

/// The place a user key is sealed for in Redis: bound to prefix, user and service.
pub fn user_place<'a>(prefix: &'a str, user_id: &'a str, service: &'a str) -> Place<'a> {
    Place::RedisUser {
        namespace: prefix,
        user_id,
        service,
    }
}

/// Seals a user key into the text stored in `{prefix}:user_api_keys:{user_id}`.
pub fn user_envelope(
    master: &MasterKey,
    prefix: &str,
    user_id: &str,
    service: &str,
    key: &Secret,
) -> String {
    let sealed = master.seal(
        key.expose().as_bytes(),
        user_place(prefix, user_id, service),
    );
    format!("{ENVELOPE}{}", B64.encode(sealed))
}

/// Reads one value of a user hash (same rules as pool values: an envelope, or a
/// legacy value in clear).
pub fn open_user_value(
    master: &MasterKey,
    prefix: &str,
    user_id: &str,
    service: &str,
    value: &[u8],
) -> StoredValue {
    open_at(master, user_place(prefix, user_id, service), value)
}

/// A value read from a pool or user hash, as it opened.
pub enum StoredValue {
    Sealed(Secret),
    /// Written in clear by the original module.
    Legacy(Secret),
    /// An envelope that does not open here (tampered, moved, or another master key).
    Broken,
}

/// Reads one pool hash value, stored under `field`.
pub fn open_value(
    master: &MasterKey,
    prefix: &str,
    pool: &PoolRef,
    field: &str,
    value: &[u8],
) -> StoredValue {
    open_at(master, pool_place(prefix, pool, field), value)
}

/// A stored value that should belong at `place`: an envelope opened there, or a
/// legacy value in clear (trimmed; empty counts as broken).
fn open_at(master: &MasterKey, place: Place, value: &[u8]) -> StoredValue {
    match value.strip_prefix(ENVELOPE.as_bytes()) {
        Some(b64) => B64
            .decode(b64)
            .ok()
            .and_then(|sealed| master.open(&sealed, place).ok())
            .map_or(StoredValue::Broken, StoredValue::Sealed),
        None => match std::str::from_utf8(value) {
            Ok(s) if !s.trim().is_empty() => StoredValue::Legacy(Secret::new(s.trim().to_owned())),
            _ => StoredValue::Broken,
        },
    }
}
