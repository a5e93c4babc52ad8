//! Wall-clock helpers: unix seconds, RFC 3339 stamps, and the UTC day quotas count in.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the epoch, now.
pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2026-11-28T12:00:00Z` for a unix time.
pub fn rfc3339(unix_s: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix_s.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The UTC calendar day, `2026-11-28`, that quota counters are kept under.
pub fn utc_day() -> String {
    utc_day_at(now_s())
}

/// The UTC calendar day of a unix time.
pub fn utc_day_at(unix_s: i64) -> String {
    let mut s = rfc3339(unix_s);
    s.truncate(10);
    s
}

/// Seconds from now until the next 00:00 UTC.
pub fn seconds_to_midnight() -> i64 {
    86_400 - now_s().rem_euclid(86_400)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc_day().len(), 10);
        assert!((1..=86_400).contains(&super::seconds_to_midnight()));
    }
}
