//! The ops of SPEC §3, one file per family. Each op has the same shape: its
//! parameters are parsed from the request into the op's own struct (`Params`), the
//! op asks the actors, and encodes its result.

mod admin;
mod health;
mod keys;
mod messages;
mod pools;
mod quota;

use crate::access::{Peer, Role};
use crate::app::App;
use crate::error::{Error, Result};
use crate::op::Op;
use crate::protocol::{Body, Request};

pub use messages::missing_key_message;

/// Runs one request for `peer`, leaving an audit line for writes and admin ops.
/// Authorisation is checked here, once, from the op itself: no arm order can let a
/// non-admin reach an admin op. The request is borrowed, not moved in, so that a
/// request's future holds it once (that future is moved into its allocation whole).
pub async fn dispatch(app: &App, peer: &Peer, op: Op, req: &mut Request) -> Result<Body> {
    let outcome = if op.admin_only() && peer.role != Role::Admin {
        Err(Error::Forbidden(format!(
            "op `{}` needs an admin (access.admin_uids or access.admin_gids); uid {} gid {} is not one",
            op.name(),
            peer.uid,
            peer.gid
        )))
    } else {
        run(app, peer, op, req).await
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
async fn run(app: &App, peer: &Peer, op: Op, req: &mut Request) -> Result<Body> {
    match op {
        Op::Ping => admin::ping(),
        Op::Stats => Box::pin(admin::stats(app)).await,
        Op::Metrics => Box::pin(admin::metrics(app)).await,
        Op::Reload => Box::pin(admin::reload(app)).await,
        Op::GetUserApiKey => keys::get_user_api_key(app, parse(req)?).await,
        Op::GetGiteaCredentials => keys::get_gitea_credentials(app, parse(req)?).await,
        Op::SetUserApiKey => Box::pin(keys::set_user_api_key(app, parse(req)?, peer)).await,
        Op::DeleteUserApiKey => Box::pin(keys::delete_user_api_key(app, parse(req)?)).await,
        Op::ListUserApiKeys => Box::pin(keys::list_user_api_keys(app, parse(req)?)).await,
        Op::GetPoolApiKey => pools::get_pool_api_key(app, parse(req)?).await,
        Op::GetChannelPoolApiKey => pools::get_channel_pool_api_key(app, parse(req)?).await,
        Op::AddPoolKey => {
            let params = parse(req)?;
            Box::pin(pools::add_pool_key(app, params, &mut req.subject)).await
        }
        Op::RemovePoolKey => Box::pin(pools::remove_pool_key(app, parse(req)?)).await,
        Op::ListPoolKeys => Box::pin(pools::list_pool_keys(app, parse(req)?)).await,
        Op::ReportKeyResult => Box::pin(health::report_key_result(app, parse(req)?, peer)).await,
        Op::EnablePoolKey => Box::pin(health::enable_pool_key(app, parse(req)?)).await,
        Op::CheckDefaultKeyLimit => quota::check_default_key_limit(app, parse(req)?).await,
        Op::IncrementDefaultKeyUsage => {
            Box::pin(quota::increment_default_key_usage(app, parse(req)?)).await
        }
        Op::ConsumeDefaultKeyUsage => quota::consume_default_key_usage(app, parse(req)?).await,
        Op::MissingApiKeyError => messages::missing_api_key_error(app, parse(req)?),
        Op::DefaultKeyLimitError => messages::default_key_limit_error(parse(req)?),
        // Only parsed in debug builds with APIKEYD_TEST_HOOKS set (`Op::parse`).
        Op::DebugPanic => panic!("debug_panic requested (test hook)"),
    }
}

/// For `#[serde(skip_serializing_if)]` on `degraded`.
fn is_false(b: &bool) -> bool {
    !*b
}
