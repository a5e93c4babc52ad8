//! The wire: one JSON object per line in, one per line out. Parsing a line into a
//! `Request`, the parameter rules of SPEC §2, and encoding responses.

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use zeroize::{Zeroize, Zeroizing};

use crate::crypto::Secret;
use crate::error::{Error, Result};

mod fastpath;

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

/// Splits the byte stream of a connection into lines of at most `max` bytes. Lines
/// come out as their own writable buffers, so the session can zero each one once it
/// is parsed (tokio-util's line codecs hand out shared, read-only `Bytes`).
///
/// A longer line comes out as [`Frame::TooLong`] once, then its bytes are wiped and
/// dropped as they arrive up to its `\n`: the connection goes on with the next line,
/// and a line without end costs no more memory than `max`.
pub struct LineCodec {
    max: usize,
    /// Where the search for `\n` resumes: bytes before it were already searched.
    searched: usize,
    /// Inside a line that was too long: dropping bytes up to its `\n`.
    discarding: bool,
}

/// What the codec makes of the stream.
pub enum Frame {
    /// One line, without its `\n`.
    Line(bytes::BytesMut),
    /// A line longer than the limit; its bytes are skipped up to its `\n`.
    TooLong,
}

/// Reading a line failed.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl LineCodec {
    /// A codec for lines of at most `max` bytes (the `\n` not counted).
    pub fn new(max: usize) -> Self {
        LineCodec {
            max,
            searched: 0,
            discarding: false,
        }
    }

    /// Drops (wiped: a skipped line may hold a key) the bytes of a skipped line that
    /// are in `buf`; answers whether its `\n` was among them.
    fn skip(&mut self, buf: &mut bytes::BytesMut) -> bool {
        let (n, found) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        buf[..n].zeroize();
        let _ = buf.split_to(n);
        self.discarding = !found;
        self.searched = 0;
        found
    }
}

impl tokio_util::codec::Decoder for LineCodec {
    type Item = Frame;
    type Error = LineError;

    fn decode(
        &mut self,
        buf: &mut bytes::BytesMut,
    ) -> std::result::Result<Option<Frame>, LineError> {
        if self.discarding && !self.skip(buf) {
            return Ok(None);
        }
        let end = buf.len().min(self.max + 1);
        match memchr::memchr(b'\n', &buf[self.searched.min(end)..end]) {
            Some(i) => {
                let at = self.searched + i;
                self.searched = 0;
                let mut line = buf.split_to(at + 1);
                line.truncate(at);
                Ok(Some(Frame::Line(line)))
            }
            None if buf.len() > self.max => {
                self.skip(buf);
                Ok(Some(Frame::TooLong))
            }
            None => {
                self.searched = end;
                Ok(None)
            }
        }
    }

    fn decode_eof(
        &mut self,
        buf: &mut bytes::BytesMut,
    ) -> std::result::Result<Option<Frame>, LineError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() || self.discarding => {
                self.skip(buf);
                Ok(None)
            }
            // A last line without `\n`, answered at half-close.
            None => {
                self.searched = 0;
                Ok(Some(Frame::Line(buf.split())))
            }
        }
    }
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

/// `service`: 1–64 characters of `[A-Za-z0-9_.-]`.
pub fn check_service(s: &str) -> Result<()> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::param(
            "service",
            "must be 1-64 characters of A-Z a-z 0-9 _ . -",
        ))
    }
}

/// Identifiers (`user_id`, `channel_id`, `tool_name`, `key_id`): 1–`max` bytes, no
/// control characters, no whitespace.
pub fn check_ident(name: &str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() || s.len() > max || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::param(
            name,
            format!("must be 1-{max} bytes without whitespace or control characters"),
        ));
    }
    Ok(())
}

/// `key`: trimmed, then 1–4096 bytes without control characters. The message never
/// repeats the value.
pub fn check_key(raw: Secret) -> Result<Secret> {
    let trimmed = raw.expose().trim();
    if trimmed.is_empty() || trimmed.len() > 4096 || trimmed.chars().any(char::is_control) {
        return Err(Error::param(
            "key",
            "must be 1-4096 bytes without control characters (after trimming whitespace)",
        ));
    }
    if trimmed.len() == raw.expose().len() {
        Ok(raw)
    } else {
        Ok(Secret::new(trimmed.to_owned()))
    }
}

/// A member taken out of a request (each is read once), with its wire name for
/// messages. Only [`take!`] makes one, from a field of `Members`: a misspelled
/// member is a compile error, not a silent default.
struct Taken {
    name: &'static str,
    param: Option<Param>,
}

macro_rules! take {
    ($req:ident . $field:ident) => {
        Taken {
            name: stringify!($field),
            param: $req.params.$field.take(),
        }
    };
}

impl Taken {
    /// A string; `None` when absent or null.
    fn opt_string(self) -> Result<Option<String>> {
        match self.param {
            None => Ok(None),
            Some(Param::Str(s)) => Ok(Some(s)),
            Some(_) => Err(Error::param(self.name, "must be a string")),
        }
    }

    fn string(self) -> Result<String> {
        let name = self.name;
        self.opt_string()?
            .ok_or_else(|| Error::param(name, "is missing"))
    }

    /// An identifier of 1–`max` bytes (see [`check_ident`]).
    fn ident(self, max: usize) -> Result<String> {
        let name = self.name;
        let s = self.string()?;
        check_ident(name, &s, max)?;
        Ok(s)
    }

    /// `user_id` or `channel_id`: a string, or a non-negative JSON integer (a Discord
    /// snowflake, as the original module's callers pass) taken as its decimal string.
    /// `None` when absent or null.
    fn opt_id(self) -> Result<Option<String>> {
        let id = match self.param {
            None => return Ok(None),
            Some(Param::Str(s)) => s,
            Some(Param::U64(n)) => n.to_string(),
            Some(_) => {
                return Err(Error::param(
                    self.name,
                    "must be a string or a non-negative integer",
                ))
            }
        };
        check_ident(self.name, &id, 128)?;
        Ok(Some(id))
    }

    fn id(self) -> Result<String> {
        let name = self.name;
        self.opt_id()?
            .ok_or_else(|| Error::param(name, "is missing"))
    }

    /// A boolean; `None` when absent or null.
    fn flag(self) -> Result<Option<bool>> {
        match self.param {
            None => Ok(None),
            Some(Param::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(Error::param(self.name, "must be true or false")),
        }
    }

    /// An integer from 0 to [`MAX_COUNT`]; `None` when absent or null.
    fn opt_count(self) -> Result<Option<u64>> {
        match self.param {
            None => Ok(None),
            Some(Param::U64(v)) if v <= MAX_COUNT => Ok(Some(v)),
            Some(_) => Err(Error::param(
                self.name,
                "must be an integer from 0 to 1000000000",
            )),
        }
    }

    fn count(self) -> Result<u64> {
        let name = self.name;
        self.opt_count()?
            .ok_or_else(|| Error::param(name, "is missing"))
    }
}

/// One reader per member, named after it; the ops build their own parameter structs
/// from these (`ops::Params`). Identifiers that pass their rule are noted in
/// `subject` for the audit line.
impl Request {
    /// Whether the request carries a `key` member (ask before it is read).
    pub fn carries_key(&self) -> bool {
        self.params.key.is_some()
    }

    /// `idempotency_key` (optional): 1–128 bytes, the rules of `user_id` (a string only).
    pub fn idempotency_key(&mut self) -> Result<Option<String>> {
        let k = take!(self.idempotency_key).opt_string()?;
        if let Some(k) = &k {
            check_ident("idempotency_key", k, 128)?;
        }
        Ok(k)
    }

    /// What a write's idempotency record is compared by: `op` and every parameter
    /// sent, as text (zeroed on drop; it holds any `key`). Read it before the op
    /// takes its parameters. The request's `id` is not part of it: a retry may
    /// carry another id.
    pub fn parameters_text(&self) -> Zeroizing<String> {
        self.params.parameters_text(&self.op)
    }

    /// Whether `user_id` was sent (and not null) and is still unread.
    pub fn has_user_id(&self) -> bool {
        self.params.user_id.is_some()
    }

    /// Whether `key_id` was sent (and not null) and is still unread.
    pub fn has_key_id(&self) -> bool {
        self.params.key_id.is_some()
    }

    /// Whether `service` was sent (and not null) and is still unread.
    pub fn has_service(&self) -> bool {
        self.params.service.is_some()
    }

    /// `service`, validated and lower-cased.
    pub fn service(&mut self) -> Result<String> {
        let mut s = take!(self.service).string()?;
        check_service(&s)?;
        s.make_ascii_lowercase();
        self.subject.service = Some(s.clone());
        Ok(s)
    }

    /// `user_id` (required): a string, or a non-negative integer as its decimal string.
    pub fn user_id(&mut self) -> Result<String> {
        let u = take!(self.user_id).id()?;
        self.subject.user_id = Some(u.clone());
        Ok(u)
    }

    /// `channel_id` (optional; absent or null is `None`); integers as for `user_id`.
    pub fn channel_id(&mut self) -> Result<Option<String>> {
        let c = take!(self.channel_id).opt_id()?;
        self.subject.channel_id.clone_from(&c);
        Ok(c)
    }

    /// `channel_id` where an op requires it.
    pub fn required_channel_id(&mut self) -> Result<String> {
        let c = take!(self.channel_id).id()?;
        self.subject.channel_id = Some(c.clone());
        Ok(c)
    }

    /// `tool_name`: 1–128 bytes, no whitespace or control characters.
    pub fn tool_name(&mut self) -> Result<String> {
        let t = take!(self.tool_name).ident(128)?;
        self.subject.tool_name = Some(t.clone());
        Ok(t)
    }

    /// `key_id`: 1–64 bytes, no whitespace or control characters.
    pub fn key_id(&mut self) -> Result<String> {
        let k = take!(self.key_id).ident(64)?;
        self.subject.key_id = Some(k.clone());
        Ok(k)
    }

    /// `label`: optional, at most 256 bytes, no control characters.
    pub fn label(&mut self) -> Result<Option<String>> {
        let l = take!(self.label).opt_string()?;
        if let Some(l) = &l {
            if l.len() > 256 || l.chars().any(char::is_control) {
                return Err(Error::param(
                    "label",
                    "must be at most 256 bytes without control characters",
                ));
            }
        }
        Ok(l)
    }

    /// `key`: see [`check_key`].
    pub fn key(&mut self) -> Result<Secret> {
        let param = self
            .params
            .key
            .take()
            .map(|mut k| std::mem::replace(&mut k.0, Param::Container));
        let taken = Taken { name: "key", param };
        check_key(Secret::new(taken.string()?))
    }

    /// `outcome` (required), a string the op maps to its vocabulary.
    pub fn outcome(&mut self) -> Result<String> {
        take!(self.outcome).string()
    }

    /// `fallback_to_pool`: `None` when absent or null.
    pub fn fallback_to_pool(&mut self) -> Result<Option<bool>> {
        take!(self.fallback_to_pool).flag()
    }

    /// `fallback_to_config`: `None` when absent or null.
    pub fn fallback_to_config(&mut self) -> Result<Option<bool>> {
        take!(self.fallback_to_config).flag()
    }

    /// `daily_limit` (optional count).
    pub fn daily_limit(&mut self) -> Result<Option<u64>> {
        take!(self.daily_limit).opt_count()
    }

    /// `retry_after_s` (optional count).
    pub fn retry_after_s(&mut self) -> Result<Option<u64>> {
        take!(self.retry_after_s).opt_count()
    }

    /// `current` (required count).
    pub fn current(&mut self) -> Result<u64> {
        take!(self.current).count()
    }

    /// `limit` (required count).
    pub fn limit(&mut self) -> Result<u64> {
        take!(self.limit).count()
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

    mod properties {
        use super::super::*;
        use proptest::prelude::*;
        use serde_json::Value;

        /// Runs every parameter reader on `req`, as the ops do; none may panic.
        fn read_all(mut req: Request) {
            let _ = req.service();
            let _ = req.user_id();
            let _ = req.channel_id();
            let _ = req.required_channel_id();
            let _ = req.tool_name();
            let _ = req.key_id();
            let _ = req.label();
            let _ = req.key();
            let _ = req.fallback_to_pool();
            let _ = req.fallback_to_config();
            let _ = req.daily_limit();
            let _ = req.limit();
            let _ = req.current();
            let _ = req.has_user_id();
            let _ = req.outcome();
            let _ = req.retry_after_s();
            let _ = req.idempotency_key();
        }

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                ".{0,40}".prop_map(Value::String),
                prop_oneof![
                    Just("ping"),
                    Just("get_user_api_key"),
                    Just("openai"),
                    Just("u1"),
                    Just(" sk-x "),
                ]
                .prop_map(|s| Value::String(s.into())),
            ];
            leaf.prop_recursive(4, 64, 8, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(
                        prop_oneof![
                            Just("op".to_string()),
                            Just("id".to_string()),
                            Just("service".to_string()),
                            Just("user_id".to_string()),
                            Just("key".to_string()),
                            Just("channel_id".to_string()),
                            Just("daily_limit".to_string()),
                            Just("limit".to_string()),
                            Just("outcome".to_string()),
                            Just("retry_after_s".to_string()),
                            ".{0,8}".prop_map(|s| s),
                        ],
                        inner,
                        0..8,
                    )
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Arbitrary bytes: never a panic, and exactly one response unless blank.
            #[test]
            fn any_bytes(line in prop::collection::vec(any::<u8>(), 0..300)) {
                let blank = line.iter().all(u8::is_ascii_whitespace);
                match parse_line(&line) {
                    Line::Blank => prop_assert!(blank),
                    Line::Invalid { error, .. } => {
                        prop_assert!(!blank);
                        prop_assert_eq!(error.code(), "bad_request");
                    }
                    Line::Request(req) => {
                        prop_assert!(!blank);
                        read_all(req);
                    }
                }
            }

            /// Arbitrary JSON: objects with a string op are requests, everything else an
            /// error that still echoes the id when there is one; validators never panic
            /// and never echo a key.
            #[test]
            fn any_json(v in json_value()) {
                let text = serde_json::to_string(&v).unwrap();
                match parse_line(text.as_bytes()) {
                    Line::Blank => prop_assert!(false, "JSON is never blank"),
                    Line::Invalid { id, error } => {
                        let is_request = matches!(&v, Value::Object(m) if matches!(m.get("op"), Some(Value::String(_))));
                        prop_assert!(!is_request);
                        if let Value::Object(m) = &v {
                            let sent = m.get("id").map_or("null".into(), |i| serde_json::to_string(i).unwrap());
                            prop_assert_eq!(id.as_deref().map_or("null", RawValue::get), sent.as_str());
                        }
                        let mut out = Vec::new();
                        write_response(&mut out, &id, &Err(error));
                        prop_assert!(serde_json::from_slice::<Value>(&out).is_ok());
                    }
                    Line::Request(mut req) => {
                        if let Err(e) = req.key() {
                            if let Some(Value::String(k)) = v.get("key") {
                                let k = k.trim();
                                if k.len() >= 4 {
                                    prop_assert!(!e.to_string().contains(k));
                                }
                            }
                        }
                        read_all(req);
                    }
                }
            }
        }
    }
}
