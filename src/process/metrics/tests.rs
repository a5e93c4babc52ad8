//! Unit tests of the metrics: the Prometheus text for each family.

use super::*;

#[test]
fn ops_and_codes_are_bounded() {
    let m = Metrics::new(false);
    m.record(Some(Op::Ping), "ok", Some(Duration::from_micros(10)));
    m.record(Some(Op::Ping), "ok", None);
    m.record(None, "unknown_op", None);
    m.record(Some(Op::GetUserApiKey), "weird", None);
    let (by_op, by_code) = m.by_op_and_code();
    assert_eq!(by_op["ping"], 2);
    assert_eq!(by_op[OTHER_OP], 1);
    assert_eq!(by_op["get_user_api_key"], 1);
    assert_eq!(by_code["ok"], 2);
    assert_eq!(by_code["internal"], 1);
}

#[test]
fn counters_are_named_as_their_samples() {
    let m = Metrics::new(true);
    m.record(Some(Op::Ping), "ok", None);
    let status = RedisStatus::default();
    status.count_refusal(crate::error::RedisRefusal::OutOfMemory);
    let text = m
        .render(&Gauges {
            cache: CacheFigures {
                hits: 1,
                misses: 2,
                entries: 3,
            },
            connections: 1,
            redis_up: Some(true),
            redis: Some(&status),
            pools: None,
            unauthenticated_heartbeats: None,
        })
        .unwrap();
    for want in [
        "# HELP apikeyd_requests_total Answers",
        "# TYPE apikeyd_requests_total counter\n",
        "apikeyd_requests_total{op=\"ping\",code=\"ok\"} 1\n",
        "# TYPE apikeyd_redis_refusals_total counter\n",
        "apikeyd_redis_refusals_total{cause=\"oom\"} 1\n",
        "# TYPE apikeyd_cache_entries gauge\n",
        "apikeyd_redis_up 1\n",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        !text.contains("sentinels"),
        "no Sentinel, no sentinel families"
    );
}

#[test]
fn sentinel_families_name_the_master_and_count_sentinels() {
    let status = RedisStatus::default();
    status.sentinels.store(3, Ordering::Relaxed);
    status.sentinels_reachable.store(2, Ordering::Relaxed);
    status.failovers.store(1, Ordering::Relaxed);
    status.set_master("10.0.0.2:6379");
    let text = Metrics::new(true)
        .render(&Gauges {
            cache: CacheFigures {
                hits: 0,
                misses: 0,
                entries: 0,
            },
            connections: 0,
            redis_up: Some(true),
            redis: Some(&status),
            pools: Some(Vec::new()),
            unauthenticated_heartbeats: None,
        })
        .unwrap();
    for want in [
        "apikeyd_redis_master_info{addr=\"10.0.0.2:6379\"} 1\n",
        "apikeyd_sentinels_reachable 2\n",
        "apikeyd_sentinels 3\n",
        "apikeyd_redis_failovers_total 1\n",
        "# HELP apikeyd_redis_failovers_total ",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
}

#[test]
fn bind_errors_keep_their_text() {
    let e = bind(Some("nowhere")).err().unwrap().to_string();
    assert_eq!(
        e,
        "metrics.listen \"nowhere\": invalid socket address syntax"
    );
}
