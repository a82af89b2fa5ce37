//! Devices that hull's VMM exposes to its guests.
//!
//! Every device implements [`BusDevice`] and knows nothing of KVM or of the CLI:
//! the VMM maps each one onto a port-I/O or MMIO range of a [`Bus`] and forwards
//! the guest's accesses to it.

pub mod bus;
pub mod legacy;
pub mod pseudo;
pub mod ratelimit;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
/// What a device fires to raise an interrupt or signal an event.
pub use vm_superio::Trigger;

use vmm_sys_util::eventfd::EventFd;

/// An [`EventFd`] that vm-superio devices can fire (an IRQ line or an exit request).
///
/// vm-superio's `Trigger` trait cannot be implemented on `EventFd` directly (both
/// are foreign), hence this newtype.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    #[must_use]
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The wrapped event.
    #[must_use]
    pub fn event(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
