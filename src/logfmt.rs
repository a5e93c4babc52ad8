//! Text-format log fields with every control character escaped, so a value from a
//! client or from Redis (an id, a hash field name) can never start a forged line.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escaped("a\nb\r\tc\u{1b}[31m"), "a\\nb\\r\\tc\\u{1b}[31m");
        assert_eq!(escaped("plain ünïcode"), "plain ünïcode");
    }
}
