//! `apikeyd import-legacy`: seals the original module's per-user keys left in clear in
//! Redis — in place with `keystore.user_keys = "redis"`, or moved into the encrypted
//! keystore with `"local"` — and encrypts pool values it left in clear. Idempotent and
//! safe to interrupt: a clear value goes only in the transaction that writes its
//! sealed copy, or after its keystore row is committed.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use redis::Commands;
use rusqlite::OptionalExtension;

use crate::keys::Secret;
use crate::model::clock;
use crate::process::config::Config;
use crate::store::envelope::{envelope, open_value, StoredValue};
use crate::store::keyspace;
use crate::store::keyspace::{Changed, Names};
use crate::store::keystore::{self, store_user_key};
use crate::wire::protocol::{check_ident, check_key, check_service};

/// Why an import stopped; rerunning carries on. Never holds key material.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("import-legacy needs redis.url in the config")]
    NoRedis,
    #[error(transparent)]
    Access(#[from] crate::process::lock::ToolAccessError),
    #[error(transparent)]
    Open(#[from] keystore::KeystoreError),
    #[error("no keystore connection")]
    NoConnection,
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    #[error(transparent)]
    RedisSettings(#[from] crate::store::redis::ConnectError),
    #[error("cannot connect to redis: {0}")]
    Connect(#[source] redis::RedisError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("keystore: {0}")]
    Keystore(#[from] rusqlite::Error),
    /// Storing a user key failed (the keystore's own error, as the wire would say it).
    #[error("keystore: {0}")]
    Store(#[from] crate::error::Error),
    #[error("cannot read the --accept-clear file {}: {source}", path.display())]
    AcceptFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The entries an operator reviewed and accepts to import although they were
/// written in clear after the cut-over: lines as `--dry-run` prints them after
/// `accept-clear: ` (`user {user_id} {service} {fingerprint}` or
/// `pool {hash} {field} {fingerprint}`); blank lines and `#` comments are ignored.
pub fn read_accepted(path: &Path) -> Result<HashSet<String>, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::AcceptFile {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .map(|l| l.strip_prefix("accept-clear:").unwrap_or(l).trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// Seals one value in clear in place (after [`crate::store::envelope::RETIRED_GUARD`]),
/// only while its field still holds the value in clear that was read and judged:
/// KEYS[2] the hash, KEYS[3] its info hash; ARGV[2] the field to write ('' to write
/// nothing: a sealed copy is already there), ARGV[3] the sealed value, ARGV[4] the
/// info, ARGV[5] 'nx' to keep existing info, ARGV[6] the field in clear (removed
/// when it is not ARGV[2]), ARGV[7] channel, ARGV[8] message, ARGV[9] the value in
/// clear as read. Answers 1 when done, 0 when the field changed meanwhile.
const SEAL_SCRIPT: &str = r"
if redis.call('HGET', KEYS[2], ARGV[6]) ~= ARGV[9] then return 0 end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  if ARGV[5] == 'nx' then redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[4])
  else redis.call('HSET', KEYS[3], ARGV[2], ARGV[4]) end
end
if ARGV[6] ~= ARGV[2] then redis.call('HDEL', KEYS[2], ARGV[6]) end
redis.call('PUBLISH', ARGV[7], ARGV[8])
return 1
";

/// One in-place seal of a value in clear (see [`SEAL_SCRIPT`]).
struct Seal<'a> {
    hash: &'a str,
    info_hash: String,
    /// The field to write and its sealed value; `None` when a sealed copy is there.
    write: Option<(&'a str, String)>,
    info: String,
    keep_info: bool,
    clear_field: &'a [u8],
    clear_value: &'a [u8],
    announce: String,
}

impl Seal<'_> {
    /// Runs it; answers whether the field still held what was read.
    fn run(
        self,
        con: &mut redis::Connection,
        script: &redis::Script,
        names: &Names,
    ) -> redis::RedisResult<bool> {
        let (field, value) = self.write.unwrap_or(("", String::new()));
        let mut call = script.prepare_invoke();
        call.key(names.keycheck())
            .key(self.hash)
            .key(&self.info_hash)
            .arg(crate::store::envelope::envelope_version(value.as_bytes()))
            .arg(field)
            .arg(&value)
            .arg(&self.info)
            .arg(if self.keep_info { "nx" } else { "" })
            .arg(self.clear_field)
            .arg(names.invalidate())
            .arg(&self.announce)
            .arg(self.clear_value);
        let done: i64 = call.invoke(con)?;
        Ok(done == 1)
    }
}

/// A value in clear changed between its read and its seal: left for a rerun.
fn changed_meanwhile(hash: &str, field: &str, report: &mut Report) {
    println!(
        "skipped {} field {}: it changed meanwhile; rerun to judge it again",
        hash.escape_debug(),
        field.escape_debug()
    );
    report.skipped += 1;
}

/// What the import does about one value in clear, once the cut-over is recorded.
enum AfterCutOver {
    /// No cut-over yet: a legacy value, imported.
    Before,
    /// Named in the `--accept-clear` file: imported.
    Accepted,
    /// Not named: refused (left as it is; the daemons do not serve it).
    Refused,
}

/// What an import did (or, with `--dry-run`, would do).
#[derive(Default, Debug)]
pub struct Report {
    /// Into the keystore (`keystore.user_keys = "local"`), or sealed in place in Redis.
    pub user_keys_moved: usize,
    pub user_keys_already_stored: usize,
    pub pool_values_encrypted: usize,
    pub skipped: usize,
    /// Values in clear written after the cut-over and not accepted.
    pub refused: usize,
}

impl Report {
    /// Whether every value in clear was imported (the tool exits non-zero otherwise).
    pub fn complete(&self) -> bool {
        self.skipped == 0 && self.refused == 0
    }
}

/// Judges one value in clear: `line` is its entry as an `--accept-clear` file names
/// it. After the cut-over a clear value was written by someone who can write Redis
/// (the import sealed every one there was), so only a reviewed one is imported.
fn judge(
    cut_over: bool,
    accepted: &HashSet<String>,
    line: &str,
    dry_run: bool,
    report: &mut Report,
) -> AfterCutOver {
    if !cut_over {
        return AfterCutOver::Before;
    }
    if accepted.contains(line) {
        println!("accepted (reviewed in --accept-clear): {line}");
        return AfterCutOver::Accepted;
    }
    report.refused += 1;
    println!(
        "{} a value in clear written after the cut-over (possible injection by someone who can write redis); \
         review it, and to import it name it in an --accept-clear file:\naccept-clear: {line}",
        if dry_run { "would refuse" } else { "refused" }
    );
    AfterCutOver::Refused
}

/// Runs the import, printing one line per action (never a key; each value in clear
/// found after the cut-over by its fingerprint, its key_id). The first run that
/// changes something records the cut-over; from then on a value in clear is only
/// imported when `accepted` (read by [`read_accepted`]) names it.
pub fn import(
    config: &Config,
    dry_run: bool,
    accepted: &HashSet<String>,
) -> Result<Report, ImportError> {
    if config.redis.url.is_empty() {
        return Err(ImportError::NoRedis);
    }
    // The import may create the keystore, but no new master key while Redis holds the fleet's.
    let (_held, db, master) = super::open_keystore(
        config,
        "import-legacy",
        true,
        &|| crate::fleet::may_create_key(config).map_err(Into::into),
        ImportError::NoConnection,
    )?;
    // Seal what goes into Redis with a version every live daemon can open.
    crate::fleet::cap_to_fleet(config, &master)?;
    let client = crate::store::redis::client(&config.redis)?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .map_err(ImportError::Connect)?;
    let _ = con.set_read_timeout(Some(Duration::from_secs(30)));
    let names = Names {
        prefix: config.redis.prefix.clone(),
    };
    let in_redis = config.user_keys_in_redis();
    let verb = match (dry_run, in_redis) {
        (true, false) => "would move",
        (false, false) => "moved",
        (true, true) => "would seal in place",
        (false, true) => "sealed in place",
    };
    let target = if in_redis { "redis" } else { "the keystore" };
    let mut report = Report::default();
    let cut_over: Option<i64> = con.get(names.legacy_cutover())?;
    if let Some(at) = cut_over {
        println!(
            "the cut-over was recorded at {}: values in clear found now were written after it",
            clock::rfc3339(at)
        );
    }
    let cut_over = cut_over.is_some();
    let seal = redis::Script::new(&format!(
        "{}{SEAL_SCRIPT}",
        crate::store::envelope::RETIRED_GUARD
    ));

    for hash in keyspace::all_hashes(&mut con, &format!("{}:user_api_keys:*", names.prefix))? {
        let user_id = &hash[names.user_keys("").len()..];
        // Bytes, not text: a binary field or value is skipped, never a stop.
        let fields: Vec<(Vec<u8>, Vec<u8>)> = con.hgetall(&hash)?;
        for (raw_field, value) in fields {
            // Sealed by a daemon with user_keys = "redis": not legacy (migrate-user-keys
            // moves those).
            if value.starts_with(crate::store::envelope::ENVELOPE.as_bytes()) {
                continue;
            }
            let field = String::from_utf8_lossy(&raw_field).into_owned();
            let service = field.to_ascii_lowercase();
            let rule = if check_ident("user_id", user_id, 128).is_err() {
                Some("the user id (1-128 bytes, no whitespace or control characters)")
            } else if check_service(&service).is_err() || raw_field != field.as_bytes() {
                Some("the service name (1-64 characters of A-Z a-z 0-9 _ . -)")
            } else {
                None
            };
            let value_read = value.clone();
            let key = String::from_utf8(value)
                .ok()
                .map(Secret::new)
                .and_then(|k| check_key(k).ok());
            let (None, Some(key)) = (rule, key) else {
                let rule =
                    rule.unwrap_or("the key (1-4096 bytes of UTF-8 without control characters)");
                println!(
                    "skipped {} field {}: {rule} does not meet the parameter rules",
                    hash.escape_debug(),
                    field.escape_debug()
                );
                report.skipped += 1;
                continue;
            };
            let line = format!(
                "user {} {} {}",
                user_id.escape_debug(),
                field.escape_debug(),
                master.key_id(&key)
            );
            if let AfterCutOver::Refused = judge(cut_over, accepted, &line, dry_run, &mut report) {
                continue;
            }
            let present = if in_redis {
                // A sealed key under the lower-cased field (when the module's field
                // differs in case) is newer than the clear one.
                let sealed: Option<Vec<u8>> = if raw_field == service.as_bytes() {
                    None
                } else {
                    con.hget(&hash, &service)?
                };
                sealed
                    .filter(|v| v.starts_with(crate::store::envelope::ENVELOPE.as_bytes()))
                    .map(|_| 1)
            } else {
                db.query_row(
                    "SELECT 1 FROM user_keys WHERE user_id = ?1 AND service = ?2",
                    [user_id, service.as_str()],
                    |r| r.get(0),
                )
                .optional()?
            };
            if present.is_some() {
                println!("user {user_id} service {service}: {target} already has a sealed key; it is kept and the legacy field dropped");
                report.user_keys_already_stored += 1;
            } else {
                println!("{verb} user {user_id} service {service} into {target}");
                report.user_keys_moved += 1;
            }
            if dry_run {
                continue;
            }
            let changed = Changed::UserKey {
                user_id: user_id.to_string(),
                service: service.clone(),
            };
            let announce = serde_json::to_string(&changed).unwrap_or_default();
            if in_redis {
                // One script: the sealed value replaces the clear one (or lands
                // beside it under the lower-cased field, which then goes) atomically,
                // only while the clear value is still the one read.
                let sealed = present.is_none().then(|| {
                    let v = crate::store::envelope::user_envelope(
                        &master,
                        &names.prefix,
                        user_id,
                        &service,
                        &key,
                    );
                    (service.as_str(), v)
                });
                let done = Seal {
                    hash: &hash,
                    info_hash: names.user_info(user_id),
                    write: sealed,
                    info: clock::now_s().to_string(),
                    keep_info: false,
                    clear_field: &raw_field,
                    clear_value: &value_read,
                    announce,
                }
                .run(&mut con, &seal, &names)?;
                if !done {
                    changed_meanwhile(&hash, &field, &mut report);
                }
                continue;
            }
            if present.is_none() {
                store_user_key(&db, &master, user_id, &service, &key)?;
            }
            // Only now, with the row committed, may the clear copy go.
            redis::pipe()
                .hdel(&hash, &raw_field)
                .publish(names.invalidate(), announce)
                .query::<()>(&mut con)?;
        }
    }

    for (hash, pool) in keyspace::pool_hashes(&mut con, &names)? {
        let fields: Vec<(Vec<u8>, Vec<u8>)> = con.hgetall(&hash)?;
        for (raw_field, value) in fields {
            let field = String::from_utf8_lossy(&raw_field).into_owned();
            let StoredValue::Legacy(key) =
                open_value(&master, &names.prefix, &pool, &field, &value)
            else {
                continue;
            };
            let Ok(key) = check_key(key) else {
                println!(
                    "skipped {} field {}: the key (1-4096 bytes without control characters) does not meet the parameter rules",
                    hash.escape_debug(),
                    field.escape_debug()
                );
                report.skipped += 1;
                continue;
            };
            let line = format!(
                "pool {} {} {}",
                hash.escape_debug(),
                field.escape_debug(),
                master.key_id(&key)
            );
            if let AfterCutOver::Refused = judge(cut_over, accepted, &line, dry_run, &mut report) {
                continue;
            }
            report.pool_values_encrypted += 1;
            if dry_run {
                println!(
                    "would encrypt {} field {}",
                    hash.escape_debug(),
                    field.escape_debug()
                );
                continue;
            }
            let key_id = master.key_id(&key);
            // The original module named its fields; that name becomes the label.
            let label = if raw_field == field.as_bytes()
                && field.len() <= 256
                && !field.chars().any(char::is_control)
            {
                field.clone()
            } else {
                "imported".to_string()
            };
            let info = serde_json::json!({"label": label, "added_at": clock::now_s()}).to_string();
            let done = Seal {
                hash: &hash,
                info_hash: names.pool_info(&pool),
                write: Some((
                    key_id.as_str(),
                    envelope(&master, &names.prefix, &pool, &key),
                )),
                info,
                keep_info: true,
                clear_field: &raw_field,
                clear_value: &value,
                announce: serde_json::to_string(&Changed::Pool(pool.clone())).unwrap_or_default(),
            }
            .run(&mut con, &seal, &names)?;
            if !done {
                changed_meanwhile(&hash, &field, &mut report);
                continue;
            }
            println!(
                "encrypted {} field {} as key_id {key_id}",
                hash.escape_debug(),
                field.escape_debug()
            );
        }
    }
    if !dry_run && !cut_over {
        let _: bool = con.set_nx(names.legacy_cutover(), clock::now_s())?;
        println!(
            "recorded the cut-over: from now on a value in clear in redis is treated as tampering \
             (not served; import-legacy imports it only when --accept-clear names it)"
        );
    }
    Ok(report)
}
