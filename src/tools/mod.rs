//! The offline tools that change the keystore or the Redis keyspace while no daemon
//! serves it: master-key rotation, import of the legacy layout, migration of per-user
//! keys between the keystore and Redis.

pub mod legacy;
pub mod migrate;
pub mod rotate;

use std::sync::Arc;

use rusqlite::Connection;

use crate::keys::MasterKey;
use crate::process::config::Config;
use crate::process::lock::{self, ToolAccess, ToolAccessError};
use crate::store::keystore::{self, KeystoreError, Opened, Refusal};

/// What a tool keeps while it works on the keystore: its access (the lock it took,
/// or the daemon found answering) and the rest of what opening the keystore gave.
/// Dropping it lets a daemon or another tool in.
pub struct Held {
    _opened: Opened,
    _access: ToolAccess,
}

/// Opens the keystore for the tool `what` (as its messages name it) with one
/// connection: creates the keystore's folder; then a daemon on this keystore must
/// answer on the config's socket, or none may run (and then the tool holds the lock
/// until [`Held`] is dropped), see [`lock::for_tool`]; then opens it, asking
/// `may_create_key` before a new master key is made. `create`: the keystore may be
/// created. `no_connection` is the tool's error for a keystore that gave none.
pub fn open_keystore<E: From<ToolAccessError> + From<KeystoreError>>(
    config: &Config,
    what: &str,
    create: bool,
    may_create_key: &dyn Fn() -> Result<(), Refusal>,
    no_connection: E,
) -> Result<(Held, Connection, Arc<MasterKey>), E> {
    keystore::create_folder(&config.keystore.path)?;
    let access = lock::for_tool(
        &config.keystore.path,
        &keystore::master_key_path(config),
        what,
        &config.server.socket,
        create,
    )?;
    let mut opened = keystore::open_with(config, 1, may_create_key)?;
    let db = std::mem::take(&mut opened.connections)
        .into_iter()
        .next()
        .ok_or(no_connection)?;
    let master = Arc::clone(&opened.key);
    let held = Held {
        _opened: opened,
        _access: access,
    };
    Ok((held, db, master))
}
