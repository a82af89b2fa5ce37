//! The contract between hull on the host and its init inside the guest, and
//! the init itself.
//!
//! The host and the guest talk over one byte stream (a virtio-console port,
//! `hull.control`: `/dev/vportNp0` in the guest) in length-prefixed frames;
//! see [`protocol`].
//! The init (the `hull-init` binary, PID 1 of every guest) is [`init`]; the
//! parts of it that can run anywhere are tested on the host: [`unpack`]
//! (layers), [`user`] (`--user`), [`command`] (environment and `PATH`).

pub mod command;
pub mod init;
pub mod protocol;
pub mod security;
pub mod spec;
pub mod sys;
pub mod unpack;
pub mod user;
