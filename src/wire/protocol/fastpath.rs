//! The request lines almost every client sends, read without serde_json: one flat
//! object of plain strings, small non-negative integers, booleans and nulls. Any other
//! shape (an escape, a nested value, a fraction, a duplicate member, a syntax error)
//! is left to serde_json, so the answers and errors stay exactly serde's.
//!
//! A child of `protocol` so it fills the same private `Members` the serde path does.

use serde_json::value::RawValue;

use super::{KeyParam, Members, Param};

/// One member's value, as the fast path reads it.
enum Scalar<'a> {
    Str(&'a str),
    U64(u64),
    Bool(bool),
    Null,
}

/// A cursor over one line; every method answers `None` for a shape it leaves to serde.
struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    /// Skips JSON whitespace (space, tab, CR, LF).
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// A string without escapes or control characters, after its opening quote; the
    /// text is valid UTF-8 already, and `"` never occurs inside a multi-byte character.
    fn string(&mut self) -> Option<&'a str> {
        let bytes = self.text.as_bytes();
        let start = self.at;
        let len = memchr::memchr2(b'"', b'\\', &bytes[start..])?;
        let end = start + len;
        if bytes[end] != b'"' || bytes[start..end].iter().any(|&b| b < 0x20) {
            return None;
        }
        self.at = end + 1;
        Some(&self.text[start..end])
    }

    /// An integer of at most 19 digits without sign, fraction or exponent (so it fits
    /// a `u64`); anything else that starts like a number is serde's.
    fn integer(&mut self) -> Option<u64> {
        let bytes = self.text.as_bytes();
        let start = self.at;
        let digits = bytes[start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let leading_zero = digits > 1 && bytes[start] == b'0';
        if digits == 0 || digits > 19 || leading_zero {
            return None;
        }
        self.at += digits;
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.text[start..self.at].parse().ok()
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        let rest = self.text.as_bytes().get(self.at..self.at + word.len())?;
        (rest == word.as_bytes()).then(|| self.at += word.len())
    }

    fn scalar(&mut self) -> Option<Scalar<'a>> {
        match self.peek()? {
            b'"' => {
                self.at += 1;
                self.string().map(Scalar::Str)
            }
            b'0'..=b'9' => self.integer().map(Scalar::U64),
            b't' => self.literal("true").map(|()| Scalar::Bool(true)),
            b'f' => self.literal("false").map(|()| Scalar::Bool(false)),
            b'n' => self.literal("null").map(|()| Scalar::Null),
            _ => None,
        }
    }
}

impl Scalar<'_> {
    /// The member's value; `None` for `null`, which counts as absent (as in serde).
    fn param(&self) -> Option<Param> {
        match *self {
            Scalar::Str(s) => Some(Param::Str(s.to_owned())),
            Scalar::U64(n) => Some(Param::U64(n)),
            Scalar::Bool(b) => Some(Param::Bool(b)),
            Scalar::Null => None,
        }
    }
}

/// The members of a flat request line, or `None` to let serde_json read it.
pub(super) fn members(text: &str) -> Option<Box<Members>> {
    let mut members = Box::<Members>::default();
    // The members already seen, by their bit in `slot`: serde refuses a second one.
    let mut seen = 0u32;
    let mut c = Cursor { text, at: 0 };
    c.skip_ws();
    c.eat(b'{')?;
    c.skip_ws();
    if c.eat(b'}').is_none() {
        loop {
            c.eat(b'"')?;
            let name = c.string()?;
            c.skip_ws();
            c.eat(b':')?;
            c.skip_ws();
            let raw_start = c.at;
            let value = c.scalar()?;
            let raw = &text[raw_start..c.at];
            if let Some(bit) = slot(name) {
                if seen & bit != 0 {
                    return None;
                }
                seen |= bit;
                set(&mut members, name, &value, raw)?;
            }
            c.skip_ws();
            match c.peek()? {
                b',' => {
                    c.at += 1;
                    c.skip_ws();
                }
                b'}' => {
                    c.at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    c.skip_ws();
    (c.at == text.len()).then_some(members)
}

/// The names `Members` knows, each with its own bit; other members are skipped.
const NAMES: [&str; 17] = [
    "op",
    "id",
    "user_id",
    "service",
    "channel_id",
    "key",
    "key_id",
    "label",
    "tool_name",
    "fallback_to_pool",
    "fallback_to_config",
    "daily_limit",
    "current",
    "limit",
    "outcome",
    "retry_after_s",
    "idempotency_key",
];

fn slot(name: &str) -> Option<u32> {
    NAMES.iter().position(|n| *n == name).map(|i| 1 << i)
}

/// Stores one known member; `None` only if the id cannot be kept as raw JSON.
fn set(m: &mut Members, name: &str, value: &Scalar, raw: &str) -> Option<()> {
    let field = match name {
        "id" => {
            if !matches!(value, Scalar::Null) {
                m.id = Some(RawValue::from_string(raw.to_owned()).ok()?);
            }
            return Some(());
        }
        "key" => {
            m.key = value.param().map(KeyParam);
            return Some(());
        }
        "op" => &mut m.op,
        "user_id" => &mut m.user_id,
        "service" => &mut m.service,
        "channel_id" => &mut m.channel_id,
        "key_id" => &mut m.key_id,
        "label" => &mut m.label,
        "tool_name" => &mut m.tool_name,
        "fallback_to_pool" => &mut m.fallback_to_pool,
        "fallback_to_config" => &mut m.fallback_to_config,
        "daily_limit" => &mut m.daily_limit,
        "current" => &mut m.current,
        "limit" => &mut m.limit,
        "outcome" => &mut m.outcome,
        "retry_after_s" => &mut m.retry_after_s,
        "idempotency_key" => &mut m.idempotency_key,
        _ => return Some(()),
    };
    *field = value.param();
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Everything a parsed `Members` holds, in one comparable string.
    fn describe(m: &Members) -> String {
        let mut out = String::new();
        out.push_str(m.id.as_deref().map_or("-", RawValue::get));
        out.push('|');
        for p in [&m.op, &m.idempotency_key] {
            match p {
                Some(p) => p.encode_into(&mut out),
                None => out.push('-'),
            }
            out.push('|');
        }
        out.push_str(&m.parameters_text(""));
        out
    }

    /// What serde_json makes of `text`: its members, or its error message.
    fn serde(text: &str) -> std::result::Result<String, String> {
        serde_json::from_str::<Members>(text)
            .map(|m| describe(&m))
            .map_err(|e| e.to_string())
    }

    /// The fast path either leaves `text` to serde, or reads exactly what serde reads.
    fn agrees(text: &str) -> std::result::Result<bool, TestCaseError> {
        match members(text) {
            None => Ok(false),
            Some(fast) => {
                prop_assert_eq!(Ok(describe(&fast)), serde(text), "line: {}", text);
                Ok(true)
            }
        }
    }

    fn taken(text: &str) -> bool {
        agrees(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_hot_lines_take_the_fast_path() {
        for line in [
            r#"{"op":"get_user_api_key","user_id":"bench-1","service":"openai"}"#,
            r#"{"op":"get_user_api_key","user_id":"u","service":"s","fallback_to_config":false}"#,
            r#"{"op":"check_default_key_limit","user_id":"bench-1","tool_name":"t"}"#,
            r#"{"op":"consume_default_key_usage","user_id":"u","tool_name":"t","daily_limit":1000000000}"#,
            r#" { "id" : 42 , "op" : "ping" } "#,
            r#"{"id":"req-7","op":"get_pool_api_key","service":"openai"}"#,
            r#"{"op":"get_user_api_key","user_id":123456789012345678,"service":"openai","channel_id":null}"#,
            "{\"op\":\"x\",\"user_id\":\"\u{e9}l\u{e8}ve-\u{1f600}\"}",
            r#"{"op":"x","extra":1,"more":"y","flag":true}"#,
            r#"{"op":"x","extra":1,"extra":2}"#,
            "{}",
            r#"{"id":null}"#,
            "{\"op\":\"x\"}\r\t ",
        ] {
            assert!(taken(line), "{line}");
        }
    }

    #[test]
    fn unusual_shapes_are_left_to_serde() {
        for line in [
            r#"{"op":"get_user_api_key","user_id":"a\"b","service":"openai"}"#,
            r#"{"op":"x","user_id":"\u0075"}"#,
            r#"{"\u006fp":"x"}"#,
            r#"{"op":"x","op":"y"}"#,
            r#"{"op":"x","user_id":null,"user_id":"u"}"#,
            r#"{"op":"x","id":1.5}"#,
            r#"{"op":"x","daily_limit":1e3}"#,
            r#"{"op":"x","daily_limit":-1}"#,
            r#"{"op":"x","daily_limit":01}"#,
            r#"{"op":"x","daily_limit":18446744073709551616}"#,
            r#"{"op":"x","daily_limit":12345678901234567890}"#,
            r#"{"op":"x","extra":{"a":1}}"#,
            r#"{"op":"x","extra":[1]}"#,
            r#"{"op":"x",}"#,
            r#"{"op":"x"} x"#,
            r#"{"op":"x""#,
            r#"{"op" "x"}"#,
            r#"{"op":"x"}{}"#,
            r#"{"op":tru}"#,
            r#"{"op":"tab	inside"}"#,
            r#"["x"]"#,
            "",
        ] {
            assert!(!taken(line), "{line}");
        }
    }

    /// A flat member as clients write it, or nearly.
    fn member() -> impl Strategy<Value = String> {
        let name = prop_oneof![
            proptest::sample::select(NAMES.to_vec()).prop_map(str::to_string),
            "[a-z_]{0,6}",
            ".{0,4}",
        ];
        let value = prop_oneof![
            "[a-zA-Z0-9_.:-]{0,12}".prop_map(|s| format!("\"{s}\"")),
            ".{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            "[^\"]{0,6}".prop_map(|s| format!("\"{s}\"")),
            any::<u64>().prop_map(|n| n.to_string()),
            (0u64..2_000_000_000).prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            "-?[0-9]{1,3}(\\.[0-9]{1,2})?([eE][+-]?[0-9])?",
            proptest::sample::select(vec!["true", "false", "null", "nul", "[]", "{}", "[1,{}]"])
                .prop_map(str::to_string),
        ];
        let ws = proptest::sample::select(vec!["", "", " ", "\t", "\r\n", "  "]);
        (name, ws.clone(), value, ws).prop_map(|(n, w1, v, w2)| {
            format!("{w1}{}{w2}:{w1}{v}{w2}", serde_json::to_string(&n).unwrap())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// Generated flat lines: whatever the fast path reads, serde reads the same.
        #[test]
        fn agrees_with_serde(members in prop::collection::vec(member(), 0..8)) {
            let text = format!("{{{}}}", members.join(","));
            agrees(&text)?;
        }

        /// The same lines cut or with one byte changed: still never a different answer.
        #[test]
        fn agrees_on_damaged_lines(
            members in prop::collection::vec(member(), 1..6),
            at in any::<prop::sample::Index>(),
            byte in prop_oneof![Just(b'"'), Just(b','), Just(b'}'), Just(b'\\'), Just(b' '), any::<u8>()],
            cut in any::<bool>(),
        ) {
            let mut bytes = format!("{{{}}}", members.join(",")).into_bytes();
            let i = at.index(bytes.len());
            if cut { bytes.truncate(i) } else { bytes[i] = byte }
            if let Ok(text) = std::str::from_utf8(&bytes) {
                agrees(text)?;
            }
        }
    }
}
