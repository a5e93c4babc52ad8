//! Unit tests of the rotation's pure parts.

use super::*;

#[test]
fn stops_keep_their_text() {
    let behind = vec![Member {
        id: "h:1:0".into(),
        host: "h".into(),
        pid: 1,
        socket: "/s".into(),
        versions: vec![1],
        sealing: 1,
        at: 0,
        tags: Default::default(),
    }];
    let cases = [
        (
            RotateError::FleetBehind {
                step: "re-sealing",
                version: 2,
                behind,
                key_file: "/k".into(),
            },
            "not re-sealing: 1 daemon(s) on this Redis do not seal with key version 2 yet:\n  \
             host h, pid 1, socket /s: holds key versions [1], seals with 1\n\
             copy /k to each of their hosts (same owner and mode 0600), run `apikeyd rotate-master-key --add-only` \
             there (it reloads that daemon with the copied file), then rerun this command"
                .to_string(),
        ),
        (
            RotateError::FleetUnreadable {
                step: "retiring",
                step_done: "retired",
                source: FleetError::Redis(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "gone",
                ))),
            },
            format!(
                "not retiring: the fleet's heartbeats cannot be read (redis: {}); nothing was retired",
                redis::RedisError::from((redis::ErrorKind::Io, "gone"))
            ),
        ),
        (
            RotateError::NotReloaded {
                versions: vec![1],
                current: 2,
            },
            "the daemon reloaded but uses key versions [1], not 2: is it reading the key \
             from $CREDENTIALS_DIRECTORY? Install the new key file as its credential, restart it, and rerun"
                .into(),
        ),
        (
            RotateError::ReloadRefused {
                error: serde_json::json!({"code": "internal", "message": "m"}),
            },
            r#"the daemon refused to reload: {"code":"internal","message":"m"}"#.into(),
        ),
        (
            RotateError::WrongKey {
                key_file: "/k".into(),
                keystore: "/ks".into(),
            },
            "/k does not open the keystore /ks".into(),
        ),
        (
            RotateError::OldVersionsKeepAppearing,
            "values under old key versions keep appearing: is a daemon still running with the old keyring? \
             Reload every daemon, then rerun"
                .into(),
        ),
    ];
    for (e, want) in cases {
        assert_eq!(e.to_string(), want);
    }
}
