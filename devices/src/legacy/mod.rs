//! Legacy PC devices on port I/O: the 8250 UART console and the i8042 controller
//! (only for its CPU-reset line, which is how a `reboot=k` guest says it is done).

mod i8042;
mod serial;

pub use i8042::I8042;
pub use serial::{ConsoleOutput, ConsoleWatch, SerialConsole, SerialInput};

/// Port of the first UART (COM1, ttyS0).
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports of an 8250 UART.
pub const COM1_LEN: u64 = 8;
/// Legacy IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;
/// Base port of the i8042: data at 0x60, command at 0x64.
pub const I8042_PORT: u64 = 0x60;
/// Ports covered by the i8042 (0x60..=0x64).
pub const I8042_LEN: u64 = 5;
