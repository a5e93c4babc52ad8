//! The running process: configuration, peer roles, the audit trail, metrics, text-log
//! formatting, systemd, hardening and the keystore's file locks.

pub mod access;
pub mod audit;
pub mod config;
pub mod hardening;
pub mod lock;
pub mod logfmt;
pub mod metrics;
pub mod systemd;
