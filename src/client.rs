//! `apikeyd call`: the scriptable client. Sends request lines, prints response lines.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Sends one request line and reads its response, for the tools that talk to a
/// running daemon (rotate-master-key, import-legacy). Waits at most `60 s`.
pub fn request(socket: &Path, line: &str) -> std::io::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(line.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the daemon's answer is not JSON",
        )
    })
}

/// Connects to the daemon, or says why not in words a caller can act on.
fn connect(socket: &Path, who: &str) -> Option<UnixStream> {
    match UnixStream::connect(socket) {
        Ok(s) => Some(s),
        Err(e) => {
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    "this user lacks access to the socket: it must be in the socket's group \
                     (see docs/operations.md, \"Access\")"
                }
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    "is `apikeyd serve` running with this socket?"
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

/// Sends `requests` (or, when empty, every line of stdin) to the daemon at `socket`
/// and prints each response line. Returns the process exit code: 0 when every
/// response was `ok`, 1 when one was not (`too_large`, `forbidden` and every other
/// error answer), 2 when the daemon could not be reached or closed the connection
/// before answering.
pub fn call(socket: &Path, requests: Vec<String>) -> i32 {
    let Some(stream) = connect(socket, "apikeyd call") else {
        return 2;
    };
    let Ok(mut writer) = stream.try_clone() else {
        eprintln!("apikeyd call: cannot use the socket");
        return 2;
    };
    // Write on another thread so a long stdin never deadlocks against unread responses.
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        if requests.is_empty() {
            for line in std::io::stdin().lock().lines() {
                writer.write_all(line?.as_bytes())?;
                writer.write_all(b"\n")?;
            }
        } else {
            for r in requests {
                writer.write_all(r.as_bytes())?;
                writer.write_all(b"\n")?;
            }
        }
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut code = 0;
    let stdout = std::io::stdout();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let ok = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get("ok").and_then(|o| o.as_bool()))
            .unwrap_or(false);
        if !ok {
            code = 1;
        }
        let mut out = stdout.lock();
        let _ = writeln!(out, "{line}");
    }
    match sender.join() {
        Ok(Ok(())) => code,
        // The daemon closes the connection after `too_large` or a refused peer, so the
        // rest could not be sent: that is the error answer already counted.
        _ if code == 1 => 1,
        _ => {
            eprintln!(
                "apikeyd call: the daemon closed the connection before all requests were sent"
            );
            2
        }
    }
}

/// `apikeyd metrics`: prints the daemon's Prometheus text (op `metrics`). Exit code
/// as for [`call`].
pub fn metrics(socket: &Path) -> i32 {
    let Some(mut stream) = connect(socket, "apikeyd metrics") else {
        return 2;
    };
    if stream.write_all(b"{\"op\":\"metrics\"}\n").is_err() {
        eprintln!("apikeyd metrics: the daemon closed the connection");
        return 2;
    }
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(n) if n > 0 => {}
        _ => {
            eprintln!("apikeyd metrics: the daemon closed the connection without answering");
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
