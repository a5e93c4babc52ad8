//! Who may talk to the daemon (docs/protocol.md, "Who may call what"; docs/operations.md,
//! "Access"): roles from the peer's credentials, the peer's supplementary groups, and
//! user and group names in `[access]`.

use std::ffi::CString;
use std::os::fd::AsRawFd;

/// What a peer may do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// Every op.
    Admin,
    /// Every op except pool management.
    User,
    /// Nothing: one `forbidden` line, then the connection is closed.
    Denied,
}

/// The process at the other end of a connection, from SO_PEERCRED.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub role: Role,
}

/// `[access]` with every name resolved to its uid or gid (by `config`, at load).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessIds {
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    pub admin_uids: Vec<u32>,
    pub admin_gids: Vec<u32>,
}

/// The role of a peer with `uid`, effective `gid` and supplementary `groups` under
/// `access`. Root and the daemon's own uid are admins; a group list matches when any
/// of the peer's groups (effective or supplementary) is listed.
pub fn role(access: &AccessIds, uid: u32, gid: u32, groups: &[u32]) -> Role {
    let own = rustix::process::geteuid().as_raw();
    let in_any =
        |listed: &[u32]| listed.contains(&gid) || groups.iter().any(|g| listed.contains(g));
    if uid == 0 || uid == own || access.admin_uids.contains(&uid) || in_any(&access.admin_gids) {
        Role::Admin
    } else if access.allow_uids.contains(&uid) || in_any(&access.allow_gids) {
        Role::User
    } else {
        Role::Denied
    }
}

/// `SO_PEERGROUPS` (Linux 4.13+), which the libc crate does not export for every
/// target: 59 everywhere except sparc.
#[cfg(not(target_arch = "sparc64"))]
const SO_PEERGROUPS: libc::c_int = 59;
#[cfg(target_arch = "sparc64")]
const SO_PEERGROUPS: libc::c_int = 0x003d;

/// The supplementary groups of the process at the other end of `socket`, as the
/// kernel recorded them when it connected (SO_PEERGROUPS).
pub fn peer_groups(socket: &impl AsRawFd) -> std::io::Result<Vec<u32>> {
    let fd = socket.as_raw_fd();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` has `len` writable bytes; the kernel writes at most that
        // many and reports the size it needs (ERANGE) when they do not fit.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if e.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 65536 {
            groups.resize(needed, 0);
            continue;
        }
        return Err(e);
    }
}

/// The uid of the user called `name` on this host (from the passwd database).
pub fn uid_of(name: &str) -> Option<u32> {
    id_of(name, libc::getpwnam_r, |p: &libc::passwd| p.pw_uid)
}

/// The gid of the group called `name` on this host (from the group database).
pub fn gid_of(name: &str) -> Option<u32> {
    id_of(name, libc::getgrnam_r, |g: &libc::group| g.gr_gid)
}

/// A reentrant lookup by name in the passwd or group database (`getpwnam_r`,
/// `getgrnam_r`: the same shape), its buffer grown while the entry does not fit;
/// `id` reads the number out of the entry found.
fn id_of<T>(
    name: &str,
    lookup: unsafe extern "C" fn(
        *const libc::c_char,
        *mut T,
        *mut libc::c_char,
        libc::size_t,
        *mut *mut T,
    ) -> libc::c_int,
    id: fn(&T) -> u32,
) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: a zeroed passwd or group (plain C structs of integers and pointers)
        // is a valid out-parameter; `buf` outlives the call, and the pointers it
        // fills are not used after it (only `id` reads a number).
        let mut entry: T = unsafe { std::mem::zeroed() };
        let mut found: *mut T = std::ptr::null_mut();
        let rc = unsafe {
            lookup(
                cname.as_ptr(),
                &mut entry,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return (rc == 0 && !found.is_null()).then(|| id(&entry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        let a = AccessIds {
            allow_uids: vec![1001],
            allow_gids: vec![2000],
            admin_uids: vec![1002],
            admin_gids: vec![3000],
        };
        assert_eq!(role(&a, 0, 0, &[]), Role::Admin);
        assert_eq!(role(&a, 1002, 5, &[]), Role::Admin);
        assert_eq!(role(&a, 4242, 3000, &[]), Role::Admin);
        assert_eq!(role(&a, 4242, 5, &[7, 3000]), Role::Admin);
        assert_eq!(role(&a, 1001, 5, &[]), Role::User);
        assert_eq!(role(&a, 4242, 2000, &[]), Role::User);
        assert_eq!(role(&a, 4242, 5, &[2000]), Role::User);
        if rustix::process::geteuid().as_raw() != 4242 {
            assert_eq!(role(&a, 4242, 4242, &[4243]), Role::Denied);
        }
    }

    #[test]
    fn names_resolve() {
        assert_eq!(uid_of("root"), Some(0));
        assert_eq!(gid_of("root"), Some(0));
        assert_eq!(uid_of("no-such-user-apikeyd"), None);
        assert_eq!(gid_of("no-such-group-apikeyd"), None);
        assert_eq!(uid_of("bad\0name"), None);
    }
}
