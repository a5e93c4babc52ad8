//! The wire: one JSON object per line in, one per line out. Parsing a line into a
//! `Request` (here; `fastpath` reads the common flat line without serde_json) and
//! encoding responses, cutting the byte stream into lines
//! (`framing`), and the parameter rules of docs/protocol.md (`params`).

mod fastpath;
mod framing;
mod params;
#[cfg(test)]
mod properties;

pub use framing::{Frame, LineCodec, LineError};
pub use params::{check_ident, check_key, check_service};

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::keys::Secret;

/// Upper bound of `daily_limit`, `current` and `limit`.
pub const MAX_COUNT: u64 = 1_000_000_000;

/// An encoded result or response. Zeroed on drop, because it may hold a key.
pub type Body = Zeroizing<Vec<u8>>;

/// The request's `id` exactly as it was sent (raw JSON), echoed byte for byte.
pub type Id = Option<Box<RawValue>>;

/// A member's value as sent, kept only as far as the parameter rules need.
enum Param {
    Str(String),
    Bool(bool),
    U64(u64),
    /// Negative integers, fractions and numbers out of range: never a valid count.
    OtherNumber,
    /// Arrays and objects.
    Container,
}

impl<'de> Deserialize<'de> for Param {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Param;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Param, E> {
                Ok(Param::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> std::result::Result<Param, E> {
                Ok(Param::Str(v))
            }
            fn visit_bool<E>(self, v: bool) -> std::result::Result<Param, E> {
                Ok(Param::Bool(v))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Param, E> {
                Ok(Param::U64(v))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<Param, E> {
                Ok(u64::try_from(v).map_or(Param::OtherNumber, Param::U64))
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<Param, E> {
                Ok(Param::OtherNumber)
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Param, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Param::Container)
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Param, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Param::Container)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// The `key` member: its text is zeroed on drop, so a key in a request that fails
/// before the key is read (a bad `user_id`, a refused op) is wiped like a used one.
struct KeyParam(Param);

impl Drop for KeyParam {
    fn drop(&mut self) {
        if let Param::Str(s) = &mut self.0 {
            s.zeroize();
        }
    }
}

impl<'de> Deserialize<'de> for KeyParam {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Param::deserialize(d).map(KeyParam)
    }
}

/// The members a request may have; unknown members are skipped unread. A member that
/// is `null` counts as absent.
#[derive(Deserialize, Default)]
struct Members {
    op: Option<Param>,
    id: Id,
    user_id: Option<Param>,
    service: Option<Param>,
    channel_id: Option<Param>,
    key: Option<KeyParam>,
    key_id: Option<Param>,
    label: Option<Param>,
    tool_name: Option<Param>,
    fallback_to_pool: Option<Param>,
    fallback_to_config: Option<Param>,
    daily_limit: Option<Param>,
    current: Option<Param>,
    limit: Option<Param>,
    outcome: Option<Param>,
    retry_after_s: Option<Param>,
    idempotency_key: Option<Param>,
}

impl Param {
    /// Appends an unambiguous encoding of the value (for fingerprints).
    fn encode_into(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = match self {
            Param::Str(s) => write!(out, "s{}:{s}", s.len()),
            Param::Bool(b) => write!(out, "b{b}"),
            Param::U64(n) => write!(out, "u{n}"),
            // Never valid for any parameter: the request fails before it applies.
            Param::OtherNumber => write!(out, "n"),
            Param::Container => write!(out, "c"),
        };
    }
}

impl Members {
    /// Every parameter member that was sent (not `id`, not `idempotency_key`), each
    /// with its name, in one fixed order, encoded unambiguously. Zeroed on drop: it
    /// holds `key`.
    fn parameters_text(&self, op: &str) -> Zeroizing<String> {
        let key = self.key.as_ref().map(|k| &k.0);
        let members: [(&str, Option<&Param>); 14] = [
            ("user_id", self.user_id.as_ref()),
            ("service", self.service.as_ref()),
            ("channel_id", self.channel_id.as_ref()),
            ("key", key),
            ("key_id", self.key_id.as_ref()),
            ("label", self.label.as_ref()),
            ("tool_name", self.tool_name.as_ref()),
            ("fallback_to_pool", self.fallback_to_pool.as_ref()),
            ("fallback_to_config", self.fallback_to_config.as_ref()),
            ("daily_limit", self.daily_limit.as_ref()),
            ("current", self.current.as_ref()),
            ("limit", self.limit.as_ref()),
            ("outcome", self.outcome.as_ref()),
            ("retry_after_s", self.retry_after_s.as_ref()),
        ];
        // Room for everything up front: a growing string would leave copies of the
        // key in memory it gives back.
        let room = members
            .iter()
            .filter_map(|(_, v)| match v {
                Some(Param::Str(s)) => Some(s.len() + 64),
                Some(_) => Some(64),
                None => None,
            })
            .sum::<usize>()
            + op.len()
            + 16;
        let mut out = Zeroizing::new(String::with_capacity(room));
        out.push_str("op=");
        out.push_str(op);
        out.push('\n');
        for (name, value) in members {
            if let Some(value) = value {
                out.push_str(name);
                out.push('=');
                value.encode_into(&mut out);
                out.push('\n');
            }
        }
        out
    }
}

/// One parsed request line: its `id`, its `op`, and the remaining members.
pub struct Request {
    pub id: Id,
    pub op: String,
    /// Boxed: the request is moved into its future and that future into its
    /// allocation; 400 bytes of members copied at each step cost more than one
    /// allocation.
    params: Box<Members>,
    /// The validated identifiers read so far, for the audit line.
    pub subject: Subject,
}

/// What a request is about: only values that passed their parameter rule, never a key.
#[derive(Default, Serialize)]
pub struct Subject {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// What a line turned out to be.
// Boxing the request would cost an allocation per request on the hot path; a `Line`
// only lives on the stack between parsing and dispatch.
#[allow(clippy::large_enum_variant)]
pub enum Line {
    /// Only whitespace: no response.
    Blank,
    /// A request to dispatch.
    Request(Request),
    /// Not a request; answer with this error and the id, if one could be read.
    Invalid { id: Id, error: Error },
}

/// Overwrites the stack below the caller's frame with zeros. Parsing a line leaves
/// pieces of it there (serde_json and memchr spill input chunks into stack slots,
/// and an error path returns before later calls overwrite them); the session calls
/// this after a line that held a key or could not be parsed. 64 KiB covers the
/// parser's deepest frames in a debug build with room to spare.
#[inline(never)]
pub fn scrub_stack() {
    let mut area = [1u8; 64 * 1024];
    // A plain memset (zeroize's byte-wise volatile writes cost milliseconds in a
    // debug build); black_box makes the zeros observed, so the fill stays.
    area.fill(0);
    std::hint::black_box(&mut area);
}

/// Parses one line (without its `\n`).
pub fn parse_line(line: &[u8]) -> Line {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Line::Blank;
    }
    let invalid = |m: &str| Line::Invalid {
        id: None,
        error: Error::BadRequest(m.into()),
    };
    let Ok(text) = std::str::from_utf8(line) else {
        return invalid("request is not valid UTF-8");
    };
    // The common flat line skips serde_json; every other shape is read by it.
    let parsed =
        fastpath::members(text).map_or_else(|| serde_json::from_str(text).map(Box::new), Ok);
    let mut members: Box<Members> = match parsed {
        Ok(m) => m,
        // serde_json's messages give a position, never the offending text.
        Err(e) => match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) if !text.trim_start().starts_with('{') => {
                return invalid("request must be a JSON object")
            }
            Ok(_) => return invalid(&format!("request is not a valid request object: {e}")),
            Err(e) => return invalid(&format!("request is not JSON: {e}")),
        },
    };
    let id = members.id.take();
    match members.op.take() {
        Some(Param::Str(op)) => Line::Request(Request {
            id,
            op,
            params: members,
            subject: Subject::default(),
        }),
        None => Line::Invalid {
            id,
            error: Error::param("op", "is missing"),
        },
        Some(_) => Line::Invalid {
            id,
            error: Error::param("op", "must be a string"),
        },
    }
}

/// Encodes an op's result.
pub fn body<T: Serialize>(result: &T) -> Result<Body> {
    let mut out = Zeroizing::new(Vec::with_capacity(128));
    serde_json::to_writer(&mut *out, result).map_err(|e| {
        tracing::error!(error = %e, "cannot encode a result");
        Error::Internal("cannot encode the result".into())
    })?;
    Ok(out)
}

#[derive(Serialize)]
struct WireError<'a> {
    code: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<bool>,
}

/// Appends the response line for `id` and `outcome`, with its `\n`, to `out`.
pub fn write_response(out: &mut Vec<u8>, id: &Id, outcome: &Result<Body>) {
    write_answer(out, id, outcome, false);
}

/// As [`write_response`]; `replayed` adds `"replayed":true` beside `ok` (a write's
/// recorded answer, sent again for a repeat of its idempotency key).
pub fn write_answer(out: &mut Vec<u8>, id: &Id, outcome: &Result<Body>, replayed: bool) {
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(id.as_deref().map_or("null", RawValue::get).as_bytes());
    match outcome {
        Ok(result) => {
            out.extend_from_slice(b",\"ok\":true,\"result\":");
            out.extend_from_slice(result);
            if replayed {
                out.extend_from_slice(b",\"replayed\":true");
            }
        }
        Err(e) => {
            out.extend_from_slice(b",\"ok\":false,\"error\":");
            let wire = WireError {
                code: e.code(),
                message: e.to_string(),
                applied: e.applied(),
            };
            if serde_json::to_writer(&mut *out, &wire).is_err() {
                out.extend_from_slice(br#"{"code":"internal","message":"encoding failed"}"#);
            }
        }
    }
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn req(line: &str) -> Request {
        match parse_line(line.as_bytes()) {
            Line::Request(r) => r,
            _ => panic!("not a request: {line}"),
        }
    }

    /// (the raw id, the error code) of an invalid line.
    fn error_of(line: &[u8]) -> (String, String) {
        match parse_line(line) {
            Line::Invalid { id, error } => (
                id.as_deref().map_or("null", RawValue::get).to_string(),
                error.code().to_string(),
            ),
            _ => panic!("expected invalid"),
        }
    }

    #[test]
    fn blank_and_invalid_lines() {
        assert!(matches!(parse_line(b"  \t\r"), Line::Blank));
        assert_eq!(error_of(b"{nope").1, "bad_request");
        assert_eq!(error_of(b"[1,2]").1, "bad_request");
        assert_eq!(error_of(b"\xff\xfe").1, "bad_request");
        assert_eq!(error_of(br#"{"id":7}"#), ("7".into(), "bad_request".into()));
        assert_eq!(error_of(br#"{"id":"x","op":5}"#).0, r#""x""#);
        // Ids are kept byte for byte.
        assert_eq!(error_of(br#"{"id": 1.50e+3 ,"op":[]}"#).0, "1.50e+3");
    }

    #[test]
    fn service_rules() {
        assert_eq!(
            req(r#"{"op":"x","service":"OpenAI"}"#).service().unwrap(),
            "openai"
        );
        for bad in [
            r#""""#,
            r#""a b""#,
            r#""a/b""#,
            "5",
            &format!("\"{}\"", "a".repeat(65)),
        ] {
            let mut r = req(&format!(r#"{{"op":"x","service":{bad}}}"#));
            let e = r.service().unwrap_err();
            assert!(e.to_string().contains("service"), "{e}");
        }
    }

    #[test]
    fn key_is_trimmed_and_never_echoed() {
        let mut r = req(r#"{"op":"x","key":"  sk-abc  "}"#);
        assert_eq!(r.key().unwrap().expose(), "sk-abc");
        let mut r = req(r#"{"op":"x","key":"sk-secret\u0007"}"#);
        let e = r
            .key()
            .err()
            .expect("a control character is refused")
            .to_string();
        assert!(!e.contains("sk-secret"));
        let mut r = req(r#"{"op":"x","key":"   "}"#);
        assert!(r.key().is_err());
    }

    #[test]
    fn counts() {
        let count = |v: &str| req(&format!(r#"{{"op":"x","daily_limit":{v}}}"#)).daily_limit();
        assert_eq!(count("0").unwrap(), Some(0));
        assert_eq!(count("1000000000").unwrap(), Some(MAX_COUNT));
        assert_eq!(count("null").unwrap(), None);
        for bad in [
            "1000000001",
            "-1",
            "1.5",
            "\"3\"",
            "[1]",
            "1e3",
            "18446744073709551616",
        ] {
            let e = count(bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.to_string().contains("daily_limit"));
        }
        assert_eq!(req(r#"{"op":"x"}"#).daily_limit().unwrap(), None);
        assert_eq!(
            req(r#"{"op":"x"}"#).limit().err().map(|e| e.to_string()),
            Some("parameter `limit` is missing".into())
        );
    }

    #[test]
    fn integer_ids_are_their_decimal_strings() {
        let mut r = req(r#"{"op":"x","user_id":123456789012345678,"channel_id":0}"#);
        assert_eq!(r.user_id().unwrap(), "123456789012345678");
        assert_eq!(r.channel_id().unwrap().as_deref(), Some("0"));
        for bad in ["-1", "1.5", "18446744073709551616", "true", "[1]"] {
            let mut r = req(&format!(r#"{{"op":"x","user_id":{bad}}}"#));
            let e = r
                .user_id()
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.to_string().contains("user_id"), "{e}");
        }
    }

    #[test]
    fn unknown_and_duplicate_members() {
        let mut r = req(r#"{"op":"x","whatever":{"a":[1,2,{"b":null}]},"user_id":"u"}"#);
        assert_eq!(r.user_id().unwrap(), "u");
        assert!(matches!(
            parse_line(br#"{"op":"x","op":"y"}"#),
            Line::Invalid { .. }
        ));
    }

    #[test]
    fn parameters_text_leaves_out_id_and_the_idempotency_key() {
        let text = |line: &str| req(line).parameters_text().to_string();
        let a = text(r#"{"op":"x","id":1,"user_id":"u","tool_name":"t","idempotency_key":"k1"}"#);
        let b =
            text(r#"{"tool_name":"t","idempotency_key":"k2","user_id":"u","op":"x","id":"other"}"#);
        assert_eq!(a, b, "member order, id and the key itself do not matter");
        assert_ne!(a, text(r#"{"op":"y","user_id":"u","tool_name":"t"}"#));
        assert_ne!(
            a,
            text(r#"{"op":"x","user_id":"u","tool_name":"t","daily_limit":3}"#)
        );
        // Lengths keep values apart from what follows them.
        assert_ne!(
            text(r#"{"op":"x","user_id":"a","service":"b"}"#),
            text(r#"{"op":"x","user_id":"a\nservice=s1:b"}"#)
        );
        let mut r = req(r#"{"op":"x","idempotency_key":"a b"}"#);
        let e = r.idempotency_key().unwrap_err().to_string();
        assert!(e.contains("idempotency_key"), "{e}");
    }

    #[test]
    fn replayed_answers_say_so_and_shutdown_refusals_say_not_applied() {
        let mut out = Vec::new();
        write_answer(&mut out, &None, &Ok(body(&1).unwrap()), true);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (v["ok"].clone(), v["replayed"].clone()),
            (true.into(), true.into())
        );
        let mut out = Vec::new();
        write_response(&mut out, &None, &Err(Error::ShuttingDown));
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["code"], "unavailable");
        assert_eq!(v["error"]["applied"], false);
    }

    #[test]
    fn response_shape() {
        let mut out = Vec::new();
        let id = Some(RawValue::from_string(r#""a""#.into()).unwrap());
        write_response(&mut out, &id, &Err(Error::UnknownOp(Some("zz".into()))));
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["id"], "a");
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["code"], "unknown_op");
        assert!(out.ends_with(b"\n"));
    }
}
