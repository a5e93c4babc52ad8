//! The `apikeyd` command line: serve, check-config, call, metrics, keygen, rotation,
//! import, completions and the man page. Nothing else lives here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::mpsc;

use apikeyd::config::{Config, LogFormat};

/// mimalloc: the hot path allocates small, short-lived buffers per request, where
/// glibc malloc cost about a fifth of the daemon's time (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use apikeyd::crypto::MasterKey;
use apikeyd::Control;

#[derive(Parser)]
#[command(
    name = "apikeyd",
    version,
    about = "Hands API keys to local processes over a Unix socket",
    long_about = "Hands API keys to local processes over a Unix socket speaking JSON lines.\n\
                  Operators' guide: docs/operations.md; wire protocol: docs/protocol.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Exit codes of `apikeyd call` (also in docs/operations.md).
const CALL_EXIT_CODES: &str = "Exit codes: 0 every response was ok; 1 any error answer \
(including too_large and forbidden); 2 the daemon could not be reached (no socket, \
no permission, connection closed early).";

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// Config file (default: $APIKEYD_CONFIG, else ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check a config as `serve` would (TOML, values, paths and permissions, master
    /// key, Redis, access names) without binding the socket; print the effective
    /// configuration without secrets. Exit 0 when `serve` would start, 1 otherwise.
    CheckConfig {
        /// Config file (default: $APIKEYD_CONFIG, else ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Send JSON request lines (arguments, or stdin when none) and print the responses.
    #[command(after_help = CALL_EXIT_CODES)]
    Call {
        /// The daemon's socket (default: $APIKEYD_SOCKET, else server.socket of the
        /// config). With it the config is not read at all.
        #[arg(long, env = "APIKEYD_SOCKET")]
        socket: Option<PathBuf>,
        /// Config file to find the socket in (default: $APIKEYD_CONFIG, else ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Requests, one JSON object each.
        requests: Vec<String>,
    },
    /// Print the daemon's metrics in the Prometheus text format (for node_exporter's
    /// textfile collector), read over the socket.
    Metrics {
        /// The daemon's socket (default: $APIKEYD_SOCKET, else server.socket of the config).
        #[arg(long, env = "APIKEYD_SOCKET")]
        socket: Option<PathBuf>,
        /// Config file to find the socket in (default: $APIKEYD_CONFIG, else ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Seal the original module's per-user keys left in clear in Redis (in place, or
    /// into the keystore with keystore.user_keys = "local") and encrypt pool values
    /// left in clear. Idempotent; safe to interrupt and rerun.
    ImportLegacy {
        /// Config file (default: $APIKEYD_CONFIG, else ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Only print what would be done.
        #[arg(long)]
        dry_run: bool,
    },
    /// Add a master-key version, re-seal every stored key under it (keystore, and
    /// Redis in Redis mode) and retire the old versions, while the daemon serves.
    /// Safe to interrupt; rerun to carry on.
    RotateMasterKey {
        /// Config file (default: $APIKEYD_CONFIG, else ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The key file to rotate (default: keystore.master_key_file).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Only add the new version and reload the local daemon (for several daemons
        /// sharing one Redis: distribute the file, reload them all, then rerun).
        #[arg(long)]
        add_only: bool,
    },
    /// Move every per-user key between this daemon's keystore and Redis (for
    /// `keystore.user_keys`). Idempotent; safe to interrupt and rerun; prints counts.
    MigrateUserKeys {
        /// Config file (default: $APIKEYD_CONFIG, else ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the keys go.
        #[arg(long, value_enum)]
        to: MigrateTo,
    },
    /// Write a new random master key file (mode 0600); refuses to overwrite.
    Keygen {
        /// Where to write the key file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a shell completion script to stdout (e.g. `apikeyd completions bash >
    /// /usr/share/bash-completion/completions/apikeyd`).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to stdout (e.g. `apikeyd man > /usr/local/share/man/man1/apikeyd.1`).
    Man,
}

/// `migrate-user-keys --to`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum MigrateTo {
    /// Sealed in `{prefix}:user_api_keys:{user_id}`, shared by the fleet.
    Redis,
    /// This daemon's SQLite keystore.
    Local,
}

fn migrate_user_keys(config: Option<PathBuf>, to: MigrateTo) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("apikeyd migrate-user-keys: {e}");
            return ExitCode::from(2);
        }
    };
    let to = match to {
        MigrateTo::Redis => apikeyd::migrate::Destination::Redis,
        MigrateTo::Local => apikeyd::migrate::Destination::Local,
    };
    match apikeyd::migrate::migrate(&config, to) {
        Ok(r) => {
            println!(
                "done: {} user keys moved, {} already there, {} left in clear (run import-legacy), {} unreadable",
                r.moved, r.already_in_target, r.left_in_clear, r.unreadable
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("apikeyd migrate-user-keys: {e}");
            ExitCode::from(1)
        }
    }
}

/// The config named on the command line (must exist), else the default (may be absent).
fn load_config(explicit: Option<PathBuf>) -> Result<Config, String> {
    let (path, must_exist) = match explicit {
        Some(p) => (p, true),
        None => (
            Config::default_path(),
            std::env::var_os("APIKEYD_CONFIG").is_some(),
        ),
    };
    Config::load(&path, must_exist).map_err(|e| e.0)
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        // Every value is escaped: ids, field names and hash names come from clients
        // and from Redis, and a raw newline in one would forge a log line.
        LogFormat::Text => builder
            .fmt_fields(apikeyd::logfmt::escaping_fields())
            .init(),
    }
}

/// Logs why the start is refused and returns exit code 1. Goes to stderr directly
/// when the log filter would drop it, so a refusal is never silent.
fn refuse(why: impl std::fmt::Display) -> ExitCode {
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!("refusing to start: {why}");
    } else {
        eprintln!("apikeyd: refusing to start: {why}");
    }
    ExitCode::from(1)
}

fn serve(explicit: Option<PathBuf>) -> ExitCode {
    let mut config = match load_config(explicit) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("apikeyd: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    match apikeyd::hardening::raise_open_files() {
        Ok(limit) => {
            if let Some(wanted) = config.fit_connections(limit) {
                tracing::warn!(
                    "server.max_connections = {wanted} does not fit under the open-file limit ({limit}); \
                     using {}. Raise LimitNOFILE= (systemd) or ulimit -n",
                    config.server.max_connections
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
    if let Err(e) = apikeyd::hardening::forbid_dumps() {
        return refuse(format!("cannot disable core dumps: {e}"));
    }
    // Everything else that can refuse a start, before the socket is bound.
    if let Err(e) = apikeyd::preflight(&config) {
        return refuse(e);
    }
    if config.cache.lock_memory {
        match apikeyd::hardening::lock_memory() {
            Ok(()) => tracing::info!("memory locked (cache.lock_memory)"),
            Err(e) => tracing::warn!(
                "cache.lock_memory is set but memory cannot be locked ({e}); raise RLIMIT_MEMLOCK (LimitMEMLOCK= under systemd)"
            ),
        }
    }
    let system = actix_rt::System::new();
    let code = system.block_on(async move {
        if let Err(e) = apikeyd::server::check_socket_path(&config) {
            tracing::error!("refusing to start: {e}");
            return ExitCode::from(1);
        }
        let opened = match apikeyd::open_keystore(&config) {
            Ok(o) => o,
            Err(e) => return refuse(e),
        };
        let socket = config.server.socket.clone();
        // Under socket activation systemd owns the socket file; otherwise we bind it.
        let passed = match apikeyd::systemd::passed_listener() {
            Ok(p) => p,
            Err(e) => return refuse(format!("bad socket from systemd: {e}")),
        };
        let metrics = match apikeyd::metrics::bind(Some(&config.metrics.listen)) {
            Ok(m) => m,
            Err(e) => return refuse(e),
        };
        let activated = passed.is_some();
        let bound = match passed {
            Some(l) => tokio::net::UnixListener::from_std(l),
            None => apikeyd::server::bind(&socket, config.socket_mode()),
        };
        let listener = match bound {
            Ok(l) => l,
            Err(e) => return refuse(format!("cannot bind {}: {e}", socket.display())),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if let Err(e) = watch_signals(tx) {
            return refuse(format!("cannot install signal handlers: {e}"));
        }
        if activated {
            tracing::info!("listening on the socket passed by systemd");
        } else {
            tracing::info!(socket = %socket.display(), "listening");
        }
        let outcome = apikeyd::run(config, opened, listener, rx, metrics).await;
        if !activated {
            if let Err(e) = std::fs::remove_file(&socket) {
                tracing::warn!(error = %e, "cannot remove the socket file");
            }
        }
        if let Err(e) = outcome {
            return refuse(e);
        }
        tracing::info!("stopped");
        ExitCode::SUCCESS
    });
    code
}

/// SIGHUP reloads the config and keyring; SIGTERM and SIGINT stop the daemon.
fn watch_signals(tx: mpsc::UnboundedSender<Control>) -> std::io::Result<()> {
    let mut signals = signal_hook_tokio::Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    actix_rt::spawn(async move {
        while let Some(sig) = signals.next().await {
            let control = if sig == SIGHUP {
                Control::Reload
            } else {
                tracing::info!(signal = sig, "shutting down");
                Control::Shutdown
            };
            if tx.send(control).is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// The socket of `call` and `metrics`: `--socket`/`$APIKEYD_SOCKET` without reading
/// any config (so a broken config does not stop a client), else the config's.
fn client_socket(socket: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, String> {
    match socket {
        Some(s) => Ok(s),
        None => load_config(config).map(|c| c.server.socket),
    }
}

fn call(socket: Option<PathBuf>, config: Option<PathBuf>, requests: Vec<String>) -> ExitCode {
    match client_socket(socket, config) {
        Ok(socket) => ExitCode::from(apikeyd::client::call(&socket, requests) as u8),
        Err(e) => {
            eprintln!("apikeyd call: {e}");
            ExitCode::from(2)
        }
    }
}

fn metrics(socket: Option<PathBuf>, config: Option<PathBuf>) -> ExitCode {
    match client_socket(socket, config) {
        Ok(socket) => ExitCode::from(apikeyd::client::metrics(&socket) as u8),
        Err(e) => {
            eprintln!("apikeyd metrics: {e}");
            ExitCode::from(2)
        }
    }
}

fn check_config(explicit: Option<PathBuf>) -> ExitCode {
    let (path, must_exist) = match explicit {
        Some(p) => (p, true),
        None => (
            Config::default_path(),
            std::env::var_os("APIKEYD_CONFIG").is_some(),
        ),
    };
    let report = apikeyd::check::check(&path, must_exist);
    if let Some(text) = &report.effective {
        println!(
            "# effective configuration of {} (secrets left out)",
            path.display()
        );
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    }
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    for problem in &report.problems {
        eprintln!("problem: {problem}");
    }
    if report.problems.is_empty() {
        eprintln!("config OK: `apikeyd serve` would start");
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{} problem(s): `apikeyd serve` would refuse to start",
            report.problems.len()
        );
        ExitCode::from(1)
    }
}

fn import_legacy(config: Option<PathBuf>, dry_run: bool) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("apikeyd import-legacy: {e}");
            return ExitCode::from(2);
        }
    };
    match apikeyd::legacy::import(&config, dry_run) {
        Ok(r) => {
            println!(
                "{}: {} user keys moved, {} already in the keystore, {} pool values encrypted, {} skipped",
                if dry_run { "dry run" } else { "done" },
                r.user_keys_moved,
                r.user_keys_already_stored,
                r.pool_values_encrypted,
                r.skipped
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("apikeyd import-legacy: {e}");
            ExitCode::from(1)
        }
    }
}

fn rotate(config: Option<PathBuf>, key_file: Option<PathBuf>, add_only: bool) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("apikeyd rotate-master-key: {e}");
            return ExitCode::from(2);
        }
    };
    let key_file = key_file.unwrap_or_else(|| config.keystore.master_key_file.clone());
    let rotation = apikeyd::rotate::Rotation {
        config: &config,
        key_file: &key_file,
        add_only,
    };
    match apikeyd::rotate::rotate(rotation) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apikeyd rotate-master-key: {e}");
            ExitCode::from(1)
        }
    }
}

fn keygen(out: &Path) -> ExitCode {
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

fn main() -> ExitCode {
    // Everything this process creates (keystore, WAL, key files, audit file) is
    // private to its user; the socket gets server.socket_mode explicitly.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    match Cli::parse().command {
        Command::Serve { config } => serve(config),
        Command::Call {
            socket,
            config,
            requests,
        } => call(socket, config, requests),
        Command::ImportLegacy { config, dry_run } => import_legacy(config, dry_run),
        Command::MigrateUserKeys { config, to } => migrate_user_keys(config, to),
        Command::RotateMasterKey {
            config,
            key_file,
            add_only,
        } => rotate(config, key_file, add_only),
        Command::Keygen { out } => keygen(&out),
        Command::CheckConfig { config } => check_config(config),
        Command::Metrics { socket, config } => metrics(socket, config),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "apikeyd", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("apikeyd man: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every subcommand and every option has a description in `--help`.
    #[test]
    fn everything_has_help() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for sub in cli.get_subcommands() {
            assert!(
                sub.get_about().is_some(),
                "{} has no description",
                sub.get_name()
            );
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_help().is_some(),
                    "{} --{id} has no description",
                    sub.get_name()
                );
            }
        }
    }
}
