//! Pools as the daemon speaks of them: a pool's reference, its keys as loaded, each
//! key's health and the rules a report is judged by, and the daily counters.

use crate::keys::Secret;

/// One pool: a channel's (`channel: Some`) or the global one, for one service.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PoolRef {
    pub channel: Option<String>,
    pub service: String,
}

/// What a client reports about a key it was handed (`report_key_result`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    Ok,
    RateLimited,
    Unauthorized,
    Error,
}

impl Outcome {
    /// The wire name parsed; `None` for anything else.
    pub fn parse(name: &str) -> Option<Outcome> {
        match name {
            "ok" => Some(Outcome::Ok),
            "rate_limited" => Some(Outcome::RateLimited),
            "unauthorized" => Some(Outcome::Unauthorized),
            "error" => Some(Outcome::Error),
            _ => None,
        }
    }

    /// The wire name, which is also the name of its daily counter (`error` counts as
    /// `errors`).
    pub fn counter(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::RateLimited => "rate_limited",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Error => "errors",
        }
    }
}

/// `[pools]` rules a report is judged by.
#[derive(Clone, Copy, Debug)]
pub struct HealthRules {
    /// Cooldown of a rate-limited key without `retry_after_s`, and of a key that
    /// reached the error threshold.
    pub cooldown_s: u64,
    /// Errors within a minute that cool a key down.
    pub error_threshold: u32,
}

/// Seconds an error counts towards the threshold.
const ERROR_WINDOW_S: i64 = 60;

/// A pool key's health as stored (JSON in Redis, columns in SQLite). The default is a
/// key nobody reported on.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    /// Unix seconds until which picks skip the key; 0 when it never cooled down.
    #[serde(default)]
    pub cooling_until: i64,
    /// Reported unauthorized: skipped until an admin enables it again.
    #[serde(default)]
    pub disabled: bool,
    /// Start of the current error window (unix seconds).
    #[serde(default)]
    pub errors_since: i64,
    /// Errors in that window.
    #[serde(default)]
    pub errors: u32,
}

/// What picks make of a key now.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Active,
    Cooling,
    Disabled,
}

impl Health {
    /// Applies one report at `now`. Cooldowns only ever move later: a report never
    /// shortens one that is running. The one place these rules live, for both stores.
    pub fn apply(
        &mut self,
        outcome: Outcome,
        now: i64,
        retry_after_s: Option<u64>,
        rules: HealthRules,
    ) {
        let cool_for = |s: u64| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX));
        match outcome {
            Outcome::Ok => {}
            Outcome::RateLimited => {
                let until = cool_for(retry_after_s.unwrap_or(rules.cooldown_s));
                self.cooling_until = self.cooling_until.max(until);
            }
            Outcome::Unauthorized => self.disabled = true,
            Outcome::Error => {
                if now - self.errors_since >= ERROR_WINDOW_S {
                    self.errors_since = now;
                    self.errors = 0;
                }
                self.errors += 1;
                if self.errors >= rules.error_threshold.max(1) {
                    self.cooling_until = self.cooling_until.max(cool_for(rules.cooldown_s));
                    self.errors = 0;
                    self.errors_since = now;
                }
            }
        }
    }

    /// Whether picks may hand the key out at `now`.
    pub fn usable(&self, now: i64) -> bool {
        !self.disabled && self.cooling_until <= now
    }

    /// The state at `now`.
    pub fn state(&self, now: i64) -> KeyState {
        if self.disabled {
            KeyState::Disabled
        } else if self.cooling_until > now {
            KeyState::Cooling
        } else {
            KeyState::Active
        }
    }

    /// The end of a running cooldown, or `None`.
    pub fn cooling_until(&self, now: i64) -> Option<i64> {
        (self.cooling_until > now).then_some(self.cooling_until)
    }

    /// Whether picks treat `self` and `other` alike (the cached pool then stays valid).
    pub fn same_for_picks(&self, other: &Health) -> bool {
        self.disabled == other.disabled && self.cooling_until == other.cooling_until
    }
}

/// One key of a pool as loaded: decrypted, with its id and health.
pub struct PoolEntry {
    pub key_id: String,
    pub key: Secret,
    pub health: Health,
}

/// Today's counters of one pool key (UTC day).
#[derive(Default, Clone, Copy, serde::Serialize)]
pub struct Counters {
    pub picks: u64,
    pub ok: u64,
    pub rate_limited: u64,
    pub unauthorized: u64,
    pub errors: u64,
}

impl Counters {
    /// Sets the counter named `name` (as `Outcome::counter` or `picks`).
    pub fn set(&mut self, name: &str, n: u64) {
        match name {
            "picks" => self.picks = n,
            "ok" => self.ok = n,
            "rate_limited" => self.rate_limited = n,
            "unauthorized" => self.unauthorized = n,
            "errors" => self.errors = n,
            _ => {}
        }
    }
}

/// Days the daily pool counters are kept before they expire on their own.
pub const COUNTER_DAYS: i64 = 3;

/// One row of `list_pool_keys`.
#[derive(serde::Serialize)]
pub struct PoolKeyInfo {
    pub key_id: String,
    pub masked: String,
    pub label: Option<String>,
    pub added_at: Option<String>,
    pub state: KeyState,
    pub cooling_until: Option<i64>,
    #[serde(flatten)]
    pub today: Counters,
}

/// How many keys a pool has in each state (for `apikeyd_pool_keys`).
pub struct PoolKeyCount {
    pub pool: PoolRef,
    pub active: u64,
    pub cooling: u64,
    pub disabled: u64,
}

impl PoolKeyCount {
    /// No key yet.
    pub fn new(pool: PoolRef) -> Self {
        PoolKeyCount {
            pool,
            active: 0,
            cooling: 0,
            disabled: 0,
        }
    }

    /// Counts one more key in `state`.
    pub fn add(&mut self, state: KeyState) {
        match state {
            KeyState::Active => self.active += 1,
            KeyState::Cooling => self.cooling += 1,
            KeyState::Disabled => self.disabled += 1,
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    const RULES: HealthRules = HealthRules {
        cooldown_s: 60,
        error_threshold: 3,
    };

    #[test]
    fn cooldowns_only_extend() {
        let mut h = Health::default();
        h.apply(Outcome::RateLimited, 1000, Some(120), RULES);
        assert_eq!(h.cooling_until, 1120);
        h.apply(Outcome::RateLimited, 1010, Some(5), RULES);
        assert_eq!(h.cooling_until, 1120, "a shorter report never shortens");
        h.apply(Outcome::RateLimited, 1010, None, RULES);
        assert_eq!(h.cooling_until, 1120);
        h.apply(Outcome::RateLimited, 1100, None, RULES);
        assert_eq!(h.cooling_until, 1160);
        assert_eq!(h.state(1159), KeyState::Cooling);
        assert_eq!(h.state(1160), KeyState::Active);
        assert!(h.usable(1160));
    }

    #[test]
    fn errors_cool_down_at_the_threshold_within_a_minute() {
        let mut h = Health::default();
        h.apply(Outcome::Error, 1000, None, RULES);
        h.apply(Outcome::Error, 1030, None, RULES);
        assert_eq!(h.state(1030), KeyState::Active);
        // The window ran out: counting starts again.
        h.apply(Outcome::Error, 1061, None, RULES);
        h.apply(Outcome::Error, 1062, None, RULES);
        assert_eq!(h.state(1062), KeyState::Active);
        h.apply(Outcome::Error, 1063, None, RULES);
        assert_eq!(h.state(1063), KeyState::Cooling);
        assert_eq!(h.cooling_until(1063), Some(1123));
    }

    #[test]
    fn unauthorized_disables() {
        let mut h = Health::default();
        h.apply(Outcome::Unauthorized, 5, None, RULES);
        assert_eq!(h.state(5), KeyState::Disabled);
        assert!(!h.usable(i64::MAX));
        h.apply(Outcome::Ok, 6, None, RULES);
        assert_eq!(h.state(6), KeyState::Disabled);
        assert_eq!(Outcome::parse("bogus"), None);
        assert_eq!(
            Outcome::parse("error").map(Outcome::counter),
            Some("errors")
        );
    }
}
