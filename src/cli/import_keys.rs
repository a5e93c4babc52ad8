//! `apikeyd import-keys [FILE]`: stores per-user keys given as JSON lines
//! `{"user_id": …, "service": …, "key": …}` (from FILE, or stdin) through the running
//! daemon's `set_user_api_key`, so each is validated and sealed exactly as a bot's
//! own request would be. Prints one line per entry not stored (line number and
//! reason, never the key) and a summary; exits 0 only when every entry was stored.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;
use zeroize::Zeroizing;

use crate::wire::client::{Connection, Timeouts};

/// What happened to one input line.
enum Entry {
    /// A blank line: not an entry.
    Blank,
    /// Not an entry the tool can send (the reason, in words that never quote it).
    Skipped(String),
    /// A `set_user_api_key` request line (holds the key: zeroed when dropped).
    Request(Zeroizing<String>),
}

/// Reads one input line as an entry. The line holds a key, so no reason quotes it,
/// and serde's messages (which can quote a value) are not passed on.
fn entry(line: &str) -> Entry {
    if line.trim().is_empty() {
        return Entry::Blank;
    }
    let mut value: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return Entry::Skipped(format!("not JSON (column {})", e.column())),
    };
    let Some(obj) = value.as_object_mut() else {
        return Entry::Skipped("not a JSON object".into());
    };
    // Taken out first, so that it is zeroed on every way out.
    let key = match obj.remove("key") {
        Some(Value::String(k)) => Zeroizing::new(k),
        _ => return Entry::Skipped("key is missing or not a string".into()),
    };
    let user_id = match obj.get("user_id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        _ => {
            return Entry::Skipped(
                "user_id is missing, or not a string or a non-negative integer".into(),
            )
        }
    };
    let Some(service) = obj.get("service").and_then(Value::as_str) else {
        return Entry::Skipped("service is missing or not a string".into());
    };
    let quoted = |s: &str| Value::String(s.to_owned()).to_string();
    // Serialising a str cannot fail.
    let key_json = Zeroizing::new(serde_json::to_string(key.as_str()).unwrap_or_default());
    let mut request = Zeroizing::new(String::with_capacity(key_json.len() + 128));
    request.push_str(r#"{"op":"set_user_api_key","user_id":"#);
    request.push_str(&quoted(&user_id));
    request.push_str(r#","service":"#);
    request.push_str(&quoted(service));
    request.push_str(r#","key":"#);
    request.push_str(&key_json);
    request.push('}');
    Entry::Request(request)
}

/// The daemon's reason for refusing a request (its messages never hold a key).
fn refusal(answer: &Value) -> Option<String> {
    if answer["ok"] == true && answer["result"]["stored"] == true {
        return None;
    }
    let code = answer["error"]["code"].as_str().unwrap_or("internal");
    let message = answer["error"]["message"]
        .as_str()
        .unwrap_or("no reason given");
    Some(format!("{code}: {message}"))
}

/// Counts of one run.
#[derive(Default)]
struct Tally {
    stored: usize,
    refused: usize,
    skipped: usize,
}

/// Sends every entry of `input` on `conn`, one at a time; prints each entry not
/// stored. `Err` when the daemon stopped answering (the rest were not sent).
fn import(input: impl BufRead, conn: &mut Connection, tally: &mut Tally) -> Result<(), String> {
    for (n, line) in input.split(b'\n').enumerate() {
        let n = n + 1;
        let line = Zeroizing::new(line.map_err(|e| format!("reading line {n}: {e}"))?);
        let Ok(text) = std::str::from_utf8(&line) else {
            println!("line {n}: skipped: not UTF-8");
            tally.skipped += 1;
            continue;
        };
        match entry(text) {
            Entry::Blank => {}
            Entry::Skipped(why) => {
                println!("line {n}: skipped: {why}");
                tally.skipped += 1;
            }
            Entry::Request(request) => {
                let answer = conn
                    .request(&request)
                    .map_err(|e| format!("line {n}: the daemon did not answer: {e}"))?;
                match refusal(&answer) {
                    None => tally.stored += 1,
                    Some(why) => {
                        println!("line {n}: refused: {why}");
                        tally.refused += 1;
                    }
                }
            }
        }
    }
    Ok(())
}

/// `apikeyd import-keys`: exit 0 when every entry was stored, 1 when any was refused
/// or skipped, 2 when the input, the config or the daemon could not be used.
pub fn import_keys(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    file: Option<PathBuf>,
) -> ExitCode {
    let socket = match super::tools::client_socket(socket, config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("apikeyd import-keys: {e}");
            return ExitCode::from(2);
        }
    };
    let input: Box<dyn Read> = match &file {
        Some(path) => match std::fs::File::open(path) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("apikeyd import-keys: cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => Box::new(std::io::stdin()),
    };
    run(&socket, BufReader::new(input))
}

fn run(socket: &Path, input: impl BufRead) -> ExitCode {
    let mut conn = match Connection::connect(socket, Timeouts::TOOL) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "apikeyd import-keys: cannot connect to {}: {e} (is `apikeyd serve` running, \
                 and is this user in the socket's group?)",
                socket.display()
            );
            return ExitCode::from(2);
        }
    };
    let mut tally = Tally::default();
    let result = import(input, &mut conn, &mut tally);
    println!(
        "{} stored, {} refused, {} skipped",
        tally.stored, tally.refused, tally.skipped
    );
    match result {
        Err(e) => {
            eprintln!(
                "apikeyd import-keys: {e}; rerun to carry on (storing a key again is harmless)"
            );
            ExitCode::from(2)
        }
        Ok(()) if tally.refused + tally.skipped > 0 => ExitCode::from(1),
        Ok(()) => ExitCode::SUCCESS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_read_without_quoting_the_key() {
        let key = "sk-SECRET-entry-0123456789";
        let skipped = |line: &str| match entry(line) {
            Entry::Skipped(why) => {
                assert!(!why.contains(key), "{why}");
                why
            }
            _ => panic!("not skipped: {line}"),
        };
        assert!(skipped(&format!(
            "{{\"user_id\":1,\"service\":\"x\",\"key\":\"{key}\""
        ))
        .contains("not JSON"));
        assert!(skipped(&format!("[\"{key}\"]")).contains("object"));
        assert!(skipped(&format!(
            "{{\"user_id\":-1,\"service\":\"x\",\"key\":\"{key}\"}}"
        ))
        .contains("user_id"));
        assert!(skipped(&format!(
            "{{\"user_id\":\"a\",\"service\":7,\"key\":\"{key}\"}}"
        ))
        .contains("service"));
        assert!(skipped(r#"{"user_id":"a","service":"x","key":5}"#).contains("key"));
        assert!(matches!(entry("  "), Entry::Blank));
        match entry(&format!(
            "{{\"user_id\":42,\"service\":\"openai\",\"key\":\"{key}\"}}"
        )) {
            Entry::Request(r) => {
                let v: Value = serde_json::from_str(&r).unwrap();
                assert_eq!(v["op"], "set_user_api_key");
                assert_eq!(v["user_id"], "42");
                assert_eq!(v["key"], key);
            }
            _ => panic!("a valid entry"),
        }
    }
}
