//! The `apikeyd` command line: serve, check-config, call, metrics, keygen, rotation,
//! import, completions and the man page. Nothing else lives here.

use std::process::ExitCode;

use clap::Parser;

use apikeyd::cli;

// The command line's definition, shared with build.rs (man page, completions).
mod args;
use args::{Cli, Command, MigrateTo};

/// mimalloc: the hot path allocates small, short-lived buffers per request, where
/// glibc malloc cost about a fifth of the daemon's time (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Everything this process creates (keystore, WAL, key files, audit file) is
    // private to its user; the socket gets server.socket_mode explicitly.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    match Cli::parse().command {
        Command::Serve { config } => cli::serve(config),
        Command::Call {
            socket,
            config,
            timeout,
            requests,
        } => cli::call(socket, config, requests, timeout),
        Command::ImportLegacy {
            config,
            dry_run,
            accept_clear,
        } => cli::import_legacy(config, dry_run, accept_clear),
        Command::ImportKeys {
            socket,
            config,
            file,
        } => cli::import_keys(socket, config, file),
        Command::MigrateUserKeys { config, to } => cli::migrate_user_keys(
            config,
            match to {
                MigrateTo::Redis => apikeyd::tools::migrate::Destination::Redis,
                MigrateTo::Local => apikeyd::tools::migrate::Destination::Local,
            },
        ),
        Command::RotateMasterKey {
            config,
            key_file,
            add_only,
        } => cli::rotate(config, key_file, add_only),
        Command::Keygen { out } => cli::keygen(&out),
        Command::CheckConfig { config, as_user } => cli::check_config(config, as_user),
        Command::Metrics { socket, config } => cli::metrics(socket, config),
        Command::Completions { shell } => {
            args::completions(shell, &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => match args::man_page(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("apikeyd man: {e}");
                ExitCode::from(1)
            }
        },
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
