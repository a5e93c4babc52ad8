//! The tools and clients: check-config, import-legacy, rotate-master-key,
//! migrate-user-keys, keygen, call and metrics. Each loads its config (exit 2 when it
//! cannot), runs, and answers the process exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::load_config;
use crate::process::config::Config;

/// The config of tool `name`, or the exit code 2 after saying why it cannot be read.
fn tool_config(name: &str, explicit: Option<PathBuf>) -> Result<Config, ExitCode> {
    load_config(explicit).map_err(|e| {
        eprintln!("apikeyd {name}: {e}");
        ExitCode::from(2)
    })
}
use crate::keys::MasterKey;

/// `apikeyd migrate-user-keys`.
pub fn migrate_user_keys(
    config: Option<PathBuf>,
    to: crate::tools::migrate::Destination,
) -> ExitCode {
    let config = match tool_config("migrate-user-keys", config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match crate::tools::migrate::migrate(&config, to) {
        Ok(r) => {
            println!(
                "done: {} user keys moved, {} already there, {} left in clear (run import-legacy), {} unreadable, {} conflicts",
                r.moved, r.already_in_target, r.left_in_clear, r.unreadable, r.conflicts
            );
            if r.conflicts == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "apikeyd migrate-user-keys: {} keys differed between the keystore and redis (listed above as conflicts); \
                     no differing key was deleted",
                    r.conflicts
                );
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("apikeyd migrate-user-keys: {e}");
            ExitCode::from(1)
        }
    }
}

/// The socket of `call` and `metrics`: `--socket`/`$APIKEYD_SOCKET` without reading
/// any config (so a broken config does not stop a client), else the config's.
pub(super) fn client_socket(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
) -> Result<PathBuf, crate::process::config::ConfigError> {
    match socket {
        Some(s) => Ok(s),
        None => load_config(config).map(|c| c.server.socket),
    }
}

/// `apikeyd call`.
pub fn call(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    requests: Vec<String>,
    timeout_s: f64,
) -> ExitCode {
    let timeout = match timeout_s {
        0.0 => None,
        t if t.is_finite() && t > 0.0 => Some(std::time::Duration::from_secs_f64(t)),
        _ => {
            eprintln!("apikeyd call: --timeout must be a number of seconds, 0 or more");
            return ExitCode::from(2);
        }
    };
    match client_socket(socket, config) {
        Ok(socket) => ExitCode::from(crate::wire::client::call(&socket, requests, timeout) as u8),
        Err(e) => {
            eprintln!("apikeyd call: {e}");
            ExitCode::from(2)
        }
    }
}

/// `apikeyd metrics`.
pub fn metrics(socket: Option<PathBuf>, config: Option<PathBuf>) -> ExitCode {
    match client_socket(socket, config) {
        Ok(socket) => ExitCode::from(crate::wire::client::metrics(&socket) as u8),
        Err(e) => {
            eprintln!("apikeyd metrics: {e}");
            ExitCode::from(2)
        }
    }
}

/// `apikeyd check-config`: runs `serve`'s preflight without creating, binding or
/// changing anything and prints every finding. Exits as `serve` would: 0 it starts,
/// 1 it refuses, 2 the config itself is wrong (unreadable, not TOML, a bad value).
/// `as_user`: check permissions as that user sees them.
pub fn check_config(explicit: Option<PathBuf>, as_user: Option<String>) -> ExitCode {
    use crate::daemon::check::{Purpose, Severity, Viewer};
    let (path, must_exist) = match explicit {
        Some(p) => (p, true),
        None => (
            Config::default_path(),
            std::env::var_os("APIKEYD_CONFIG").is_some(),
        ),
    };
    let viewer = match as_user.as_deref().map(Viewer::user).transpose() {
        Ok(v) => v.unwrap_or_else(Viewer::current),
        Err(e) => {
            eprintln!("apikeyd check-config: --as-user: {e}");
            return ExitCode::from(2);
        }
    };
    let (config, config_problems) = match Config::load_all(&path, must_exist) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("problem: {e}");
            eprintln!("the config cannot be read: `apikeyd serve` would refuse to start (exit 2)");
            return ExitCode::from(2);
        }
    };
    if let Some(text) = crate::daemon::check::effective(&config) {
        println!(
            "# effective configuration of {} (secrets left out)",
            path.display()
        );
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    }
    if let Some(user) = &viewer.name {
        eprintln!("checking permissions as user {user} (uid {})", viewer.uid);
    }
    for problem in &config_problems {
        eprintln!("problem: {problem}");
    }
    let report = crate::daemon::check::preflight(&config, &viewer, Purpose::Check);
    for f in &report.findings {
        match f.severity {
            Severity::Problem => eprintln!("problem: {}", f.text),
            Severity::Warning => eprintln!("warning: {}", f.text),
        }
    }
    let problems = config_problems.len() + report.problems();
    if problems == 0 {
        eprintln!("config OK: `apikeyd serve` would start");
        return ExitCode::SUCCESS;
    }
    eprintln!("{problems} problem(s): `apikeyd serve` would refuse to start");
    ExitCode::from(if config_problems.is_empty() { 1 } else { 2 })
}

/// `apikeyd import-legacy`.
/// Exits 1 when any value in clear was skipped or refused.
pub fn import_legacy(
    config: Option<PathBuf>,
    dry_run: bool,
    accept_clear: Option<PathBuf>,
) -> ExitCode {
    let config = match tool_config("import-legacy", config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let accepted = match accept_clear
        .as_deref()
        .map(crate::tools::legacy::read_accepted)
    {
        None => Default::default(),
        Some(Ok(a)) => a,
        Some(Err(e)) => {
            eprintln!("apikeyd import-legacy: {e}");
            return ExitCode::from(1);
        }
    };
    match crate::tools::legacy::import(&config, dry_run, &accepted) {
        Ok(r) => {
            println!(
                "{}: {} user keys moved, {} already in the keystore, {} pool values encrypted, {} skipped, {} refused",
                if dry_run { "dry run" } else { "done" },
                r.user_keys_moved,
                r.user_keys_already_stored,
                r.pool_values_encrypted,
                r.skipped,
                r.refused
            );
            if r.complete() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "apikeyd import-legacy: {} values in clear were skipped or refused (see above); they stay as they are",
                    r.skipped + r.refused
                );
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("apikeyd import-legacy: {e}");
            ExitCode::from(1)
        }
    }
}

/// `apikeyd rotate-master-key`.
pub fn rotate(config: Option<PathBuf>, key_file: Option<PathBuf>, add_only: bool) -> ExitCode {
    let config = match tool_config("rotate-master-key", config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let key_file = key_file.unwrap_or_else(|| config.keystore.master_key_file.clone());
    let rotation = crate::tools::rotate::Rotation {
        config: &config,
        key_file: &key_file,
        add_only,
    };
    match crate::tools::rotate::rotate(rotation) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apikeyd rotate-master-key: {e}");
            ExitCode::from(1)
        }
    }
}

/// `apikeyd keygen`.
pub fn keygen(out: &Path) -> ExitCode {
    match MasterKey::create_file(out) {
        Ok(_) => {
            println!(
                "wrote a new master key to {} (mode 0600); back it up",
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("apikeyd keygen: {e}");
            ExitCode::from(1)
        }
    }
}
