//! hull's init inside the guest. The protocol it speaks with the host is the
//! `hull-protocol` crate (re-exported here as [`protocol`], [`spec`] and
//! [`security`]).
//!
//! The init (the `hull-init` binary, PID 1 of every guest) is [`init`]; the
//! parts of it that can run anywhere are tested on the host: [`unpack`]
//! (layers), [`user`] (`--user`), [`command`] (environment and `PATH`).

// The protocol lives in its own crate (shared with the host); the old paths
// stay for the init's own code.
pub use hull_protocol::frame as protocol;
pub use hull_protocol::{security, spec, PROTOCOL_VERSION};

pub mod command;
pub mod init;
pub mod ports;
pub mod sys;
pub mod unpack;
pub mod user;
