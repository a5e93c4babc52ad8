//! The `Keystore` actor: owns per-user keys in the SQLite keystore (blocking, so on a
//! `SyncArbiter`). The file: its schema and connections (`file`), opening it with the
//! master key and the clean-shutdown marker (`open`), the deferred integrity check
//! (`integrity`), the master key rules (`master_key`).

mod file;
mod integrity;
mod master_key;
mod open;

pub use file::*;
pub use integrity::*;
pub use master_key::*;
pub use open::*;

use std::sync::Arc;

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;
use crate::keys::{MasterKey, Place};
use crate::model::clock;
use crate::model::idempotency::{self, Written};
pub use crate::model::user_key::{LoadedUserKey, UserKeyInfo};
use crate::store::messages::*;

/// At a clean shutdown: checkpoints the WAL into the keystore and records its
/// fingerprint, so the next start can skip the full integrity check.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct MarkClean;

impl Handler<MarkClean> for Keystore {
    type Result = Result<()>;

    fn handle(&mut self, _: MarkClean, _: &mut Self::Context) -> Self::Result {
        let busy: i64 = self
            .db
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        let Some(path) = self
            .db
            .path()
            .filter(|_| busy == 0)
            .map(std::path::PathBuf::from)
        else {
            return Ok(());
        };
        if let Some(print) = fingerprint(&path) {
            if let Err(e) = std::fs::write(clean_marker(&path), print) {
                tracing::warn!(error = %e, "cannot write the clean-shutdown marker");
            }
        }
        Ok(())
    }
}

/// Owns one SQLite connection and the per-user keys in it.
pub struct Keystore {
    db: Connection,
    key: Arc<MasterKey>,
    /// When expired idempotency records were last dropped (unix seconds).
    pruned_at: i64,
}

impl Keystore {
    /// One keystore worker on `db`.
    pub fn new(db: Connection, key: Arc<MasterKey>) -> Self {
        if let Err(e) = idempotency::create_table(&db) {
            // Writes with an idempotency key then fail (and say so); the rest works.
            tracing::error!(error = %e, "cannot create the idempotency table");
        }
        Keystore {
            db,
            key,
            pruned_at: 0,
        }
    }
}

impl RecordsWrites for Keystore {
    fn db(&self) -> &Connection {
        &self.db
    }

    fn records(&mut self) -> (&Connection, &mut i64) {
        (&self.db, &mut self.pruned_at)
    }
}

impl Actor for Keystore {
    type Context = SyncContext<Self>;
}

impl Handler<LoadUserKey> for Keystore {
    type Result = Result<LoadedUserKey>;

    fn handle(&mut self, msg: LoadUserKey, _: &mut Self::Context) -> Self::Result {
        let row: Option<(Vec<u8>, bool)> = self
            .db
            .prepare_cached(
                "SELECT k.sealed, EXISTS (SELECT 1 FROM user_key_rejected r
                   WHERE r.user_id = k.user_id AND r.service = k.service)
                 FROM user_keys k WHERE k.user_id = ?1 AND k.service = ?2",
            )?
            .query_row(params![msg.user_id, msg.service], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let absent = |rejected| LoadedUserKey {
            key: None,
            rejected,
        };
        let Some((sealed, rejected)) = row else {
            return Ok(absent(false));
        };
        if rejected {
            return Ok(absent(true));
        }
        let place = Place::User {
            user_id: &msg.user_id,
            service: &msg.service,
        };
        match self.key.open(&sealed, place) {
            Ok(secret) => Ok(LoadedUserKey {
                key: Some(secret),
                rejected: false,
            }),
            Err(_) => {
                tracing::error!(user_id = %msg.user_id, service = %msg.service,
                    "integrity: a stored user key does not decrypt; treating it as absent");
                Ok(absent(false))
            }
        }
    }
}

impl Handler<ReportUserKey> for Keystore {
    type Result = Result<Written<Option<bool>>>;

    /// A report on a user without a key applied nothing and is not recorded.
    fn handle(&mut self, msg: ReportUserKey, _: &mut Self::Context) -> Self::Result {
        self.once(msg.idem.as_ref(), Option::is_some, |s| {
            s.report_user_key(&msg)
        })
    }
}

impl Keystore {
    fn report_user_key(&self, msg: &ReportUserKey) -> Result<Option<bool>> {
        let rejected: Option<bool> = self
            .db
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM user_key_rejected r
                   WHERE r.user_id = k.user_id AND r.service = k.service)
                 FROM user_keys k WHERE k.user_id = ?1 AND k.service = ?2",
            )?
            .query_row(params![msg.user_id, msg.service], |r| r.get(0))
            .optional()?;
        if let (Some(false), true, Some(reporter)) = (rejected, msg.unauthorized, msg.reporter) {
            let owner: Option<u32> = self
                .db
                .prepare_cached(
                    "SELECT uid FROM user_key_owner WHERE user_id = ?1 AND service = ?2",
                )?
                .query_row(params![msg.user_id, msg.service], |r| r.get(0))
                .optional()?;
            if owner != Some(reporter) {
                return Err(not_the_owner(reporter));
            }
        }
        match rejected {
            Some(false) if msg.unauthorized => {
                self.db
                    .prepare_cached(
                        "INSERT OR IGNORE INTO user_key_rejected (user_id, service, reported_at)
                         VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![msg.user_id, msg.service, clock::now_s()])?;
                Ok(Some(true))
            }
            other => Ok(other),
        }
    }
}

impl Handler<StoreUserKey> for Keystore {
    type Result = Result<Written<()>>;

    fn handle(&mut self, msg: StoreUserKey, _: &mut Self::Context) -> Self::Result {
        self.once(
            msg.idem.as_ref(),
            |_| true,
            |s| {
                // The key and its owner land together: inside the idempotency record's
                // transaction, or in one of their own (dropped unfinished = rolled back).
                let own =
                    s.db.is_autocommit()
                        .then(|| s.db.unchecked_transaction())
                        .transpose()?;
                store_user_key(&s.db, &s.key, &msg.user_id, &msg.service, &msg.key)?;
                s.db.prepare_cached(
                "INSERT OR REPLACE INTO user_key_owner (user_id, service, uid) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![msg.user_id, msg.service, msg.owner])?;
                if let Some(tx) = own {
                    tx.commit()?;
                }
                Ok(())
            },
        )
    }
}

impl Handler<DeleteUserKey> for Keystore {
    type Result = Result<Written<bool>>;

    fn handle(&mut self, msg: DeleteUserKey, _: &mut Self::Context) -> Self::Result {
        self.once(
            msg.idem.as_ref(),
            |_| true,
            |s| {
                let n = s
                    .db
                    .prepare_cached("DELETE FROM user_keys WHERE user_id = ?1 AND service = ?2")?
                    .execute(params![msg.user_id, msg.service])?;
                Ok(n > 0)
            },
        )
    }
}

/// Answers at once: proves a keystore thread is not wedged (for the watchdog).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ping;

impl Handler<Ping> for Keystore {
    type Result = ();

    fn handle(&mut self, _: Ping, _: &mut Self::Context) {}
}

/// Whether `candidate` opens this keystore's check value: a keyring is only put in
/// service when it does.
#[derive(Message)]
#[rtype(result = "Result<bool>")]
pub struct CheckKeyring {
    pub candidate: Arc<MasterKey>,
}

impl Handler<CheckKeyring> for Keystore {
    type Result = Result<bool>;

    fn handle(&mut self, msg: CheckKeyring, _: &mut Self::Context) -> Self::Result {
        Ok(opens_keycheck(&self.db, &msg.candidate)?)
    }
}

impl Handler<ListUserKeys> for Keystore {
    type Result = Result<Vec<UserKeyInfo>>;

    fn handle(&mut self, msg: ListUserKeys, _: &mut Self::Context) -> Self::Result {
        let mut stmt = self.db.prepare_cached(
            "SELECT service, sealed, updated_at FROM user_keys WHERE user_id = ?1 ORDER BY service",
        )?;
        let rows = stmt.query_map(params![msg.user_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (service, sealed, updated_at) = row?;
            let place = Place::User {
                user_id: &msg.user_id,
                service: &service,
            };
            let Ok(secret) = self.key.open(&sealed, place) else {
                tracing::error!(user_id = %msg.user_id, service = %service,
                    "integrity: a stored user key does not decrypt; leaving it out of the list");
                continue;
            };
            out.push(UserKeyInfo {
                masked: secret.masked(),
                service,
                updated_at: clock::rfc3339(updated_at),
            });
        }
        Ok(out)
    }
}
