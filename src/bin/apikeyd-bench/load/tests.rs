//! Unit tests of the load generator: requests, framing and the report.

use super::cpu::cpu_ticks;
use super::*;

fn load(pipeline: usize) -> Load {
    Load {
        connections: 1,
        pipeline,
        duration: Duration::ZERO,
        warmup: Duration::ZERO,
        rate: None,
        keys: 3,
    }
}

#[test]
fn requests_are_encoded_once_per_template_and_key() {
    let r = Requests::apikeyd(&[r#"{"a":"{n}"}"#.into(), r#"{"b":{N}}"#.into()], 3);
    assert_eq!(r.get(0, 2), b"{\"a\":\"2\"}\n");
    assert_eq!(r.get(1, 0), b"{\"b\":0}\n");
    let h = Requests::redis(RedisCommand::Hget, "", 12);
    assert_eq!(
        h.get(0, 11),
        b"*3\r\n$4\r\nHGET\r\n$8\r\nbench:11\r\n$6\r\nopenai\r\n"
    );
    let c = Requests::redis(RedisCommand::Consume, "abc", 1);
    assert!(c
        .get(0, 0)
        .starts_with(b"*7\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n"));
}

#[test]
fn a_batch_cycles_keys_and_templates_and_can_make_each_request_unique() {
    let r = Requests::apikeyd(&[r#"{"k":{n}}"#.into()], 3);
    let (mut n, mut t, mut out) = (0, 0, Vec::new());
    next_batch_bytes(&r, &load(4), &mut n, &mut t, None, &mut out);
    assert_eq!(out, b"{\"k\":1}\n{\"k\":2}\n{\"k\":0}\n{\"k\":1}\n");
    let mut count = 7;
    out.clear();
    next_batch_bytes(
        &r,
        &load(2),
        &mut n,
        &mut t,
        Some(("run-0", &mut count)),
        &mut out,
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"k\":2,\"idempotency_key\":\"run-0-7\"}\n{\"k\":0,\"idempotency_key\":\"run-0-8\"}\n"
    );
    assert_eq!(count, 9);
}

async fn answers(framing: Framing, bytes: &[u8], n: usize) -> Vec<bool> {
    let mut rd = BufReader::with_capacity(4, bytes);
    let mut line = Vec::new();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(read_answer(framing, &mut rd, &mut line).await.unwrap());
    }
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut rest)
        .await
        .unwrap();
    assert!(rest.is_empty(), "every byte belongs to an answer");
    out
}

#[tokio::test]
async fn the_resp_reader_reads_whole_replies_and_sees_errors() {
    let replies = b"$14\r\nsk-a\r\nsk-bench\r\n$-1\r\n*2\r\n:1\r\n:5\r\n-NOSCRIPT no\r\n+OK\r\n*2\r\n$3\r\nabc\r\n*1\r\n:2\r\n";
    assert_eq!(
        answers(Framing::Resp, replies, 6).await,
        [true, true, true, false, true, true]
    );
    let mut rd = BufReader::new(&b"$10\r\nshort"[..]);
    assert!(read_answer(Framing::Resp, &mut rd, &mut Vec::new())
        .await
        .is_err());
}

#[tokio::test]
async fn the_line_reader_counts_answers_without_ok_as_errors() {
    let lines =
        b"{\"id\":1,\"ok\":true,\"result\":{}}\n{\"ok\":false,\"error\":{\"code\":\"x\"}}\n";
    assert_eq!(answers(Framing::JsonLines, lines, 2).await, [true, false]);
}

#[test]
fn cpu_time_is_read_from_proc() {
    let (name, _) = cpu_ticks("self").unwrap();
    assert!(!name.is_empty());
    let mut burn = 0u64;
    let (_, before) = cpu_ticks("self").unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(60) {
        burn = std::hint::black_box(burn.wrapping_add(1));
    }
    let (_, after) = cpu_ticks("self").unwrap();
    assert!(after > before, "60 ms of spinning shows in utime");
    assert!(cpu_ticks("0").is_err());
}

#[test]
fn a_closed_loop_run_below_90_percent_is_client_bound() {
    let target = Target::Redis {
        socket: PathBuf::new(),
        command: RedisCommand::Hget,
    };
    let mut r = report(&target, &load(1), &Tally::new());
    r.requests = 1000;
    let at = Instant::now();
    let tick = ticks_per_second() as u64;
    let first = CpuSample {
        at,
        servers: vec![("redis-server".into(), 0)],
        client: 0,
    };
    let last = |server: u64| CpuSample {
        at: at + Duration::from_secs(1),
        servers: vec![("redis-server".into(), server)],
        client: tick,
    };
    r.add_cpu(&[1], &first, &last(tick / 2));
    assert_eq!(r.saturated, Some(false));
    assert!((r.cpu[0].share - 0.5).abs() < 1e-9);
    assert!((r.cpu_us_per_request.unwrap() - 500.0).abs() < 1e-6);
    assert!(r.line().ends_with("CLIENT-BOUND"), "{}", r.line());
    r.add_cpu(&[1], &first, &last(tick * 95 / 100));
    assert_eq!(r.saturated, Some(true));
    assert!(!r.line().contains("CLIENT-BOUND"));
}
