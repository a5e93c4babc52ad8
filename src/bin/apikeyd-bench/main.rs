//! `apikeyd-bench`: the load generator, a binary of its own so the daemon links none
//! of it. Throughput and latency percentiles of the daemon, and of redis-server under
//! the same load pattern with `--redis` (docs/performance.md); `--populate` stores
//! bench keys first, `--plot` draws a latency-vs-throughput chart.

mod load;
mod plot;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use apikeyd::process::config::Config;
use load::{Load, RedisCommand, Report, Target};

#[derive(Parser)]
#[command(
    name = "apikeyd-bench",
    version,
    about = "Load generator: throughput and latency percentiles of apikeyd, and of \
             redis-server under the same load pattern with --redis (docs/performance.md)"
)]
struct Args {
    /// The daemon's socket (default: server.socket of the config).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Config file (to find the socket, and the keystore for --populate; default:
    /// $APIKEYD_CONFIG, else ./config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Connections to the server under test (all on one thread, closed-loop or
    /// paced).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests written per round trip on each connection.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Seconds measured (after --warmup).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds run before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Offered load in requests/s over all connections (default: as fast as it goes).
    #[arg(long)]
    rate: Option<f64>,
    /// Preset load: get (cached user keys), pool (a pool key), pool-cooling (a pool key
    /// from a pool where half the keys cool down), check, consume, mix.
    #[arg(long, default_value = "get")]
    preset: String,
    /// Request line templates instead of a preset; `{N}` becomes a key index.
    #[arg(long)]
    op: Vec<String>,
    /// Spread `{N}` over this many keys (user_ids bench-0 … bench-<keys - 1>).
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// First store --keys user keys straight into the keystore (and Redis hashes with
    /// --redis); with --duration 0, only that (the daemon need not run).
    #[arg(long)]
    populate: bool,
    /// Also run the same pattern against redis-server at this Unix socket.
    #[arg(long)]
    redis: Option<PathBuf>,
    /// What redis-server runs: hget, or consume (EVALSHA of the daemon's consume script).
    #[arg(long, default_value = "hget")]
    redis_cmd: String,
    /// Give every daemon request its own `idempotency_key` (unique to the run), to
    /// measure what recording it costs.
    #[arg(long)]
    idempotency: bool,
    /// A process serving the daemon's requests whose CPU time is measured during
    /// the daemon's runs: the daemon, and in Redis mode also its redis-server
    /// (repeat the option). A closed-loop run where none reached 90% of a core is
    /// marked CLIENT-BOUND.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// The pid of the redis-server at --redis, whose CPU time is measured during its
    /// own runs (default: the process_id it reports in INFO).
    #[arg(long)]
    redis_pid: Option<u32>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also write the JSON reports to this file (the text is printed as usual).
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Sweep the offered load and write a latency-vs-throughput chart to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// The request templates of a preset (`{n}` = key index).
fn templates(preset: &str) -> Result<Vec<String>, String> {
    let get = r#"{"op":"get_user_api_key","user_id":"bench-{n}","service":"openai"}"#;
    let pool = r#"{"op":"get_user_api_key","user_id":"nokey-{n}","service":"benchpool","fallback_to_config":false}"#;
    let cooling = r#"{"op":"get_user_api_key","user_id":"nokey-{n}","service":"benchcool","fallback_to_config":false}"#;
    let check = r#"{"op":"check_default_key_limit","user_id":"bench-{n}","tool_name":"t"}"#;
    let consume = r#"{"op":"consume_default_key_usage","user_id":"bench-{n}","tool_name":"t","daily_limit":1000000000}"#;
    Ok(match preset {
        "get" => vec![get.into()],
        "pool" => vec![pool.into()],
        "pool-cooling" => vec![cooling.into()],
        "check" => vec![check.into()],
        "consume" => vec![consume.into()],
        "mix" => vec![
            get.into(),
            get.into(),
            pool.into(),
            check.into(),
            consume.into(),
        ],
        other => {
            return Err(format!(
                "unknown preset {other:?}: get, pool, pool-cooling, check, consume or mix"
            ))
        }
    })
}

/// Everything `main` does; the error is printed as `apikeyd-bench: …`.
fn bench(a: Args) -> Result<(), String> {
    if a.populate && a.config.is_none() {
        return Err("--populate needs --config".into());
    }
    let config = if a.populate || a.socket.is_none() || a.config.is_some() {
        // As `apikeyd serve` reads it: a config named by --config or $APIKEYD_CONFIG
        // must exist, ./config.toml may be absent (then the defaults apply).
        let must_exist = a.config.is_some() || std::env::var_os("APIKEYD_CONFIG").is_some();
        let path = a.config.clone().unwrap_or_else(Config::default_path);
        Some(Config::load(&path, must_exist).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let socket = match (&a.socket, &config) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => c.server.socket.clone(),
        (None, None) => return Err("--socket or --config is needed".into()),
    };
    let templates = if a.op.is_empty() {
        templates(&a.preset)?
    } else {
        a.op.clone()
    };
    if let (true, Some(c)) = (a.populate, &config) {
        setup::populate_keystore(c, a.keys)?;
        if let Some(r) = &a.redis {
            setup::populate_redis(r, a.keys)?;
        }
        eprintln!("stored {} bench keys", a.keys);
        if a.duration <= 0.0 {
            return Ok(());
        }
    }
    if templates.iter().any(|t| t.contains("benchpool")) {
        setup::pool(&socket)?;
    }
    if templates.iter().any(|t| t.contains("benchcool")) {
        setup::cooling_pool(&socket)?;
    }
    let load = Load {
        connections: a.connections.max(1),
        pipeline: a.pipeline.max(1),
        duration: Duration::from_secs_f64(a.duration),
        warmup: Duration::from_secs_f64(a.warmup),
        rate: a.rate,
        keys: a.keys.max(1),
    };
    if a.idempotency && templates.iter().any(|t| !t.trim_end().ends_with('}')) {
        return Err("--idempotency needs request templates that are JSON objects".into());
    }
    let mut targets = vec![(
        Target::Apikeyd {
            socket,
            templates,
            idempotency: a.idempotency,
        },
        a.server_pids.clone(),
    )];
    if let Some(r) = &a.redis {
        let command = match a.redis_cmd.as_str() {
            "hget" => RedisCommand::Hget,
            "consume" => RedisCommand::Consume,
            other => return Err(format!("unknown --redis-cmd {other:?}: hget or consume")),
        };
        let pid = match a.redis_pid {
            Some(p) => p,
            None => load::redis_pid(r).map_err(|e| format!("{}: {e}", r.display()))?,
        };
        targets.push((
            Target::Redis {
                socket: r.clone(),
                command,
            },
            vec![pid],
        ));
    }
    // Per target: the closed-loop run, and the paced runs of the sweep.
    let mut runs: Vec<(Report, Vec<Report>)> = Vec::new();
    for (target, pids) in &targets {
        let requests = load::requests(target, load.keys).map_err(|e| e.to_string())?;
        let first = load::run(target, &requests, &load, pids).map_err(|e| e.to_string())?;
        if !a.json {
            println!("{}", first.line());
        }
        let mut sweep = Vec::new();
        if a.plot.is_some() {
            // From 5% to half of this target's own maximum; beyond that a paced
            // run measures queueing more than the server (docs/performance.md).
            for share in [0.05, 0.1, 0.2, 0.3, 0.4, 0.5] {
                let paced = Load {
                    rate: Some(first.rps * share),
                    ..load.clone()
                };
                let r = load::run(target, &requests, &paced, pids).map_err(|e| e.to_string())?;
                if !a.json {
                    println!("{}  (offered {:.0} req/s)", r.line(), first.rps * share);
                }
                sweep.push(r);
            }
        }
        runs.push((first, sweep));
    }
    if let Some(path) = &a.plot {
        let series: Vec<plot::Series> = runs
            .iter()
            .map(|(first, sweep)| plot::Series {
                name: if first.target == "redis" {
                    "redis-server"
                } else {
                    "apikeyd"
                },
                paced: sweep,
                closed_loop: first,
            })
            .collect();
        plot::chart(path, &series).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    // Each target's paced runs, then its closed-loop run, as before the split.
    let reports: Vec<&Report> = runs
        .iter()
        .flat_map(|(first, sweep)| sweep.iter().chain(std::iter::once(first)))
        .collect();
    let json = serde_json::to_string_pretty(&reports).map_err(|e| e.to_string())?;
    if a.json {
        println!("{json}");
    }
    if let Some(path) = &a.json_out {
        std::fs::write(path, json + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match bench(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apikeyd-bench: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every option has a description in `--help`.
    #[test]
    fn everything_has_help() {
        let cmd = Args::command();
        cmd.clone().debug_assert();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" {
                assert!(arg.get_help().is_some(), "--{id} has no description");
            }
        }
    }

    #[test]
    fn every_preset_has_templates() {
        for preset in ["get", "pool", "pool-cooling", "check", "consume", "mix"] {
            assert!(!templates(preset).unwrap().is_empty(), "{preset}");
        }
        assert!(templates("nope").is_err());
    }
}
