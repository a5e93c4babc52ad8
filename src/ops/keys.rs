//! Per-user keys: resolve, Gitea credentials, set, delete, list.

use serde::Serialize;

use super::messages::{
    cooling_message, missing_key_message, rejected_key_warning, unavailable_key_message,
};
use super::{is_false, Params, Reply};
use crate::error::Result;
use crate::keys::Secret;
use crate::model::idempotency::Idem;
use crate::ops::app::App;
use crate::ops::resolver::{resolve, Query, Resolved, Source};
use crate::ops::services;
use crate::store::cache::ForgetUserKey;
use crate::store::keystore::UserKeyInfo;
use crate::store::messages::{DeleteUserKey, ListUserKeys, StoreUserKey};
use crate::wire::protocol::{body, Body, Request};

/// The rest of a lookup, once its user and service are known.
fn query(req: &mut Request, user_id: String, service: String) -> Result<Query> {
    Ok(Query {
        user_id,
        service,
        channel_id: req.channel_id()?,
        fallback_to_pool: req.fallback_to_pool()?.unwrap_or(true),
        fallback_to_config: req.fallback_to_config()?.unwrap_or(true),
    })
}

/// `get_user_api_key`'s parameters are the resolver's query.
impl Params for Query {
    fn parse(req: &mut Request) -> Result<Self> {
        let user_id = req.user_id()?;
        let service = req.service()?;
        query(req, user_id, service)
    }
}

/// `get_gitea_credentials`: a query for the service `gitea`.
pub(super) struct GiteaQuery(Query);

impl Params for GiteaQuery {
    fn parse(req: &mut Request) -> Result<Self> {
        let user_id = req.user_id()?;
        query(req, user_id, "gitea".into()).map(GiteaQuery)
    }
}

/// A user and a service (`delete_user_api_key`).
pub(super) struct UserService {
    user_id: String,
    service: String,
}

impl Params for UserService {
    fn parse(req: &mut Request) -> Result<Self> {
        Ok(UserService {
            user_id: req.user_id()?,
            service: req.service()?,
        })
    }
}

/// `set_user_api_key`'s parameters.
pub(super) struct NewUserKey {
    user_id: String,
    service: String,
    key: Secret,
}

impl Params for NewUserKey {
    fn parse(req: &mut Request) -> Result<Self> {
        Ok(NewUserKey {
            user_id: req.user_id()?,
            service: req.service()?,
            key: req.key()?,
        })
    }
}

/// A user alone (`list_user_api_keys`).
pub(super) struct User {
    user_id: String,
}

impl Params for User {
    fn parse(req: &mut Request) -> Result<Self> {
        Ok(User {
            user_id: req.user_id()?,
        })
    }
}

/// The message of an answer without a key: when to retry if a pool key is only
/// cooling down, else how to get a key.
fn no_key_message(app: &App, service: &str, r: &Resolved) -> Option<String> {
    if r.key.is_some() {
        // The hot path: no config snapshot taken for a message that is not sent.
        return None;
    }
    let config = app.config();
    // Nobody is told to go and get a key while a store is only unreachable.
    match (r.retry_after_s, r.degraded) {
        (Some(retry), _) => Some(cooling_message(&config, service, retry)),
        (None, true) => Some(unavailable_key_message(&config, service)),
        (None, false) => Some(missing_key_message(&config, service)),
    }
}

/// `{"op":"get_user_api_key","user_id":"u1","service":"openai","channel_id":"c1"}` →
/// `{"key":"sk-…","source":"user"}`, `{"key":"sk-…","source":"global_pool","key_id":"3f2a9c0e12ab45cd"}`,
/// or `{"key":null,"source":null,"message":"No API key for OpenAI …"}`.
/// `"retry_after_s":N` is added when no key is left but a pool key is only cooling
/// down; `"warning"` when the user's own key was skipped because it was reported
/// unauthorized; `"degraded":true` when a store was skipped because it failed.
pub async fn get_user_api_key(app: &App, q: Query) -> Result<Body> {
    #[derive(Serialize)]
    struct Answer<'a> {
        key: Option<&'a str>,
        source: Option<Source>,
        #[serde(skip_serializing_if = "Option::is_none")]
        key_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_s: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        warning: Option<String>,
        #[serde(skip_serializing_if = "is_false")]
        degraded: bool,
    }
    let service = q.service.clone();
    let r = resolve(app, q).await?;
    body(&Answer {
        key: r.key.as_deref().map(Secret::expose),
        source: r.source,
        key_id: r.key_id.as_deref(),
        retry_after_s: r.retry_after_s,
        message: no_key_message(app, &service, &r),
        warning: r
            .user_key_rejected
            .then(|| rejected_key_warning(&app.config(), &service)),
        degraded: r.degraded,
    })
}

/// A stored Gitea value: a plain token, or `{"token": "...", "base_url": "..."}`.
fn gitea_parts(value: &Secret) -> (Option<Secret>, Option<String>) {
    #[derive(serde::Deserialize)]
    struct Stored {
        token: Option<String>,
        base_url: Option<String>,
    }
    let text = value.expose();
    if text.starts_with('{') {
        if let Ok(stored) = serde_json::from_str::<Stored>(text) {
            let token = stored
                .token
                .filter(|t| !t.trim().is_empty())
                .map(Secret::new);
            return (token, stored.base_url.filter(|u| !u.is_empty()));
        }
    }
    (Some(Secret::new(text.to_owned())), None)
}

/// `{"op":"get_gitea_credentials","user_id":"u1"}` →
/// `{"token":"…","base_url":"https://gitea.example.com","source":"user"}`; a token from a
/// pool adds its `"key_id"`, and `retry_after_s`, `warning` and `degraded` are added as
/// for `get_user_api_key`.
pub async fn get_gitea_credentials(app: &App, GiteaQuery(q): GiteaQuery) -> Result<Body> {
    #[derive(Serialize)]
    struct Answer<'a> {
        token: Option<&'a str>,
        base_url: Option<String>,
        source: Option<Source>,
        #[serde(skip_serializing_if = "Option::is_none")]
        key_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_s: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        warning: Option<String>,
        #[serde(skip_serializing_if = "is_false")]
        degraded: bool,
    }
    let resolved = resolve(app, q).await?;
    let config = app.config();
    let warning = resolved
        .user_key_rejected
        .then(|| rejected_key_warning(&config, "gitea"));
    let Resolved {
        ref key,
        source,
        ref key_id,
        degraded,
        retry_after_s,
        ..
    } = resolved;
    let nothing = |message: String| Answer {
        token: None,
        base_url: None,
        source: None,
        key_id: None,
        retry_after_s: None,
        message: Some(message),
        warning: warning.clone(),
        degraded,
    };
    let Some(value) = key else {
        return body(&Answer {
            retry_after_s,
            ..nothing(no_key_message(app, "gitea", &resolved).unwrap_or_default())
        });
    };
    let (token, base_url) = gitea_parts(value);
    let Some(token) = token else {
        return body(&nothing(missing_key_message(&config, "gitea")));
    };
    let Some(base_url) = base_url.or_else(|| services::info(&config, "gitea").base_url) else {
        return body(&nothing(
            "A Gitea token is stored but no Gitea base URL is known: set services.gitea.base_url in the \
             daemon's config, or store {\"token\": \"<token>\", \"base_url\": \"https://…\"} with \
             set_user_api_key gitea."
                .into(),
        ));
    };
    body(&Answer {
        token: Some(token.expose()),
        base_url: Some(base_url),
        source,
        key_id: key_id.as_deref(),
        retry_after_s: None,
        message: None,
        warning: warning.clone(),
        degraded,
    })
}

/// Drops the cached copy of a user's key once a write to it went through, so
/// the next lookup on this daemon reads what the store now holds.
async fn forget_cached(app: &App, user_id: &str, service: &str) -> Result<()> {
    app.cache
        .send(ForgetUserKey {
            user_id: user_id.to_owned(),
            service: service.to_owned(),
        })
        .await?;
    Ok(())
}

/// `{"op":"set_user_api_key","user_id":"u1","service":"openai","key":"sk-…"}` → `{"stored":true}`
///
/// The storing client's uid is recorded: only it (or an admin) may report the key
/// `unauthorized`.
pub async fn set_user_api_key(
    app: &App,
    p: NewUserKey,
    idem: Option<Idem>,
    peer: &crate::process::access::Peer,
) -> Result<Reply> {
    let NewUserKey {
        user_id,
        service,
        key,
    } = p;
    let stored = app
        .user_keys
        .store(StoreUserKey {
            user_id: user_id.clone(),
            service: service.clone(),
            key,
            idem,
            owner: peer.uid,
        })
        .await?;
    forget_cached(app, &user_id, &service).await?;
    tracing::info!(op = "set_user_api_key", user_id = %user_id, service = %service,
        replayed = stored.replayed, "stored");
    Ok(Reply::of(
        &stored,
        body(&serde_json::json!({ "stored": true }))?,
    ))
}

/// `{"op":"delete_user_api_key","user_id":"u1","service":"openai"}` → `{"deleted":true}`
pub async fn delete_user_api_key(app: &App, p: UserService, idem: Option<Idem>) -> Result<Reply> {
    let UserService { user_id, service } = p;
    let written = app
        .user_keys
        .delete(DeleteUserKey {
            user_id: user_id.clone(),
            service: service.clone(),
            idem,
        })
        .await?;
    let deleted = written.value;
    forget_cached(app, &user_id, &service).await?;
    tracing::info!(op = "delete_user_api_key", user_id = %user_id, service = %service, deleted,
        replayed = written.replayed, "deleted");
    Ok(Reply::of(
        &written,
        body(&serde_json::json!({ "deleted": deleted }))?,
    ))
}

/// `{"op":"list_user_api_keys","user_id":"u1"}` →
/// `{"keys":[{"service":"openai","masked":"sk-a…1234","updated_at":"2026-11-28T12:00:00Z"}]}`
pub async fn list_user_api_keys(app: &App, User { user_id }: User) -> Result<Body> {
    #[derive(Serialize)]
    struct Answer {
        keys: Vec<UserKeyInfo>,
    }
    let keys = app.user_keys.list(ListUserKeys { user_id }).await?;
    body(&Answer { keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitea_values() {
        let (t, u) = gitea_parts(&Secret::new("tok123".into()));
        assert_eq!(t.unwrap().expose(), "tok123");
        assert!(u.is_none());
        let (t, u) = gitea_parts(&Secret::new(
            r#"{"token":"tok","base_url":"https://g"}"#.into(),
        ));
        assert_eq!(t.unwrap().expose(), "tok");
        assert_eq!(u.as_deref(), Some("https://g"));
        let (t, _) = gitea_parts(&Secret::new(r#"{"base_url":"https://g"}"#.into()));
        assert!(t.is_none());
    }
}
