//! Reaching Redis: `Target` turns `[redis]` (URL, password file or credential, TLS
//! files, sentinels) into clients, asks Sentinel for the master, and builds the one
//! connection manager the store shares; `RedisStatus` is what `stats` shows of it.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult};

use crate::process::config::RedisConfig;

/// Reaching Redis failed before any command ran: a setting or file that is not
/// usable, or no sentinel that names the master. Names settings, files and sentinel
/// addresses; never the URL or the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("redis.url is not usable: {0}")]
    Url(#[source] RedisError),
    #[error("cannot read the redis password from {}: {source}", path.display())]
    PasswordUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the redis password file {} is empty", path.display())]
    PasswordEmpty { path: PathBuf },
    /// `setting` names the file (`redis.tls_ca_file`, …).
    #[error("cannot read {setting} {}: {source}", path.display())]
    TlsFile {
        setting: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("redis.tls_* files are set but redis.url is not a rediss:// URL")]
    TlsWithoutRediss,
    /// The client could not be built from the settings (TLS material, address).
    #[error("redis settings are not usable: {0}")]
    Settings(#[source] RedisError),
    #[error("cannot set up the redis connection: {0}")]
    Manager(#[source] RedisError),
    #[error("the sentinels know no master named {name:?} (redis.master_name)")]
    NoSuchMaster { name: String },
    #[error("a sentinel answered a malformed port")]
    MalformedPort,
    /// One sentinel could not be asked.
    #[error("sentinel {address}: {source}")]
    Sentinel { address: String, source: RedisError },
    #[error("sentinel {address}: timed out")]
    SentinelTimedOut { address: String },
    /// Every sentinel was asked; what each answered, in order.
    #[error("no sentinel answered: {}", joined(.0))]
    NoSentinel(Vec<ConnectError>),
}

/// `errors` as one line, `; `-separated.
fn joined(errors: &[ConnectError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The store's connection, shared with the fleet heartbeat; replaced whole when
/// Sentinel names a new master.
pub type SharedConn = Rc<RefCell<ConnectionManager>>;

pub(super) fn manager(
    client: redis::Client,
    timeout: Duration,
) -> std::result::Result<ConnectionManager, ConnectError> {
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        // One attempt per reconnect: a refused connection fails at once and is
        // reported as refused, instead of sleeping a backoff into the timeout.
        // `bounded` tries once more where that is safe; the health check every
        // second keeps reconnecting.
        .set_number_of_retries(0)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client, manager_config).map_err(ConnectError::Manager)
}

/// How to reach Redis, built once from `[redis]`: the URL's settings with the ACL
/// user and the password file applied, the TLS files, and the sentinels to ask for
/// the master. Holds the password, so it has no `Debug`.
#[derive(Clone)]
pub struct Target {
    pub(super) info: redis::ConnectionInfo,
    tls: Option<redis::TlsCertificates>,
    sentinels: Vec<String>,
    master_name: String,
    timeout: Duration,
}

/// The systemd credential a password is read from when present (`LoadCredential=`).
pub const PASSWORD_CREDENTIAL: &str = "redis.password";

/// The Redis password: the systemd credential `redis.password` when present, else
/// `redis.password_file`, else none. Errors name the file, never its content.
fn read_password(
    config: &RedisConfig,
) -> std::result::Result<Option<zeroize::Zeroizing<String>>, ConnectError> {
    let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|d| std::path::Path::new(&d).join(PASSWORD_CREDENTIAL))
        .filter(|p| p.exists());
    let Some(path) = credential.or_else(|| config.password_file.clone()) else {
        return Ok(None);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => zeroize::Zeroizing::new(t),
        Err(source) => return Err(ConnectError::PasswordUnreadable { path, source }),
    };
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(ConnectError::PasswordEmpty { path });
    }
    Ok(Some(zeroize::Zeroizing::new(password.to_string())))
}

fn read_file(
    setting: &'static str,
    path: &std::path::Path,
) -> std::result::Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|source| ConnectError::TlsFile {
        setting,
        path: path.to_path_buf(),
        source,
    })
}

impl Target {
    /// Parses `redis.url` and reads the password and TLS files; any problem refuses
    /// the start with a message naming the setting.
    pub fn new(config: &RedisConfig) -> std::result::Result<Target, ConnectError> {
        use redis::IntoConnectionInfo;
        // rustls is built with `ring` only; installing it explicitly keeps a second
        // provider pulled in by another crate from making rustls refuse to choose.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(ConnectError::Url)?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = config.username.as_deref().filter(|u| !u.is_empty()) {
            settings = settings.set_username(user);
        }
        if let Some(password) = read_password(config)? {
            settings = settings.set_password(password.as_str());
        }
        let info = info.set_redis_settings(settings);
        let tls_wanted = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
        let tls = if tls_wanted {
            let root_cert = match &config.tls_ca_file {
                Some(p) => Some(read_file("redis.tls_ca_file", p)?),
                None => None,
            };
            let client_tls = match (&config.tls_cert_file, &config.tls_key_file) {
                (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                    client_cert: read_file("redis.tls_cert_file", c)?,
                    client_key: read_file("redis.tls_key_file", k)?,
                }),
                _ => None,
            };
            Some(redis::TlsCertificates {
                client_tls,
                root_cert,
            })
        } else {
            if config.tls_ca_file.is_some() || config.tls_cert_file.is_some() {
                return Err(ConnectError::TlsWithoutRediss);
            }
            None
        };
        Ok(Target {
            info,
            tls,
            sentinels: config.sentinels.clone(),
            master_name: config.master_name.clone(),
            timeout: Duration::from_millis(config.timeout_ms.max(1)),
        })
    }

    /// Whether the master is found through Sentinel.
    pub fn uses_sentinels(&self) -> bool {
        !self.sentinels.is_empty()
    }

    /// A client for the server at `host:port`, with the URL's settings and TLS.
    pub fn client_at(
        &self,
        host: &str,
        port: u16,
    ) -> std::result::Result<redis::Client, ConnectError> {
        let addr = match self.info.addr() {
            redis::ConnectionAddr::TcpTls { insecure, .. } => redis::ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => redis::ConnectionAddr::Tcp(host.to_string(), port),
        };
        self.build(self.info.clone().set_addr(addr))
    }

    pub(super) fn build(
        &self,
        info: redis::ConnectionInfo,
    ) -> std::result::Result<redis::Client, ConnectError> {
        let built = match &self.tls {
            Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
            None => redis::Client::open(info),
        };
        built.map_err(ConnectError::Settings)
    }

    /// A client for the server of `redis.url`, or for the master the sentinels name
    /// (asked now, blocking: for start-up and the tools).
    pub fn client(&self) -> std::result::Result<redis::Client, ConnectError> {
        if !self.uses_sentinels() {
            return self.build(self.info.clone());
        }
        let (host, port) = self.ask_sentinels_blocking()?;
        self.client_at(&host, port)
    }

    /// Like [`Target::client`], without blocking the thread.
    pub async fn client_async(&self) -> std::result::Result<redis::Client, ConnectError> {
        if !self.uses_sentinels() {
            return self.build(self.info.clone());
        }
        let (host, port) = self.ask_sentinels().await?;
        self.client_at(&host, port)
    }

    fn sentinel_client(&self, address: &str) -> RedisResult<redis::Client> {
        redis::Client::open(format!("redis://{address}/"))
    }

    fn master_address(
        reply: Option<(String, String)>,
        name: &str,
    ) -> std::result::Result<(String, u16), ConnectError> {
        let (host, port) = reply.ok_or_else(|| ConnectError::NoSuchMaster {
            name: name.to_string(),
        })?;
        let port = port.parse().map_err(|_| ConnectError::MalformedPort)?;
        Ok((host, port))
    }

    fn ask_one_blocking(&self, address: &str) -> std::result::Result<(String, u16), ConnectError> {
        let failed = |source| ConnectError::Sentinel {
            address: address.to_string(),
            source,
        };
        let mut con = self
            .sentinel_client(address)
            .and_then(|c| {
                c.get_connection_with_timeout(self.timeout.max(Duration::from_millis(500)))
            })
            .map_err(failed)?;
        let _ = con.set_read_timeout(Some(self.timeout.max(Duration::from_millis(500))));
        let reply: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query(&mut con)
            .map_err(failed)?;
        Self::master_address(reply, &self.master_name)
    }

    /// The master's address, from the first sentinel that answers.
    pub(super) fn ask_sentinels_blocking(
        &self,
    ) -> std::result::Result<(String, u16), ConnectError> {
        let mut errors = Vec::new();
        for s in &self.sentinels {
            match self.ask_one_blocking(s) {
                Ok(a) => return Ok(a),
                Err(e) => errors.push(e),
            }
        }
        Err(ConnectError::NoSentinel(errors))
    }

    /// The master's address, from the first sentinel (in order) that answers.
    pub async fn ask_sentinels(&self) -> std::result::Result<(String, u16), ConnectError> {
        self.ask_every_sentinel().await.0
    }

    /// Asks every sentinel at once: the master's address from the first (in order)
    /// that answers, and how many answered.
    pub async fn ask_every_sentinel(
        &self,
    ) -> (std::result::Result<(String, u16), ConnectError>, usize) {
        let limit = self.timeout.max(Duration::from_millis(500));
        let answers = futures_util::future::join_all(self.sentinels.iter().map(|s| async move {
            let asked = async {
                let client = self.sentinel_client(s)?;
                let mut con = client.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.master_name)
                    .query_async::<Option<(String, String)>>(&mut con)
                    .await
            };
            match tokio::time::timeout(limit, asked).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(source)) => Err(ConnectError::Sentinel {
                    address: s.clone(),
                    source,
                }),
                Err(_) => Err(ConnectError::SentinelTimedOut { address: s.clone() }),
            }
        }))
        .await;
        let reachable = answers.iter().filter(|a| a.is_ok()).count();
        let mut errors = Vec::new();
        for answer in answers {
            match answer {
                Ok(reply) => return (Self::master_address(reply, &self.master_name), reachable),
                Err(e) => errors.push(e),
            }
        }
        (Err(ConnectError::NoSentinel(errors)), reachable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_text() {
        let none = ConnectError::NoSentinel(vec![
            ConnectError::SentinelTimedOut {
                address: "a:1".into(),
            },
            ConnectError::NoSuchMaster { name: "m".into() },
        ]);
        assert_eq!(
            none.to_string(),
            "no sentinel answered: sentinel a:1: timed out; the sentinels know no master named \"m\" (redis.master_name)"
        );
        let config = RedisConfig {
            url: "redis://127.0.0.1/0".into(),
            tls_ca_file: Some("/ca".into()),
            ..RedisConfig::default()
        };
        let refused = Target::new(&config).err().map(|e| e.to_string());
        assert_eq!(
            refused.as_deref(),
            Some("redis.tls_* files are set but redis.url is not a rediss:// URL")
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("password");
        std::fs::write(&empty, "\n").unwrap();
        let config = RedisConfig {
            url: "redis://127.0.0.1/0".into(),
            password_file: Some(empty.clone()),
            ..RedisConfig::default()
        };
        let refused = Target::new(&config).err().map(|e| e.to_string());
        assert_eq!(
            refused,
            Some(format!(
                "the redis password file {} is empty",
                empty.display()
            ))
        );
    }
}
