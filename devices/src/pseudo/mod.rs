//! hull's own pseudo devices on port I/O (no PC has them; hull's init knows
//! them: see [`hull_protocol::ports`]).

mod power;

pub use hull_protocol::ports::{POWER_OFF, POWER_PORT};
pub use power::PowerPort;

/// Ports covered by the power-off doorbell.
pub const POWER_LEN: u64 = 1;
