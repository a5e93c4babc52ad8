//! `apikeyd serve`: logging, hardening, every check that can refuse a start before
//! the socket is bound, the signals, then the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::mpsc;

use super::load_config;
use crate::process::config::{Config, LogFormat};
use crate::Control;

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
            .fmt_fields(crate::process::logfmt::escaping_fields())
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

/// `apikeyd serve`: everything that can refuse a start, then the daemon until a
/// signal stops it.
pub fn serve(explicit: Option<PathBuf>) -> ExitCode {
    let mut config = match load_config(explicit) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("apikeyd: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    match crate::process::hardening::raise_open_files() {
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
    if let Err(e) = crate::process::hardening::forbid_dumps() {
        return refuse(format!("cannot disable core dumps: {e}"));
    }
    // Everything else that can refuse a start, before anything is created or bound.
    let redis_answered = match crate::preflight(&config) {
        Ok(r) => r,
        Err(e) => return refuse(e),
    };
    if config.cache.lock_memory {
        match crate::process::hardening::lock_memory() {
            Ok(()) => tracing::info!("memory locked (cache.lock_memory)"),
            Err(e) => tracing::warn!(
                "cache.lock_memory is set but memory cannot be locked ({e}); raise RLIMIT_MEMLOCK (LimitMEMLOCK= under systemd)"
            ),
        }
    }
    let system = actix_rt::System::new();
    let (code, refused) = system.block_on(async move {
        // What binds comes first; what creates files (keystore, master key) next;
        // the actors last, once the socket is bound, so that a refusal leaves
        // nothing running and nothing behind.
        // Under socket activation systemd owns the socket file; otherwise we bind it.
        let passed = match crate::process::systemd::passed_listener() {
            Ok(p) => p,
            Err(e) => return (refuse(format!("bad socket from systemd: {e}")), true),
        };
        let metrics = match crate::process::metrics::bind(Some(&config.metrics.listen)) {
            Ok(m) => m,
            Err(e) => return (refuse(e), true),
        };
        let opened = match crate::open_keystore(&config, redis_answered) {
            Ok(o) => o,
            Err(e) => return (refuse(e), true),
        };
        let socket = config.server.socket.clone();
        let activated = passed.is_some();
        let bound = match passed {
            Some(l) => tokio::net::UnixListener::from_std(l),
            None => crate::front::server::bind(&socket, config.socket_mode()),
        };
        let listener = match bound {
            Ok(l) => l,
            Err(e) => {
                return (
                    refuse(format!("cannot bind {}: {e}", socket.display())),
                    true,
                )
            }
        };
        let remove_socket = || {
            if !activated {
                if let Err(e) = std::fs::remove_file(&socket) {
                    tracing::warn!(error = %e, "cannot remove the socket file");
                }
            }
        };
        let started = match crate::start(config, opened) {
            Ok(s) => s,
            Err(e) => {
                remove_socket();
                return (refuse(e), true);
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if let Err(e) = watch_signals(tx) {
            remove_socket();
            return (refuse(format!("cannot install signal handlers: {e}")), true);
        }
        if activated {
            tracing::info!("listening on the socket passed by systemd");
        } else {
            tracing::info!(socket = %socket.display(), "listening");
        }
        let outcome = crate::run(started, listener, rx, metrics).await;
        remove_socket();
        if let Err(e) = outcome {
            return (refuse(e), true);
        }
        tracing::info!("stopped");
        (ExitCode::SUCCESS, false)
    });
    if refused {
        // Actors built for a start that was then refused never ran; tearing their
        // runtime down would run their start-up outside it. The process ends now.
        std::mem::forget(system);
    }
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
