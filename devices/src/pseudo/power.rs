use hull_protocol::ports::POWER_OFF;
use vm_superio::Trigger;

use crate::BusDevice;

/// The power-off doorbell: the guest writes [`POWER_OFF`] and `off` fires,
/// synchronously in the vCPU thread that wrote it (so the guest runs no
/// further). A guest without ACPI has no other way to say that it ended on
/// purpose: its reboot and its kernel's panic reset the CPUs the same way.
///
/// Reads return 0; any other value written is ignored and logged
/// (rate-limited, without the value: the guest chooses it).
#[derive(Debug)]
pub struct PowerPort<T: Trigger> {
    off: T,
}

impl<T: Trigger> PowerPort<T> {
    /// A doorbell that fires `off`.
    #[must_use]
    pub fn new(off: T) -> Self {
        Self { off }
    }
}

impl<T: Trigger + Send> BusDevice for PowerPort<T>
where
    T::E: std::fmt::Display,
{
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data != [POWER_OFF] {
            crate::rate_limited!(
                warn,
                "power port: ignored a {}-byte write at offset {offset}",
                data.len()
            );
            return;
        }
        crate::rate_limited!(debug, "power port: the guest powered off");
        if let Err(e) = self.off.trigger() {
            crate::rate_limited!(error, "power port: cannot signal the power-off: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventFdTrigger;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn only_the_power_off_value_fires() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = PowerPort::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        for junk in [&[0u8][..], &[POWER_OFF, 0], &[0xff], &[POWER_OFF ^ 0x80]] {
            dev.write(0, junk);
        }
        dev.write(1, &[POWER_OFF]);
        assert!(evt.read().is_err(), "a stray write powered the VM off");
        let mut data = [0xaa; 2];
        dev.read(0, &mut data);
        assert_eq!(data, [0, 0]);
        dev.write(0, &[POWER_OFF]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
