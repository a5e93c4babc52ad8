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
}

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

/// Appends the next `load.pipeline` request lines for apikeyd to `out`, advancing the
/// key index `n` and the template index `t`.
fn apikeyd_batch(
    templates: &[String],
    load: &Load,
    n: &mut usize,
    t: &mut usize,
    out: &mut Vec<u8>,
) {
    for _ in 0..load.pipeline {
        *n = (*n + 1) % load.keys.max(1);
        *t = (*t + 1) % templates.len();
        out.extend_from_slice(fill(&templates[*t], *n).as_bytes());
        out.push(b'\n');
    }
}

/// The next `load.pipeline` commands of the Redis side, advancing the key index `n`.
fn redis_batch(command: RedisCommand, sha: &str, load: &Load, n: &mut usize) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for _ in 0..load.pipeline {
        *n = (*n + 1) % load.keys.max(1);
        match command {
            RedisCommand::Hget => {
                pipe.cmd("HGET").arg(format!("bench:{n}")).arg("openai");
            }
            RedisCommand::Consume => {
                pipe.cmd("EVALSHA")
                    .arg(sha)
                    .arg(1)
                    .arg(format!("bench:usage:{n}"))
                    .arg("t")
                    .arg(apikeyd::clock::now_s() + 86_400)
                    .arg(1_000_000_000);
            }
        }
    }
    pipe
}

/// One connection, as fast as it goes or paced; answers (requests done, errors,
/// latencies).
async fn drive(target: Target, load: Load, index: usize, start: Instant) -> std::io::Result<Tally> {
    let mut tally = Tally::new();
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    let mut pacer = Pacer::new(&load, index, start)?;
    let mut n = index.wrapping_mul(7919);
    match target {
        Target::Apikeyd { socket, templates } => {
            // Tokio framing rather than `apikeyd::client`, which is blocking: every
            // connection of a closed-loop run shares this one thread, so the load
            // takes one core and leaves the other to the server under test.
            let stream = UnixStream::connect(&socket).await?;
            let (rd, mut wr) = stream.into_split();
            let mut rd = BufReader::with_capacity(64 * 1024, rd);
            let mut batch = Vec::new();
            let mut line = String::new();
            let mut t = index;
            while let Some(intended) = next_batch(&mut pacer, &mut tally, measure_from, end).await?
            {
                batch.clear();
                apikeyd_batch(&templates, &load, &mut n, &mut t, &mut batch);
                wr.write_all(&batch).await?;
                for _ in 0..load.pipeline {
                    line.clear();
                    if rd.read_line(&mut line).await? == 0 {
                        return Err(std::io::Error::other("the daemon closed the connection"));
                    }
                    if !line.contains("\"ok\":true") {
                        tally.errors += 1;
                    }
                }
                tally.batch(load.pipeline, intended, measure_from);
            }
        }
        Target::Redis { socket, command } => {
            let client = redis::Client::open(format!("redis+unix://{}", socket.display()))
                .map_err(std::io::Error::other)?;
            let mut con = client
                .get_multiplexed_async_connection()
                .await
                .map_err(std::io::Error::other)?;
            let sha: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(apikeyd::actors::redis::CONSUME_SCRIPT)
                .query_async(&mut con)
                .await
                .map_err(std::io::Error::other)?;
            while let Some(intended) = next_batch(&mut pacer, &mut tally, measure_from, end).await?
            {
                let pipe = redis_batch(command, &sha, &load, &mut n);
                let replies: redis::RedisResult<Vec<redis::Value>> =
                    pipe.query_async(&mut con).await;
                if replies.is_err() {
                    tally.errors += load.pipeline as u64;
                }
                tally.batch(load.pipeline, intended, measure_from);
            }
        }
    }
    Ok(tally)
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
pub fn run(target: &Target, load: &Load) -> std::io::Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let start = Instant::now() + Duration::from_millis(50);
        let tasks: Vec<_> = (0..load.connections)
            .map(|i| tokio::task::spawn_local(drive(target.clone(), load.clone(), i, start)))
            .collect();
        let mut all = Tally::new();
        for t in tasks {
            all.merge(t.await.map_err(std::io::Error::other)??)?;
        }
        Ok(report(target, load, &all))
    })
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
    }
}
