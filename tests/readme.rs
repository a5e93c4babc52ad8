//! The README and docs/operations.md, run as a new operator would type them: every
//! ```sh block, in order, with bash, in a folder laid out like a checkout (the
//! shipped config.toml, `./target/release/apikeyd`), against a daemon freshly
//! started there with `apikeyd serve`. Each `# {...}` comment under a command is
//! the line that command must print (ids, times, key ids and the version masked),
//! and every command must succeed.
//!
//! A block that cannot run on this machine is preceded by an HTML comment
//! `<!-- not run: why -->`; there must be few of them, each with a reason.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// One fenced ```sh block of a Markdown file.
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    text: String,
    /// The reason given by a `<!-- not run: ... -->` right before the block.
    not_run: Option<String>,
}

const NOT_RUN: &str = "<!-- not run:";

/// Every ```sh block of `md`, fences possibly indented (inside a list item).
fn sh_blocks(md: &str) -> Vec<Block> {
    let lines: Vec<&str> = md.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let open = lines[i].trim_start();
        if open.starts_with("```") && open.trim_end() != "```" {
            let indent = lines[i].len() - open.len();
            let is_sh = open.trim_end() == "```sh";
            let start = i;
            let mut text = String::new();
            i += 1;
            while i < lines.len() && lines[i].trim() != "```" {
                let l = lines[i];
                text.push_str(
                    l.get(indent.min(l.len() - l.trim_start().len())..)
                        .unwrap_or(""),
                );
                text.push('\n');
                i += 1;
            }
            if is_sh {
                let before = lines[..start]
                    .iter()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(|l| l.trim())
                    .unwrap_or("");
                let not_run = before
                    .strip_prefix(NOT_RUN)
                    .and_then(|r| r.strip_suffix("-->"))
                    .map(|r| r.trim().to_string());
                blocks.push(Block {
                    line: start + 1,
                    text,
                    not_run,
                });
            }
        }
        i += 1;
    }
    blocks
}

/// One command of a block (continuation lines joined) and the lines it must print.
struct Step {
    line: usize,
    command: String,
    expected: Vec<String>,
}

fn steps(block: &Block) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut pending: Option<Step> = None;
    for (n, raw) in block.text.lines().enumerate() {
        let line = block.line + 1 + n;
        if let Some(mut p) = pending.take() {
            p.command.push('\n');
            p.command.push_str(raw);
            if raw.ends_with('\\') {
                pending = Some(p);
            } else {
                steps.push(p);
            }
            continue;
        }
        let t = raw.trim();
        if let Some(expected) = t.strip_prefix("# {") {
            steps
                .last_mut()
                .unwrap_or_else(|| panic!("line {line}: an expected answer before any command"))
                .expected
                .push(format!("{{{expected}"));
        } else if t.is_empty() || t.starts_with('#') {
            continue;
        } else {
            let step = Step {
                line,
                command: raw.to_string(),
                expected: Vec::new(),
            };
            if raw.ends_with('\\') {
                pending = Some(step);
            } else {
                steps.push(step);
            }
        }
    }
    steps.extend(pending);
    steps
}

/// Replaces what differs from run to run: ids derived from the master key, times,
/// the version, countdowns in messages.
fn mask(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                match k.as_str() {
                    "key_id" | "cooling_until" | "version" | "added_at" | "retry_after_s"
                    | "uptime_s" => *v = Value::String("<masked>".into()),
                    "message" => {
                        if let Value::String(s) = v {
                            *s = s
                                .split(|c: char| c.is_ascii_digit())
                                .filter(|p| !p.is_empty())
                                .collect::<Vec<_>>()
                                .join("N");
                        }
                    }
                    _ => mask(v),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(mask),
        _ => {}
    }
}

fn masked(line: &str) -> String {
    match serde_json::from_str::<Value>(line) {
        Ok(mut v) => {
            mask(&mut v);
            v.to_string()
        }
        Err(_) => line.to_string(),
    }
}

/// A folder laid out like a checkout, with the daemon serving in it.
struct Checkout {
    dir: tempfile::TempDir,
    daemon: Child,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Variables the operator's shell would not have here, and that would change answers.
fn scrub(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.ends_with("_API_KEY") || k.starts_with("APIKEYD_") || k == "CREDENTIALS_DIRECTORY" {
            cmd.env_remove(&*k);
        }
    }
    cmd
}

impl Checkout {
    /// The shipped config.toml, `target/release/apikeyd` and `apikeyd` on PATH (both
    /// the binary cargo built for this test), and `apikeyd serve` started.
    fn start() -> Checkout {
        let dir = tempfile::Builder::new()
            .prefix("apikeyd-readme")
            .tempdir()
            .unwrap();
        std::fs::copy(repo().join("config.toml"), dir.path().join("config.toml")).unwrap();
        for sub in ["target/release", "bin"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            std::os::unix::fs::symlink(common::bin(), dir.path().join(sub).join("apikeyd"))
                .unwrap();
        }
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let daemon = scrub(&mut Command::new(common::bin()))
            .arg("serve")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Checkout { dir, daemon };
        let socket = c.dir.path().join("run/apikeyd.sock");
        common::eventually(
            "the README's daemon listening",
            Duration::from_secs(20),
            || common::Client::try_connect(&socket).is_ok(),
        );
        c
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs the runnable blocks of `doc`, in order, in one bash; `rewrite` adapts
    /// each command to this folder. Answers the blocks not run.
    fn run_doc(&self, doc: &str, rewrite: impl Fn(&str) -> String) -> Vec<Block> {
        let md = std::fs::read_to_string(repo().join(doc)).unwrap();
        let (skipped, run): (Vec<Block>, Vec<Block>) = sh_blocks(&md)
            .into_iter()
            .partition(|b| b.not_run.is_some());
        let steps: Vec<Step> = run.iter().flat_map(steps).collect();
        assert!(!steps.is_empty(), "{doc}: no command to run");
        // Nothing here may touch the host: a command that still names a system path
        // after `rewrite` (or asks for root or systemd) fails the test before any
        // command runs. Such a block needs a `<!-- not run: why -->`.
        for s in &steps {
            let cmd = rewrite(&s.command).replace(&*self.dir.path().to_string_lossy(), "DIR");
            for host in [
                "/etc/",
                "/usr/",
                "/var/",
                "/run/",
                "/lib/",
                "sudo",
                "systemctl",
            ] {
                // A path of its own, not one inside this folder (DIR/run/…).
                let touches = cmd.match_indices(host).any(|(i, _)| {
                    !host.starts_with('/')
                        || !cmd[..i]
                            .chars()
                            .next_back()
                            .is_some_and(|c| c.is_alphanumeric() || c == '.')
                });
                assert!(
                    !touches,
                    "{doc}:{}: `{cmd}` would touch the host ({host}): mark its block \
                     `<!-- not run: why -->` or adapt it",
                    s.line
                );
            }
        }
        // Aliases, as in the operator's interactive shell.
        let mut script = String::from("shopt -s expand_aliases\n");
        for (i, s) in steps.iter().enumerate() {
            script.push_str(&format!(
                "echo '@@step {i}'\n{}\necho \"@@status {i} $?\"\n",
                rewrite(&s.command)
            ));
        }
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = scrub(&mut Command::new("bash"))
            .arg("-c")
            .arg(&script)
            .current_dir(self.dir.path())
            .env("PATH", path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut printed: Vec<Vec<String>> = vec![Vec::new(); steps.len()];
        let mut status: Vec<Option<i32>> = vec![None; steps.len()];
        let mut current = None;
        for l in stdout.lines() {
            if let Some(i) = l.strip_prefix("@@step ") {
                current = Some(i.parse::<usize>().unwrap());
            } else if let Some(rest) = l.strip_prefix("@@status ") {
                let (i, code) = rest.split_once(' ').unwrap();
                status[i.parse::<usize>().unwrap()] = code.parse().ok();
                current = None;
            } else if let Some(i) = current {
                printed[i].push(l.to_string());
            }
        }
        for (i, s) in steps.iter().enumerate() {
            let context = format!(
                "{doc}:{}: `{}`\nprinted:\n{}\nstderr of the run:\n{stderr}",
                s.line,
                s.command,
                printed[i].join("\n")
            );
            assert_eq!(status[i], Some(0), "exit status of {context}");
            if s.expected.is_empty() {
                continue;
            }
            let want: Vec<String> = s.expected.iter().map(|l| masked(l)).collect();
            let got: Vec<String> = printed[i].iter().map(|l| masked(l)).collect();
            assert_eq!(got, want, "{context}");
        }
        skipped
    }
}

#[test]
fn the_readme_runs_as_written() {
    let c = Checkout::start();
    let skipped = c.run_doc("README.md", str::to_string);
    // The tour's report is recorded and cools the key down (it did not when the
    // README hard-coded a key id): the state says so too.
    let mut client = common::Client::connect(&c.path("run/apikeyd.sock"));
    let keys = client.ok(serde_json::json!({"op": "list_pool_keys", "service": "openai"}));
    assert_eq!(keys["keys"][0]["state"], "cooling", "{keys}");
    assert_eq!(keys["keys"][0]["rate_limited"], 1, "{keys}");
    // Only the Python install, which .ci/run does in clients/python/run-tests.sh.
    assert_eq!(skipped.len(), 1, "blocks not run in README.md");
    for b in &skipped {
        assert!(
            b.not_run.as_deref().is_some_and(|r| r.len() > 10),
            "README.md:{}: say why the block is not run",
            b.line
        );
    }
}

/// docs/operations.md's commands name the installed paths; here they are this
/// folder's: the socket and config under /run and /etc, node_exporter's folder,
/// and `sudo` (the test runs them as whoever runs it).
#[test]
fn the_operations_guide_runs_where_it_can() {
    let c = Checkout::start();
    std::fs::create_dir_all(c.path("node_exporter")).unwrap();
    // The guide's example pool key, with its id as this master key derives it.
    let mut client = common::Client::connect(&c.path("run/apikeyd.sock"));
    let added = client.ok(serde_json::json!({"op": "add_pool_key", "service": "openai", "key": "sk-shared-9876543210"}));
    let key_id = added["key_id"].as_str().unwrap().to_string();
    let dir = c.dir.path().display().to_string();
    let skipped = c.run_doc("docs/operations.md", |cmd| {
        cmd.replace(
            "/run/apikeyd/apikeyd.sock",
            &format!("{dir}/run/apikeyd.sock"),
        )
        .replace("/etc/apikeyd/config.toml", &format!("{dir}/config.toml"))
        .replace("/var/lib/node_exporter", &format!("{dir}/node_exporter"))
        .replace("8cc326f70949e750", &key_id)
        .replace("sudo ", "")
    });
    let key = std::fs::metadata(c.path("new-master.key")).expect("keygen wrote the key");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
    assert!(
        std::fs::read_to_string(c.path("node_exporter/apikeyd.prom"))
            .unwrap()
            .contains("apikeyd_requests_total"),
        "the textfile collector example wrote the metrics"
    );
    // Few, and each says why: installing into the host (root, PID-1 systemd).
    assert!(
        skipped.len() <= 6,
        "{} blocks of docs/operations.md are not run",
        skipped.len()
    );
    for b in &skipped {
        let why = b.not_run.as_deref().unwrap_or("");
        assert!(
            why.len() > 10,
            "docs/operations.md:{}: say why the block is not run",
            b.line
        );
    }
}

#[test]
fn blocks_and_steps_are_found() {
    let md = "text\n<!-- not run: needs PID-1 systemd -->\n```sh\nsudo x\n```\n\n  ```sh\n  a \\\n    b\n  # {\"ok\":true}\n  ```\n```toml\nx=1\n```\n";
    let blocks = sh_blocks(md);
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].not_run.as_deref(), Some("needs PID-1 systemd"));
    assert!(blocks[1].not_run.is_none());
    let s = steps(&blocks[1]);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].command, "a \\\n  b");
    assert_eq!(s[0].expected, vec!["{\"ok\":true}"]);
    assert_eq!(
        masked(r#"{"result":{"key_id":"abc","message":"retry in 29 s"}}"#),
        masked(r#"{"result":{"key_id":"def","message":"retry in 30 s"}}"#)
    );
}
