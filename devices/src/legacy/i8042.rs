use vm_superio::{I8042Device, Trigger};

use crate::BusDevice;

/// The i8042 keyboard controller, reduced to what a microVM needs: the guest's
/// CPU-reset command (0xfe on port 0x64) fires the reset trigger, synchronously
/// in the vCPU thread that wrote it.
#[derive(Debug)]
pub struct I8042<T: Trigger> {
    inner: I8042Device<T>,
}

impl<T: Trigger> I8042<T> {
    /// A controller that fires `reset` when the guest asks for a CPU reset.
    #[must_use]
    pub fn new(reset: T) -> Self {
        Self {
            inner: I8042Device::new(reset),
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T>
where
    T::E: std::fmt::Display,
{
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0, |o| self.inner.read(o));
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.inner.write(offset, value) {
            crate::rate_limited!(error, "i8042: cannot signal the guest's reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventFdTrigger;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_fires_the_event() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        dev.write(0, &[0xfe]); // data port: ignored
        assert!(evt.read().is_err());
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
