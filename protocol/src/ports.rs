//! hull's pseudo devices on port I/O, as the guest sees them: the VMM serves
//! these ports and hull's init writes them (one `outb` each; guest-init's
//! `ports::write`).
//!
//! The guest has no ACPI (so no power button or S5) and no PCI (so no
//! pvpanic-pci): the ways a stock guest tells its host that it is done are a
//! CPU reset and halting. A reset looks the same whether the init asked for
//! it or the kernel panicked, hence a port of hull's own on which the init
//! announces a clean end. The ports lie in 0x4f0..0x4ff, which no device of
//! a PC nor any driver of hull's guest kernel uses.

/// The power-off doorbell: writing [`POWER_OFF`] ends the VM cleanly at once
/// (the init has synced and remounted everything read-only first).
pub const POWER_PORT: u16 = 0x4f0;
/// The one value the power-off doorbell acts on; others are ignored.
pub const POWER_OFF: u8 = 0x01;
