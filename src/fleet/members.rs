//! Membership: each daemon's authenticated heartbeat (which key versions it holds),
//! the live members read back, the sealing version they allow, and the heartbeat
//! task that gates rotation and stops a daemon whose key the fleet retired.

use super::*;

/// One live daemon, as its heartbeat describes it.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub struct Member {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub socket: String,
    /// The key versions it can open.
    pub versions: Vec<u32>,
    /// The version it seals new values with.
    pub sealing: u32,
    pub at: i64,
    /// Per key version it holds that is not retired, the record's tag under the
    /// heartbeat key derived from that version (`MasterKey::heartbeat_tag`), so that
    /// a Redis writer without the master key cannot fake or alter a heartbeat.
    #[serde(default)]
    pub tags: BTreeMap<u32, String>,
}

impl Member {
    /// "host h1, pid 12, socket /run/apikeyd/apikeyd.sock: holds [1, 2], seals with 2".
    pub fn describe(&self) -> String {
        // Escaped: anyone who can write Redis writes these fields.
        format!(
            "host {}, pid {}, socket {}: holds key versions {:?}, seals with {}",
            self.host.escape_debug(),
            self.pid,
            self.socket.escape_debug(),
            self.versions,
            self.sealing
        )
    }

    fn newest(&self) -> u32 {
        self.versions.iter().copied().max().unwrap_or(0)
    }

    /// What the tags authenticate: every field but the tags, in an unambiguous form.
    fn signed_text(&self) -> Vec<u8> {
        serde_json::to_vec(&(
            "apikeyd heartbeat",
            &self.id,
            &self.host,
            self.pid,
            &self.socket,
            &self.versions,
            self.sealing,
            self.at,
        ))
        .unwrap_or_default()
    }

    /// Tags the record under every version of `key` that is not `retired`.
    pub fn sign(&mut self, key: &MasterKey, retired: &BTreeSet<u32>) {
        let text = self.signed_text();
        self.tags = key
            .versions()
            .into_iter()
            .filter(|v| !retired.contains(v))
            .filter_map(|v| Some((v, key.heartbeat_tag(v, &text)?)))
            .collect();
    }

    /// Whether the record is a fleet daemon's own, listed under `id`: one of its tags
    /// verifies under a version of `key` that is not `retired` (a retired version
    /// may have leaked, so it authenticates nothing).
    pub(super) fn authentic(&self, id: &[u8], key: &MasterKey, retired: &BTreeSet<u32>) -> bool {
        if self.id.as_bytes() != id {
            return false;
        }
        let text = self.signed_text();
        self.tags
            .iter()
            .any(|(v, tag)| !retired.contains(v) && key.heartbeat_tag_matches(*v, &text, tag))
    }
}

/// The fleet set's members, as read from Redis and judged with the reader's key.
#[derive(Default)]
pub(super) struct Beats {
    /// Authenticated heartbeats.
    live: Vec<Member>,
    /// Ids whose heartbeat expired: the daemon is gone (the id is removed from the set).
    gone: Vec<Vec<u8>>,
    /// Escaped ids whose value is not a heartbeat (another type, not JSON, no versions).
    stray: Vec<String>,
    /// Ids (raw) whose heartbeat no tag authenticates: written by someone without
    /// the fleet's key (or by a daemon whose every version is retired).
    forged: Vec<Vec<u8>>,
}

/// Sorts the heartbeats of the fleet's member ids (bytes: an id that is not UTF-8
/// must not hide the others), with the values read for them.
pub(super) fn sort_beats(
    ids: &[Vec<u8>],
    values: Vec<Option<Vec<u8>>>,
    key: &MasterKey,
    retired: &BTreeSet<u32>,
) -> Beats {
    let mut out = Beats::default();
    for (id, v) in ids.iter().zip(values) {
        let Some(v) = v else {
            out.gone.push(id.clone());
            continue;
        };
        match serde_json::from_slice::<Member>(&v)
            .ok()
            .filter(|m| !m.versions.is_empty())
        {
            None => out
                .stray
                .push(String::from_utf8_lossy(id).escape_debug().to_string()),
            Some(m) if m.authentic(id, key, retired) => out.live.push(m),
            Some(_) => out.forged.push(id.clone()),
        }
    }
    out
}

/// An id for a message (anyone who can write Redis writes it).
pub(super) fn escaped(id: &[u8]) -> String {
    String::from_utf8_lossy(id).escape_debug().to_string()
}

/// The heartbeat keys of `ids`.
pub(super) fn member_keys(names: &Names, ids: &[Vec<u8>]) -> Vec<Vec<u8>> {
    ids.iter()
        .map(|id| {
            let mut k = names.fleet_member("").into_bytes();
            k.extend_from_slice(id);
            k
        })
        .collect()
}

/// Whether process `pid` runs on this host (a pid that is not ours to signal runs).
pub(super) fn pid_runs(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    // Signal 0 only checks that the process exists; nothing is sent.
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e != rustix::io::Errno::SRCH,
    }
}

/// Every live daemon's heartbeat that `key` authenticates, found through the fleet
/// set (no keyspace scan). Stray and unauthenticated entries are skipped with a
/// warning naming them, and so is a daemon on this host whose pid no longer runs
/// (stopped or killed: its heartbeat merely has not expired yet); a Redis error is
/// an error (the caller must not take "no heartbeat read" for "no daemon behind").
pub fn members(config: &Config, key: &MasterKey) -> Result<Vec<Member>, FleetError> {
    let mut con = connect(&config.redis, TOOL_WAIT)?;
    let names = names(config);
    let ids: Vec<Vec<u8>> = con.smembers(names.fleet()).map_err(redis_failed)?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let retired: Option<String> = con
        .hget(names.keycheck(), "retired")
        .map_err(redis_failed)?;
    let retired = parse_retired(retired.as_deref());
    // MGET answers nil for a key of another type instead of failing.
    let values: Vec<Option<Vec<u8>>> = con.mget(member_keys(&names, &ids)).map_err(redis_failed)?;
    let beats = sort_beats(&ids, values, key, &retired);
    for id in beats.stray {
        eprintln!("warning: skipping fleet member {id}: not a daemon's heartbeat");
    }
    for id in &beats.forged {
        eprintln!(
            "warning: skipping fleet member {}: its heartbeat is not authenticated by this master key \
             (written by someone without the fleet's key, or by a daemon holding only retired versions)",
            escaped(id)
        );
    }
    let here = hostname();
    let mut out: Vec<Member> = beats
        .live
        .into_iter()
        .filter(|m| {
            let dead = m.host == here && !pid_runs(m.pid);
            if dead {
                println!(
                    "treating the daemon with pid {} on this host as gone: that process is not running \
                     (its heartbeat had not expired yet)",
                    m.pid
                );
            }
            !dead
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Why the fleet is not ready for a rotation step.
pub enum NotReady {
    /// These daemons do not seal with the version yet.
    Behind(Vec<Member>),
    /// The heartbeats could not be read: nothing can be said, so nothing may change.
    Unreadable(FleetError),
}

/// Waits until every live daemon holds `version` and seals with it; otherwise
/// answers the daemons that are behind. Daemons that hold the version switch to it
/// within a beat or two, so they get up to `within`; a daemon that lacks the version
/// will not get it by waiting, so once its heartbeat has had time to renew
/// (`LACKING_WAIT`) the answer comes at once. Heartbeats are judged with `key`.
pub fn wait_until_sealing(
    config: &Config,
    key: &MasterKey,
    version: u32,
    within: Duration,
) -> Result<(), NotReady> {
    const LACKING_WAIT: Duration = Duration::from_secs(3);
    let began = std::time::Instant::now();
    let deadline = began + within;
    loop {
        let behind: Vec<Member> = members(config, key)
            .map_err(NotReady::Unreadable)?
            .into_iter()
            .filter(|m| m.sealing != version)
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        let lacking = behind.iter().all(|m| !m.versions.contains(&version));
        if std::time::Instant::now() >= deadline || (lacking && began.elapsed() >= LACKING_WAIT) {
            return Err(NotReady::Behind(behind));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// For a tool that seals values into Redis (import-legacy): caps `key` at the
/// newest version every live daemon holds, as the daemons themselves do (never a
/// retired version).
pub fn cap_to_fleet(config: &Config, key: &MasterKey) -> Result<(), FleetError> {
    let mut con = connect(&config.redis, TOOL_WAIT)?;
    let retired: Option<String> = con
        .hget(names(config).keycheck(), "retired")
        .map_err(redis_failed)?;
    let retired = parse_retired(retired.as_deref());
    let others: Vec<u32> = members(config, key)?.iter().map(Member::newest).collect();
    match sealing_choice(&key.versions(), others, &retired) {
        Some(v) => key.set_seal_cap(v),
        None => {
            return Err(FleetError::OnlyRetired {
                retired: retired.into_iter().collect(),
            })
        }
    }
    Ok(())
}

/// What a daemon says of itself in its heartbeat.
pub struct Identity {
    pub id: String,
    pub host: String,
    pub socket: PathBuf,
    /// Set on a clean stop: no heartbeat is written any more (see [`leave`]).
    pub leaving: Arc<AtomicBool>,
}

impl Identity {
    /// This process on this host, with a random part so a reused pid is a new member.
    pub fn new(socket: PathBuf) -> Identity {
        let host = hostname();
        let id = format!(
            "{host}:{}:{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        Identity {
            id,
            host,
            socket,
            leaving: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// What the heartbeat remembers from beat to beat.
pub(super) struct Watch {
    /// Every version seen retired since start: a version once retired stays retired
    /// here even if a Redis writer removes it from the list.
    retired: BTreeSet<u32>,
    /// Unauthenticated member ids already logged (each is logged and counted once).
    forged: HashSet<Vec<u8>>,
    /// Counts the unauthenticated heartbeats for `stats` and metrics.
    status: Arc<crate::model::figures::RedisStatus>,
}

/// Runs forever in a daemon in Redis mode: renews this daemon's heartbeat every
/// `BEAT_EVERY`, and caps the sealing version at the newest version every live
/// daemon holds, never a retired one. Only heartbeats authenticated under a version
/// of this key that is not retired count; others are logged and counted once.
/// Checks the key against the fleet's whenever its versions change (and, when Redis
/// was down at start, on the first beat that reaches it), and at every beat that
/// the daemon holds a version not retired; a key that fails stops the process
/// rather than seal with it.
pub async fn heartbeat(
    conn: crate::store::redis::SharedConn,
    redis: RedisConfig,
    key: Arc<MasterKey>,
    me: Identity,
    verified: bool,
    status: Arc<crate::model::figures::RedisStatus>,
) {
    let names = Names {
        prefix: redis.prefix.clone(),
    };
    let mut checked = verified.then(|| key.versions());
    let mut unwritten = crate::process::logfmt::Repeated::default();
    let mut watch = Watch {
        retired: BTreeSet::new(),
        forged: HashSet::new(),
        status,
    };
    loop {
        let mut verified = checked.as_ref() == Some(&key.versions());
        if !verified {
            let (config, ring) = (redis.clone(), key.clone());
            let names = names.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                let mut con = connect(&config, DAEMON_WAIT)?;
                verify(&mut con, &names, &ring)
            })
            .await
            .unwrap_or(Err(FleetError::CheckPanicked));
            match outcome {
                Ok(()) => {
                    tracing::info!(versions = ?key.versions(), "the master key matches the fleet's");
                    checked = Some(key.versions());
                    verified = true;
                }
                Err(e) if e.is_unreachable() => {}
                // A running daemon that lacks a version another host just added is
                // the usual state mid-rotation (the fleet seals with what every
                // daemon holds); only a start is refused for it. Reloaded right
                // as a rotation adds a version, it must not stop.
                Err(e @ FleetError::LacksVersion { .. }) => {
                    tracing::warn!(
                        "{e}; serving on: the fleet seals with versions this daemon holds"
                    );
                    checked = Some(key.versions());
                    verified = true;
                }
                Err(e) => stop(&e.to_string()),
            }
        }
        if verified {
            // A fresh clone each beat: the store replaces it after a failover.
            let mut now = conn.borrow().clone();
            match beat(&mut now, &names, &key, &me, &mut watch).await {
                Ok(None) => crate::process::logfmt::recovered(
                    &mut unwritten,
                    "fleet heartbeat written again",
                ),
                Ok(Some(why)) => stop(&why),
                Err(e) => {
                    watch
                        .status
                        .heartbeat_failures
                        .fetch_add(1, Ordering::Relaxed);
                    crate::process::logfmt::warn_repeated(
                        &mut unwritten,
                        &e,
                        "fleet heartbeat not written",
                    );
                }
            }
        }
        tokio::time::sleep(BEAT_EVERY).await;
    }
}

/// On a clean stop: removes this daemon's heartbeat, so that a rotation run right
/// after does not wait for it to expire. Best effort (bounded by `DAEMON_WAIT`).
/// `leaving` (the identity's flag) stops the heartbeat from writing it again.
pub fn leave(redis: &RedisConfig, me_id: &str, leaving: &AtomicBool) {
    leaving.store(true, Ordering::SeqCst);
    let names = Names {
        prefix: redis.prefix.clone(),
    };
    let left = connect(redis, DAEMON_WAIT).and_then(|mut con| {
        redis::pipe()
            .del(names.fleet_member(me_id))
            .ignore()
            .srem(names.fleet(), me_id)
            .ignore()
            .query::<()>(&mut con)
            .map_err(redis_failed)
    });
    match left {
        Ok(()) => tracing::info!("removed this daemon's fleet heartbeat"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot remove this daemon's fleet heartbeat; it expires within {BEAT_TTL_S} s")
        }
    }
}

/// Ends the process: it holds a key that must not seal anything more.
pub(super) fn stop(why: &str) -> ! {
    tracing::error!("stopping: {why}");
    std::process::exit(1);
}

/// One heartbeat; answers why the daemon must stop, if it must.
pub(super) async fn beat(
    conn: &mut ConnectionManager,
    names: &Names,
    key: &MasterKey,
    me: &Identity,
    watch: &mut Watch,
) -> redis::RedisResult<Option<String>> {
    let retired_now: Option<String> = conn.hget(names.keycheck(), "retired").await?;
    watch.retired.extend(parse_retired(retired_now.as_deref()));
    let versions = key.versions();
    let ids: Vec<Vec<u8>> = conn.smembers(names.fleet()).await?;
    let beats = if ids.is_empty() {
        Beats::default()
    } else {
        let values: Vec<Option<Vec<u8>>> = conn.mget(member_keys(names, &ids)).await?;
        sort_beats(&ids, values, key, &watch.retired)
    };
    for id in &beats.forged {
        if watch.forged.insert(id.clone()) {
            watch
                .status
                .unauthenticated_heartbeats
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(member = %escaped(id),
                "security: ignoring a fleet heartbeat that this master key does not authenticate \
                 (written to redis by someone without the fleet's key?)");
        }
    }
    if !beats.gone.is_empty() {
        let _: () = conn.srem(names.fleet(), beats.gone).await?;
    }
    let others = beats
        .live
        .iter()
        .filter(|m| m.id != me.id)
        .map(Member::newest);
    let Some(sealing) = sealing_choice(&versions, others, &watch.retired) else {
        return Ok(Some(format!(
            "a rotation retired every version this master key holds ({versions:?}); \
             copy the master key file from a host of the fleet and start again"
        )));
    };
    key.set_seal_cap(sealing);
    if me.leaving.load(Ordering::SeqCst) {
        return Ok(None);
    }
    let mut record = Member {
        id: me.id.clone(),
        host: me.host.clone(),
        pid: std::process::id(),
        socket: me.socket.display().to_string(),
        versions,
        sealing: key.sealing_version(),
        at: clock::now_s(),
        tags: BTreeMap::new(),
    };
    record.sign(key, &watch.retired);
    let text = serde_json::to_string(&record).unwrap_or_default();
    redis::pipe()
        .set_ex(names.fleet_member(&me.id), text, BEAT_TTL_S)
        .ignore()
        .sadd(names.fleet(), &me.id)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(None)
}
