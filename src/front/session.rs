//! One connection: request lines in, responses out in request order. Requests of one
//! connection run concurrently up to a bound; responses that are ready together are
//! written together.

use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::{FutureExt, LocalBoxFuture};
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::front::sequencer::Sequencer;
use crate::ops;
use crate::ops::app::App;
use crate::ops::Reply;
use crate::process::access::Peer;
use crate::wire::catalog::{looks_like_op, Op};
use crate::wire::protocol::{
    parse_line, write_answer, Body, Frame, Id, Line, LineCodec, LineError,
};

/// Requests of one connection in flight at once. Past it the daemon stops reading
/// that connection until responses drain: backpressure instead of buffering.
pub const MAX_IN_FLIGHT: usize = 256;

/// A request's answer: already encoded (it finished when first polled, as a cache hit
/// does), or still running.
enum Answer {
    Ready(Body),
    Running(LocalBoxFuture<'static, Body>),
}

impl Answer {
    /// Polls `fut` once: most requests finish there, and need no place among the
    /// running ones.
    fn poll_once(mut fut: LocalBoxFuture<'static, Body>) -> Answer {
        match (&mut fut).now_or_never() {
            Some(body) => Answer::Ready(body),
            None => Answer::Running(fut),
        }
    }
}

/// A connection's answers in request order: finished ones wait in `order` until those
/// before them are written; running ones also sit in `running`, which yields them in
/// the same order.
#[derive(Default)]
struct Answers {
    /// `None` marks an answer that is still running (the next one `running` yields).
    order: std::collections::VecDeque<Option<Body>>,
    running: FuturesOrdered<LocalBoxFuture<'static, Body>>,
}

impl Answers {
    fn push(&mut self, answer: Answer) {
        match answer {
            Answer::Ready(body) => self.order.push_back(Some(body)),
            Answer::Running(fut) => {
                self.order.push_back(None);
                self.running.push_back(fut);
            }
        }
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The next answer in request order once it is ready. Cancel-safe: an answer is
    /// taken out only in the poll that returns it.
    async fn next(&mut self) -> Option<Body> {
        match self.order.front_mut()? {
            Some(_) => self.order.pop_front().flatten(),
            None => {
                let body = self.running.next().await?;
                self.order.pop_front();
                Some(body)
            }
        }
    }
}

fn encoded(id: &Id, outcome: &Result<Body>) -> Body {
    let mut out = Zeroizing::new(Vec::with_capacity(96));
    write_answer(&mut out, id, outcome, false);
    out
}

/// The response line of an op's answer.
fn answered(id: &Id, outcome: Result<Reply>) -> Body {
    // Room for the whole line up front: a growing buffer would move, leaving a copy
    // of the key it holds in memory that is not wiped (64: the envelope's own bytes).
    let result = outcome.as_ref().map_or(0, |r| r.body.len());
    let id_len = id.as_deref().map_or(4, |r| r.get().len());
    let mut out = Zeroizing::new(Vec::with_capacity(result + id_len + 64));
    match outcome {
        Ok(Reply { body, replayed }) => write_answer(&mut out, id, &Ok(body), replayed),
        Err(e) => write_answer(&mut out, id, &Err(e), false),
    }
    out
}

/// Longest request id written to the per-request debug line, in bytes.
const LOGGED_ID_BYTES: usize = 64;

/// The request id for the debug line: at most [`LOGGED_ID_BYTES`], cut on a
/// character boundary and marked, so a huge id cannot flood the log.
fn short_id(id: &Id) -> String {
    let raw = id.as_deref().map_or("null", |r| r.get());
    if raw.len() <= LOGGED_ID_BYTES {
        return raw.to_string();
    }
    let mut end = LOGGED_ID_BYTES;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &raw[..end], raw.len())
}

/// Turns one line into its answer (`None` for a blank line).
/// Sets `sensitive` when the line may have held a key: it carried a `key` member, or
/// it was not a valid request (nothing can be said of what it held).
fn start(
    app: &Rc<App>,
    peer: &Peer,
    order: &Rc<Sequencer>,
    line: &[u8],
    sensitive: &mut bool,
) -> Option<Answer> {
    let mut req = match parse_line(line) {
        Line::Blank => return None,
        Line::Invalid { id, error } => {
            *sensitive = true;
            app.requests_total.fetch_add(1, Ordering::Relaxed);
            app.metrics.record(None, error.code(), None);
            tracing::debug!(code = error.code(), "malformed request");
            return Some(Answer::Ready(encoded(&id, &Err(error))));
        }
        Line::Request(req) => req,
    };
    *sensitive = req.carries_key();
    app.requests_total.fetch_add(1, Ordering::Relaxed);
    let app = app.clone();
    let peer = *peer;
    let id = std::mem::take(&mut req.id);
    let op = match Op::parse(&req.op) {
        Ok(op) => op,
        Err(_) => {
            let error = Error::UnknownOp(looks_like_op(&req.op).then(|| req.op.clone()));
            app.metrics.record(None, error.code(), None);
            tracing::debug!(code = error.code(), id = short_id(&id), "unknown op");
            return Some(Answer::Ready(encoded(&id, &Err(error))));
        }
    };
    let order = order.clone();
    let ticket = order.ticket(op.writes());
    Some(Answer::poll_once(
        async move {
            let began = Instant::now();
            order.admit(&ticket).await;
            // Every call into a store is bounded by server.request_timeout_ms
            // (store::handle::within), so this never waits forever.
            let outcome = AssertUnwindSafe(ops::dispatch(&app, &peer, op, &mut req))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    tracing::error!("a request handler panicked; answering internal");
                    Err(Error::Internal(
                        "the request failed inside the daemon; see its log".into(),
                    ))
                });
            order.finish(ticket);
            let code = outcome.as_ref().err().map(Error::code).unwrap_or("ok");
            let took = began.elapsed();
            app.metrics.record(Some(op), code, Some(took));
            tracing::debug!(
                op = %op.name(),
                id = short_id(&id),
                uid = peer.uid,
                code,
                micros = took.as_micros() as u64,
                "request"
            );
            answered(&id, outcome)
        }
        .boxed_local(),
    ))
}

/// At shutdown: the complete lines already read from the socket but not started
/// (waiting in the read buffer) are answered `unavailable` with `"applied": false`,
/// in order after the requests in flight, so a client knows what did not run (lines
/// that are not requests get their usual error). A last line without its newline
/// was not fully sent and gets no answer.
fn refuse_buffered(
    app: &App,
    lines: &mut FramedRead<tokio::net::unix::OwnedReadHalf, LineCodec>,
    pending: &mut Answers,
    max_line: usize,
) {
    use tokio_util::codec::Decoder;
    let mut buf = std::mem::take(lines.read_buffer_mut());
    let mut refused = 0u64;
    while let Ok(Some(frame)) = lines.decoder_mut().decode(&mut buf) {
        let (id, error) = match frame {
            Frame::TooLong => (None, Error::TooLarge(max_line)),
            Frame::Line(mut line) => {
                let parsed = parse_line(&line);
                line[..].zeroize();
                match parsed {
                    Line::Blank => continue,
                    Line::Invalid { id, error } => (id, error),
                    Line::Request(req) => {
                        refused += 1;
                        (req.id, Error::ShuttingDown)
                    }
                }
            }
        };
        app.requests_total.fetch_add(1, Ordering::Relaxed);
        app.metrics.record(None, error.code(), None);
        pending.push(Answer::Ready(encoded(&id, &Err(error))));
    }
    crate::wire::protocol::scrub_stack();
    *lines.read_buffer_mut() = buf;
    if refused > 0 {
        tracing::info!(refused, "shutting down: requests read but not started were answered unavailable (applied: false)");
    }
}

/// Serves one accepted connection until EOF, error, idle timeout or shutdown.
pub async fn run(app: Rc<App>, stream: UnixStream, peer: Peer, stop: CancellationToken) {
    let config = app.config();
    let max_line = config.server.max_line_bytes;
    let idle = Duration::from_secs(config.server.idle_timeout_s.max(1));
    drop(config);

    let (rd, mut wr) = stream.into_split();
    let mut lines = FramedRead::new(rd, LineCodec::new(max_line));
    let mut pending = Answers::default();
    let mut out: Zeroizing<Vec<u8>> = Zeroizing::new(Vec::with_capacity(4096));
    let order = Rc::new(Sequencer::default());
    let mut reading = true;
    let idle_deadline = tokio::time::sleep(idle);
    tokio::pin!(idle_deadline);

    loop {
        if !reading && pending.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some(first) = pending.next(), if !pending.is_empty() => {
                out.extend_from_slice(&first);
                drop(first);
                while let Some(Some(more)) = pending.next().now_or_never() {
                    out.extend_from_slice(&more);
                }
                // A client that stops reading holds its session here; after the idle
                // timeout it is dropped instead of pinning memory forever.
                let written = tokio::time::timeout(idle, wr.write_all(&out)).await;
                out.zeroize();
                if !matches!(written, Ok(Ok(()))) {
                    tracing::debug!(uid = peer.uid, "client not reading its responses; closing");
                    break;
                }
                idle_deadline.as_mut().reset(tokio::time::Instant::now() + idle);
            }
            // Before reading: a client that never pauses must not keep its
            // connection from seeing the shutdown.
            () = stop.cancelled(), if reading => {
                reading = false;
                refuse_buffered(&app, &mut lines, &mut pending, max_line);
            }
            frame = lines.next(), if reading && pending.len() < MAX_IN_FLIGHT => {
                idle_deadline.as_mut().reset(tokio::time::Instant::now() + idle);
                let mut frame = frame;
                // Take every line that is already here before answering, so a
                // pipelined batch is answered with one write rather than one each.
                loop {
                    match frame {
                        None => reading = false,
                        Some(Ok(Frame::Line(mut line))) => {
                            let mut sensitive = false;
                            if let Some(answer) = start(&app, &peer, &order, &line, &mut sensitive) {
                                pending.push(answer);
                            }
                            // The request is parsed into its own values; a key in it
                            // must not linger in the connection's buffer, nor in the
                            // stack the parser (and its SIMD searches) ran on.
                            line[..].zeroize();
                            if sensitive {
                                crate::wire::protocol::scrub_stack();
                            }
                        }
                        Some(Ok(Frame::TooLong)) => {
                            // Answered in its place; the codec skips the rest of the
                            // line and the connection goes on with the next one.
                            tracing::info!(uid = peer.uid, max_line, "request line too long; skipped");
                            app.requests_total.fetch_add(1, Ordering::Relaxed);
                            app.metrics.record(None, "too_large", None);
                            let line = encoded(&None, &Err(Error::TooLarge(max_line)));
                            pending.push(Answer::Ready(line));
                        }
                        Some(Err(LineError::Io(e))) => {
                            tracing::debug!(error = %e, "connection read failed");
                            reading = false;
                        }
                    }
                    if !reading || pending.len() >= MAX_IN_FLIGHT {
                        break;
                    }
                    match lines.next().now_or_never() {
                        Some(next) => frame = next,
                        None => break,
                    }
                }
            }
            () = &mut idle_deadline, if reading && pending.is_empty() => {
                tracing::debug!(uid = peer.uid, "idle connection closed");
                break;
            }
        }
    }
    // Whatever the client sent and was not answered (a cut-off line) is wiped too.
    let buffer = lines.read_buffer_mut();
    buffer.clear();
    buffer.resize(buffer.capacity(), 0);
    buffer[..].zeroize();
    let _ = wr.shutdown().await;
}
