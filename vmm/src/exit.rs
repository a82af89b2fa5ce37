//! How a VM ends, and how the thread that notices tells the others.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmExit {
    /// The guest reset its CPUs through the i8042 (`reboot` with `reboot=k`)
    /// without announcing it on the power-off doorbell.
    Reset,
    /// The guest rang the power-off doorbell (hull's init does, once all is
    /// synced), or KVM reported a shutdown.
    PowerOff,
    /// Every vCPU halted with interrupts masked (a guest without ACPI that
    /// powers off or halts ends so): nothing but an NMI or INIT, which no
    /// device of hull's sends, could wake them.
    Halted,
    /// The guest kernel panicked (it said so when it reset: see
    /// [`crate::power`]); the last panic line of its console, if any.
    Panic(Option<String>),
    /// A vCPU hit a triple fault (or the guest asked for a shutdown that KVM
    /// reports the same way).
    TripleFault,
    /// KVM or the VMM failed.
    Error(String),
}

impl VmExit {
    /// True for the endings a guest chooses on purpose.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::Reset | Self::PowerOff | Self::Halted)
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reset => write!(f, "the guest rebooted"),
            Self::PowerOff => write!(f, "the guest powered off"),
            Self::Halted => write!(f, "the guest halted"),
            Self::Panic(Some(line)) => write!(f, "the guest kernel panicked: {line}"),
            Self::Panic(None) => write!(f, "the guest kernel panicked"),
            Self::TripleFault => write!(
                f,
                "a guest vCPU triple-faulted (the kernel crashed before it could report why; \
                 add 'earlyprintk=serial' to the command line to see more)"
            ),
            Self::Error(e) => write!(f, "{e}"),
        }
    }
}

/// Shared between the vCPU threads, the devices and the event loop: the first
/// reason recorded wins, and everyone can see that the VM is stopping.
#[derive(Debug, Clone)]
pub struct ExitSignal {
    reason: Arc<Mutex<Option<VmExit>>>,
    stopping: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    /// Notified (under `reason`'s lock) when `stopping` is set.
    stopped: Arc<Condvar>,
}

impl ExitSignal {
    /// A fresh signal.
    ///
    /// # Errors
    /// Creating the eventfd failed.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Arc::default(),
            stopping: Arc::default(),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            stopped: Arc::default(),
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the event loop.
    pub fn exit(&self, reason: VmExit) {
        let mut slot = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            tracing::debug!("vm exit: {reason:?}");
            *slot = Some(reason);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.stopped.notify_all();
        drop(slot);
        // If the wake-up write fails the loop still sees `stopping` at its next wake.
        let _ = self.wake.write(1);
    }

    /// Blocks until an exit was recorded or `timeout` passed; returns
    /// whether one was recorded.
    pub(crate) fn wait_timeout(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut slot = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        while !self.stopping() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            slot = self
                .stopped
                .wait_timeout(slot, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// The recorded reason.
    #[must_use]
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// True once any reason was recorded.
    #[must_use]
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Readable once an exit was recorded.
    #[must_use]
    pub fn wake(&self) -> &EventFd {
        &self.wake
    }
}

/// The i8042's reset line: records a clean reset, in the vCPU thread that
/// wrote the command, before the guest can go on to anything else (Linux
/// falls back to a triple fault if the reset seems not to happen).
impl devices::Trigger for ExitSignal {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.exit(VmExit::Reset);
        Ok(())
    }
}

/// The power-off doorbell's line: records a clean power-off, in the vCPU
/// thread that rang it.
#[derive(Debug, Clone)]
pub struct PowerOffLine(pub ExitSignal);

impl devices::Trigger for PowerOffLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.exit(VmExit::PowerOff);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.stopping());
        s.exit(VmExit::Reset);
        s.exit(VmExit::TripleFault);
        assert_eq!(s.reason(), Some(VmExit::Reset));
        assert!(s.stopping());
        assert!(s.wake().read().unwrap() >= 1);
        assert!(s.wait_timeout(std::time::Duration::ZERO));
    }

    #[test]
    fn wait_returns_once_another_thread_signals() {
        let s = ExitSignal::new().unwrap();
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_timeout(std::time::Duration::from_secs(60)))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished());
        s.exit(VmExit::PowerOff);
        assert!(waiter.join().unwrap());
    }

    #[test]
    fn wait_timeout_says_whether_the_vm_stopped() {
        let s = ExitSignal::new().unwrap();
        let t = std::time::Instant::now();
        assert!(!s.wait_timeout(std::time::Duration::from_millis(30)));
        assert!(t.elapsed() >= std::time::Duration::from_millis(30));
        s.exit(VmExit::Halted);
        assert!(s.wait_timeout(std::time::Duration::from_secs(5)));
    }
}
