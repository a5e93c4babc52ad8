//! The requests of a run, encoded once before it starts (JSON lines for the daemon,
//! RESP for redis-server), and the batches cut from them.

use super::*;

pub(super) fn fill(template: &str, n: usize) -> String {
    // `{N}` too: clap turns a literal `{n}` in help text into a line break, so the
    // help documents `{N}`.
    let n = n.to_string();
    template.replace("{n}", &n).replace("{N}", &n)
}

/// Every request of a run, encoded once before it starts, so that both servers are
/// sent bytes the same way: request (t, n) is template (or command) t for key n,
/// ready to be copied into a connection's batch buffer.
pub struct Requests {
    pub(super) bytes: Vec<u8>,
    /// End of request i = t * keys + n in `bytes`.
    pub(super) ends: Vec<usize>,
    pub(super) keys: usize,
    pub(super) templates: usize,
}

impl Requests {
    pub(super) fn new(keys: usize) -> Self {
        Requests {
            bytes: Vec::new(),
            ends: Vec::new(),
            keys,
            templates: 0,
        }
    }

    /// JSON lines for the daemon: each template for each key, newline-terminated.
    pub fn apikeyd(templates: &[String], keys: usize) -> Requests {
        let mut r = Requests::new(keys);
        for t in templates {
            for n in 0..keys {
                r.bytes.extend_from_slice(fill(t, n).as_bytes());
                r.bytes.push(b'\n');
                r.ends.push(r.bytes.len());
            }
        }
        r.templates = templates.len();
        r
    }

    /// RESP arrays for redis-server: `HGET bench:{n} openai`, or the consume script's
    /// EVALSHA for `bench:usage:{n}` (`sha` is the loaded script's).
    pub fn redis(command: RedisCommand, sha: &str, keys: usize) -> Requests {
        let mut r = Requests::new(keys);
        let expiry = (apikeyd::model::clock::now_s() + 86_400).to_string();
        for n in 0..keys {
            match command {
                RedisCommand::Hget => {
                    resp_command(&mut r.bytes, &["HGET", &format!("bench:{n}"), "openai"]);
                }
                RedisCommand::Consume => resp_command(
                    &mut r.bytes,
                    &[
                        "EVALSHA",
                        sha,
                        "1",
                        &format!("bench:usage:{n}"),
                        "t",
                        &expiry,
                        "1000000000",
                    ],
                ),
            }
            r.ends.push(r.bytes.len());
        }
        r.templates = 1;
        r
    }

    pub(super) fn get(&self, t: usize, n: usize) -> &[u8] {
        let i = t * self.keys + n;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

/// Appends `args` to `out` as one RESP command (an array of bulk strings).
pub(super) fn resp_command(out: &mut Vec<u8>, args: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends the next `load.pipeline` requests to `out`, advancing the key index `n`
/// and the template index `t`. With `unique` (the daemon's JSON lines only), each
/// request gets its own `idempotency_key`: `unique.0` (this run and connection)
/// followed by the counter `unique.1`.
pub(super) fn next_batch_bytes(
    requests: &Requests,
    load: &Load,
    n: &mut usize,
    t: &mut usize,
    mut unique: Option<(&str, &mut u64)>,
    out: &mut Vec<u8>,
) {
    use std::io::Write;
    for _ in 0..load.pipeline {
        *n = (*n + 1) % requests.keys;
        *t = (*t + 1) % requests.templates;
        let request = requests.get(*t, *n);
        match unique.as_mut() {
            // `{...}\n` becomes `{...,"idempotency_key":"<prefix>-<count>"}\n`.
            Some((prefix, count)) if request.ends_with(b"}\n") => {
                out.extend_from_slice(&request[..request.len() - 2]);
                let _ = write!(out, r#","idempotency_key":"{prefix}-{count}"}}"#);
                out.push(b'\n');
                **count += 1;
            }
            _ => out.extend_from_slice(request),
        }
    }
}

/// The requests of `target`, encoded once for every run against it (`keys` keys).
/// For the consume script, loads it into redis-server first (the `redis` crate is
/// used for that set-up only, never on the measured path).
pub fn requests(target: &Target, keys: usize) -> std::io::Result<std::rc::Rc<Requests>> {
    let keys = keys.max(1);
    Ok(std::rc::Rc::new(match target {
        Target::Apikeyd { templates, .. } => Requests::apikeyd(templates, keys),
        Target::Redis { socket, command } => {
            let sha = match command {
                RedisCommand::Hget => String::new(),
                RedisCommand::Consume => {
                    let client = redis::Client::open(format!("redis+unix://{}", socket.display()))
                        .map_err(std::io::Error::other)?;
                    let mut con = client.get_connection().map_err(std::io::Error::other)?;
                    redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(apikeyd::store::redis::CONSUME_SCRIPT)
                        .query(&mut con)
                        .map_err(std::io::Error::other)?
                }
            };
            Requests::redis(*command, &sha, keys)
        }
    }))
}
