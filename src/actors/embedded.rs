//! The embedded store: pools and quota counters in the keystore's SQLite file, owned
//! by the `SqliteStore` actor on its own connection (blocking, so on a `SyncArbiter`).

use std::sync::Arc;

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};

use super::store::*;
use crate::clock;
use crate::crypto::{MasterKey, Place, Secret};
use crate::error::Result;

/// Owns pools and quota counters in SQLite.
pub struct SqliteStore {
    db: Connection,
    key: Arc<MasterKey>,
    /// The last UTC day old counters were purged on.
    purged_day: String,
}

impl SqliteStore {
    /// The store on `db`, a connection to the keystore file.
    pub fn new(db: Connection, key: Arc<MasterKey>) -> Self {
        SqliteStore {
            db,
            key,
            purged_day: String::new(),
        }
    }

    /// Today's day, dropping counters of earlier days the first time a day is seen.
    fn today(&mut self) -> Result<String> {
        let day = clock::utc_day();
        if day != self.purged_day {
            self.db
                .execute("DELETE FROM quota WHERE day < ?1", params![day])?;
            self.purged_day.clone_from(&day);
        }
        Ok(day)
    }

    fn count(&self, day: &str, user_id: &str, tool_name: &str) -> Result<u64> {
        let n: Option<i64> = self
            .db
            .prepare_cached(
                "SELECT count FROM quota WHERE day = ?1 AND user_id = ?2 AND tool_name = ?3",
            )?
            .query_row(params![day, user_id, tool_name], |r| r.get(0))
            .optional()?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }
}

impl Actor for SqliteStore {
    type Context = SyncContext<Self>;
}

fn place<'a>(pool: &'a PoolRef, key_id: &'a str) -> Place<'a> {
    Place::Pool {
        namespace: "sqlite",
        channel: pool.channel.as_deref(),
        service: &pool.service,
        key_id,
    }
}

fn channel_col(pool: &PoolRef) -> &str {
    pool.channel.as_deref().unwrap_or("")
}

impl Handler<LoadPool> for SqliteStore {
    type Result = Result<Vec<Secret>>;

    fn handle(&mut self, msg: LoadPool, _: &mut Self::Context) -> Self::Result {
        let mut stmt = self.db.prepare_cached(
            "SELECT key_id, sealed FROM pool_keys WHERE channel_id = ?1 AND service = ?2",
        )?;
        let rows = stmt.query_map(params![channel_col(&msg.pool), msg.pool.service], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut keys = Vec::new();
        for row in rows {
            let (key_id, sealed) = row?;
            match self.key.open(&sealed, place(&msg.pool, &key_id)) {
                Ok(k) => keys.push(k),
                Err(_) => {
                    tracing::error!(channel_id = ?msg.pool.channel, service = %msg.pool.service,
                    key_id = %key_id, "integrity: a pool key does not decrypt; skipping it")
                }
            }
        }
        Ok(keys)
    }
}

impl Handler<AddPoolKey> for SqliteStore {
    type Result = Result<(String, bool)>;

    fn handle(&mut self, msg: AddPoolKey, _: &mut Self::Context) -> Self::Result {
        let key_id = self.key.key_id(&msg.key);
        let sealed = self
            .key
            .seal(msg.key.expose().as_bytes(), place(&msg.pool, &key_id));
        let n = self
            .db
            .prepare_cached(
                "INSERT INTO pool_keys (channel_id, service, key_id, sealed, label, added_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
            )?
            .execute(params![
                channel_col(&msg.pool),
                msg.pool.service,
                key_id,
                sealed,
                msg.label,
                clock::now_s()
            ])?;
        Ok((key_id, n > 0))
    }
}

impl Handler<RemovePoolKey> for SqliteStore {
    type Result = Result<bool>;

    fn handle(&mut self, msg: RemovePoolKey, _: &mut Self::Context) -> Self::Result {
        let n = self
            .db
            .prepare_cached(
                "DELETE FROM pool_keys WHERE channel_id = ?1 AND service = ?2 AND key_id = ?3",
            )?
            .execute(params![
                channel_col(&msg.pool),
                msg.pool.service,
                msg.key_id
            ])?;
        Ok(n > 0)
    }
}

impl Handler<ListPoolKeys> for SqliteStore {
    type Result = Result<Vec<PoolKeyInfo>>;

    fn handle(&mut self, msg: ListPoolKeys, _: &mut Self::Context) -> Self::Result {
        let mut stmt = self.db.prepare_cached(
            "SELECT key_id, sealed, label, added_at FROM pool_keys
             WHERE channel_id = ?1 AND service = ?2 ORDER BY added_at, key_id",
        )?;
        let rows = stmt.query_map(params![channel_col(&msg.pool), msg.pool.service], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key_id, sealed, label, added_at) = row?;
            let masked = match self.key.open(&sealed, place(&msg.pool, &key_id)) {
                Ok(k) => k.masked(),
                Err(_) => {
                    tracing::error!(channel_id = ?msg.pool.channel, service = %msg.pool.service,
                        key_id = %key_id, "integrity: a pool key does not decrypt");
                    "(undecryptable)".into()
                }
            };
            out.push(PoolKeyInfo {
                key_id,
                masked,
                label,
                added_at: Some(clock::rfc3339(added_at)),
            });
        }
        Ok(out)
    }
}

impl Handler<ReadUsage> for SqliteStore {
    type Result = Result<u64>;

    fn handle(&mut self, msg: ReadUsage, _: &mut Self::Context) -> Self::Result {
        let day = self.today()?;
        self.count(&day, &msg.user_id, &msg.tool_name)
    }
}

impl Handler<IncrementUsage> for SqliteStore {
    type Result = Result<u64>;

    fn handle(&mut self, msg: IncrementUsage, _: &mut Self::Context) -> Self::Result {
        let day = self.today()?;
        let n: i64 = self
            .db
            .prepare_cached(
                "INSERT INTO quota (day, user_id, tool_name, count) VALUES (?1, ?2, ?3, 1)
                 ON CONFLICT DO UPDATE SET count = count + 1 RETURNING count",
            )?
            .query_row(params![day, msg.user_id, msg.tool_name], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }
}

impl Handler<ConsumeUsage> for SqliteStore {
    type Result = Result<(bool, u64)>;

    /// One statement, so the check and the increment cannot interleave with another
    /// writer: the upsert only increments below the limit.
    fn handle(&mut self, msg: ConsumeUsage, _: &mut Self::Context) -> Self::Result {
        let day = self.today()?;
        if msg.limit == 0 {
            return Ok((false, self.count(&day, &msg.user_id, &msg.tool_name)?));
        }
        let after: Option<i64> = self
            .db
            .prepare_cached(
                "INSERT INTO quota (day, user_id, tool_name, count) VALUES (?1, ?2, ?3, 1)
                 ON CONFLICT DO UPDATE SET count = count + 1 WHERE count < ?4 RETURNING count",
            )?
            .query_row(
                params![day, msg.user_id, msg.tool_name, msg.limit as i64],
                |r| r.get(0),
            )
            .optional()?;
        match after {
            Some(n) => Ok((true, n.max(0) as u64)),
            None => Ok((false, self.count(&day, &msg.user_id, &msg.tool_name)?)),
        }
    }
}
