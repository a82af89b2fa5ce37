//! hull's own pseudo devices on port I/O (no PC has them; hull's init knows
//! them: see [`hull_protocol::ports`]).

mod boot_timer;
mod power;

pub use boot_timer::{BootPoint, BootTimer, BootTimes};
pub use hull_protocol::ports::{BootMark, BOOT_TIMER_PORT, POWER_OFF, POWER_PORT};
pub use power::PowerPort;

/// Ports covered by the power-off doorbell.
pub const POWER_LEN: u64 = 1;
/// Ports covered by the boot timer.
pub const BOOT_TIMER_LEN: u64 = 1;
