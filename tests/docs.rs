//! The docs speak to users and stand on their own: no tracker issue numbers, no
//! files outside the repository; the man page and the shell list follow the binary.

mod common;

use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// What a user's docs must not cite: issue numbers (`issue 12`, `issues 12 and 14`,
/// `#12`) and the contract file outside the repository.
fn citations(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let lower = text.to_lowercase();
    let b = lower.as_bytes();
    for (i, _) in lower.match_indices("issue") {
        let mut j = i + "issue".len();
        if b.get(j) == Some(&b's') {
            j += 1;
        }
        while matches!(b.get(j), Some(b' ' | b'#')) {
            j += 1;
        }
        if b.get(j).is_some_and(u8::is_ascii_digit) && j > i + 5 {
            found.push(lower[i..(j + 2).min(lower.len())].to_string());
        }
    }
    for (i, _) in lower.match_indices('#') {
        let before = i.checked_sub(1).map(|k| b[k]);
        let word_before = before.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'&');
        if !word_before && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            found.push(lower[i..(i + 4).min(lower.len())].to_string());
        }
    }
    for needle in ["shared/spec", "spec.md", "spec §"] {
        if lower.contains(needle) {
            found.push(needle.to_string());
        }
    }
    found
}

fn help_texts() -> Vec<(String, String)> {
    let run = |args: &[&str]| {
        let out = Command::new(common::bin()).args(args).output().unwrap();
        assert!(out.status.success(), "apikeyd {args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let mut texts = vec![
        ("apikeyd --help".to_string(), run(&["--help"])),
        ("apikeyd man".to_string(), run(&["man"])),
    ];
    for sub in [
        "serve",
        "check-config",
        "call",
        "metrics",
        "import-legacy",
        "rotate-master-key",
        "migrate-user-keys",
        "keygen",
        "completions",
        "man",
    ] {
        texts.push((format!("apikeyd {sub} --help"), run(&[sub, "--help"])));
    }
    texts
}

/// The files under `dir` (relative to the repository), recursively, whose names end
/// with `ext` (any name when `ext` is empty).
fn files_under(dir: &str, ext: &str) -> Vec<String> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_string()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(repo().join(&dir)).unwrap() {
            let e = e.unwrap();
            let name = format!("{dir}/{}", e.file_name().to_string_lossy());
            if e.file_type().unwrap().is_dir() {
                dirs.push(name);
            } else if name.ends_with(ext) {
                files.push(name);
            }
        }
    }
    files.sort();
    files
}

/// The comments of Rust source (`//`, `///`, `//!`; not a `//` after `:`, as in a
/// URL), one line each, joined with spaces so that a citation wrapped over two
/// comment lines is still one.
fn rust_comments(source: &str) -> String {
    let mut out = String::new();
    for line in source.lines() {
        let at = line
            .match_indices("//")
            .find(|(i, _)| *i == 0 || line.as_bytes()[i - 1] != b':');
        if let Some((i, _)) = at {
            out.push_str(line[i..].trim_start_matches(['/', '!']).trim());
            out.push(' ');
        }
    }
    out
}

#[test]
fn docs_cite_no_issues_and_no_file_outside_the_repository() {
    let mut files = vec![
        "README.md".to_string(),
        "config.toml".to_string(),
        "clients/python/README.md".to_string(),
    ];
    for dir in ["docs", "systemd"] {
        files.extend(
            files_under(dir, "")
                .into_iter()
                .filter(|f| !f.ends_with(".svg")),
        );
    }
    // The Python client's docstrings are what `help()` shows its users.
    files.extend(files_under("clients/python/src", ".py"));
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(repo().join(f)).unwrap();
        for c in citations(&text) {
            bad.push(format!("{f}: {c:?}"));
        }
    }
    // Rustdoc and comments are read by whoever works on the code, who can no more
    // follow a tracker number or a file outside the repository than a user can.
    for f in files_under("src", ".rs") {
        let text = std::fs::read_to_string(repo().join(&f)).unwrap();
        for c in citations(&rust_comments(&text)) {
            bad.push(format!("{f} (comments): {c:?}"));
        }
    }
    for (what, text) in help_texts() {
        for c in citations(&text) {
            bad.push(format!("{what}: {c:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "citations a user cannot follow:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_citation_finder_finds_them() {
    assert_eq!(citations("see issue 12").len(), 1);
    assert_eq!(citations("features of issues 12 and 14").len(), 1);
    assert_eq!(citations("fixed in #12.").len(), 1);
    assert_eq!(citations("the contract is ../shared/SPEC.md §2").len(), 2);
    assert_eq!(citations("(SPEC §4)").len(), 1);
    assert!(citations("an issue with 3 keys; security.md#the-keyring; &#39;").is_empty());
}

#[test]
fn rust_comments_are_read_whole_and_code_is_not() {
    let source = "//! Pools (issue\n//! 12).\n\
                  let url = \"redis://h/#1\"; // see SPEC §4\n#[derive(Debug)]\n";
    let comments = rust_comments(source);
    assert_eq!(citations(&comments), vec!["issue 12", "spec §"]);
    assert!(!comments.contains("redis"), "{comments}");
}

#[test]
fn the_man_page_has_the_sections_and_names_no_missing_page() {
    let out = Command::new(common::bin()).arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH COMMANDS",
        ".SH \"EXIT STATUS\"",
        ".SH \"FILES\"",
        ".SH \"SIGNALS\"",
        ".SH \"ENVIRONMENT\"",
        ".SH \"SEE ALSO\"",
    ] {
        assert!(page.contains(section), "man page lacks {section}");
    }
    // Every command is in this one page; no per-command page is installed.
    assert!(
        !page.contains("apikeyd-"),
        "a reference to apikeyd-<cmd>(1)"
    );
    for sub in ["serve", "check-config", "call", "migrate-user-keys", "man"] {
        assert!(page.contains(&format!(".SS \"apikeyd {sub}\"")), "{sub}");
    }
    // The page the package ships (build.rs) is the binary's.
    let built = Path::new(common::bin())
        .parent()
        .unwrap()
        .join("assets/apikeyd.1");
    assert_eq!(std::fs::read_to_string(built).unwrap(), page);
}

#[test]
fn the_docs_list_every_shell_the_binary_completes() {
    use clap::ValueEnum;
    let offered: Vec<String> = clap_complete::Shell::value_variants()
        .iter()
        .map(|s| s.to_possible_value().unwrap().get_name().to_string())
        .collect();
    let ops = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let line = ops
        .lines()
        .find_map(|l| l.strip_prefix("- `apikeyd completions "))
        .expect("docs/operations.md lists `apikeyd completions SHELLS`");
    let listed: Vec<String> = line
        .split('`')
        .next()
        .unwrap()
        .split('|')
        .map(str::to_string)
        .collect();
    let mut sorted = offered.clone();
    sorted.sort();
    assert_eq!(listed, sorted, "docs/operations.md vs the binary");
    for shell in &offered {
        let out = Command::new(common::bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
}

/// Every key the config structs know, as `table.key` (`services.<name>.key` for the
/// per-service tables), read from the structs themselves through serde.
fn config_keys() -> Vec<String> {
    use apikeyd::process::config::{Config, ServiceConfig};
    let mut keys = Vec::new();
    let config = serde_json::to_value(Config::default()).unwrap();
    for (table, members) in config.as_object().unwrap() {
        if table == "services" {
            continue;
        }
        for key in members.as_object().expect("a table").keys() {
            keys.push(format!("{table}.{key}"));
        }
    }
    let service = serde_json::to_value(ServiceConfig::default()).unwrap();
    for key in service.as_object().unwrap().keys() {
        keys.push(format!("services.<name>.{key}"));
    }
    keys
}

/// The `table.key`s config.toml sets or shows commented out (`# key = …`), tables
/// commented out included; `[services.x]` tables count as `services.<name>`.
fn keys_in_config_toml(text: &str) -> Vec<String> {
    let mut table = String::new();
    let mut keys = Vec::new();
    for line in text.lines() {
        let l = line.trim_start_matches(['#', ' ']).trim_end();
        if let Some(name) = l.strip_prefix('[').and_then(|l| l.split(']').next()) {
            if !name.is_empty() && !name.contains(' ') {
                table = match name.strip_prefix("services.") {
                    Some(_) => "services.<name>".to_string(),
                    None => name.to_string(),
                };
            }
            continue;
        }
        let Some((key, _)) = l.split_once(" = ") else {
            continue;
        };
        let key = key.trim();
        if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            keys.push(format!("{table}.{key}"));
        }
    }
    keys
}

#[test]
fn every_config_key_is_in_config_toml_and_the_guide() {
    let known = config_keys();
    assert!(known.len() > 40, "{known:?}");
    let toml = std::fs::read_to_string(repo().join("config.toml")).unwrap();
    let shown = keys_in_config_toml(&toml);
    let ops = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    // The rows of the configuration reference: `| `table.key`, `table.key2` | …`.
    let documented: Vec<&str> = ops
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| l.split(" | ").next().unwrap().split('`').skip(1).step_by(2))
        .collect();
    let mut missing = Vec::new();
    for key in &known {
        if !shown.contains(key) {
            missing.push(format!("config.toml lacks {key}"));
        }
        if !documented.contains(&key.as_str()) {
            missing.push(format!("docs/operations.md's reference lacks {key}"));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    // And config.toml, as shipped, is a config the daemon accepts.
    let out = Command::new(common::bin())
        .args(["check-config", "--config"])
        .arg(repo().join("config.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("unknown field"), "{stderr}");
}

#[test]
fn config_toml_keys_are_read_from_commented_lines_too() {
    let keys = keys_in_config_toml(
        "[server]\nsocket = \"x\"   # a = b\n# lock = true\n# [metrics]\n# listen = \"\"\n\
         [services.openai]\nenv = \"X\"\n# prose that says = something\n",
    );
    assert_eq!(
        keys,
        vec![
            "server.socket",
            "server.lock",
            "metrics.listen",
            "services.<name>.env"
        ]
    );
}

#[test]
fn the_other_commands_list_every_command() {
    let ops = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let out = Command::new(common::bin()).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    // The command names in `apikeyd --help`'s list.
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.contains(&"migrate-user-keys"), "{help}");
    for c in commands {
        let listed = c == "serve" || ops.contains(&format!("- `apikeyd {c}"));
        assert!(
            listed,
            "docs/operations.md, \"Other commands\", lacks `apikeyd {c}`"
        );
    }
    // Shared decision: the import command other work adds is documented already.
    assert!(ops.contains("- `apikeyd import-keys"));
}
