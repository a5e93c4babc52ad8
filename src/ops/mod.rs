//! The ops of SPEC §3, one file per family. Each op takes the parsed request, checks
//! its parameters, asks the actors, and encodes its result.

mod admin;
mod health;
mod keys;
mod messages;
mod pools;
mod quota;

use crate::access::{Peer, Role};
use crate::app::App;
use crate::error::{Error, Result};
use crate::protocol::{Body, Request};

pub use messages::missing_key_message;

/// Runs one request for `peer`, leaving an audit line for writes and admin ops.
pub async fn dispatch(app: &App, peer: &Peer, mut req: Request) -> Result<Body> {
    let op = std::mem::take(&mut req.op);
    let outcome = run(app, peer, &op, &mut req).await;
    if crate::audit::audited(&op, || app.config().log.audit_quota) {
        app.audit.record(peer, &op, &req.subject, &outcome);
    }
    outcome
}

async fn run(app: &App, peer: &Peer, op: &str, req: &mut Request) -> Result<Body> {
    match op {
        "ping" => admin::ping(),
        "stats" => admin::stats(app).await,
        "metrics" => admin::metrics(app).await,
        "get_user_api_key" => keys::get_user_api_key(app, req).await,
        "get_gitea_credentials" => keys::get_gitea_credentials(app, req).await,
        "set_user_api_key" => keys::set_user_api_key(app, req).await,
        "delete_user_api_key" => keys::delete_user_api_key(app, req).await,
        "list_user_api_keys" => keys::list_user_api_keys(app, req).await,
        "get_pool_api_key" => pools::get_pool_api_key(app, req).await,
        "get_channel_pool_api_key" => pools::get_channel_pool_api_key(app, req).await,
        "report_key_result" => health::report_key_result(app, req).await,
        _ if admin_only(op) && peer.role != Role::Admin => Err(Error::Forbidden(format!(
            "op `{op}` needs an admin (access.admin_uids or access.admin_gids); uid {} gid {} is not one",
            peer.uid, peer.gid
        ))),
        "reload" => admin::reload(app).await,
        "add_pool_key" => pools::add_pool_key(app, req).await,
        "remove_pool_key" => pools::remove_pool_key(app, req).await,
        "list_pool_keys" => pools::list_pool_keys(app, req).await,
        "enable_pool_key" => health::enable_pool_key(app, req).await,
        "check_default_key_limit" => quota::check_default_key_limit(app, req).await,
        "increment_default_key_usage" => quota::increment_default_key_usage(app, req).await,
        "consume_default_key_usage" => quota::consume_default_key_usage(app, req).await,
        "missing_api_key_error" => messages::missing_api_key_error(app, req),
        "default_key_limit_error" => messages::default_key_limit_error(req),
        #[cfg(debug_assertions)]
        "debug_panic" if std::env::var_os("APIKEYD_TEST_HOOKS").is_some() => {
            panic!("debug_panic requested (test hook)")
        }
        _ => Err(Error::UnknownOp(looks_like_op(op).then(|| op.to_string()))),
    }
}

/// Whether `op` is for admins only (SPEC §5: pool management; apikeyd adds `reload`
/// and `enable_pool_key`).
pub fn admin_only(op: &str) -> bool {
    matches!(
        op,
        "add_pool_key" | "remove_pool_key" | "list_pool_keys" | "enable_pool_key" | "reload"
    )
}

/// Whether `op` has the shape of an op name (safe to echo and log).
pub fn looks_like_op(op: &str) -> bool {
    (1..=40).contains(&op.len()) && op.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// Whether `op` changes stored state. A connection's requests after a write wait for
/// it, and a write waits for the requests before it, so pipelined clients read their
/// own writes.
pub fn is_write(op: &str) -> bool {
    matches!(
        op,
        "set_user_api_key"
            | "delete_user_api_key"
            | "add_pool_key"
            | "remove_pool_key"
            | "report_key_result"
            | "enable_pool_key"
            | "increment_default_key_usage"
            | "consume_default_key_usage"
    )
}

/// For `#[serde(skip_serializing_if)]` on `degraded`.
fn is_false(b: &bool) -> bool {
    !*b
}
