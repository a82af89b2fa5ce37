//! The contract between hull on the host and its init inside the guest,
//! shared by both (Kata keeps its agent protocol in a crate of its own for the
//! same reason: one definition, versioned, no side parses it differently).
//!
//! The host and the guest talk over one byte stream (a virtio-console port,
//! `hull.control`: `/dev/vportNp0` in the guest) in length-prefixed
//! [`frame`]s. The first frame each side sends carries [`PROTOCOL_VERSION`]
//! (the guest's [`Frame::Ready`](frame::Frame::Ready), the host's
//! [`Frame::Spec`](frame::Frame::Spec)); a peer of another version is a clear
//! [`ProtocolError::Version`](frame::ProtocolError::Version), never a misparse.
//! [`spec`] is what the host asks the init to run, [`security`] the
//! container's privileges within it.

pub mod frame;
pub mod ports;
pub mod security;
pub mod spec;

/// The version of the control protocol this build speaks. Bump it on any
/// change to a frame's layout or to the specs' meaning; both sides refuse a
/// peer of another version.
pub const PROTOCOL_VERSION: u32 = 2;
