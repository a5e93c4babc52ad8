//! The docs speak to users and stand on their own: no tracker issue numbers, no
//! files outside the repository; the man page and the shell list follow the binary.

mod common;

use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Docs that other work is still rewriting; checked once it lands (remove them here).
const NOT_YET_CHECKED: &[&str] = &["docs/performance.md", "docs/security.md"];

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

#[test]
fn docs_cite_no_issues_and_no_file_outside_the_repository() {
    let mut files = vec!["README.md".to_string(), "config.toml".to_string()];
    for dir in ["docs", "systemd"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let name = format!("{dir}/{}", e.unwrap().file_name().to_string_lossy());
            if !name.ends_with(".svg") && !NOT_YET_CHECKED.contains(&name.as_str()) {
                files.push(name);
            }
        }
    }
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(repo().join(f)).unwrap();
        for c in citations(&text) {
            bad.push(format!("{f}: {c:?}"));
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
