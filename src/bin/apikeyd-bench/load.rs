//! The load itself: closed-loop (as fast as it goes) or paced runs against the daemon,
//! and against redis-server with the same load pattern, so both figures come from one
//! tool in one run. Latency is recorded in an HDR histogram from each request's
//! intended send time (so a stalled server cannot hide its queueing delay).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// What to run, from the command line.
#[derive(Clone)]
pub struct Load {
    /// Connections to the server under test.
    pub connections: usize,
    /// Requests written per round trip on each connection.
    pub pipeline: usize,
    /// Time measured, after the warm-up.
    pub duration: Duration,
    /// Time run before measuring.
    pub warmup: Duration,
    /// Requests per second over all connections; `None` = as fast as possible.
    pub rate: Option<f64>,
    /// Spread `{n}` in templates over 0..keys.
    pub keys: usize,
}

/// Where to send it.
#[derive(Clone)]
pub enum Target {
    /// apikeyd at this socket, with request-line templates (`{n}` = key index).
    Apikeyd {
        socket: PathBuf,
        templates: Vec<String>,
        /// A unique `idempotency_key` in every request.
        idempotency: bool,
    },
    /// redis-server at this socket: `HGET bench:{n} openai`, or the consume script.
    Redis {
        socket: PathBuf,
        command: RedisCommand,
    },
}

/// The Redis side's command.
#[derive(Clone, Copy)]
pub enum RedisCommand {
    /// `HGET bench:{n} openai`, the counterpart of a cached key.
    Hget,
    /// EVALSHA of the same consume script the daemon runs.
    Consume,
}

/// One run's figures.
#[derive(Serialize, Clone)]
pub struct Report {
    /// `apikeyd` or `redis`.
    pub target: String,
    /// Connections used.
    pub connections: usize,
    /// Requests per round trip.
    pub pipeline: usize,
    /// The paced rate offered, `None` for a closed-loop run.
    pub offered_rps: Option<f64>,
    /// Requests answered while measuring.
    pub requests: u64,
    /// Answers that were errors.
    pub errors: u64,
    /// Seconds measured.
    pub seconds: f64,
    /// Requests answered per second.
    pub rps: f64,
    /// Median latency (µs); every latency counts from the request's intended send time.
    pub p50_us: f64,
    /// 90th percentile (µs).
    pub p90_us: f64,
    /// 99th percentile (µs).
    pub p99_us: f64,
    /// 99.9th percentile (µs).
    pub p999_us: f64,
    /// Maximum (µs).
    pub max_us: f64,
    /// Paced runs: how late the pacer itself sent (µs after the intended send time,
    /// median and p99), a part of every latency above that the server had no hand in.
    pub pacer_late_p50_us: Option<f64>,
    pub pacer_late_p99_us: Option<f64>,
    /// Each server process's CPU over the measured window (from /proc/PID/stat),
    /// empty when no pid was given.
    pub cpu: Vec<ProcessCpu>,
    /// The server's CPU time per request (µs): the sum over `cpu`.
    pub cpu_us_per_request: Option<f64>,
    /// This load generator's own CPU share over the measured window (1.0 = a core).
    pub client_cpu_share: Option<f64>,
    /// Closed-loop runs with a server pid: whether a server process used at least
    /// 90% of a core. `false` = the figure is client-bound (or latency-bound) and
    /// says nothing about the server's maximum; compare CPU per request instead.
    pub saturated: Option<bool>,
}

/// One server process's CPU over a run's measured window.
#[derive(Serialize, Clone)]
pub struct ProcessCpu {
    pub pid: u32,
    /// Its command name (`apikeyd`, `redis-server`).
    pub name: String,
    /// utime + stime over wall time (1.0 = one core).
    pub share: f64,
    /// utime + stime per request answered (µs).
    pub us_per_request: f64,
}

/// A server is saturated from this share of a core on.
pub const SATURATED: f64 = 0.9;

impl Report {
    /// One human line.
    pub fn line(&self) -> String {
        format!(
            "{:<9} conns {:>3} pipeline {:>3} {:>10.0} req/s  p50 {:>7.1} µs  p90 {:>7.1}  p99 {:>7.1}  p99.9 {:>7.1}  max {:>8.1}  errors {}",
            self.target, self.connections, self.pipeline, self.rps, self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us, self.errors
        ) + &self
            .pacer_late_p50_us
            .zip(self.pacer_late_p99_us)
            .map(|(p50, p99)| format!("  pacer late p50 {p50:.1} p99 {p99:.1} µs"))
            .unwrap_or_default()
            + &self.cpu_line()
    }

    /// `  cpu apikeyd 94% 4.7 µs/req + redis-server 35% 1.8 µs/req = 6.5 µs/req  client 61%`,
    /// and `CLIENT-BOUND` for a closed-loop run where no server was saturated.
    fn cpu_line(&self) -> String {
        let mut out = String::new();
        if !self.cpu.is_empty() {
            let each: Vec<String> = self
                .cpu
                .iter()
                .map(|c| {
                    format!(
                        "{} {:.0}% {:.2} µs/req",
                        c.name,
                        c.share * 100.0,
                        c.us_per_request
                    )
                })
                .collect();
            out += &format!("  cpu {}", each.join(" + "));
            if let (true, Some(total)) = (self.cpu.len() > 1, self.cpu_us_per_request) {
                out += &format!(" = {total:.2} µs/req");
            }
        }
        if let Some(c) = self.client_cpu_share {
            out += &format!("  client {:.0}%", c * 100.0);
        }
        if self.saturated == Some(false) {
            out += "  CLIENT-BOUND";
        }
        out
    }
}

/// What connections measured: requests answered after the warm-up, errors, and
/// their latencies.
struct Tally {
    done: u64,
    errors: u64,
    hist: Histogram<u64>,
    /// Paced runs: how late each batch went out.
    late: Histogram<u64>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            done: 0,
            errors: 0,
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            late: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        }
    }

    /// A paced batch meant to go out at `intended` is being sent just now.
    fn sent(&mut self, intended: Instant, measure_from: Instant) {
        if intended >= measure_from {
            let _ = self
                .late
                .record(intended.elapsed().as_micros().max(1) as u64);
        }
    }

    /// A batch of `pipeline` requests meant to go out at `intended` and answered just
    /// now; counted only once the warm-up is over.
    fn batch(&mut self, pipeline: usize, intended: Instant, measure_from: Instant) {
        if intended >= measure_from {
            self.done += pipeline as u64;
            let us = intended.elapsed().as_micros().max(1) as u64;
            let _ = self.hist.record_n(us, pipeline as u64);
        }
    }

    fn merge(&mut self, other: Tally) -> std::io::Result<()> {
        self.done += other.done;
        self.errors += other.errors;
        self.late.add(other.late).map_err(std::io::Error::other)?;
        self.hist.add(other.hist).map_err(std::io::Error::other)
    }
}

fn fill(template: &str, n: usize) -> String {
    // `{N}` too: clap turns a literal `{n}` in help text into a line break, so the
    // help documents `{N}`.
    let n = n.to_string();
    template.replace("{n}", &n).replace("{N}", &n)
}

/// Every request of a run, encoded once before it starts, so that both servers are
/// sent bytes the same way: request (t, n) is template (or command) t for key n,
/// ready to be copied into a connection's batch buffer.
pub struct Requests {
    bytes: Vec<u8>,
    /// End of request i = t * keys + n in `bytes`.
    ends: Vec<usize>,
    keys: usize,
    templates: usize,
}

impl Requests {
    fn new(keys: usize) -> Self {
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

    fn get(&self, t: usize, n: usize) -> &[u8] {
        let i = t * self.keys + n;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

/// Appends `args` to `out` as one RESP command (an array of bulk strings).
fn resp_command(out: &mut Vec<u8>, args: &[&str]) {
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
fn next_batch_bytes(
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

/// How answers are framed, and what counts as an error answer.
#[derive(Clone, Copy)]
enum Framing {
    /// The daemon's JSON lines; an answer without `"ok":true` is an error.
    JsonLines,
    /// RESP; an error reply (`-…`) is an error.
    Resp,
}

/// Reads one answer; `Ok(false)` when it is an error answer. `line` is scratch space.
async fn read_answer<R: tokio::io::AsyncBufRead + Unpin>(
    framing: Framing,
    rd: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let closed = || std::io::Error::other("the server closed the connection");
    match framing {
        Framing::JsonLines => {
            line.clear();
            if rd.read_until(b'\n', line).await? == 0 {
                return Err(closed());
            }
            Ok(memchr::memmem::find(line, br#""ok":true"#).is_some())
        }
        Framing::Resp => {
            // A minimal RESP reader: simple strings, errors, integers, bulk strings
            // (skipped, not copied) and arrays of those.
            let mut ok = true;
            let mut pending = 1usize;
            while pending > 0 {
                pending -= 1;
                line.clear();
                if rd.read_until(b'\n', line).await? == 0 {
                    return Err(closed());
                }
                let len = || -> i64 {
                    std::str::from_utf8(&line[1..])
                        .ok()
                        .and_then(|s| s.trim_end().parse().ok())
                        .unwrap_or(-1)
                };
                match line.first() {
                    Some(b'-') => ok = false,
                    Some(b'*') => pending += len().max(0) as usize,
                    Some(b'$') => {
                        let n = len();
                        if n >= 0 {
                            let mut left = n as usize + 2;
                            while left > 0 {
                                let got = rd.fill_buf().await?;
                                if got.is_empty() {
                                    return Err(closed());
                                }
                                let k = got.len().min(left);
                                rd.consume(k);
                                left -= k;
                            }
                        }
                    }
                    Some(b'+' | b':' | b'_' | b'#' | b',') => {}
                    _ => return Err(std::io::Error::other("not a RESP reply")),
                }
            }
            Ok(ok)
        }
    }
}

/// One connection, as fast as it goes or paced; answers (requests done, errors,
/// latencies). The same loop for both servers: one write of a pre-encoded batch,
/// then its answers read on the same buffered reader.
async fn drive(
    target: Target,
    requests: std::rc::Rc<Requests>,
    load: Load,
    index: usize,
    start: Instant,
) -> std::io::Result<Tally> {
    let mut tally = Tally::new();
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    let mut pacer = Pacer::new(&load, index, start)?;
    let mut n = index.wrapping_mul(7919) % requests.keys;
    let mut t = index % requests.templates;
    let (socket, framing, unique) = match &target {
        Target::Apikeyd {
            socket,
            idempotency,
            ..
        } => (
            socket,
            Framing::JsonLines,
            idempotency.then(|| format!("{}-{index}", run_id())),
        ),
        Target::Redis { socket, .. } => (socket, Framing::Resp, None),
    };
    let mut count = 0u64;
    // Tokio framing rather than `apikeyd::wire::client` or the `redis` crate: every
    // connection of a run shares this one thread, so the load takes one core and
    // leaves the other to the server under test.
    let stream = UnixStream::connect(socket).await?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut batch = Vec::new();
    let mut line = Vec::new();
    while let Some(intended) = next_batch(&mut pacer, &mut tally, measure_from, end).await? {
        batch.clear();
        let unique = unique.as_deref().map(|p| (p, &mut count));
        next_batch_bytes(&requests, &load, &mut n, &mut t, unique, &mut batch);
        wr.write_all(&batch).await?;
        for _ in 0..load.pipeline {
            if !read_answer(framing, &mut rd, &mut line).await? {
                tally.errors += 1;
            }
        }
        tally.batch(load.pipeline, intended, measure_from);
    }
    Ok(tally)
}

/// Unique to this process and moment: idempotency keys of one run never repeat
/// those of an earlier run (which the daemon would replay).
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("b{}-{nanos}", std::process::id())
}

/// When a paced connection sends: on a fixed schedule, its connections' send times
/// spread over one interval. The wait is a timerfd (nanosecond resolution; tokio's
/// own timer has millisecond steps), so every connection of a paced run shares one
/// thread like a closed-loop run: one waking thread instead of one per connection,
/// which on two cores made the pacer itself late (docs/performance.md).
struct Pacer {
    delay: tokio_timerfd::Delay,
    next: Instant,
    interval: Duration,
}

impl Pacer {
    fn new(load: &Load, index: usize, start: Instant) -> std::io::Result<Option<Pacer>> {
        let Some(rate) = load.rate else {
            return Ok(None);
        };
        let interval =
            Duration::from_secs_f64(load.pipeline as f64 * load.connections as f64 / rate.max(1.0));
        let next = start + interval.mul_f64(index as f64 / load.connections as f64);
        Ok(Some(Pacer {
            delay: tokio_timerfd::Delay::new(next)?,
            next,
            interval,
        }))
    }

    /// Waits for the next send time and answers it (the intended send time that
    /// latency counts from, so any lateness of the pacer is charged, not hidden).
    async fn wait(&mut self, tally: &mut Tally, measure_from: Instant) -> std::io::Result<Instant> {
        self.delay.reset(self.next);
        (&mut self.delay).await?;
        tally.sent(self.next, measure_from);
        let intended = self.next;
        self.next += self.interval;
        Ok(intended)
    }
}

/// The intended send time of the next batch, `None` once the run is over: now for a
/// closed-loop run, the pacer's next time for a paced one.
async fn next_batch(
    pacer: &mut Option<Pacer>,
    tally: &mut Tally,
    measure_from: Instant,
    end: Instant,
) -> std::io::Result<Option<Instant>> {
    match pacer {
        None => Ok(Some(Instant::now()).filter(|now| *now < end)),
        Some(p) if p.next >= end => Ok(None),
        Some(p) => p.wait(tally, measure_from).await.map(Some),
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

/// The pid of the redis-server at `socket` (`INFO server`), to read its CPU time.
pub fn redis_pid(socket: &std::path::Path) -> std::io::Result<u32> {
    let client = redis::Client::open(format!("redis+unix://{}", socket.display()))
        .map_err(std::io::Error::other)?;
    let mut con = client.get_connection().map_err(std::io::Error::other)?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut con)
        .map_err(std::io::Error::other)?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("redis-server did not tell its process_id"))
}

/// A process's command name and CPU time (utime + stime, in clock ticks) from
/// /proc/PID/stat; `pid` may be `self`.
fn cpu_ticks(pid: &str) -> std::io::Result<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || std::io::Error::other(format!("/proc/{pid}/stat: unexpected format"));
    // `pid (comm) state ppid …`: comm may hold spaces and parentheses, so split at
    // the last `)`; utime and stime are fields 14 and 15.
    let open = stat.find('(').ok_or_else(bad)?;
    let close = stat.rfind(')').ok_or_else(bad)?;
    let name = stat[open + 1..close].to_string();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |k: usize| -> std::io::Result<u64> {
        fields
            .get(k - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(bad)
    };
    Ok((name, field(14)? + field(15)?))
}

/// Clock ticks per second of /proc's CPU times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU times of the server processes and of this process at one moment.
struct CpuSample {
    at: Instant,
    servers: Vec<(String, u64)>,
    client: u64,
}

fn sample(pids: &[u32]) -> std::io::Result<CpuSample> {
    let servers = pids
        .iter()
        .map(|p| cpu_ticks(&p.to_string()))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(CpuSample {
        at: Instant::now(),
        servers,
        client: cpu_ticks("self")?.1,
    })
}

/// Runs `load` against `target` on a single-threaded runtime (one core for the load,
/// the other for the server on a two-core machine): as fast as it goes, or paced.
/// `pids` are the processes serving `target`, whose CPU time over the measured window
/// the report shows.
pub fn run(
    target: &Target,
    requests: &std::rc::Rc<Requests>,
    load: &Load,
    pids: &[u32],
) -> std::io::Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let start = Instant::now() + Duration::from_millis(50);
        let measure_from = start + load.warmup;
        let end = measure_from + load.duration;
        let owned_pids = pids.to_vec();
        let sampler = tokio::task::spawn_local(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let first = sample(&owned_pids)?;
            tokio::time::sleep_until(end.into()).await;
            Ok::<_, std::io::Error>((first, sample(&owned_pids)?))
        });
        let tasks: Vec<_> = (0..load.connections)
            .map(|i| {
                tokio::task::spawn_local(drive(
                    target.clone(),
                    requests.clone(),
                    load.clone(),
                    i,
                    start,
                ))
            })
            .collect();
        let mut all = Tally::new();
        for t in tasks {
            all.merge(t.await.map_err(std::io::Error::other)??)?;
        }
        let (first, last) = sampler.await.map_err(std::io::Error::other)??;
        let mut r = report(target, load, &all);
        r.add_cpu(pids, &first, &last);
        Ok(r)
    })
}

impl Report {
    /// Fills the CPU figures from two samples taken at the start and end of the
    /// measured window.
    fn add_cpu(&mut self, pids: &[u32], first: &CpuSample, last: &CpuSample) {
        let wall = last.at.duration_since(first.at).as_secs_f64().max(1e-9);
        let tick = 1.0 / ticks_per_second();
        let seconds = |a: u64, b: u64| b.saturating_sub(a) as f64 * tick;
        let requests = self.requests.max(1) as f64;
        self.cpu = pids
            .iter()
            .zip(first.servers.iter().zip(&last.servers))
            .map(|(pid, ((name, a), (_, b)))| ProcessCpu {
                pid: *pid,
                name: name.clone(),
                share: seconds(*a, *b) / wall,
                us_per_request: seconds(*a, *b) * 1e6 / requests,
            })
            .collect();
        if !self.cpu.is_empty() {
            self.cpu_us_per_request = Some(self.cpu.iter().map(|c| c.us_per_request).sum());
            if self.offered_rps.is_none() {
                self.saturated = Some(self.cpu.iter().any(|c| c.share >= SATURATED));
            }
        }
        self.client_cpu_share = Some(seconds(first.client, last.client) / wall);
    }
}

fn report(target: &Target, load: &Load, tally: &Tally) -> Report {
    let (done, errors, hist) = (tally.done, tally.errors, &tally.hist);
    let seconds = load.duration.as_secs_f64();
    let q = |p: f64| hist.value_at_quantile(p) as f64;
    Report {
        target: match target {
            Target::Apikeyd { .. } => "apikeyd".into(),
            Target::Redis { .. } => "redis".into(),
        },
        connections: load.connections,
        pipeline: load.pipeline,
        offered_rps: load.rate,
        requests: done,
        errors,
        seconds,
        rps: done as f64 / seconds,
        p50_us: q(0.50),
        p90_us: q(0.90),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: hist.max() as f64,
        pacer_late_p50_us: load.rate.map(|_| tally.late.value_at_quantile(0.50) as f64),
        pacer_late_p99_us: load.rate.map(|_| tally.late.value_at_quantile(0.99) as f64),
        cpu: Vec::new(),
        cpu_us_per_request: None,
        client_cpu_share: None,
        saturated: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pipeline: usize) -> Load {
        Load {
            connections: 1,
            pipeline,
            duration: Duration::ZERO,
            warmup: Duration::ZERO,
            rate: None,
            keys: 3,
        }
    }

    #[test]
    fn requests_are_encoded_once_per_template_and_key() {
        let r = Requests::apikeyd(&[r#"{"a":"{n}"}"#.into(), r#"{"b":{N}}"#.into()], 3);
        assert_eq!(r.get(0, 2), b"{\"a\":\"2\"}\n");
        assert_eq!(r.get(1, 0), b"{\"b\":0}\n");
        let h = Requests::redis(RedisCommand::Hget, "", 12);
        assert_eq!(
            h.get(0, 11),
            b"*3\r\n$4\r\nHGET\r\n$8\r\nbench:11\r\n$6\r\nopenai\r\n"
        );
        let c = Requests::redis(RedisCommand::Consume, "abc", 1);
        assert!(c
            .get(0, 0)
            .starts_with(b"*7\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n"));
    }

    #[test]
    fn a_batch_cycles_keys_and_templates_and_can_make_each_request_unique() {
        let r = Requests::apikeyd(&[r#"{"k":{n}}"#.into()], 3);
        let (mut n, mut t, mut out) = (0, 0, Vec::new());
        next_batch_bytes(&r, &load(4), &mut n, &mut t, None, &mut out);
        assert_eq!(out, b"{\"k\":1}\n{\"k\":2}\n{\"k\":0}\n{\"k\":1}\n");
        let mut count = 7;
        out.clear();
        next_batch_bytes(
            &r,
            &load(2),
            &mut n,
            &mut t,
            Some(("run-0", &mut count)),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"k\":2,\"idempotency_key\":\"run-0-7\"}\n{\"k\":0,\"idempotency_key\":\"run-0-8\"}\n"
        );
        assert_eq!(count, 9);
    }

    async fn answers(framing: Framing, bytes: &[u8], n: usize) -> Vec<bool> {
        let mut rd = BufReader::with_capacity(4, bytes);
        let mut line = Vec::new();
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(read_answer(framing, &mut rd, &mut line).await.unwrap());
        }
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut rest)
            .await
            .unwrap();
        assert!(rest.is_empty(), "every byte belongs to an answer");
        out
    }

    #[tokio::test]
    async fn the_resp_reader_reads_whole_replies_and_sees_errors() {
        let replies = b"$14\r\nsk-a\r\nsk-bench\r\n$-1\r\n*2\r\n:1\r\n:5\r\n-NOSCRIPT no\r\n+OK\r\n*2\r\n$3\r\nabc\r\n*1\r\n:2\r\n";
        assert_eq!(
            answers(Framing::Resp, replies, 6).await,
            [true, true, true, false, true, true]
        );
        let mut rd = BufReader::new(&b"$10\r\nshort"[..]);
        assert!(read_answer(Framing::Resp, &mut rd, &mut Vec::new())
            .await
            .is_err());
    }

    #[tokio::test]
    async fn the_line_reader_counts_answers_without_ok_as_errors() {
        let lines =
            b"{\"id\":1,\"ok\":true,\"result\":{}}\n{\"ok\":false,\"error\":{\"code\":\"x\"}}\n";
        assert_eq!(answers(Framing::JsonLines, lines, 2).await, [true, false]);
    }

    #[test]
    fn cpu_time_is_read_from_proc() {
        let (name, _) = cpu_ticks("self").unwrap();
        assert!(!name.is_empty());
        let mut burn = 0u64;
        let (_, before) = cpu_ticks("self").unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(60) {
            burn = std::hint::black_box(burn.wrapping_add(1));
        }
        let (_, after) = cpu_ticks("self").unwrap();
        assert!(after > before, "60 ms of spinning shows in utime");
        assert!(cpu_ticks("0").is_err());
    }

    #[test]
    fn a_closed_loop_run_below_90_percent_is_client_bound() {
        let target = Target::Redis {
            socket: PathBuf::new(),
            command: RedisCommand::Hget,
        };
        let mut r = report(&target, &load(1), &Tally::new());
        r.requests = 1000;
        let at = Instant::now();
        let tick = ticks_per_second() as u64;
        let first = CpuSample {
            at,
            servers: vec![("redis-server".into(), 0)],
            client: 0,
        };
        let last = |server: u64| CpuSample {
            at: at + Duration::from_secs(1),
            servers: vec![("redis-server".into(), server)],
            client: tick,
        };
        r.add_cpu(&[1], &first, &last(tick / 2));
        assert_eq!(r.saturated, Some(false));
        assert!((r.cpu[0].share - 0.5).abs() < 1e-9);
        assert!((r.cpu_us_per_request.unwrap() - 500.0).abs() < 1e-6);
        assert!(r.line().ends_with("CLIENT-BOUND"), "{}", r.line());
        r.add_cpu(&[1], &first, &last(tick * 95 / 100));
        assert_eq!(r.saturated, Some(true));
        assert!(!r.line().contains("CLIENT-BOUND"));
    }
}
