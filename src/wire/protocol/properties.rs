//! Property tests of the parser: any bytes and any JSON come out as a blank line, a
//! request or an error that echoes the id; no reader panics or echoes a key.

use super::*;
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
