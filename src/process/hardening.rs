//! Process hardening for a daemon that holds keys in memory: no core dumps, not
//! ptrace-able by same-uid processes, and optionally memory locked against swap.

use rustix::mm::MlockAllFlags;
use rustix::process::{self, DumpableBehavior, Resource, Rlimit};

/// Makes the process non-dumpable (no core files, no same-uid ptrace or
/// `/proc/<pid>/mem` reads) and sets the core size limit to 0.
pub fn forbid_dumps() -> std::io::Result<()> {
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    process::setrlimit(Resource::Core, none)?;
    process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

/// Whether the process is dumpable (0 after [`forbid_dumps`]; -1 when it cannot be read).
pub fn dumpable() -> i32 {
    process::dumpable_behavior().map_or(-1, |b| b as i32)
}

/// Locks all current and future memory (the cache included) so decrypted keys are
/// never written to swap. Fails when RLIMIT_MEMLOCK is too small; the caller warns.
pub fn lock_memory() -> std::io::Result<()> {
    rustix::mm::mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE)?;
    Ok(())
}

/// Locked memory of this process in kB (`VmLck` of /proc/self/status).
pub fn locked_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmLck:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Raises the soft open-file limit to the hard one and answers the soft limit now in
/// force (or the error, leaving the limit as it was).
pub fn raise_open_files() -> std::io::Result<u64> {
    // `None` is RLIM_INFINITY.
    let lim = process::getrlimit(Resource::Nofile);
    let (current, maximum) = (
        lim.current.unwrap_or(u64::MAX),
        lim.maximum.unwrap_or(u64::MAX),
    );
    if current < maximum {
        process::setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )?;
        return Ok(maximum);
    }
    Ok(current)
}

#[cfg(test)]
mod tests {
    #[test]
    fn dumps_are_forbidden() {
        super::forbid_dumps().unwrap();
        assert_eq!(super::dumpable(), 0);
    }
}
