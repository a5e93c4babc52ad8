//! Socket-level fuzzing: random and mutated request lines thrown at a running daemon,
//! which must answer each non-blank line exactly once, keep serving, and keep every
//! stored key intact.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Mode, TestDaemon};
use serde_json::{json, Value};

/// A small deterministic generator (xorshift64*), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Valid requests to mutate. None touches the guarded users below.
fn templates() -> Vec<Value> {
    vec![
        json!({"op": "ping", "id": 1}),
        json!({"op": "get_user_api_key", "user_id": "f1", "service": "openai", "channel_id": "c"}),
        json!({"op": "set_user_api_key", "user_id": "f2", "service": "openai", "key": "sk-fuzz-000000001"}),
        json!({"op": "delete_user_api_key", "user_id": "f2", "service": "openai"}),
        json!({"op": "list_user_api_keys", "user_id": "f1"}),
        json!({"op": "add_pool_key", "service": "fuzz", "key": "sk-fuzz-pool-0001", "label": "l"}),
        json!({"op": "remove_pool_key", "service": "fuzz", "key_id": "0011223344556677"}),
        json!({"op": "list_pool_keys", "service": "fuzz", "channel_id": "c"}),
        json!({"op": "get_pool_api_key", "service": "fuzz"}),
        json!({"op": "get_channel_pool_api_key", "service": "fuzz", "channel_id": "c"}),
        json!({"op": "consume_default_key_usage", "user_id": "f1", "tool_name": "t", "daily_limit": 5}),
        json!({"op": "check_default_key_limit", "user_id": "f1", "tool_name": "t"}),
        json!({"op": "increment_default_key_usage", "user_id": "f1", "tool_name": "t"}),
        json!({"op": "missing_api_key_error", "service": "openai"}),
        json!({"op": "default_key_limit_error", "tool_name": "t", "current": 1, "limit": 2}),
        json!({"op": "get_gitea_credentials", "user_id": "f1"}),
        json!({"op": "stats"}),
    ]
}

const NASTY: &[&[u8]] = &[
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"null",
    b"1e999",
    b"-0",
    b"\\u0000",
    b"\\ud800",
    b"\r",
    b"\t",
    b" ",
    b"\xe2\x80\xa8",
    b"true",
    b"\"op\":",
    b"9999999999999999999999",
];

fn mutate(rng: &mut Rng, line: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        if line.is_empty() {
            line.push(b'{');
        }
        let at = rng.below(line.len());
        match rng.below(6) {
            0 => line[at] ^= 1 << rng.below(8),
            1 => line[at] = rng.next() as u8,
            2 => {
                let nasty = NASTY[rng.below(NASTY.len())];
                line.splice(at..at, nasty.iter().copied());
            }
            3 => line.truncate(at),
            4 => {
                let end = (at + rng.below(8)).min(line.len());
                line.drain(at..end);
            }
            _ => {
                let copy: Vec<u8> = line[at..].to_vec();
                line.extend_from_slice(&copy);
            }
        }
    }
}

fn fuzz_lines(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let templates = templates();
    let mut out = Vec::new();
    for _ in 0..n {
        let mut line = if rng.below(5) == 0 {
            (0..rng.below(200)).map(|_| rng.next() as u8).collect()
        } else {
            serde_json::to_vec(&templates[rng.below(templates.len())]).unwrap()
        };
        if rng.below(4) != 0 {
            mutate(&mut rng, &mut line);
        }
        out.extend_from_slice(&line);
        out.push(b'\n');
    }
    out
}

fn random_and_mutated_lines_leave_the_daemon_sound(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "guard-a", "service": "openai", "key": "sk-guard-a-00000001"}));
    c.ok(json!({"op": "add_pool_key", "service": "guarded", "key": "sk-guard-pool-00001"}));
    for seed in 1..=4u64 {
        let stream = fuzz_lines(seed * 7919, 3000);
        let expected = stream
            .split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .count();
        let s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&stream);
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        let mut answered = 0;
        for line in BufReader::new(s).lines() {
            let line = line.expect("read");
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("seed {seed}: not JSON ({e}): {line}"));
            assert!(v["ok"].is_boolean(), "seed {seed}: {line}");
            assert!(v.get("id").is_some(), "seed {seed}: {line}");
            if v["ok"] == false {
                assert!(
                    v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                    "{line}"
                );
                assert_ne!(v["error"]["code"], "internal", "seed {seed}: {line}");
            }
            answered += 1;
        }
        writer.join().unwrap();
        assert_eq!(
            answered, expected,
            "seed {seed}: one response per non-blank line"
        );
    }
    // Still serving, and what was stored before is intact.
    let mut c = d.client();
    assert_eq!(c.ok(json!({"op": "ping"}))["pong"], true);
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "guard-a", "service": "openai"}));
    assert_eq!(r["key"], "sk-guard-a-00000001");
    assert_eq!(
        c.ok(json!({"op": "get_pool_api_key", "service": "guarded"}))["key"],
        "sk-guard-pool-00001"
    );
    let pool = c.ok(json!({"op": "list_pool_keys", "service": "guarded"}));
    assert_eq!(pool["keys"].as_array().unwrap().len(), 1);
}

in_every_mode!(random_and_mutated_lines_leave_the_daemon_sound);
