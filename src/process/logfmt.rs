//! Text-format log fields with every control character escaped, so a value from a
//! client or from Redis (an id, a hash field name) can never start a forged line;
//! and [`Repeated`], which keeps a warning that recurs every second to one line on
//! change and a summary a minute.

use std::time::{Duration, Instant};

use tracing::field::Field;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{self, FormatFields, Writer};

/// Writes `text` with control characters as escapes (`\n`, `\r`, `\t`, `\u{1b}`).
pub fn escape_into(out: &mut impl std::fmt::Write, text: &str) -> std::fmt::Result {
    for c in text.chars() {
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if c.is_control() => write!(out, "\\u{{{:x}}}", c as u32)?,
            c => out.write_char(c)?,
        }
    }
    Ok(())
}

/// `text` with its control characters escaped.
pub fn escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let _ = escape_into(&mut out, text);
    out
}

/// The field formatter of the text log: `name=value` pairs separated by spaces like
/// tracing's default, the message bare, every value escaped.
pub fn escaping_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    format::debug_fn(
        |w: &mut Writer<'_>, field: &Field, value: &dyn std::fmt::Debug| {
            let text = format!("{value:?}");
            if field.name() == "message" {
                escape_into(w, &text)
            } else {
                write!(w, "{}=", field.name())?;
                escape_into(w, &text)
            }
        },
    )
    .delimited(" ")
}

/// How often a warning that keeps recurring is summed up in the log.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// A condition that may recur many times a second (Redis refusing writes, the
/// fleet heartbeat not written): said when it starts, then at most once per
/// [`SUMMARY_EVERY`] with the count since, and once when it ends with the total.
#[derive(Debug, Default)]
pub struct Repeated {
    /// Since when the condition holds; `None` while it does not.
    since: Option<Instant>,
    said_at: Option<Instant>,
    /// The latest occurrence.
    last: Option<Instant>,
    /// Occurrences since the condition began, and since it was last said.
    total: u64,
    unsaid: u64,
}

/// What to log for one occurrence of a [`Repeated`] condition.
#[derive(Debug, PartialEq, Eq)]
pub enum Say {
    /// The condition began: log it.
    First,
    /// A summary is due: `times` more occurrences since the last line, `total` in all.
    Again { times: u64, total: u64 },
    /// Already said recently.
    Nothing,
}

impl Repeated {
    /// One more occurrence at `now`.
    pub fn hit(&mut self, now: Instant) -> Say {
        self.total += 1;
        self.last = Some(now);
        let Some(said_at) = self.said_at.filter(|_| self.since.is_some()) else {
            self.since = Some(now);
            self.said_at = Some(now);
            self.total = 1;
            self.unsaid = 0;
            return Say::First;
        };
        self.unsaid += 1;
        if now.duration_since(said_at) < SUMMARY_EVERY {
            return Say::Nothing;
        }
        self.said_at = Some(now);
        Say::Again {
            times: std::mem::take(&mut self.unsaid),
            total: self.total,
        }
    }

    /// The condition no longer holds: how many times it occurred and for how
    /// long, when it held (log the recovery), else `None`.
    pub fn end(&mut self, now: Instant) -> Option<(u64, Duration)> {
        let since = self.since.take()?;
        let total = std::mem::take(&mut self.total);
        self.unsaid = 0;
        self.said_at = None;
        Some((total, now.duration_since(since)))
    }

    /// Like [`Repeated::end`], but only once the condition has not occurred for
    /// `quiet`: for a condition that flickers (an accept that fails, then succeeds
    /// once, then fails again), so that the log does not flicker with it.
    pub fn end_when_quiet(&mut self, now: Instant, quiet: Duration) -> Option<(u64, Duration)> {
        let last = self.last.filter(|_| self.since.is_some())?;
        if now.duration_since(last) < quiet {
            return None;
        }
        self.end(now)
    }

    /// Whether the condition holds.
    pub fn holds(&self) -> bool {
        self.since.is_some()
    }
}

/// Logs one occurrence of a recurring warning `what` (caused by `error`): the
/// first at once, then a count at most once per [`SUMMARY_EVERY`].
pub fn warn_repeated(r: &mut Repeated, error: &dyn std::fmt::Display, what: &str) {
    match r.hit(Instant::now()) {
        Say::First => tracing::warn!(error = %error, "{what}"),
        Say::Again { times, total } => tracing::warn!(error = %error, times, total,
            "{what} (still; {times} times in the last minute)"),
        Say::Nothing => {}
    }
}

/// Ends a recurring warning: logs `what` with how often and how long it occurred,
/// if it was going on.
pub fn recovered(r: &mut Repeated, what: &str) {
    if let Some((times, lasted)) = r.end(Instant::now()) {
        tracing::info!(
            times,
            seconds = lasted.as_secs(),
            "{what} after {times} failures"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_said_once_then_summed_up() {
        let t0 = Instant::now();
        let mut r = Repeated::default();
        assert_eq!(r.end(t0), None);
        assert_eq!(r.hit(t0), Say::First);
        for s in 1..60 {
            assert_eq!(r.hit(t0 + Duration::from_secs(s)), Say::Nothing);
        }
        assert_eq!(
            r.hit(t0 + Duration::from_secs(60)),
            Say::Again {
                times: 60,
                total: 61
            }
        );
        assert_eq!(r.hit(t0 + Duration::from_secs(61)), Say::Nothing);
        assert!(r.holds());
        assert_eq!(
            r.end(t0 + Duration::from_secs(62)),
            Some((62, Duration::from_secs(62)))
        );
        assert!(!r.holds());
        assert_eq!(r.hit(t0 + Duration::from_secs(63)), Say::First);
        let quiet = Duration::from_secs(5);
        assert_eq!(r.end_when_quiet(t0 + Duration::from_secs(64), quiet), None);
        assert_eq!(r.hit(t0 + Duration::from_secs(65)), Say::Nothing);
        assert_eq!(
            r.end_when_quiet(t0 + Duration::from_secs(70), quiet),
            Some((2, Duration::from_secs(7)))
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escaped("a\nb\r\tc\u{1b}[31m"), "a\\nb\\r\\tc\\u{1b}[31m");
        assert_eq!(escaped("plain ünïcode"), "plain ünïcode");
    }
}
