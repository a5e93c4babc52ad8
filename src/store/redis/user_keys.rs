//! Per-user keys in Redis (`keystore.user_keys = "redis"`): sealed, shared by the
//! fleet, answering the keystore's messages.

use super::*;

// The messages this file answers, each sent through `store::handle::UserKeys`.

impl Handler<LoadUserKey> for RedisStore {
    type Result = ResponseFuture<Result<LoadedUserKey>>;

    fn handle(&mut self, msg: LoadUserKey, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.load_user_key(msg).await })
    }
}

impl Handler<StoreUserKey> for RedisStore {
    type Result = ResponseFuture<Result<Written<()>>>;

    fn handle(&mut self, msg: StoreUserKey, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.store_user_key(msg).await })
    }
}

impl Handler<DeleteUserKey> for RedisStore {
    type Result = ResponseFuture<Result<Written<bool>>>;

    fn handle(&mut self, msg: DeleteUserKey, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.delete_user_key(msg).await })
    }
}

impl Handler<ListUserKeys> for RedisStore {
    type Result = ResponseFuture<Result<Vec<UserKeyInfo>>>;

    fn handle(&mut self, msg: ListUserKeys, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.list_user_keys(msg).await })
    }
}

impl Handler<ReportUserKey> for RedisStore {
    type Result = ResponseFuture<Result<Written<Option<bool>>>>;

    fn handle(&mut self, msg: ReportUserKey, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.report_user_key(msg).await })
    }
}

impl Inner {
    pub(super) async fn load_user_key(&self, msg: LoadUserKey) -> Result<LoadedUserKey> {
        let hash = self.names.user_keys(&msg.user_id);
        let pipe = redis::pipe()
            .hget(&hash, &msg.service)
            .hexists(self.names.user_rejected(&msg.user_id), &msg.service)
            .to_owned();
        let (value, rejected): (Option<Vec<u8>>, bool) =
            self.pipeline("load user key", Retry::Read, &pipe).await?;
        let absent = |rejected| LoadedUserKey {
            key: None,
            rejected,
        };
        let Some(value) = value else {
            return Ok(absent(false));
        };
        if rejected {
            return Ok(absent(true));
        }
        let opened = open_user_value(
            &self.master,
            &self.names.prefix,
            &msg.user_id,
            &msg.service,
            &value,
        );
        let key = match opened {
            StoredValue::Sealed(k) => Some(k),
            StoredValue::Legacy(k) => {
                let place = [
                    ("user_id", msg.user_id.as_str()),
                    ("service", msg.service.as_str()),
                ];
                self.clear_value(&hash, "user key", &place)
                    .await
                    .then_some(k)
            }
            StoredValue::Broken => {
                tracing::error!(user_id = %msg.user_id, service = %msg.service,
                    "integrity: a user key in redis does not decrypt with this master key; treating it as absent");
                None
            }
        };
        Ok(LoadedUserKey {
            key,
            rejected: false,
        })
    }

    pub(super) fn user_changed(&self, user_id: &str, service: &str) -> String {
        self.announce(&Changed::UserKey {
            user_id: user_id.to_string(),
            service: service.to_string(),
        })
    }

    pub(super) async fn store_user_key(&self, msg: StoreUserKey) -> Result<Written<()>> {
        let value = user_envelope(
            &self.master,
            &self.names.prefix,
            &msg.user_id,
            &msg.service,
            &msg.key,
        );
        let version = envelope_version(value.as_bytes());
        let pipe = redis::pipe()
            .atomic()
            .hset(self.names.user_keys(&msg.user_id), &msg.service, value)
            .hset(
                self.names.user_info(&msg.user_id),
                &msg.service,
                clock::now_s(),
            )
            // A new key is not the one the provider rejected.
            .hdel(self.names.user_rejected(&msg.user_id), &msg.service)
            // Only the storing uid (or an admin) may report it unauthorized.
            .hset(self.names.user_owner(&msg.user_id), &msg.service, msg.owner)
            .publish(
                self.names.invalidate(),
                self.user_changed(&msg.user_id, &msg.service),
            )
            .to_owned();
        let replies = self
            .write_once("set user key", &pipe, msg.idem.as_ref(), version)
            .await?;
        self.confirm("set user key").await?;
        Ok(replies.map(|_| ()))
    }

    pub(super) async fn delete_user_key(&self, msg: DeleteUserKey) -> Result<Written<bool>> {
        let pipe = redis::pipe()
            .atomic()
            .hdel(self.names.user_keys(&msg.user_id), &msg.service)
            .hdel(self.names.user_info(&msg.user_id), &msg.service)
            .hdel(self.names.user_rejected(&msg.user_id), &msg.service)
            .hdel(self.names.user_owner(&msg.user_id), &msg.service)
            .publish(
                self.names.invalidate(),
                self.user_changed(&msg.user_id, &msg.service),
            )
            .to_owned();
        let replies = self
            .write_once("delete user key", &pipe, msg.idem.as_ref(), 0)
            .await?;
        self.confirm("delete user key").await?;
        Ok(replies.map(|r| reply(&r, 0) > 0))
    }

    pub(super) async fn list_user_keys(&self, msg: ListUserKeys) -> Result<Vec<UserKeyInfo>> {
        let pipe = redis::pipe()
            .hgetall(self.names.user_keys(&msg.user_id))
            .hgetall(self.names.user_info(&msg.user_id))
            .to_owned();
        let (fields, times): (HashFields, std::collections::HashMap<String, i64>) =
            self.pipeline("list user keys", Retry::Read, &pipe).await?;
        let hash = self.names.user_keys(&msg.user_id);
        let mut out = Vec::with_capacity(fields.len());
        for (service, value) in text_fields(&hash, fields) {
            let masked = match open_user_value(
                &self.master,
                &self.names.prefix,
                &msg.user_id,
                &service,
                &value,
            ) {
                StoredValue::Sealed(k) => k.masked(),
                StoredValue::Legacy(k) => format!("{} (stored in clear)", k.masked()),
                StoredValue::Broken => {
                    tracing::error!(user_id = %msg.user_id, service = %service,
                        "integrity: a user key in redis does not decrypt; leaving it out of the list");
                    continue;
                }
            };
            out.push(UserKeyInfo {
                updated_at: clock::rfc3339(times.get(&service).copied().unwrap_or(0)),
                masked,
                service,
            });
        }
        out.sort_by(|a, b| a.service.cmp(&b.service));
        Ok(out)
    }

    /// A report on a user's own key. Reads first, then writes only to mark the key
    /// rejected; with an idempotency key the record is looked at before the read
    /// and written with the mark.
    pub(super) async fn report_user_key(
        &self,
        msg: ReportUserKey,
    ) -> Result<Written<Option<bool>>> {
        if let Some(idem) = &msg.idem {
            if let Some(replayed) = self.recorded::<Vec<i64>>(idem).await? {
                // Only a report that marked the key is recorded.
                return Ok(replayed.map(|_| Some(true)));
            }
        }
        let pipe = redis::pipe()
            .hexists(self.names.user_keys(&msg.user_id), &msg.service)
            .hexists(self.names.user_rejected(&msg.user_id), &msg.service)
            .hget(self.names.user_owner(&msg.user_id), &msg.service)
            .to_owned();
        let (present, rejected, owner): (bool, bool, Option<u32>) = self
            .pipeline("read user key mark", Retry::Read, &pipe)
            .await?;
        if !present {
            return Ok(Written::fresh(None));
        }
        if rejected || !msg.unauthorized {
            // Nothing to write, so nothing to record.
            return Ok(Written::fresh(Some(rejected)));
        }
        if let Some(reporter) = msg.reporter.filter(|r| owner != Some(*r)) {
            return Err(crate::store::messages::not_the_owner(reporter));
        }
        let pipe = redis::pipe()
            .atomic()
            .hset(
                self.names.user_rejected(&msg.user_id),
                &msg.service,
                clock::now_s(),
            )
            .publish(
                self.names.invalidate(),
                self.user_changed(&msg.user_id, &msg.service),
            )
            .to_owned();
        let replies = self
            .write_once("mark user key rejected", &pipe, msg.idem.as_ref(), 0)
            .await?;
        self.confirm("mark user key rejected").await?;
        Ok(replies.map(|_| Some(true)))
    }
}
