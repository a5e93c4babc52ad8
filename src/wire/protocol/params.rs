//! The parameter rules (docs/protocol.md, "Parameter rules"): one reader per
//! parameter on `Request`, each taking its member once and checking its shape.

use super::*;

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
