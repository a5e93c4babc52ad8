//! The embedded store: pools and quota counters in the keystore's SQLite file, owned
//! by the `SqliteStore` actor on its own connection (blocking, so on a `SyncArbiter`).

use std::sync::Arc;

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};

use super::keystore::RecordsWrites;
use super::messages::*;
use crate::error::Result;
use crate::keys::{MasterKey, Place};
use crate::model::clock;
use crate::model::idempotency::{self, Written};
use crate::model::pool::*;

/// Owns pools and quota counters in SQLite.
pub struct SqliteStore {
    db: Connection,
    key: Arc<MasterKey>,
    /// The last UTC day old counters were purged on.
    purged_day: String,
    /// The last UTC day old pool counters were purged on.
    pool_counts_day: String,
    /// When expired idempotency records were last dropped (unix seconds).
    pruned_at: i64,
}

impl RecordsWrites for SqliteStore {
    fn db(&self) -> &Connection {
        &self.db
    }

    fn records(&mut self) -> (&Connection, &mut i64) {
        (&self.db, &mut self.pruned_at)
    }
}

impl SqliteStore {
    /// The store on `db`, a connection to the keystore file.
    pub fn new(db: Connection, key: Arc<MasterKey>) -> Self {
        if let Err(e) = idempotency::create_table(&db) {
            // Writes with an idempotency key then fail (and say so); the rest works.
            tracing::error!(error = %e, "cannot create the idempotency table");
        }
        SqliteStore {
            db,
            key,
            purged_day: String::new(),
            pool_counts_day: String::new(),
            pruned_at: 0,
        }
    }

    /// Today's day for pool counters, dropping those older than `COUNTER_DAYS` the
    /// first time a day is seen (Redis lets them expire instead).
    fn pool_counts_today(&mut self) -> Result<String> {
        let day = clock::utc_day();
        if day != self.pool_counts_day {
            let oldest = clock::utc_day_at(clock::now_s() - COUNTER_DAYS * 86_400);
            self.db
                .execute("DELETE FROM pool_counts WHERE day < ?1", params![oldest])?;
            self.pool_counts_day.clone_from(&day);
        }
        Ok(day)
    }

    fn health(&self, pool: &PoolRef, key_id: &str) -> Result<Health> {
        Ok(self
            .db
            .prepare_cached(
                "SELECT cooling_until, disabled, errors_since, errors FROM pool_health
                 WHERE channel_id = ?1 AND service = ?2 AND key_id = ?3",
            )?
            .query_row(params![channel_col(pool), pool.service, key_id], health_row)
            .optional()?
            .unwrap_or_default())
    }

    /// Drops what is known of a pool key's health, so it counts as healthy again
    /// (cooling, disabling and error counts gone): when it is removed, or enabled.
    fn forget_health(&self, pool: &PoolRef, key_id: &str) -> Result<()> {
        self.db
            .prepare_cached(
                "DELETE FROM pool_health WHERE channel_id = ?1 AND service = ?2 AND key_id = ?3",
            )?
            .execute(params![channel_col(pool), pool.service, key_id])?;
        Ok(())
    }

    fn has_key(&self, pool: &PoolRef, key_id: &str) -> Result<bool> {
        Ok(self
            .db
            .prepare_cached(
                "SELECT 1 FROM pool_keys WHERE channel_id = ?1 AND service = ?2 AND key_id = ?3",
            )?
            .query_row(params![channel_col(pool), pool.service, key_id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn add_count(
        &self,
        day: &str,
        pool: &PoolRef,
        key_id: &str,
        counter: &str,
        n: u64,
    ) -> Result<()> {
        self.db
            .prepare_cached(
                "INSERT INTO pool_counts (day, channel_id, service, key_id, counter, count)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT DO UPDATE SET count = count + ?6",
            )?
            .execute(params![
                day,
                channel_col(pool),
                pool.service,
                key_id,
                counter,
                n as i64
            ])?;
        Ok(())
    }
}

fn health_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Health> {
    Ok(Health {
        cooling_until: r.get(0)?,
        disabled: r.get(1)?,
        errors_since: r.get(2)?,
        errors: r.get::<_, i64>(3)?.clamp(0, u32::MAX as i64) as u32,
    })
}

impl SqliteStore {
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
    type Result = Result<Vec<PoolEntry>>;

    fn handle(&mut self, msg: LoadPool, _: &mut Self::Context) -> Self::Result {
        let mut stmt = self.db.prepare_cached(
            "SELECT k.key_id, k.sealed, h.cooling_until, h.disabled, h.errors_since, h.errors
             FROM pool_keys k LEFT JOIN pool_health h
               ON h.channel_id = k.channel_id AND h.service = k.service AND h.key_id = k.key_id
             WHERE k.channel_id = ?1 AND k.service = ?2",
        )?;
        let rows = stmt.query_map(params![channel_col(&msg.pool), msg.pool.service], |r| {
            let health = match r.get::<_, Option<i64>>(2)? {
                Some(cooling_until) => Health {
                    cooling_until,
                    disabled: r.get(3)?,
                    errors_since: r.get(4)?,
                    errors: r.get::<_, i64>(5)?.clamp(0, u32::MAX as i64) as u32,
                },
                None => Health::default(),
            };
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, health))
        })?;
        let mut keys = Vec::new();
        for row in rows {
            let (key_id, sealed, health) = row?;
            match self.key.open(&sealed, place(&msg.pool, &key_id)) {
                Ok(key) => keys.push(PoolEntry {
                    key_id,
                    key,
                    health,
                }),
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
    type Result = Result<Written<(String, bool)>>;

    fn handle(&mut self, msg: AddPoolKey, _: &mut Self::Context) -> Self::Result {
        self.once(msg.idem.as_ref(), |_| true, |s| s.add_pool_key(&msg))
    }
}

impl SqliteStore {
    fn add_pool_key(&self, msg: &AddPoolKey) -> Result<(String, bool)> {
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
    type Result = Result<Written<bool>>;

    fn handle(&mut self, msg: RemovePoolKey, _: &mut Self::Context) -> Self::Result {
        self.once(msg.idem.as_ref(), |_| true, |s| s.remove_pool_key(&msg))
    }
}

impl SqliteStore {
    fn remove_pool_key(&self, msg: &RemovePoolKey) -> Result<bool> {
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
        // A key added again later starts healthy.
        self.forget_health(&msg.pool, &msg.key_id)?;
        Ok(n > 0)
    }
}

impl Handler<ReportPoolKey> for SqliteStore {
    type Result = Result<Written<Option<Health>>>;

    /// One transaction: read, apply the rules, write back, count (and record). A
    /// report on a key the pool does not have applied nothing and is not recorded.
    fn handle(&mut self, msg: ReportPoolKey, _: &mut Self::Context) -> Self::Result {
        let day = self.pool_counts_today()?;
        if msg.idem.is_some() {
            return self.once(msg.idem.as_ref(), Option::is_some, |s| {
                s.report_pool_key(&day, &msg)
            });
        }
        let tx = self.db.unchecked_transaction()?;
        let health = self.report_pool_key(&day, &msg)?;
        tx.commit()?;
        Ok(Written::fresh(health))
    }
}

impl SqliteStore {
    /// A report, inside the caller's transaction.
    fn report_pool_key(&self, day: &str, msg: &ReportPoolKey) -> Result<Option<Health>> {
        if !self.has_key(&msg.pool, &msg.key_id)? {
            return Ok(None);
        }
        let mut health = self.health(&msg.pool, &msg.key_id)?;
        health.apply(msg.outcome, clock::now_s(), msg.retry_after_s, msg.rules);
        self.db
            .prepare_cached(
                "INSERT INTO pool_health
                   (channel_id, service, key_id, cooling_until, disabled, errors_since, errors)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT DO UPDATE SET cooling_until = ?4, disabled = ?5,
                   errors_since = ?6, errors = ?7",
            )?
            .execute(params![
                channel_col(&msg.pool),
                msg.pool.service,
                msg.key_id,
                health.cooling_until,
                health.disabled,
                health.errors_since,
                health.errors
            ])?;
        self.add_count(day, &msg.pool, &msg.key_id, msg.outcome.counter(), 1)?;
        Ok(Some(health))
    }
}

impl Handler<EnablePoolKey> for SqliteStore {
    type Result = Result<Written<bool>>;

    fn handle(&mut self, msg: EnablePoolKey, _: &mut Self::Context) -> Self::Result {
        self.once(msg.idem.as_ref(), |_| true, |s| s.enable_pool_key(&msg))
    }
}

impl SqliteStore {
    fn enable_pool_key(&self, msg: &EnablePoolKey) -> Result<bool> {
        if !self.has_key(&msg.pool, &msg.key_id)? {
            return Ok(false);
        }
        self.forget_health(&msg.pool, &msg.key_id)?;
        Ok(true)
    }
}

impl Handler<CountPicks> for SqliteStore {
    type Result = Result<()>;

    fn handle(&mut self, msg: CountPicks, _: &mut Self::Context) -> Self::Result {
        let day = self.pool_counts_today()?;
        let tx = self.db.unchecked_transaction()?;
        for (pool, key_id, n) in &msg.picks {
            self.add_count(&day, pool, key_id, "picks", *n)?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl Handler<CountPoolKeys> for SqliteStore {
    type Result = Result<Vec<PoolKeyCount>>;

    fn handle(&mut self, _: CountPoolKeys, _: &mut Self::Context) -> Self::Result {
        let mut stmt = self.db.prepare_cached(
            "SELECT k.channel_id, k.service, h.cooling_until, h.disabled
             FROM pool_keys k LEFT JOIN pool_health h
               ON h.channel_id = k.channel_id AND h.service = k.service AND h.key_id = k.key_id
             ORDER BY k.channel_id, k.service",
        )?;
        let rows = stmt.query_map([], |r| {
            let health = Health {
                cooling_until: r.get::<_, Option<i64>>(2)?.unwrap_or(0),
                disabled: r.get::<_, Option<bool>>(3)?.unwrap_or(false),
                ..Health::default()
            };
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, health))
        })?;
        let now = crate::model::clock::now_s();
        let mut out: Vec<PoolKeyCount> = Vec::new();
        for row in rows {
            let (channel, service, health) = row?;
            let pool = PoolRef {
                channel: (!channel.is_empty()).then_some(channel),
                service,
            };
            match out.last_mut() {
                Some(last) if last.pool == pool => last.add(health.state(now)),
                _ => {
                    let mut count = PoolKeyCount::new(pool);
                    count.add(health.state(now));
                    out.push(count);
                }
            }
        }
        Ok(out)
    }
}

impl Handler<ListPoolKeys> for SqliteStore {
    type Result = Result<Vec<PoolKeyInfo>>;

    fn handle(&mut self, msg: ListPoolKeys, _: &mut Self::Context) -> Self::Result {
        let day = self.pool_counts_today()?;
        let mut today: std::collections::HashMap<String, Counters> = Default::default();
        let mut counts = self.db.prepare_cached(
            "SELECT key_id, counter, count FROM pool_counts
             WHERE day = ?1 AND channel_id = ?2 AND service = ?3",
        )?;
        let rows = counts.query_map(
            params![day, channel_col(&msg.pool), msg.pool.service],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            },
        )?;
        for row in rows {
            let (key_id, counter, n) = row?;
            today
                .entry(key_id)
                .or_default()
                .set(&counter, n.max(0) as u64);
        }
        drop(counts);
        let now = clock::now_s();
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
            let health = self.health(&msg.pool, &key_id)?;
            out.push(PoolKeyInfo {
                today: today.get(&key_id).copied().unwrap_or_default(),
                state: health.state(now),
                cooling_until: health.cooling_until(now),
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
    type Result = Result<Written<u64>>;

    fn handle(&mut self, msg: IncrementUsage, _: &mut Self::Context) -> Self::Result {
        let day = self.today()?;
        self.once(
            msg.idem.as_ref(),
            |_| true,
            |s| s.increment_usage(&day, &msg),
        )
    }
}

impl SqliteStore {
    fn increment_usage(&self, day: &str, msg: &IncrementUsage) -> Result<u64> {
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
    type Result = Result<Written<(bool, u64)>>;

    fn handle(&mut self, msg: ConsumeUsage, _: &mut Self::Context) -> Self::Result {
        let day = self.today()?;
        self.once(msg.idem.as_ref(), |_| true, |s| s.consume_usage(&day, &msg))
    }
}

impl SqliteStore {
    /// One statement, so the check and the increment cannot interleave with another
    /// writer: the upsert only increments below the limit.
    fn consume_usage(&self, day: &str, msg: &ConsumeUsage) -> Result<(bool, u64)> {
        if msg.limit == 0 {
            return Ok((false, self.count(day, &msg.user_id, &msg.tool_name)?));
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
            None => Ok((false, self.count(day, &msg.user_id, &msg.tool_name)?)),
        }
    }
}
