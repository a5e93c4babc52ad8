//! `apikeyd rotate-master-key`: adds a key version, makes the running daemon load it,
//! re-seals every stored key under it (SQLite, and Redis in Redis mode), then retires
//! the old versions. Every step is safe to interrupt; rerunning carries on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use redis::Commands;
use rusqlite::Connection;

use crate::fleet::{FleetError, Member, NotReady};
use crate::keys::{sealed_version, MasterKey, MasterKeyError, Place};
use crate::process::config::Config;
use crate::process::lock::{self, ToolAccess, ToolAccessError};
use crate::store::envelope::{envelope, open_user_value, user_envelope, StoredValue, ENVELOPE};
use crate::store::keyspace::Names;
use crate::store::keystore;

/// Why a rotation stopped. Every step is safe to rerun; the message says what to do
/// first. Holds paths, version numbers, daemons and causes; never key material.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Access(#[from] ToolAccessError),
    #[error(transparent)]
    MasterKey(#[from] MasterKeyError),
    #[error("keystore: {0}")]
    Keystore(#[from] rusqlite::Error),
    #[error("{} does not open the keystore {}", key_file.display(), keystore.display())]
    WrongKey {
        key_file: PathBuf,
        keystore: PathBuf,
    },
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    RedisSettings(#[from] crate::store::redis::ConnectError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cannot write {}: {source}", path.display())]
    WriteKeyring {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot keep the retired versions beside {}: {source}", key_file.display())]
    WriteBackup {
        key_file: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot ask the daemon at {} to reload: {source}", socket.display())]
    AskReload {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// The daemon answered the reload with an error; `error` is its `error` member.
    #[error("the daemon refused to reload: {error}")]
    ReloadRefused { error: serde_json::Value },
    #[error(
        "the daemon reloaded but uses key versions {versions:?}, not {current}: is it reading the key \
         from $CREDENTIALS_DIRECTORY? Install the new key file as its credential, restart it, and rerun"
    )]
    NotReloaded { versions: Vec<u32>, current: u32 },
    /// `step` ("re-sealing", "retiring") was not taken; nothing was `step_done`.
    #[error(
        "not {step}: the fleet's heartbeats cannot be read ({source}); nothing was {step_done}"
    )]
    FleetUnreadable {
        step: &'static str,
        step_done: &'static str,
        source: FleetError,
    },
    /// `step` was not taken: these daemons do not seal with `version` yet.
    #[error(
        "not {step}: {} daemon(s) on this Redis do not seal with key version {version} yet:\n{}\n\
         copy {} to each of their hosts (same owner and mode 0600), run `apikeyd rotate-master-key --add-only` \
         there (it reloads that daemon with the copied file), then rerun this command",
        behind.len(),
        described(behind),
        key_file.display()
    )]
    FleetBehind {
        step: &'static str,
        version: u32,
        behind: Vec<Member>,
        key_file: PathBuf,
    },
    #[error(
        "values under old key versions keep appearing: is a daemon still running with the old keyring? \
         Reload every daemon, then rerun"
    )]
    OldVersionsKeepAppearing,
}

/// One indented line per daemon.
fn described(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| format!("  {}", m.describe()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How long rotation waits for every daemon of the fleet to seal with the new
/// version (their heartbeats renew every second).
const FLEET_WAIT: Duration = Duration::from_secs(10);

/// Rows re-sealed per SQLite transaction.
const BATCH: usize = 256;

/// Options of one run.
pub struct Rotation<'a> {
    pub config: &'a Config,
    /// The key file to rotate (default `keystore.master_key_file`).
    pub key_file: &'a Path,
    /// Stop after adding the new version (to distribute the file to other hosts).
    pub add_only: bool,
}

/// Asks the daemon on `config`'s socket to reload; answers the key versions it now
/// uses. Only called once `lock::for_tool` has proven that daemon answers there.
fn reload_daemon(config: &Config) -> Result<Vec<u32>, RotateError> {
    let socket = &config.server.socket;
    let answer = crate::wire::client::request(socket, r#"{"op":"reload"}"#).map_err(|source| {
        RotateError::AskReload {
            socket: socket.clone(),
            source,
        }
    })?;
    if answer["ok"] != true {
        return Err(RotateError::ReloadRefused {
            error: answer["error"].clone(),
        });
    }
    Ok(answer["result"]["key_versions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect()
        })
        .unwrap_or_default())
}

/// Makes the daemon on this keystore (if one runs) load the keyring on disk, and
/// checks that it now holds `current`.
fn hand_over(config: &Config, access: &ToolAccess, current: u32) -> Result<(), RotateError> {
    if let ToolAccess::Alone(_) = access {
        println!("no daemon runs on this keystore (its lock is free, and held by this rotation until it ends)");
        return Ok(());
    }
    match reload_daemon(config)? {
        v if v.last() == Some(&current) => println!("the daemon now uses key versions {v:?}"),
        versions => return Err(RotateError::NotReloaded { versions, current }),
    }
    Ok(())
}

/// In Redis mode: waits until every live daemon of the fleet seals with `current`;
/// otherwise stops, naming the daemons that are behind and what to do.
fn fleet_ready(
    config: &Config,
    key: &MasterKey,
    key_file: &Path,
    step: &'static str,
    step_done: &'static str,
) -> Result<(), RotateError> {
    if config.redis.url.is_empty() {
        return Ok(());
    }
    let current = key.current_version();
    match crate::fleet::wait_until_sealing(config, key, current, FLEET_WAIT) {
        Ok(()) => {
            println!("every live daemon on this Redis seals with key version {current}");
            Ok(())
        }
        Err(NotReady::Unreadable(source)) => Err(RotateError::FleetUnreadable {
            step,
            step_done,
            source,
        }),
        Err(NotReady::Behind(behind)) => Err(RotateError::FleetBehind {
            step,
            version: current,
            behind,
            key_file: key_file.to_path_buf(),
        }),
    }
}

/// One keystore table whose `sealed` column is re-sealed, keyed by its primary key.
struct Table {
    name: &'static str,
    key: &'static [&'static str],
}

const TABLES: [Table; 3] = [
    Table {
        name: "user_keys",
        key: &["user_id", "service"],
    },
    Table {
        name: "pool_keys",
        key: &["channel_id", "service", "key_id"],
    },
    Table {
        name: "meta",
        key: &["name"],
    },
];

fn place_of<'a>(table: &str, pk: &'a [String]) -> Place<'a> {
    match table {
        "user_keys" => Place::User {
            user_id: &pk[0],
            service: &pk[1],
        },
        "pool_keys" => Place::Pool {
            namespace: "sqlite",
            channel: Some(pk[0].as_str()).filter(|c| !c.is_empty()),
            service: &pk[1],
            key_id: &pk[2],
        },
        _ => Place::Meta(&pk[0]),
    }
}

/// Re-seals every row of the keystore not sealed with the current version, in
/// batches, each row only if it still holds what was read (a concurrent write wins).
/// Answers (re-sealed, left because they open with no version).
fn reseal_sqlite(db: &mut Connection, key: &MasterKey) -> Result<(usize, usize), RotateError> {
    let current = key.current_version().to_be_bytes().to_vec();
    let (mut done, mut broken) = (0, 0);
    for t in &TABLES {
        let cols = t.key.join(", ");
        let holes = (1..=t.key.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let (sealed_col, extra) = if t.name == "meta" {
            ("value", " AND name = 'keycheck'")
        } else {
            ("sealed", "")
        };
        let select = format!(
            "SELECT {cols}, {sealed_col} FROM {} WHERE substr({sealed_col}, 2, 4) != ?{n}{extra} \
             AND ({cols}) > ({holes}) ORDER BY {cols} LIMIT {BATCH}",
            t.name,
            n = t.key.len() + 1
        );
        let where_pk = t
            .key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c} = ?{}", i + 3))
            .collect::<Vec<_>>()
            .join(" AND ");
        let update = format!(
            "UPDATE {} SET {sealed_col} = ?1 WHERE {sealed_col} = ?2 AND {where_pk}",
            t.name
        );
        let mut after: Vec<String> = vec![String::new(); t.key.len()];
        loop {
            let rows: Vec<(Vec<String>, Vec<u8>)> = {
                let mut stmt = db.prepare(&select)?;
                let mut args: Vec<&dyn rusqlite::ToSql> =
                    after.iter().map(|s| s as &dyn rusqlite::ToSql).collect();
                args.push(&current);
                let rows = stmt.query_map(args.as_slice(), |r| {
                    let pk = (0..t.key.len())
                        .map(|i| r.get::<_, String>(i))
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok((pk, r.get::<_, Vec<u8>>(t.key.len())?))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let Some(last) = rows.last() else { break };
            after = last.0.clone();
            let tx = db.transaction()?;
            for (pk, sealed) in &rows {
                let place = place_of(t.name, pk);
                let Ok(plain) = key.open(sealed, place) else {
                    eprintln!(
                        "integrity: a row of {} does not open with any key version; left as it is",
                        t.name
                    );
                    broken += 1;
                    continue;
                };
                let resealed = key.seal(plain.expose().as_bytes(), place);
                let mut args: Vec<&dyn rusqlite::ToSql> = vec![&resealed, sealed];
                args.extend(pk.iter().map(|s| s as &dyn rusqlite::ToSql));
                done += tx.execute(&update, args.as_slice())?;
            }
            tx.commit()?;
        }
    }
    Ok((done, broken))
}

/// Compare-and-set of one hash field: the re-sealed value replaces the old one only
/// if the field still holds it (a concurrent write wins).
const SWAP: &str = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then \
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) return 1 end return 0";

/// Re-seals the envelopes of one hash that are not under the current version:
/// `reseal` opens a value for its field and seals it again (`None`: it opens with no
/// version). Answers (re-sealed, left as they are).
fn reseal_hash(
    con: &mut redis::Connection,
    swap: &redis::Script,
    hash: &str,
    key: &MasterKey,
    reseal: impl Fn(&str, &[u8]) -> Option<String>,
) -> redis::RedisResult<(usize, usize)> {
    let (mut done, mut broken) = (0, 0);
    // Bytes, not text: a stray binary field must not stop the rotation.
    let fields: Vec<(Vec<u8>, Vec<u8>)> = con.hgetall(hash)?;
    for (field, value) in fields {
        let Some(b64) = value.strip_prefix(ENVELOPE.as_bytes()) else {
            continue;
        };
        let version = B64.decode(b64).ok().as_deref().and_then(sealed_version);
        if version == Some(key.current_version()) {
            continue;
        }
        let name = String::from_utf8_lossy(&field);
        let Some(resealed) = reseal(&name, &value) else {
            eprintln!(
                "integrity: {} field {} does not open with any key version; left as it is",
                hash.escape_debug(),
                name.escape_debug()
            );
            broken += 1;
            continue;
        };
        let swapped: i64 = swap
            .key(hash)
            .arg(&field)
            .arg(&value)
            .arg(resealed)
            .invoke(con)?;
        done += swapped as usize;
    }
    Ok((done, broken))
}

/// Re-seals every pool value and sealed user key in Redis not sealed with the current
/// version; each field only if it still holds what was read. Answers (re-sealed, left
/// as they are).
fn reseal_redis(config: &Config, key: &MasterKey) -> Result<(usize, usize), RotateError> {
    let client = crate::store::redis::client(&config.redis)?;
    let mut con = client.get_connection_with_timeout(Duration::from_secs(5))?;
    let prefix = config.redis.prefix.as_str();
    let names = Names {
        prefix: prefix.to_string(),
    };
    let swap = redis::Script::new(SWAP);
    let (mut done, mut broken) = (0, 0);
    let mut add = |(d, b): (usize, usize)| {
        done += d;
        broken += b;
    };
    for (hash, pool) in crate::store::keyspace::pool_hashes(&mut con, &names)? {
        add(reseal_hash(&mut con, &swap, &hash, key, |field, value| {
            match crate::store::envelope::open_value(key, prefix, &pool, field, value) {
                StoredValue::Sealed(plain) => Some(envelope(key, prefix, &pool, &plain)),
                _ => None,
            }
        })?);
    }
    // Per-user keys sealed in Redis (`keystore.user_keys = "redis"`), same rules.
    for (hash, user_id) in crate::store::keyspace::user_hashes(&mut con, &names)? {
        add(reseal_hash(
            &mut con,
            &swap,
            &hash,
            key,
            |service, value| match open_user_value(key, prefix, &user_id, service, value) {
                StoredValue::Sealed(plain) => {
                    Some(user_envelope(key, prefix, &user_id, service, &plain))
                }
                _ => None,
            },
        )?);
    }
    Ok((done, broken))
}

/// Re-seals the keystore and Redis until a pass finds nothing left under an old
/// version (a daemon that had not reloaded could still have written one). Answers
/// how many values open with no version and stay as they are.
fn reseal_everything(
    config: &Config,
    db: &mut Connection,
    key: &MasterKey,
) -> Result<usize, RotateError> {
    reseal_passes(config, db, key, 5)
}

/// Re-seals like [`reseal_everything`], at most `passes` times; one pass answers
/// after it without checking that nothing is left.
fn reseal_passes(
    config: &Config,
    db: &mut Connection,
    key: &MasterKey,
    passes: usize,
) -> Result<usize, RotateError> {
    for pass in 1..=passes {
        let (rows, broken_rows) = reseal_sqlite(db, key)?;
        let (values, broken_values) = if config.redis.url.is_empty() {
            (0, 0)
        } else {
            reseal_redis(config, key)?
        };
        println!(
            "pass {pass}: re-sealed {rows} keystore rows and {values} redis pool and user values under version {}",
            key.current_version()
        );
        if (pass > 1 && rows + values == 0) || passes == 1 {
            return Ok(broken_rows + broken_values);
        }
    }
    Err(RotateError::OldVersionsKeepAppearing)
}

/// Writes `key`'s keyring over `key_file` (both times the rotation changes it: once
/// to add the new version, once to keep only it), naming the file if that fails.
fn write_keyring(key: &MasterKey, key_file: &Path) -> Result<(), RotateError> {
    key.write_keyring(key_file)
        .map_err(|source| RotateError::WriteKeyring {
            path: key_file.to_path_buf(),
            source,
        })
}

/// Runs (or resumes) a rotation.
pub fn rotate(r: Rotation<'_>) -> Result<(), RotateError> {
    let config = r.config;
    // Before anything changes: a daemon on this keystore must answer on this config's
    // socket, or none may run (then this rotation holds the lock until it ends).
    let access = lock::for_tool(
        &config.keystore.path,
        r.key_file,
        "rotate-master-key",
        &config.server.socket,
        false,
    )?;
    let mut key = MasterKey::read_file(r.key_file)?;
    let mut db = keystore::connect(&config.keystore.path)?;
    if !keystore::opens_keycheck(&db, &key)? {
        return Err(RotateError::WrongKey {
            key_file: r.key_file.to_path_buf(),
            keystore: config.keystore.path.clone(),
        });
    }
    let fleet = !config.redis.url.is_empty();
    if fleet {
        // The key to rotate must be the fleet's, and a new version is announced to
        // the fleet before any daemon can seal with it.
        crate::fleet::verify_config(config, &key)?;
    }
    if key.versions().len() == 1 {
        key = key.with_new_version();
        if fleet {
            crate::fleet::verify_config(config, &key)?;
        }
        write_keyring(&key, r.key_file)?;
        println!(
            "added key version {} to {}",
            key.current_version(),
            r.key_file.display()
        );
    } else {
        println!(
            "resuming the rotation to key version {} (versions {:?} in the file)",
            key.current_version(),
            key.versions()
        );
    }
    hand_over(config, &access, key.current_version())?;
    if r.add_only {
        println!(
            "stopped after adding the version (--add-only): copy {} to every daemon that shares this Redis, \
             reload them, then run rotate-master-key again to re-seal and retire the old versions",
            r.key_file.display()
        );
        return Ok(());
    }
    fleet_ready(config, &key, r.key_file, "re-sealing", "re-sealed")?;
    let retired: Vec<u32> = key
        .versions()
        .into_iter()
        .filter(|v| *v != key.current_version())
        .collect();
    let broken = if fleet {
        // One pass while every write still lands; then the versions are retired in
        // Redis, from which moment every daemon's write of a value sealed with one of
        // them is refused (atomically, in the script that writes it). The passes
        // that follow catch every old value that landed before, including those of
        // a daemon whose heartbeat a Redis writer hid, so none is left unreadable.
        reseal_passes(config, &mut db, &key, 1)?;
        fleet_ready(config, &key, r.key_file, "retiring", "retired")?;
        crate::fleet::mark_retired(config, &retired)?;
        println!(
            "marked key versions {retired:?} retired for the fleet; writes sealed with them are refused from now on"
        );
        reseal_everything(config, &mut db, &key)?
    } else {
        reseal_everything(config, &mut db, &key)?
    };
    let backup =
        key.write_backup(r.key_file, &retired)
            .map_err(|source| RotateError::WriteBackup {
                key_file: r.key_file.to_path_buf(),
                source,
            })?;
    println!(
        "kept the whole keyring, retired versions included, in {} (mode 0600): keep it with the keystore backups made before now",
        backup.display()
    );
    let key = key.current_only();
    write_keyring(&key, r.key_file)?;
    println!(
        "retired key versions {retired:?}; {} now holds only version {}",
        r.key_file.display(),
        key.current_version()
    );
    if broken > 0 {
        println!(
            "{broken} stored values opened with no key version (see above); they stay unreadable"
        );
    }
    hand_over(config, &access, key.current_version())?;
    Ok(())
}

#[cfg(test)]
mod tests;
