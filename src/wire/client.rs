//! The one JSON-lines client of the daemon's socket: a small blocking [`Connection`]
//! used by `apikeyd call` and `apikeyd metrics`, by the tools that ask a running
//! daemon something (`rotate-master-key`, the keystore lock's check), by the bench's
//! setup and by the tests' helper. Line framing lives here and nowhere else.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a [`Connection`] waits. `None` waits for as long as it takes.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Connecting, including waiting while the daemon's accept queue is full.
    pub connect: Duration,
    /// Each read of an answer.
    pub read: Option<Duration>,
    /// Each write of a request.
    pub write: Option<Duration>,
}

impl Timeouts {
    /// One request from a tool: an answer may take a store call or a reload, so up to
    /// a minute; writing one short line never should.
    pub const TOOL: Timeouts = Timeouts {
        connect: Duration::from_secs(10),
        read: Some(Duration::from_secs(60)),
        write: Some(Duration::from_secs(10)),
    };

    /// `apikeyd call` and `metrics`: requests stream from stdin for as long as the
    /// caller likes, and a slow answer is the daemon's to bound, so only connecting
    /// is bounded.
    pub const INTERACTIVE: Timeouts = Timeouts {
        connect: Duration::from_secs(10),
        read: None,
        write: None,
    };
}

/// One connection to the daemon: request lines out, response lines in, in order.
pub struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// Connects within `within`. std's `UnixStream::connect` would block for as long as
/// the daemon's accept queue stays full; Linux bounds that wait by the socket's send
/// timeout, which can only be set before connecting, hence socket2.
fn connect_within(socket: &Path, within: Duration) -> std::io::Result<UnixStream> {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    // A zero timeout would mean "forever" to the kernel and is refused by socket2.
    s.set_write_timeout(Some(within.max(Duration::from_millis(1))))?;
    s.connect(&socket2::SockAddr::unix(socket)?)?;
    Ok(s.into())
}

impl Connection {
    /// Connects to the daemon at `socket` with `timeouts`.
    pub fn connect(socket: &Path, timeouts: Timeouts) -> std::io::Result<Connection> {
        let stream = connect_within(socket, timeouts.connect)?;
        // Replaces the connect bound set above, also when no write timeout is wanted.
        stream.set_write_timeout(timeouts.write)?;
        stream.set_read_timeout(timeouts.read)?;
        Ok(Connection {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request line (the newline is added) in one write.
    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.writer.write_all(&buf)
    }

    /// Sends bytes as they are: several lines at once, or deliberately broken input.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Appends the next response line, newline included, to `line`; answers its
    /// length, 0 when the daemon closed the connection.
    pub fn read_line_into(&mut self, line: &mut String) -> std::io::Result<usize> {
        self.reader.read_line(line)
    }

    /// The next response, parsed; `None` when the daemon closed the connection.
    /// A line that is not JSON is an `InvalidData` error that does not quote the
    /// line: an answer can hold a key.
    pub fn recv(&mut self) -> std::io::Result<Option<serde_json::Value>> {
        let mut line = String::new();
        if self.read_line_into(&mut line)? == 0 {
            return Ok(None);
        }
        parse(&line).map(Some)
    }

    /// Sends one request line and reads its response.
    pub fn request(&mut self, line: &str) -> std::io::Result<serde_json::Value> {
        self.send(line)?;
        self.recv()?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection without answering",
            )
        })
    }

    /// The buffered reading half, for callers that read raw bytes.
    pub fn reader(&mut self) -> &mut BufReader<UnixStream> {
        &mut self.reader
    }

    /// A second handle on the socket, for writing from another thread.
    pub fn try_clone_writer(&self) -> std::io::Result<UnixStream> {
        self.writer.try_clone()
    }

    /// Half-closes: the daemon sees EOF after what was sent, answers it and closes.
    pub fn shutdown_write(&self) -> std::io::Result<()> {
        self.writer.shutdown(std::net::Shutdown::Write)
    }

    /// Pipelines `requests`: a second thread writes them (then half-closes) while this
    /// one hands each response line, without its newline, to `on_answer` until the
    /// daemon closes. Writing and reading at once is what keeps a long batch from
    /// deadlocking: the daemon stops reading a connection whose answers are not read.
    /// Answers the writer's outcome; a read error ends reading like a close does.
    pub fn pipeline<I>(self, requests: I, mut on_answer: impl FnMut(&str)) -> std::io::Result<()>
    where
        I: IntoIterator<Item = std::io::Result<String>>,
        I::IntoIter: Send + 'static,
    {
        let mut writer = self.writer;
        let requests = requests.into_iter();
        let sender = std::thread::spawn(move || -> std::io::Result<()> {
            for line in requests {
                let mut buf = line?.into_bytes();
                buf.push(b'\n');
                writer.write_all(&buf)?;
            }
            writer.shutdown(std::net::Shutdown::Write)
        });
        for line in self.reader.lines() {
            let Ok(line) = line else { break };
            on_answer(&line);
        }
        sender
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the sending thread panicked")))
    }

    /// Pipelines `requests` and answers their parsed responses, one each, in order.
    pub fn exchange(self, requests: Vec<String>) -> std::io::Result<Vec<serde_json::Value>> {
        let wanted = requests.len();
        let mut answers = Vec::with_capacity(wanted);
        let mut bad = false;
        let sent = self.pipeline(requests.into_iter().map(Ok), |line| match parse(line) {
            Ok(v) => answers.push(v),
            Err(_) => bad = true,
        });
        if bad {
            return Err(not_json());
        }
        sent?;
        if answers.len() < wanted {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection before answering every request",
            ));
        }
        Ok(answers)
    }
}

fn not_json() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "the daemon's answer is not JSON",
    )
}

fn parse(line: &str) -> std::io::Result<serde_json::Value> {
    serde_json::from_str(line).map_err(|_| not_json())
}

/// Sends one request line to the daemon at `socket` and reads its response, for the
/// tools that talk to a running daemon (rotate-master-key, the keystore lock's
/// check). Bounded by [`Timeouts::TOOL`].
pub fn request(socket: &Path, line: &str) -> std::io::Result<serde_json::Value> {
    Connection::connect(socket, Timeouts::TOOL)?.request(line)
}

/// Connects to the daemon, or says why not in words a caller can act on.
fn connect(socket: &Path, who: &str) -> Option<Connection> {
    match Connection::connect(socket, Timeouts::INTERACTIVE) {
        Ok(c) => Some(c),
        Err(e) => {
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    "this user lacks access to the socket: it must be in the socket's group \
                     (see docs/operations.md, \"Access\")"
                }
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    "is `apikeyd serve` running with this socket?"
                }
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    "the daemon is not accepting connections"
                }
                _ => "check the path and the daemon",
            };
            eprintln!(
                "{who}: cannot connect to {}: {e} ({hint})",
                socket.display()
            );
            None
        }
    }
}

/// What `apikeyd call` waits for by default: longer than the daemon's own bound on
/// a request (`server.request_timeout_ms`, 10 s by default), after which it answers
/// `timeout` itself.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Requests sent and answered so far by [`call`], shared by its sending thread.
#[derive(Default)]
struct Progress {
    sent: usize,
    answered: usize,
    /// Since when the oldest unanswered request has waited without any answer
    /// arriving; `None` while nothing is outstanding.
    waiting_since: Option<Instant>,
    /// The sending thread has sent every request (it half-closes next).
    all_sent: bool,
}

/// How often [`call`]'s reader looks at the clock while it waits for an answer.
const CALL_POLL: Duration = Duration::from_millis(100);

/// Sends `requests` (or, when empty, every line of stdin) to the daemon at `socket`
/// and prints each response line. Returns the process exit code: 0 when every
/// request got an `ok` answer; 1 when one got an error answer (`too_large`,
/// `forbidden` and every other code); 2 when a request got no answer: the daemon
/// could not be reached, closed the connection without answering, or answered
/// nothing for `timeout` (`None`: wait for as long as it takes). When the daemon
/// closes the connection right after an error answer (as it does for a peer it
/// refuses), the unanswered rest is that error's: 1.
pub fn call(socket: &Path, requests: Vec<String>, timeout: Option<Duration>) -> i32 {
    let Some(conn) = connect(socket, "apikeyd call") else {
        return 2;
    };
    let lines: Box<dyn Iterator<Item = std::io::Result<String>> + Send> = if requests.is_empty() {
        // Stdin itself (not its lock) so the sending thread can own it.
        Box::new(BufReader::new(std::io::stdin()).lines())
    } else {
        Box::new(requests.into_iter().map(Ok))
    };
    let progress = std::sync::Arc::new(std::sync::Mutex::new(Progress::default()));
    let Connection { mut reader, writer } = conn;
    // The reader wakes up now and then to look at the clock; without a timeout it
    // never needs to.
    if timeout.is_some() && reader.get_ref().set_read_timeout(Some(CALL_POLL)).is_err() {
        eprintln!("apikeyd call: cannot set a read timeout on the socket");
        return 2;
    }
    let sender = {
        let progress = progress.clone();
        let mut writer = writer;
        std::thread::spawn(move || -> std::io::Result<()> {
            for line in lines {
                let line = line?;
                // The daemon answers nothing to a blank line: not a request.
                if line.trim().is_empty() {
                    continue;
                }
                let mut buf = line.into_bytes();
                buf.push(b'\n');
                {
                    let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                    p.sent += 1;
                    p.waiting_since.get_or_insert_with(Instant::now);
                }
                writer.write_all(&buf)?;
            }
            // Before half-closing: the daemon's close that follows must find it set.
            progress.lock().unwrap_or_else(|e| e.into_inner()).all_sent = true;
            // The daemon may have closed already; then there is nothing to half-close.
            let _ = writer.shutdown(std::net::Shutdown::Write);
            Ok(())
        })
    };
    let stdout = std::io::stdout();
    let mut any_error = false;
    let mut last_was_error = false;
    let mut timed_out = false;
    let mut line = Vec::new();
    loop {
        // read_until keeps what it read before a timeout in `line`: the next round
        // carries on with the same line.
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) if line.last() != Some(&b'\n') => break, // closed mid-line
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches('\n');
                let ok = serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .and_then(|v| v.get("ok").and_then(|o| o.as_bool()))
                    .unwrap_or(false);
                any_error |= !ok;
                last_was_error = !ok;
                let _ = writeln!(stdout.lock(), "{text}");
                line.clear();
                let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                p.answered += 1;
                p.waiting_since = (p.answered < p.sent).then(Instant::now);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let p = progress.lock().unwrap_or_else(|e| e.into_inner());
                let waited = p.waiting_since.map(|t| t.elapsed()).unwrap_or_default();
                if timeout.is_some_and(|limit| waited >= limit) {
                    timed_out = true;
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let (unanswered, all_sent) = {
        let p = progress.lock().unwrap_or_else(|e| e.into_inner());
        (p.sent - p.answered.min(p.sent), p.all_sent)
    };
    if timed_out {
        eprintln!(
            "apikeyd call: no answer within {} s ({unanswered} request(s) unanswered)",
            timeout.unwrap_or_default().as_secs_f64(),
        );
        // The sender may be blocked on stdin or a full socket: exiting ends it.
        return 2;
    }
    if all_sent {
        // It only half-closes now.
        let _ = sender.join();
    }
    // Otherwise the sender still waits on stdin or failed to write: the daemon
    // closed while requests were still coming, and nothing more will be answered.
    if unanswered == 0 && all_sent {
        return i32::from(any_error);
    }
    if last_was_error {
        // The daemon said why it stopped (e.g. forbidden) before closing.
        return 1;
    }
    if unanswered > 0 {
        eprintln!(
            "apikeyd call: the daemon closed the connection without answering {unanswered} request(s)"
        );
    } else {
        eprintln!("apikeyd call: the daemon closed the connection before all requests were sent");
    }
    2
}

/// `apikeyd metrics`: prints the daemon's Prometheus text (op `metrics`). Exit code
/// as for [`call`].
pub fn metrics(socket: &Path) -> i32 {
    let Some(mut conn) = connect(socket, "apikeyd metrics") else {
        return 2;
    };
    // One answer is awaited: bounded like `call`'s default, so a stuck daemon
    // fails a cron job instead of hanging it.
    if conn
        .reader
        .get_ref()
        .set_read_timeout(Some(CALL_TIMEOUT))
        .is_err()
    {
        return 2;
    }
    if conn.send(r#"{"op":"metrics"}"#).is_err() {
        eprintln!("apikeyd metrics: the daemon closed the connection");
        return 2;
    }
    let mut line = String::new();
    match conn.read_line_into(&mut line) {
        Ok(n) if n > 0 => {}
        Ok(_) => {
            eprintln!("apikeyd metrics: the daemon closed the connection without answering");
            return 2;
        }
        Err(e) => {
            eprintln!(
                "apikeyd metrics: no answer within {} s: {e}",
                CALL_TIMEOUT.as_secs()
            );
            return 2;
        }
    }
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
    match v["result"]["text"].as_str() {
        Some(text) if v["ok"] == true => {
            print!("{text}");
            0
        }
        _ => {
            eprintln!("apikeyd metrics: {}", line.trim_end());
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A toy server answering each line with `{"ok":true,"n":<index>}`, or with
    /// `not json` for the line `bad`.
    fn echo_server(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut w = stream.try_clone().unwrap();
                    for (n, line) in BufReader::new(stream).lines().enumerate() {
                        let Ok(line) = line else { return };
                        let answer = if line == "bad" {
                            "not json\n".to_string()
                        } else {
                            format!("{{\"ok\":true,\"n\":{n}}}\n")
                        };
                        if w.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        path
    }

    #[test]
    fn request_and_a_long_pipelined_exchange() {
        let dir = tempfile::tempdir().unwrap();
        let socket = echo_server(dir.path());
        assert_eq!(request(&socket, "{}").unwrap()["n"], 0);
        // Far more than a socket buffer holds, so sending and reading must overlap.
        let lines: Vec<String> = (0..50_000).map(|_| "{}".repeat(20)).collect();
        let conn = Connection::connect(&socket, Timeouts::TOOL).unwrap();
        let answers = conn.exchange(lines).unwrap();
        assert_eq!(answers.len(), 50_000);
        assert_eq!(answers[49_999]["n"], 49_999);
    }

    #[test]
    fn an_answer_that_is_not_json_is_not_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let socket = echo_server(dir.path());
        let e = request(&socket, "bad").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(!e.to_string().contains("not json"), "{e}");
    }

    #[test]
    fn a_missing_socket_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let e = Connection::connect(&dir.path().join("none.sock"), Timeouts::TOOL)
            .err()
            .expect("no daemon there");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
