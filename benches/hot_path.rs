//! Criterion benchmarks of the pieces on the hot path: parsing and validating a
//! request line, encoding a response, a cache hit through the actor, the resolver,
//! cached pool picks (healthy, and with half the pool cooling down), and
//! sealing/opening a key. `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::rc::Rc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};

use apikeyd::keys::{MasterKey, Place, Secret};
use apikeyd::model::pool::{HealthRules, Outcome, PoolRef};
use apikeyd::ops::app::App;
use apikeyd::ops::resolver::{resolve, Query};
use apikeyd::process::config::Config;
use apikeyd::store::cache::LookupUserKey;
use apikeyd::store::keystore;
use apikeyd::store::messages::StoreUserKey;
use apikeyd::store::messages::{AddPoolKey, ReportPoolKey};
use apikeyd::wire::protocol::{self, Line};

const LINE: &[u8] = br#"{"op":"get_user_api_key","id":17,"user_id":"user-123","service":"OpenAI","channel_id":"chan-9"}"#;

fn parse(c: &mut Criterion) {
    c.bench_function("parse + validate a get_user_api_key line", |b| {
        b.iter(|| {
            let Line::Request(mut req) = protocol::parse_line(black_box(LINE)) else {
                panic!()
            };
            black_box(req.user_id().unwrap());
            black_box(req.service().unwrap());
            black_box(req.channel_id().unwrap());
            black_box(req.fallback_to_pool().unwrap());
        })
    });
}

fn encode(c: &mut Criterion) {
    let result = protocol::body(
        &serde_json::json!({"key": "sk-0123456789abcdef0123456789abcdef", "source": "user"}),
    )
    .unwrap();
    let id = Some(serde_json::value::RawValue::from_string("17".into()).unwrap());
    let mut out = Vec::with_capacity(256);
    c.bench_function("encode a response line", |b| {
        b.iter(|| {
            out.clear();
            protocol::write_response(&mut out, black_box(&id), black_box(&Ok(result.clone())));
            black_box(&out);
        })
    });
}

fn crypto(c: &mut Criterion) {
    let key = MasterKey::from_text(&MasterKey::generate_base64()).unwrap();
    let place = Place::User {
        user_id: "user-123",
        service: "openai",
    };
    let sealed = key.seal(b"sk-0123456789abcdef0123456789abcdef", place);
    c.bench_function("seal a key", |b| {
        b.iter(|| black_box(key.seal(black_box(b"sk-0123456789abcdef0123456789abcdef"), place)))
    });
    c.bench_function("open a key", |b| {
        b.iter(|| black_box(key.open(black_box(&sealed), place).is_ok()))
    });
    let secret = Secret::new("sk-0123456789abcdef0123456789abcdef".into());
    c.bench_function("key_id", |b| {
        b.iter(|| black_box(key.key_id(black_box(&secret))))
    });
}

/// A keystore in a temp dir with the actors running, one user key stored and cached.
fn actors(system: &actix_rt::SystemRunner, dir: &std::path::Path) -> Rc<App> {
    let mut config = Config::parse("").unwrap();
    config.keystore.path = dir.join("keystore.sqlite3");
    config.keystore.master_key_file = dir.join("master.key");
    // Pools stay cached for the whole measurement.
    config.cache.pool_ttl_s = 3600;
    system.block_on(async move {
        // The daemon's own wiring (`apikeyd::start`), as `serve` builds it.
        let opened = keystore::open(&config, 2).unwrap();
        let app = apikeyd::start(config, opened).unwrap().app;
        app.keystore
            .send(StoreUserKey {
                user_id: "user-123".into(),
                service: "openai".into(),
                key: Secret::new("sk-bench".into()),
                idem: None,
                owner: 0,
            })
            .await
            .unwrap()
            .unwrap();
        app.cache
            .send(LookupUserKey {
                user_id: "user-123".into(),
                service: "openai".into(),
            })
            .await
            .unwrap()
            .unwrap();
        app
    })
}

/// A global pool of four keys of `service`; the first `cooling` of them reported
/// rate-limited for an hour.
async fn pool(app: &App, service: &str, cooling: usize) -> PoolRef {
    let pool = PoolRef {
        channel: None,
        service: service.into(),
    };
    for i in 0..4 {
        let (key_id, _) = app
            .store
            .add_pool_key(AddPoolKey {
                pool: pool.clone(),
                key: Secret::new(format!("sk-bench-pool-{i}-0123456789")),
                label: None,
                idem: None,
            })
            .await
            .unwrap()
            .value;
        if i < cooling {
            app.store
                .report_pool_key(ReportPoolKey {
                    pool: pool.clone(),
                    key_id,
                    outcome: Outcome::RateLimited,
                    retry_after_s: Some(3600),
                    rules: HealthRules {
                        cooldown_s: 60,
                        error_threshold: 3,
                    },
                    idem: None,
                })
                .await
                .unwrap();
        }
    }
    pool
}

fn pool_picks(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let system = actix_rt::System::new();
    let app = actors(&system, dir.path());
    for (name, service, cooling) in [
        ("pool pick, cached, healthy pool", "healthy", 0),
        ("pool pick, cached, half the pool cooling", "cooling", 2),
    ] {
        let pool = system.block_on(pool(&app, service, cooling));
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (app, pool) = (app.clone(), pool.clone());
                system.block_on(async move {
                    let began = Instant::now();
                    for _ in 0..iters {
                        black_box(app.cache_reader.pool_key(&pool).await.unwrap());
                    }
                    began.elapsed()
                })
            })
        });
    }
}

fn cache_and_resolver(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let system = actix_rt::System::new();
    let app = actors(&system, dir.path());
    c.bench_function("cache hit through the KeyCache actor", |b| {
        b.iter_custom(|iters| {
            let app = app.clone();
            system.block_on(async move {
                let began = Instant::now();
                for _ in 0..iters {
                    let hit = app
                        .cache
                        .send(LookupUserKey {
                            user_id: "user-123".into(),
                            service: "openai".into(),
                        })
                        .await;
                    black_box(hit.unwrap().unwrap());
                }
                began.elapsed()
            })
        })
    });
    c.bench_function("cache hit through the same-thread reader", |b| {
        b.iter_custom(|iters| {
            let app = app.clone();
            system.block_on(async move {
                let (mut user, mut service) = ("user-123".to_string(), "openai".to_string());
                let began = Instant::now();
                for _ in 0..iters {
                    black_box(
                        app.cache_reader
                            .user_key(&mut user, &mut service)
                            .await
                            .unwrap(),
                    );
                }
                began.elapsed()
            })
        })
    });
    c.bench_function("resolver, user key cached", |b| {
        b.iter_custom(|iters| {
            let app = app.clone();
            system.block_on(async move {
                let began = Instant::now();
                for _ in 0..iters {
                    let q = Query {
                        user_id: "user-123".into(),
                        service: "openai".into(),
                        channel_id: Some("chan-9".into()),
                        fallback_to_pool: true,
                        fallback_to_config: true,
                    };
                    black_box(resolve(&app, q).await.unwrap().key.is_some());
                }
                began.elapsed()
            })
        })
    });
}

criterion_group!(
    benches,
    parse,
    encode,
    crypto,
    cache_and_resolver,
    pool_picks
);
criterion_main!(benches);
