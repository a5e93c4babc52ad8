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

/// Sends `requests` (or, when empty, every line of stdin) to the daemon at `socket`
/// and prints each response line. Returns the process exit code: 0 when every
/// response was `ok`, 1 when one was not, 2 when the daemon could not be reached.
pub fn call(socket: &Path, requests: Vec<String>) -> i32 {
    let stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "apikeyd call: cannot connect to {}: {e} (is `apikeyd serve` running with this socket?)",
                socket.display()
            );
            return 2;
        }
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
        _ => {
            eprintln!(
                "apikeyd call: the daemon closed the connection before all requests were sent"
            );
            2
        }
    }
}
