//! systemd integration through the sd-notify crate: readiness, reload and stop
//! notifications, the watchdog, and sockets passed by socket activation. Every call
//! is a no-op when the daemon does not run under systemd.

use std::os::fd::FromRawFd;
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// READY=1: the socket accepts connections.
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// RELOADING=1 with the monotonic time, before a reload.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// STOPPING=1: shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// WATCHDOG=1: the actors answered in time.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often systemd wants WATCHDOG=1, when it does.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// The listening socket systemd passed (LISTEN_FDS/LISTEN_PID), if any.
pub fn passed_listener() -> std::io::Result<Option<std::os::unix::net::UnixListener>> {
    let mut fds = sd_notify::listen_fds()?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    if fds.len() > 0 {
        tracing::warn!("systemd passed more than one socket; using the first");
    }
    // SAFETY: systemd hands this descriptor to us alone; nothing else owns it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}
