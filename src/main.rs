//! The `apikeyd` command line: serve, check-config, call, metrics, keygen, rotation,
//! import, completions and the man page. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use apikeyd::cli;

/// mimalloc: the hot path allocates small, short-lived buffers per request, where
/// glibc malloc cost about a fifth of the daemon's time (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// After the cut-over (the first import), values in clear are refused as
        /// possible injections; import those this file names, one `--dry-run`
        /// `accept-clear:` line each, reviewed by you.
        #[arg(long, value_name = "FILE")]
        accept_clear: Option<PathBuf>,
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

fn main() -> ExitCode {
    // Everything this process creates (keystore, WAL, key files, audit file) is
    // private to its user; the socket gets server.socket_mode explicitly.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    match Cli::parse().command {
        Command::Serve { config } => cli::serve(config),
        Command::Call {
            socket,
            config,
            requests,
        } => cli::call(socket, config, requests),
        Command::ImportLegacy {
            config,
            dry_run,
            accept_clear,
        } => cli::import_legacy(config, dry_run, accept_clear),
        Command::MigrateUserKeys { config, to } => cli::migrate_user_keys(
            config,
            match to {
                MigrateTo::Redis => apikeyd::migrate::Destination::Redis,
                MigrateTo::Local => apikeyd::migrate::Destination::Local,
            },
        ),
        Command::RotateMasterKey {
            config,
            key_file,
            add_only,
        } => cli::rotate(config, key_file, add_only),
        Command::Keygen { out } => cli::keygen(&out),
        Command::CheckConfig { config } => cli::check_config(config),
        Command::Metrics { socket, config } => cli::metrics(socket, config),
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
