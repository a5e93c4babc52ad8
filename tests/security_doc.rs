//! docs/security.md names, for each claim about what an attacker or a mistake can
//! and cannot do, the test that shows it (`tests/FILE.rs::NAME`). Each named test
//! must exist: a renamed or deleted test leaves a claim unbacked, and this fails.

use std::collections::BTreeSet;
use std::path::Path;

/// Every `tests/FILE.rs::NAME` in `text`.
fn named_tests(text: &str) -> BTreeSet<(String, String)> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("tests/") {
        let rest = &text[at + "tests/".len()..];
        let file = ident(rest);
        let Some(after) = rest[file.len()..].strip_prefix(".rs::") else {
            continue;
        };
        let name = ident(after);
        if !file.is_empty() && !name.is_empty() {
            out.insert((file, name));
        }
    }
    out
}

/// Whether `source` defines test `name`: a `#[test]` fn, or a fn run in every mode
/// by `in_every_mode!`.
fn defines_test(source: &str, name: &str) -> bool {
    let lines: Vec<&str> = source.lines().collect();
    let defined = |l: &str| {
        let l = l.trim_start();
        l.starts_with(&format!("fn {name}(")) || l.starts_with(&format!("async fn {name}("))
    };
    let Some(at) = lines.iter().position(|l| defined(l)) else {
        return false;
    };
    let marked = at > 0 && lines[at - 1].trim() == "#[test]";
    let every_mode = source
        .split("in_every_mode!(")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .any(|list| list.split(',').any(|n| n.trim() == name));
    marked || every_mode
}

#[test]
fn every_test_named_in_the_security_doc_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/security.md")).unwrap();
    let named = named_tests(&doc);
    assert!(
        named.len() >= 30,
        "docs/security.md names only {} tests",
        named.len()
    );
    let mut missing = Vec::new();
    for (file, name) in &named {
        let source = std::fs::read_to_string(root.join("tests").join(format!("{file}.rs")))
            .unwrap_or_default();
        if !defines_test(&source, name) {
            missing.push(format!("tests/{file}.rs::{name}"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/security.md names tests that do not exist: {missing:?}"
    );
}

#[test]
fn the_parser_finds_names_and_tells_tests_from_helpers() {
    let named = named_tests("see tests/a_b.rs::c_d, and tests/x.rs::y. Not tests/ alone.");
    let want: BTreeSet<(String, String)> = [("a_b", "c_d"), ("x", "y")]
        .iter()
        .map(|(f, n)| (f.to_string(), n.to_string()))
        .collect();
    assert_eq!(named, want);
    let source = "#[test]\nfn real() {}\nfn helper() {}\nfn moded(mode: Mode) {}\nin_every_mode!(\n    moded,\n);\n";
    assert!(defines_test(source, "real"));
    assert!(defines_test(source, "moded"));
    assert!(!defines_test(source, "helper"));
    assert!(!defines_test(source, "absent"));
}
