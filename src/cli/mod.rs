//! The bodies of the `apikeyd` subcommands, so the binary's `main.rs` is only the
//! command line: `serve` (logging, signals, the start-up order), the tools (rotate,
//! import, migrate, keygen, check-config) and the clients (`call`, `metrics`,
//! `import-keys`).

mod import_keys;
mod serve;
mod tools;

pub use import_keys::import_keys;
pub use serve::serve;
pub use tools::*;

use std::path::PathBuf;

use crate::process::config::{Config, ConfigError};

/// The config named on the command line (must exist), else the default (may be absent).
pub fn load_config(explicit: Option<PathBuf>) -> Result<Config, ConfigError> {
    let (path, must_exist) = match explicit {
        Some(p) => (p, true),
        None => (
            Config::default_path(),
            std::env::var_os("APIKEYD_CONFIG").is_some(),
        ),
    };
    Config::load(&path, must_exist)
}
