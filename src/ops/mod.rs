//! The ops (docs/protocol.md, "Ops"), one file per family. Each op has the same
//! shape: its parameters are parsed from the request into the op's own struct
//! (`Params`), the op asks the actors, and encodes its result. Beside them: the
//! shared `App` the ops run against, the resolver, and the built-in service names.

mod admin;
pub mod app;
mod health;
mod keys;
mod messages;
mod pools;
mod quota;
pub mod resolver;
pub mod services;

use crate::error::{Error, Result};
use crate::keys::Secret;
use crate::model::idempotency::{Idem, Written};
use crate::ops::app::App;
use crate::process::access::{Peer, Role};
use crate::wire::catalog::Op;
use crate::wire::protocol::{Body, Request};

pub use messages::missing_key_message;

/// An op's answer: its encoded result, and whether it is the recorded answer of an
/// earlier write with the same `idempotency_key` (then nothing was applied now).
pub struct Reply {
    pub body: Body,
    pub replayed: bool,
}

impl From<Body> for Reply {
    fn from(body: Body) -> Self {
        Reply {
            body,
            replayed: false,
        }
    }
}

impl Reply {
    /// The answer of a write whose store said whether it was replayed.
    fn of<T>(written: &Written<T>, body: Body) -> Self {
        Reply {
            body,
            replayed: written.replayed,
        }
    }
}

/// A write's `idempotency_key`, if it was sent, with the fingerprint of the request
/// (its op and parameters, under a key derived from the master key: a record never
/// holds a key, nor anything a key could be guessed from). Read before the op takes
/// its parameters. Reads ignore the member.
fn idempotency(app: &App, peer: &Peer, op: Op, req: &mut Request) -> Result<Option<Idem>> {
    if !op.writes() {
        return Ok(None);
    }
    let Some(key) = req.idempotency_key()? else {
        return Ok(None);
    };
    let mut text = req.parameters_text();
    let fingerprint = app.key.key_id(&Secret::new(std::mem::take(&mut *text)));
    Ok(Some(Idem {
        uid: peer.uid,
        key,
        fingerprint,
        ttl_s: app.config().server.idempotency_ttl_s,
        max_records: app.config().server.idempotency_max_records,
    }))
}

/// Runs one request for `peer`, leaving an audit line for writes and admin ops.
/// Authorisation is checked here, once, from the op itself: no arm order can let a
/// non-admin reach an admin op. The request is borrowed, not moved in, so that a
/// request's future holds it once (that future is moved into its allocation whole).
pub async fn dispatch(app: &App, peer: &Peer, op: Op, req: &mut Request) -> Result<Reply> {
    let outcome = if op.admin_only() && peer.role != Role::Admin {
        Err(Error::Forbidden(format!(
            "op `{}` needs an admin (access.admin_uids or access.admin_gids); uid {} gid {} is not one",
            op.name(),
            peer.uid,
            peer.gid
        )))
    } else {
        match idempotency(app, peer, op, req) {
            Ok(idem) => run(app, peer, op, req, idem).await,
            Err(e) => Err(e),
        }
    };
    if op.audited(|| app.config().log.audit_quota) {
        app.audit.record(peer, op.name(), &req.subject, &outcome);
    }
    outcome
}

/// An op's parameters, read from its request in the order the op checks them (the
/// first bad one is the one reported). Each op declares its own struct, so its
/// members are named by type, not by string.
trait Params: Sized {
    fn parse(req: &mut Request) -> Result<Self>;
}

/// Parses the parameters of the op `run` calls next, chosen by that op's signature.
fn parse<P: Params>(req: &mut Request) -> Result<P> {
    P::parse(req)
}

/// The lookups and quota calls (the hot path) run in place; the other ops' futures
/// are boxed, so that every request's future is as small as the largest hot op's,
/// not the largest op's (it is moved into its allocation whole, on every request).
/// `idem`: a write's idempotency key, when one was sent.
async fn run(
    app: &App,
    peer: &Peer,
    op: Op,
    req: &mut Request,
    idem: Option<Idem>,
) -> Result<Reply> {
    let read = match op {
        Op::SetUserApiKey => {
            return Box::pin(keys::set_user_api_key(app, parse(req)?, idem, peer)).await
        }
        Op::DeleteUserApiKey => {
            return Box::pin(keys::delete_user_api_key(app, parse(req)?, idem)).await
        }
        Op::AddPoolKey => {
            let params = parse(req)?;
            return Box::pin(pools::add_pool_key(app, params, idem, &mut req.subject)).await;
        }
        Op::RemovePoolKey => return Box::pin(pools::remove_pool_key(app, parse(req)?, idem)).await,
        Op::ReportKeyResult => {
            return Box::pin(health::report_key_result(app, parse(req)?, idem, peer)).await
        }
        Op::EnablePoolKey => {
            return Box::pin(health::enable_pool_key(app, parse(req)?, idem)).await
        }
        Op::IncrementDefaultKeyUsage => {
            return Box::pin(quota::increment_default_key_usage(app, parse(req)?, idem)).await
        }
        Op::ConsumeDefaultKeyUsage => {
            return quota::consume_default_key_usage(app, parse(req)?, idem).await
        }
        Op::Ping => admin::ping(),
        Op::Stats => Box::pin(admin::stats(app)).await,
        Op::Metrics => Box::pin(admin::metrics(app)).await,
        Op::Reload => Box::pin(admin::reload(app)).await,
        Op::GetUserApiKey => keys::get_user_api_key(app, parse(req)?).await,
        Op::GetGiteaCredentials => keys::get_gitea_credentials(app, parse(req)?).await,
        Op::ListUserApiKeys => Box::pin(keys::list_user_api_keys(app, parse(req)?)).await,
        Op::GetPoolApiKey => pools::get_pool_api_key(app, parse(req)?).await,
        Op::GetChannelPoolApiKey => pools::get_channel_pool_api_key(app, parse(req)?).await,
        Op::ListPoolKeys => Box::pin(pools::list_pool_keys(app, parse(req)?)).await,
        Op::CheckDefaultKeyLimit => quota::check_default_key_limit(app, parse(req)?).await,
        Op::MissingApiKeyError => messages::missing_api_key_error(app, parse(req)?),
        Op::DefaultKeyLimitError => messages::default_key_limit_error(parse(req)?),
        // Only parsed in debug builds with APIKEYD_TEST_HOOKS set (`Op::parse`).
        Op::DebugPanic => panic!("debug_panic requested (test hook)"),
    };
    read.map(Reply::from)
}

/// For `#[serde(skip_serializing_if)]` on `degraded`.
fn is_false(b: &bool) -> bool {
    !*b
}
