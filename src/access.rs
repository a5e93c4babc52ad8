//! Who may talk to the daemon (SPEC §5): roles from the peer's credentials.

use crate::config::AccessConfig;

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

/// The role of (uid, gid) under `access`. Root and the daemon's own uid are admins.
/// The gid is the peer's effective group as the kernel reports it; supplementary
/// groups are not seen.
pub fn role(access: &AccessConfig, uid: u32, gid: u32) -> Role {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    if uid == 0
        || uid == own
        || access.admin_uids.contains(&uid)
        || access.admin_gids.contains(&gid)
    {
        Role::Admin
    } else if access.allow_uids.contains(&uid) || access.allow_gids.contains(&gid) {
        Role::User
    } else {
        Role::Denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        let a = AccessConfig {
            allow_uids: vec![1001],
            allow_gids: vec![2000],
            admin_uids: vec![1002],
            admin_gids: vec![3000],
        };
        assert_eq!(role(&a, 0, 0), Role::Admin);
        assert_eq!(role(&a, 1002, 5), Role::Admin);
        assert_eq!(role(&a, 4242, 3000), Role::Admin);
        assert_eq!(role(&a, 1001, 5), Role::User);
        assert_eq!(role(&a, 4242, 2000), Role::User);
        if unsafe { libc::geteuid() } != 4242 {
            assert_eq!(role(&a, 4242, 4242), Role::Denied);
        }
    }
}
