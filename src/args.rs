//! The definition of the `apikeyd` command line, and the man page and completion
//! scripts made from it. Shared by the binary (`apikeyd man`, `apikeyd completions`)
//! and by build.rs, which writes them for the Debian package: so they cannot drift
//! from the binary. Only clap and std here.

use std::io::Write;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "apikeyd",
    version,
    about = "Hands API keys to local processes over a Unix socket",
    long_about = "Hands API keys to local processes over a Unix socket speaking JSON lines.\n\
                  Operators' guide: operations.md; wire protocol: protocol.md (in \
                  /usr/share/doc/apikeyd when installed from the package, else docs/)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Exit codes of `apikeyd call` (also in docs/operations.md).
const CALL_EXIT_CODES: &str = "Exit codes: 0 every request got an ok answer; 1 any error \
answer (including too_large and forbidden); 2 a request got no answer: the daemon could \
not be reached (no socket, no permission), closed the connection without answering, or \
did not answer within --timeout. So `apikeyd call '{\"op\":\"ping\"}'` is a health check.";

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        /// Config file (default: $APIKEYD_CONFIG, else ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run `serve`'s own start-up checks (config values, access names, paths and
    /// permissions, the socket, the lock, the master key against the keystore and
    /// the fleet, Redis with its TLS, credentials and Sentinel) without creating,
    /// binding or changing anything; print every problem and warning and the
    /// effective configuration without secrets. Exit 0 when `serve` would start, 1
    /// when it would refuse, 2 when the config itself is wrong.
    CheckConfig {
        /// Config file (default: $APIKEYD_CONFIG, else ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Check permissions as this user (the service's `User=`) would see them.
        #[arg(long, value_name = "NAME")]
        as_user: Option<String>,
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
        /// Seconds to wait for an answer to an outstanding request before giving up
        /// with exit code 2 (0: wait for as long as it takes).
        #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
        timeout: f64,
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
    /// Store per-user keys given as JSON lines {"user_id", "service", "key"} (from
    /// FILE, or stdin) through the running daemon, which validates and seals each.
    /// Prints one line per entry refused or skipped (never the key); exit 0 when all
    /// were stored, 1 when any was refused or skipped, 2 when the daemon or the
    /// input could not be used. Safe to rerun.
    ImportKeys {
        /// The daemon's socket (default: $APIKEYD_SOCKET, else server.socket of the config).
        #[arg(long, env = "APIKEYD_SOCKET")]
        socket: Option<PathBuf>,
        /// Config file to find the socket in (default: $APIKEYD_CONFIG, else ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// JSON-lines file to read (default: stdin).
        file: Option<PathBuf>,
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
pub enum MigrateTo {
    /// Sealed in `{prefix}:user_api_keys:{user_id}`, shared by the fleet.
    Redis,
    /// This daemon's SQLite keystore.
    Local,
}

/// The sections of the man page that are not in the command line's definition.
/// Each is (title, paragraphs); a paragraph starting with `item:` is a tagged item
/// (`item:TAG|text`).
const MAN_SECTIONS: &[(&str, &[&str])] = &[
    (
        "EXIT STATUS",
        &[
            "item:serve|0 after a clean shutdown; 1 when the start is refused (one line \
             on stderr says why); 2 for an unreadable or invalid config.",
            "item:check-config|serve's own: 0 when serve would start with this config; \
             1 when it would refuse (every problem listed on stderr); 2 when the config \
             itself is wrong (unreadable, not TOML, a bad value).",
            "item:call, metrics|0 only when every request got an ok answer; 1 when an \
             answer was an error; 2 when a request got no answer (the daemon could not be \
             reached, closed the connection, or did not answer within --timeout).",
            "item:other commands|0 on success; 1 when the work failed (each is safe to \
             rerun); 2 for an unreadable or invalid config.",
            "item:usage errors|2 (an unknown option or a missing argument).",
        ],
    ),
    (
        "FILES",
        &[
            "item:/etc/apikeyd/config.toml|the config of the packaged service (the \
             default for a command without --config is ./config.toml).",
            "item:/etc/apikeyd/master.key|the master key (base64 of 32 bytes, mode \
             0600), handed to the service as the systemd credential master.key. Back it \
             up apart from the keystore.",
            "item:/var/lib/apikeyd/keystore.sqlite3|the keystore: per-user keys sealed \
             with the master key (and, in embedded mode, pools and quotas); \
             keystore.sqlite3.lock beside it names the daemon holding it.",
            "item:/var/lib/apikeyd/audit.jsonl|the audit log (log.audit_file), rotated by \
             /etc/logrotate.d/apikeyd.",
            "item:/run/apikeyd/apikeyd.sock|the socket clients connect to (from \
             apikeyd.socket, mode 0660 apikeyd:apikeyd).",
            "item:/usr/lib/systemd/system/apikeyd.service, apikeyd.socket|the units.",
            "item:/usr/share/doc/apikeyd/|operations.md (the operator's guide), \
             protocol.md (the wire protocol), security.md, python.md; \
             examples/alerts.yml (Prometheus alert rules).",
        ],
    ),
    (
        "SIGNALS",
        &[
            "item:SIGTERM, SIGINT|stop accepting, answer every request already read (up \
             to 10 s), remove the socket file, exit 0.",
            "item:SIGHUP|reload: re-read the config file and the master keyring without \
             dropping connections, and reopen log.audit_file. A config or keyring that \
             does not load is refused and everything running stays as it was. The admin \
             op reload does the same (systemctl reload apikeyd sends SIGHUP).",
        ],
    ),
    (
        "ENVIRONMENT",
        &[
            "item:APIKEYD_CONFIG|the config file when --config is not given (then it \
             must exist).",
            "item:APIKEYD_SOCKET|the socket of call and metrics when --socket is not \
             given; the config is then not read.",
            "item:<SERVICE>_API_KEY|the operator's default key for a service (e.g. \
             OPENAI_API_KEY; services.<name>.env names another variable).",
            "item:CREDENTIALS_DIRECTORY|set by systemd: master.key, redis.password and \
             <SERVICE>_API_KEY are read from there when present.",
            "item:LISTEN_FDS, LISTEN_PID, NOTIFY_SOCKET, WATCHDOG_USEC|set by systemd: \
             the socket of apikeyd.socket, and readiness and watchdog notification.",
        ],
    ),
    (
        "SEE ALSO",
        &[
            "systemctl(1), journalctl(1), systemd.socket(5), and the guides in \
           /usr/share/doc/apikeyd/ (docs/ in the source).",
        ],
    ),
];

/// Writes the manual page (roff): the command line's own sections, every command
/// with its synopsis and options (all in this one page), then exit status, files,
/// signals and environment.
pub fn man_page(w: &mut dyn Write) -> std::io::Result<()> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    writeln!(w, ".SH COMMANDS")?;
    for sub in cmd.get_subcommands() {
        let page = clap_mangen::Man::new(sub.clone());
        let mut text = Vec::new();
        page.render_synopsis_section(&mut text)?;
        page.render_description_section(&mut text)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            page.render_options_section(&mut text)?;
        }
        let mut extra = Vec::new();
        if sub.get_after_help().is_some() {
            page.render_extra_section(&mut extra)?;
        }
        // One subsection per command: its own section headings become paragraphs.
        writeln!(w, ".SS \"apikeyd {}\"", sub.get_name())?;
        for line in String::from_utf8_lossy(&text)
            .lines()
            .chain(String::from_utf8_lossy(&extra).lines())
        {
            if line.starts_with(".SH") {
                writeln!(w, ".PP")?;
            } else {
                writeln!(w, "{line}")?;
            }
        }
    }
    for (title, paragraphs) in MAN_SECTIONS {
        writeln!(w, ".SH \"{title}\"")?;
        for p in *paragraphs {
            match p.strip_prefix("item:").and_then(|i| i.split_once('|')) {
                Some((tag, text)) => writeln!(w, ".TP\n\\fB{}\\fR\n{}", roff(tag), roff(text))?,
                None => writeln!(w, ".PP\n{}", roff(p))?,
            }
        }
    }
    man.render_version_section(w)
}

/// Escapes text for roff: backslashes, and a leading dot or quote.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// Writes the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell, w: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "apikeyd", w);
}
