//! `Viewer`: the user whose view of the files the permission checks take, and what
//! that user may read, write or search.

use rustix::fs::Access;

use super::*;

/// The user whose view of the files the permission checks take: this process
/// (`serve`, and `check-config` by default) or `check-config --as-user NAME`.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub uid: u32,
    /// Its primary and supplementary groups (for `--as-user`; this process's
    /// own are the kernel's business).
    pub gids: Vec<u32>,
    /// `None`: this process (the kernel answers, ACLs included).
    pub name: Option<String>,
}

impl Viewer {
    /// This process.
    pub fn current() -> Viewer {
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        Viewer {
            uid,
            gids: vec![gid],
            name: None,
        }
    }

    /// The user `name` of this host, with its primary and supplementary groups.
    pub fn user(name: &str) -> Result<Viewer, String> {
        let uid = crate::process::access::uid_of(name).or_else(|| name.parse().ok());
        let Some(uid) = uid else {
            return Err(format!("there is no user named {name:?} on this host"));
        };
        let cname = std::ffi::CString::new(name).map_err(|_| format!("bad user name {name:?}"))?;
        // SAFETY: getpwuid returns a pointer into static storage or null; only
        // the gid is read, at once.
        let gid = unsafe {
            let pw = libc::getpwuid(uid);
            if pw.is_null() {
                return Err(format!("there is no user with uid {uid} on this host"));
            }
            (*pw).pw_gid
        };
        let mut groups = vec![0 as libc::gid_t; 256];
        let mut n = groups.len() as libc::c_int;
        // SAFETY: `groups` holds `n` entries; getgrouplist writes at most `n`.
        let found = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        groups.truncate(if found < 0 { 0 } else { n.max(0) as usize });
        if !groups.contains(&gid) {
            groups.push(gid);
        }
        Ok(Viewer {
            uid,
            gids: groups,
            name: Some(name.to_string()),
        })
    }

    /// "the service user" or "user NAME", for messages.
    pub(super) fn who(&self) -> String {
        match &self.name {
            Some(n) => format!("user {n}"),
            None => format!("uid {}", self.uid),
        }
    }

    /// Whether this viewer may `want` (read, write, search/execute, or'ed) on `path`.
    pub(super) fn may(&self, path: &Path, want: Access) -> bool {
        if self.name.is_none() {
            return rustix::fs::accessat(rustix::fs::CWD, path, want, rustix::fs::AtFlags::EACCESS)
                .is_ok();
        }
        // Another user: every folder on the way must be searchable, then the mode
        // bits of the file itself (ACLs are not read).
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let mut ancestors: Vec<&Path> = absolute.ancestors().skip(1).collect();
        ancestors.reverse();
        for dir in ancestors {
            if !self.bits_allow(dir, Access::EXEC_OK) {
                return false;
            }
        }
        self.bits_allow(&absolute, want)
    }

    fn bits_allow(&self, path: &Path, want: Access) -> bool {
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        let mode = meta.mode();
        if self.uid == 0 {
            // Root reads and writes anything; it executes what anyone may.
            return !want.contains(Access::EXEC_OK) || meta.is_dir() || mode & 0o111 != 0;
        }
        let bits = if meta.uid() == self.uid {
            (mode >> 6) & 7
        } else if self.gids.contains(&meta.gid()) {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        bits & want.bits() == want.bits()
    }

    /// Whether this viewer may create files in `path` (or in the folders that would
    /// be created for it): the nearest existing folder must be writable.
    pub(super) fn may_create(&self, path: &Path) -> Result<(), PathBuf> {
        let mut dir = path.parent();
        while let Some(d) = dir {
            let d = if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            };
            if d.exists() {
                return if d.is_dir() && self.may(d, Access::WRITE_OK | Access::EXEC_OK) {
                    Ok(())
                } else {
                    Err(d.to_path_buf())
                };
            }
            dir = d.parent();
        }
        Ok(())
    }
}
