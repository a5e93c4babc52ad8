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
/// non-admin reach an admin op.
pub async fn dispatch(app: &App, peer: &Peer, op: Op, mut req: Request) -> Result<Body> {
    let outcome = if op.admin_only() && peer.role != Role::Admin {
        Err(Error::Forbidden(format!(
            "op `{}` needs an admin (access.admin_uids or access.admin_gids); uid {} gid {} is not one",
            op.name(),
            peer.uid,
            peer.gid
        )))
    } else {
        run(app, op, &mut req).await
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

async fn run(app: &App, op: Op, req: &mut Request) -> Result<Body> {
    match op {
        Op::Ping => admin::ping(),
        Op::Stats => admin::stats(app).await,
        Op::Metrics => admin::metrics(app).await,
        Op::Reload => admin::reload(app).await,
        Op::GetUserApiKey => keys::get_user_api_key(app, parse(req)?).await,
        Op::GetGiteaCredentials => keys::get_gitea_credentials(app, parse(req)?).await,
        Op::SetUserApiKey => keys::set_user_api_key(app, parse(req)?).await,
        Op::DeleteUserApiKey => keys::delete_user_api_key(app, parse(req)?).await,
        Op::ListUserApiKeys => keys::list_user_api_keys(app, parse(req)?).await,
        Op::GetPoolApiKey => pools::get_pool_api_key(app, parse(req)?).await,
        Op::GetChannelPoolApiKey => pools::get_channel_pool_api_key(app, parse(req)?).await,
        Op::AddPoolKey => pools::add_pool_key(app, parse(req)?, &mut req.subject).await,
        Op::RemovePoolKey => pools::remove_pool_key(app, parse(req)?).await,
        Op::ListPoolKeys => pools::list_pool_keys(app, parse(req)?).await,
        Op::ReportKeyResult => health::report_key_result(app, parse(req)?).await,
        Op::EnablePoolKey => health::enable_pool_key(app, parse(req)?).await,
        Op::CheckDefaultKeyLimit => quota::check_default_key_limit(app, parse(req)?).await,
        Op::IncrementDefaultKeyUsage => quota::increment_default_key_usage(app, parse(req)?).await,
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
