//! Built-in display names and signup URLs, merged with `[services.*]` from the config.

use crate::process::config::Config;

/// (name, display name, signup URL) for services the daemon knows out of the box.
const BUILT_IN: &[(&str, &str, &str)] = &[
    ("openai", "OpenAI", "https://platform.openai.com/api-keys"),
    (
        "anthropic",
        "Anthropic",
        "https://console.anthropic.com/settings/keys",
    ),
    (
        "gemini",
        "Google Gemini",
        "https://aistudio.google.com/app/apikey",
    ),
    (
        "mistral",
        "Mistral AI",
        "https://console.mistral.ai/api-keys",
    ),
    ("groq", "Groq", "https://console.groq.com/keys"),
    ("openrouter", "OpenRouter", "https://openrouter.ai/keys"),
    (
        "deepseek",
        "DeepSeek",
        "https://platform.deepseek.com/api_keys",
    ),
    ("xai", "xAI", "https://console.x.ai"),
    ("cohere", "Cohere", "https://dashboard.cohere.com/api-keys"),
    (
        "perplexity",
        "Perplexity",
        "https://www.perplexity.ai/settings/api",
    ),
    (
        "together",
        "Together AI",
        "https://api.together.ai/settings/api-keys",
    ),
    (
        "fireworks",
        "Fireworks AI",
        "https://fireworks.ai/account/api-keys",
    ),
    (
        "huggingface",
        "Hugging Face",
        "https://huggingface.co/settings/tokens",
    ),
    (
        "replicate",
        "Replicate",
        "https://replicate.com/account/api-tokens",
    ),
    (
        "elevenlabs",
        "ElevenLabs",
        "https://elevenlabs.io/app/settings/api-keys",
    ),
    ("serpapi", "SerpApi", "https://serpapi.com/manage-api-key"),
    (
        "brave",
        "Brave Search",
        "https://api-dashboard.search.brave.com/app/keys",
    ),
    ("tavily", "Tavily", "https://app.tavily.com/home"),
    ("exa", "Exa", "https://dashboard.exa.ai/api-keys"),
    ("github", "GitHub", "https://github.com/settings/tokens"),
    ("gitea", "Gitea", ""),
    (
        "wolframalpha",
        "Wolfram|Alpha",
        "https://developer.wolframalpha.com/access",
    ),
    (
        "openweathermap",
        "OpenWeatherMap",
        "https://home.openweathermap.org/api_keys",
    ),
];

/// What the daemon knows about one service after merging config over the built-ins.
pub struct ServiceInfo {
    pub display_name: String,
    pub signup_url: Option<String>,
    /// The environment variable holding the operator's default key.
    pub env: String,
    pub base_url: Option<String>,
}

/// Looks up `service` (already validated and lower-cased).
pub fn info(config: &Config, service: &str) -> ServiceInfo {
    let built_in = BUILT_IN.iter().find(|(n, _, _)| *n == service);
    let over = config.services.get(service);
    let non_empty = |s: &Option<String>| s.clone().filter(|v| !v.is_empty());
    ServiceInfo {
        display_name: over
            .and_then(|o| non_empty(&o.display_name))
            .or_else(|| built_in.map(|b| b.1.to_string()))
            .unwrap_or_else(|| service.to_string()),
        signup_url: over
            .and_then(|o| non_empty(&o.signup_url))
            .or_else(|| built_in.map(|b| b.2.to_string()).filter(|u| !u.is_empty())),
        env: over
            .and_then(|o| non_empty(&o.env))
            .unwrap_or_else(|| default_env(service)),
        base_url: over.and_then(|o| non_empty(&o.base_url)),
    }
}

/// `<SERVICE>_API_KEY`, upper-cased, with `.` and `-` as `_`.
pub fn default_env(service: &str) -> String {
    let mut s: String = service
        .chars()
        .map(|c| match c {
            '.' | '-' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    s.push_str("_API_KEY");
    s
}

/// The operator's default key from the environment (an empty variable counts as
/// unset), else from the systemd credential of the same name.
pub fn env_default(config: &Config, service: &str) -> Option<crate::keys::Secret> {
    let var = info(config, service).env;
    let from_env = std::env::var(&var)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty());
    from_env
        .or_else(|| credential(&var))
        .map(crate::keys::Secret::new)
}

/// A systemd credential named like the variable (`LoadCredential=OPENAI_API_KEY:…`),
/// read from `$CREDENTIALS_DIRECTORY` when the variable itself is unset or empty.
fn credential(var: &str) -> Option<String> {
    if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(std::path::Path::new(&dir).join(var)).ok()?,
    );
    Some(text.trim().to_string()).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        assert_eq!(default_env("openai"), "OPENAI_API_KEY");
        assert_eq!(default_env("my.svc-x"), "MY_SVC_X_API_KEY");
    }

    #[test]
    fn config_overrides_and_adds() {
        let c = Config::parse(
            "[services.openai]\ndisplay_name = \"OAI\"\n[services.acme]\nsignup_url = \"https://acme\"",
        )
        .unwrap();
        let o = info(&c, "openai");
        assert_eq!(o.display_name, "OAI");
        assert_eq!(
            o.signup_url.as_deref(),
            Some("https://platform.openai.com/api-keys")
        );
        let a = info(&c, "acme");
        assert_eq!(a.display_name, "acme");
        assert_eq!(a.signup_url.as_deref(), Some("https://acme"));
        assert!(info(&c, "unknown").signup_url.is_none());
    }
}
