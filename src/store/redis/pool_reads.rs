//! Reading pools: a pool's keys decrypted with their health (for the cache), listed
//! masked, and counted by state (for `/metrics`).

use super::*;

// The messages this file answers, each sent through `store::handle::Store`.

impl Handler<LoadPool> for RedisStore {
    type Result = ResponseFuture<Result<Vec<PoolEntry>>>;

    fn handle(&mut self, msg: LoadPool, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.load_pool(msg.pool).await })
    }
}

impl Handler<ListPoolKeys> for RedisStore {
    type Result = ResponseFuture<Result<Vec<PoolKeyInfo>>>;

    fn handle(&mut self, msg: ListPoolKeys, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.list_pool_keys(msg.pool).await })
    }
}

impl Handler<CountPoolKeys> for RedisStore {
    type Result = ResponseFuture<Result<Vec<PoolKeyCount>>>;

    fn handle(&mut self, msg: CountPoolKeys, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.count_pool_keys(msg).await })
    }
}

impl Inner {
    pub(super) async fn load_pool(&self, pool: PoolRef) -> Result<Vec<PoolEntry>> {
        let hash = self.names.pool(&pool);
        let pipe = redis::pipe()
            .hgetall(&hash)
            .hgetall(self.names.pool_health(&pool))
            .to_owned();
        let (fields, health): (HashFields, std::collections::HashMap<String, String>) =
            self.pipeline("load pool", Retry::Read, &pipe).await?;
        let mut keys = Vec::with_capacity(fields.len());
        for (field, value) in text_fields(&hash, fields) {
            let entry = |key| PoolEntry {
                health: parse_health(health.get(&field).map(String::as_str)),
                key_id: field.clone(),
                key,
            };
            match open_value(&self.master, &self.names.prefix, &pool, &field, &value) {
                StoredValue::Sealed(k) => keys.push(entry(k)),
                StoredValue::Legacy(k) => {
                    if self
                        .clear_value(&hash, "pool value", &[("hash", &hash), ("field", &field)])
                        .await
                    {
                        keys.push(entry(k));
                    }
                }
                StoredValue::Broken => tracing::error!(hash = %hash, field = %field,
                    "integrity: a pool value does not decrypt with this master key; skipping it"),
            }
        }
        Ok(keys)
    }

    pub(super) async fn list_pool_keys(&self, pool: PoolRef) -> Result<Vec<PoolKeyInfo>> {
        let hash = self.names.pool(&pool);
        let pipe = redis::pipe()
            .hgetall(&hash)
            .hgetall(self.names.pool_info(&pool))
            .hgetall(self.names.pool_health(&pool))
            .hgetall(self.names.pool_counts(&clock::utc_day(), &pool))
            .to_owned();
        type Listed = (
            HashFields,
            Vec<(String, String)>,
            std::collections::HashMap<String, String>,
            Vec<(String, u64)>,
        );
        let (fields, infos, health, counts): Listed =
            self.pipeline("list pool keys", Retry::Read, &pipe).await?;
        let mut today: std::collections::HashMap<String, Counters> = Default::default();
        for (field, n) in counts {
            if let Some((key_id, counter)) = field.rsplit_once(':') {
                today.entry(key_id.to_string()).or_default().set(counter, n);
            }
        }
        let now = clock::now_s();
        let infos: std::collections::HashMap<String, Info> = infos
            .into_iter()
            .map(|(k, v)| (k, serde_json::from_str(&v).unwrap_or_default()))
            .collect();
        let mut out: Vec<PoolKeyInfo> = text_fields(&hash, fields)
            .into_iter()
            .map(|(key_id, value)| {
                let masked = match open_value(&self.master, &self.names.prefix, &pool, &key_id, &value) {
                    StoredValue::Sealed(k) => k.masked(),
                    StoredValue::Legacy(k) => format!("{} (stored in clear)", k.masked()),
                    StoredValue::Broken => {
                        tracing::error!(hash = %hash, field = %key_id, "integrity: a pool value does not decrypt");
                        "(undecryptable)".into()
                    }
                };
                let info = infos.get(&key_id);
                let h = parse_health(health.get(&key_id).map(String::as_str));
                PoolKeyInfo {
                    state: h.state(now),
                    cooling_until: h.cooling_until(now),
                    today: today.get(&key_id).copied().unwrap_or_default(),
                    masked,
                    label: info.and_then(|i| i.label.clone()),
                    added_at: info.and_then(|i| i.added_at).map(clock::rfc3339),
                    key_id,
                }
            })
            .collect();
        out.sort_by(|a, b| a.added_at.cmp(&b.added_at).then(a.key_id.cmp(&b.key_id)));
        Ok(out)
    }

    /// Every pool hash under the prefix (SCAN), then each pool's key ids and health
    /// in one pipeline; only the counts leave.
    pub(super) async fn count_pool_keys(&self, _: CountPoolKeys) -> Result<Vec<PoolKeyCount>> {
        let patterns = [
            format!("{}:global_api_pool:*", self.names.prefix),
            format!("{}:channel_api_pool:*", self.names.prefix),
        ];
        let mut hashes: Vec<String> = Vec::new();
        for pattern in &patterns {
            let found: Vec<String> = self
                .bounded("scan pools", Retry::Read, |mut c| async move {
                    let mut found = Vec::new();
                    let mut iter = c.scan_match::<_, String>(pattern).await?;
                    while let Some(name) = iter.next_item().await {
                        found.push(name?);
                    }
                    Ok(found)
                })
                .await?;
            hashes.extend(found);
        }
        hashes.sort();
        hashes.dedup();
        let pools: Vec<PoolRef> = hashes
            .iter()
            .filter_map(|h| crate::store::keyspace::pool_of(&self.names, h))
            .collect();
        if pools.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for pool in &pools {
            pipe.hkeys(self.names.pool(pool))
                .hgetall(self.names.pool_health(pool));
        }
        let replies: Vec<redis::Value> =
            self.pipeline("count pool keys", Retry::Read, &pipe).await?;
        let now = clock::now_s();
        let mut out = Vec::with_capacity(pools.len());
        for (pool, pair) in pools.into_iter().zip(replies.chunks_exact(2)) {
            // A key of another type under the pattern answers an error: not a pool.
            let (Ok(ids), Ok(health)) = (
                redis::from_redis_value_ref::<Vec<String>>(&pair[0]),
                redis::from_redis_value_ref::<std::collections::HashMap<String, String>>(&pair[1]),
            ) else {
                continue;
            };
            let mut count = PoolKeyCount::new(pool);
            for id in &ids {
                count.add(parse_health(health.get(id).map(String::as_str)).state(now));
            }
            out.push(count);
        }
        Ok(out)
    }
}
