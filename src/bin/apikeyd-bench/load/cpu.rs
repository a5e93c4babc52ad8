//! CPU time of the server under test (and of redis-server), read from /proc, so a
//! figure counts only when the server was the bottleneck.

use super::*;

/// The pid of the redis-server at `socket` (`INFO server`), to read its CPU time.
pub fn redis_pid(socket: &std::path::Path) -> std::io::Result<u32> {
    let client = redis::Client::open(format!("redis+unix://{}", socket.display()))
        .map_err(std::io::Error::other)?;
    let mut con = client.get_connection().map_err(std::io::Error::other)?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut con)
        .map_err(std::io::Error::other)?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("redis-server did not tell its process_id"))
}

/// A process's command name and CPU time (utime + stime, in clock ticks) from
/// /proc/PID/stat; `pid` may be `self`.
pub(super) fn cpu_ticks(pid: &str) -> std::io::Result<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || std::io::Error::other(format!("/proc/{pid}/stat: unexpected format"));
    // `pid (comm) state ppid …`: comm may hold spaces and parentheses, so split at
    // the last `)`; utime and stime are fields 14 and 15.
    let open = stat.find('(').ok_or_else(bad)?;
    let close = stat.rfind(')').ok_or_else(bad)?;
    let name = stat[open + 1..close].to_string();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |k: usize| -> std::io::Result<u64> {
        fields
            .get(k - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(bad)
    };
    Ok((name, field(14)? + field(15)?))
}

/// Clock ticks per second of /proc's CPU times.
pub(super) fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU times of the server processes and of this process at one moment.
pub(super) struct CpuSample {
    pub(super) at: Instant,
    pub(super) servers: Vec<(String, u64)>,
    pub(super) client: u64,
}

pub(super) fn sample(pids: &[u32]) -> std::io::Result<CpuSample> {
    let servers = pids
        .iter()
        .map(|p| cpu_ticks(&p.to_string()))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(CpuSample {
        at: Instant::now(),
        servers,
        client: cpu_ticks("self")?.1,
    })
}
