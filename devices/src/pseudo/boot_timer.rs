use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hull_protocol::ports::BootMark;

use crate::BusDevice;

/// When each point of a VM's start happened, as the VMM saw it: its own
/// steps and the guest's [`BootMark`]s. A fixed table: one slot per mark,
/// the first write of each wins, so a guest cannot grow it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Table {
    /// KVM_CREATE_VM: the reference for every other time.
    vm_created: Option<Instant>,
    /// The vCPU threads were started (the guest's kernel starts).
    vcpus_started: Option<Instant>,
    guest: [Option<Instant>; BootMark::ALL.len()],
    /// The VM ended.
    stopped: Option<Instant>,
}

/// A shared handle on a VM's boot timeline: the VMM and its boot-timer
/// device write it, the caller reads it once the VM ended.
#[derive(Debug, Clone, Default)]
pub struct BootTimes(Arc<Mutex<Table>>);

/// One point of the timeline: its name and when, from KVM_CREATE_VM.
pub type BootPoint = (&'static str, Duration);

impl BootTimes {
    /// An empty timeline.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The KVM VM exists now (the reference point).
    pub fn vm_created(&self) {
        self.with(|t| t.vm_created = Some(Instant::now()));
    }

    /// The vCPU threads run now.
    pub fn vcpus_started(&self) {
        self.with(|t| t.vcpus_started = Some(Instant::now()));
    }

    /// The VM ended now.
    pub fn stopped(&self) {
        self.with(|t| t.stopped = Some(Instant::now()));
    }

    /// Records `mark` now unless it was already; returns whether it was new.
    fn guest_mark(&self, mark: BootMark) -> bool {
        self.with(|t| {
            let slot = &mut t.guest[mark.index()];
            let new = slot.is_none();
            if new {
                *slot = Some(Instant::now());
            }
            new
        })
    }

    /// The points recorded, in the order they happen, each from
    /// KVM_CREATE_VM (nothing before the VM exists).
    #[must_use]
    pub fn points(&self) -> Vec<BootPoint> {
        let t = self.with(|t| *t);
        let Some(zero) = t.vm_created else {
            return Vec::new();
        };
        let since = |at: Instant| at.saturating_duration_since(zero);
        let mut points = Vec::with_capacity(BootMark::ALL.len() + 3);
        points.push(("vm created", Duration::ZERO));
        if let Some(at) = t.vcpus_started {
            points.push(("vcpus started", since(at)));
        }
        for (mark, at) in BootMark::ALL.into_iter().zip(t.guest) {
            if let Some(at) = at {
                points.push((mark.name(), since(at)));
            }
        }
        if let Some(at) = t.stopped {
            points.push(("vm stopped", since(at)));
        }
        points
    }
}

/// The boot timer (as Firecracker's boot-timer device and Cloud
/// Hypervisor's debug port do): hull's init writes one byte, a
/// [`BootMark`], at known points of its start, and the VMM records when, in
/// the vCPU thread that wrote it. Costs the guest one `outb` per mark.
/// Unknown bytes and marks already recorded are ignored and logged
/// (rate-limited, without the byte); reads return 0.
#[derive(Debug)]
pub struct BootTimer {
    times: BootTimes,
}

impl BootTimer {
    /// A timer that records into `times`.
    #[must_use]
    pub fn new(times: BootTimes) -> Self {
        Self { times }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mark = match (offset, data) {
            (0, [code]) => BootMark::from_code(*code),
            _ => None,
        };
        let recorded = mark.is_some_and(|m| self.times.guest_mark(m));
        if !recorded {
            crate::rate_limited!(
                warn,
                "boot timer: ignored a {}-byte write at offset {offset} (not a new mark)",
                data.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_kept_once_each_in_order_from_the_vm_creation() {
        let times = BootTimes::new();
        let mut dev = BootTimer::new(times.clone());
        assert!(times.points().is_empty(), "a point before the VM exists");
        times.vm_created();
        times.vcpus_started();
        dev.write(0, &[BootMark::InitStarted as u8]);
        dev.write(0, &[BootMark::RootReady as u8]);
        std::thread::sleep(Duration::from_millis(5));
        let first = times.points();
        // Repeats, unknown bytes, wide writes and other offsets change nothing.
        for _ in 0..1000 {
            dev.write(0, &[BootMark::RootReady as u8]);
        }
        dev.write(0, &[0]);
        dev.write(0, &[0xff]);
        dev.write(0, &[BootMark::WorkloadStarted as u8, 0]);
        dev.write(1, &[BootMark::WorkloadStarted as u8]);
        assert_eq!(times.points(), first);
        dev.write(0, &[BootMark::WorkloadStarted as u8]);
        times.stopped();
        let names: Vec<_> = times.points().iter().map(|p| p.0).collect();
        assert_eq!(
            names,
            [
                "vm created",
                "vcpus started",
                "init started",
                "root ready",
                "workload started",
                "vm stopped"
            ]
        );
        let at: Vec<_> = times.points().iter().map(|p| p.1).collect();
        assert!(at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
        let mut data = [0xaa];
        dev.read(0, &mut data);
        assert_eq!(data, [0]);
    }
}
