//! The human messages: `missing_api_key_error` and `default_key_limit_error`.

use serde::Serialize;

use super::Params;
use crate::error::Result;
use crate::ops::app::App;
use crate::ops::services;
use crate::process::config::Config;
use crate::wire::protocol::{body, Body, Request};

#[derive(Serialize)]
struct Message {
    message: String,
}

/// The text that tells a user how to get and store a key for `service`.
pub fn missing_key_message(config: &Config, service: &str) -> String {
    let info = services::info(config, service);
    let fix = format!("set_user_api_key {service} <your-key>");
    match info.signup_url {
        Some(url) => format!(
            "No API key for {} is available to you. Get one at {url}, then run: {fix}",
            info.display_name
        ),
        None => format!(
            "No API key for {} is available to you. Get a key from {}, then run: {fix}",
            info.display_name, info.display_name
        ),
    }
}

/// The text for a user when every pool key for `service` is cooling down: when to
/// retry, not how to get a key.
pub fn cooling_message(config: &Config, service: &str, retry_after_s: u64) -> String {
    let info = services::info(config, service);
    format!(
        "Every shared {} key is cooling down after rate limits or errors; retry in {retry_after_s} s.",
        info.display_name
    )
}

/// The warning for a user whose own key for `service` was reported unauthorized.
pub fn rejected_key_warning(config: &Config, service: &str) -> String {
    let info = services::info(config, service);
    format!(
        "Your own {} key was rejected by the provider (unauthorized), so it is not used. \
         Store a working one with: set_user_api_key {service} <your-key>",
        info.display_name
    )
}

/// The text of an answer without a key while a store was skipped (Redis down): the
/// user should retry, not go and get a key they may not need.
pub fn unavailable_key_message(config: &Config, service: &str) -> String {
    let info = services::info(config, service);
    format!(
        "Keys for {} are temporarily unavailable (a key store cannot be reached right now); retry in a moment.",
        info.display_name
    )
}

/// The parameters of `missing_api_key_error`.
pub(super) struct ForService {
    service: String,
}

impl Params for ForService {
    fn parse(req: &mut Request) -> Result<Self> {
        Ok(ForService {
            service: req.service()?,
        })
    }
}

/// The parameters of `default_key_limit_error`.
pub(super) struct LimitReached {
    tool: String,
    current: u64,
    limit: u64,
    service: Option<String>,
}

impl Params for LimitReached {
    fn parse(req: &mut Request) -> Result<Self> {
        Ok(LimitReached {
            tool: req.tool_name()?,
            current: req.current()?,
            limit: req.limit()?,
            service: match req.has_service() {
                true => Some(req.service()?),
                false => None,
            },
        })
    }
}

/// `{"op":"missing_api_key_error","service":"openai"}` →
/// `{"message":"No API key for OpenAI is available to you. Get one at https://platform.openai.com/api-keys, then run: set_user_api_key openai <your-key>"}`
pub fn missing_api_key_error(app: &App, p: ForService) -> Result<Body> {
    let ForService { service } = p;
    body(&Message {
        message: missing_key_message(&app.config(), &service),
    })
}

/// `{"op":"default_key_limit_error","tool_name":"web_search","current":20,"limit":20,"service":"serpapi"}` →
/// `{"message":"You have used web_search 20 times today on the operator's key; the daily limit is 20. ..."}`;
/// `service` is optional and, when given, is filled into the command.
pub fn default_key_limit_error(p: LimitReached) -> Result<Body> {
    let LimitReached {
        tool,
        current,
        limit,
        service,
    } = p;
    let lift = match service {
        Some(service) => {
            format!("To lift it, set your own key with: set_user_api_key {service} <your-key>.")
        }
        None => "To lift it, set your own key for that service with set_user_api_key.".into(),
    };
    body(&Message {
        message: format!(
            "You have used {tool} {current} times today on the operator's key; the daily limit is {limit}. \
             The limit resets at 00:00 UTC. {lift}"
        ),
    })
}
