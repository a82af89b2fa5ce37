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

/// The boot timer: each byte written names a [`BootMark`], which the VMM
/// timestamps (the first time only; other bytes are ignored).
pub const BOOT_TIMER_PORT: u16 = 0x4f1;

/// The points of a container's start that hull's init marks on the boot
/// timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BootMark {
    /// The init runs (the kernel booted).
    InitStarted = 1,
    /// The container's root is built and switched to.
    RootReady = 2,
    /// The container's process was exec'd.
    WorkloadStarted = 3,
}

impl BootMark {
    /// Every mark, in the order they happen.
    pub const ALL: [Self; 3] = [Self::InitStarted, Self::RootReady, Self::WorkloadStarted];

    /// The mark a byte written to the port names.
    #[must_use]
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|m| *m as u8 == code)
    }

    /// Its name in reports.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::InitStarted => "init started",
            Self::RootReady => "root ready",
            Self::WorkloadStarted => "workload started",
        }
    }

    /// Its position in [`ALL`](Self::ALL).
    #[must_use]
    pub fn index(self) -> usize {
        usize::from(self as u8 - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_index_all() {
        for (i, m) in BootMark::ALL.into_iter().enumerate() {
            assert_eq!(BootMark::from_code(m as u8), Some(m));
            assert_eq!(m.index(), i);
        }
        assert_eq!(BootMark::from_code(0), None);
        assert_eq!(BootMark::from_code(4), None);
        assert_ne!(BOOT_TIMER_PORT, POWER_PORT);
    }
}
