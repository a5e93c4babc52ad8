//! Process hardening for a daemon that holds keys in memory: no core dumps, not
//! ptrace-able by same-uid processes, and optionally memory locked against swap.

/// Makes the process non-dumpable (no core files, no same-uid ptrace or
/// `/proc/<pid>/mem` reads) and sets the core size limit to 0.
pub fn forbid_dumps() -> std::io::Result<()> {
    // SAFETY: plain syscalls with constant arguments.
    unsafe {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether the process is dumpable (0 after [`forbid_dumps`]).
pub fn dumpable() -> i32 {
    // SAFETY: PR_GET_DUMPABLE takes no pointers.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }
}

/// Locks all current and future memory (the cache included) so decrypted keys are
/// never written to swap. Fails when RLIMIT_MEMLOCK is too small; the caller warns.
pub fn lock_memory() -> std::io::Result<()> {
    // SAFETY: mlockall takes only flags.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
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
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim = raised;
        }
        Ok(lim.rlim_cur)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dumps_are_forbidden() {
        super::forbid_dumps().unwrap();
        assert_eq!(super::dumpable(), 0);
    }
}
