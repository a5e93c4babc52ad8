//! The load itself: closed-loop (as fast as it goes) or paced runs against the daemon,
//! and against redis-server with the same load pattern, so both figures come from one
//! tool in one run. Latency is recorded in an HDR histogram from each request's
//! intended send time (so a stalled server cannot hide its queueing delay).

mod cpu;
mod requests;

pub use cpu::redis_pid;
use cpu::{sample, ticks_per_second, CpuSample};
use requests::next_batch_bytes;
pub use requests::{requests, Requests};

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
mod tests;
