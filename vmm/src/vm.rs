//! Assembling a VM (KVM VM, memory, boot images, devices, vCPUs) and running
//! it: one thread per vCPU, and the calling thread runs the device event loop.

use std::io::Write;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::{
    ConsoleOutput, ConsoleWatch, SerialConsole, SerialInput, COM1_IRQ, COM1_LEN, COM1_PORT, I8042,
    I8042_LEN, I8042_PORT,
};
use devices::pseudo::{
    BootTimer, BootTimes, PowerPort, BOOT_TIMER_LEN, BOOT_TIMER_PORT, POWER_LEN, POWER_PORT,
};
use devices::virtio::MmioTransport;
use devices::{Bus, EventFdTrigger};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::{self, mptable, BootError, BootSource};
use crate::control::{self, VcpuChannel, VmmHandle};
use crate::device_manager::NetConfig;
use crate::device_manager::{DeviceError, DiskConfig, FsShare, PendingDevices};
use crate::exit::{ExitSignal, PowerOffLine, VmExit};
use crate::kvm::{self, GuestNeeds, KvmError};
use crate::layout::KVM_TSS_ADDRESS;
use crate::memory::{self, MemoryError};
use crate::power;
use crate::seccomp::{Filters, SeccompError, SeccompMode, ThreadKind};
use crate::vcpu::{self, VcpuError};

/// How often the vCPUs are looked at for a guest that halted for good.
const HALT_PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long the VMM waits for vCPU threads to leave KVM_RUN at the end.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything the VMM needs to run one VM.
pub struct VmConfig {
    /// Kernel, initramfs and command line.
    pub boot: BootSource,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// The KVM device.
    pub kvm_path: PathBuf,
    /// What the guest needs from KVM (a Linux kernel, normally).
    pub guest_needs: GuestNeeds,
    /// Where the guest's serial console goes.
    pub console_out: Box<dyn Write + Send>,
    /// What is fed to the guest's serial console, if anything (a readable fd
    /// that stays open while the VM runs).
    pub console_in: Option<RawFd>,
    /// virtio-blk disks, in the order the guest enumerates them.
    pub disks: Vec<DiskConfig>,
    /// virtio-fs shares served by vhost-user backends; with any, guest
    /// memory is a shared memfd (the backends map it).
    pub shares: Vec<FsShare>,
    /// The host end of a virtio-console port (the guest init's control channel).
    pub control: Option<UnixStream>,
    /// Give the guest a virtio-rng entropy source.
    pub entropy: bool,
    /// The guest's network interface, if it has one (`None`: loopback only).
    pub net: Option<NetConfig>,
    /// Lets the caller stop the VM from another thread (`ExitSignal::exit`);
    /// `None` when only the guest ends it.
    pub exit_signal: Option<ExitSignal>,
    /// Where the VM's boot timeline goes (its own steps and the guest
    /// init's boot-timer marks), for the caller to read once it ended.
    pub boot_times: Option<BootTimes>,
    /// The seccomp filters of the VMM's threads ([`crate::seccomp`]). Off
    /// while the VMM is a thread of a bigger process: the filter of the
    /// thread that calls [`Vmm::run`] stays on it afterwards.
    pub seccomp: SeccompMode,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("boot", &self.boot)
            .field("memory_mib", &self.memory_mib)
            .field("cpus", &self.cpus)
            .field("kvm_path", &self.kvm_path)
            .field("seccomp", &self.seccomp)
            .finish_non_exhaustive()
    }
}

/// Errors that keep a VM from starting.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` is unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A KVM VM-level ioctl failed.
    #[error("cannot set up the VM: {what}")]
    Vm {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// vCPU set-up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// virtio devices.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// The seccomp filters.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// Host resources (eventfds, epoll, threads).
    #[error("cannot set up {what}")]
    Host {
        /// Which resource.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn host_err(what: &'static str) -> impl Fn(std::io::Error) -> VmmError {
    move |source| VmmError::Host { what, source }
}

/// `e` and its sources, for a `VmExit::Error`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn vm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Vm { what, source }
}

/// Wakes the event loop when the VM must stop or the console reported
/// something; the loop then looks at the shared state itself.
struct Lifecycle {
    fds: Vec<RawFd>,
    drain: Vec<Arc<EventFd>>,
}

impl MutEventSubscriber for Lifecycle {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        for evt in &self.drain {
            let _ = evt.read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in &self.fds {
            if let Err(e) = ops.add(Events::new_raw(*fd, EventSet::IN)) {
                tracing::error!("event loop: cannot watch fd {fd}: {e}");
            }
        }
    }
}

/// Boots the VM `config` describes and runs it to its end: [`Vmm::build`]
/// then [`Vmm::run`].
///
/// # Errors
/// The VM could not be set up. Once the guest runs, every ending (clean or
/// not) is an `Ok(VmExit)`.
pub fn run(config: VmConfig) -> Result<VmExit, VmmError> {
    Vmm::build(config)?.run()
}

/// A VM that is fully set up but not yet running: guest memory holds the
/// kernel, every host file is open, every vhost-user backend connected, and
/// the KVM VM and its vCPUs exist and are configured. [`Vmm::run`] then only
/// starts threads and runs the guest: it opens no path and connects no
/// socket, so a caller may confine itself (namespaces, `pivot_root`, dropped
/// capabilities) between the two.
///
/// Fields drop in declaration order, and that order is the memory-safety
/// argument: every KVM file descriptor (vCPUs, then the VM) closes before
/// `mem`, the mapping KVM was told the guest's RAM lives in, is unmapped.
pub struct Vmm {
    /// Created and configured, not yet running; each with its command channel.
    vcpus: Vec<(u8, VcpuFd, VcpuChannel)>,
    /// Pauses, resumes and stops the vCPUs.
    handle: VmmHandle,
    events: EventManager<Box<dyn MutEventSubscriber + Send>>,
    /// The virtio-mmio transports (also reachable through `mmio`).
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    pio: Bus,
    mmio: Bus,
    exit: ExitSignal,
    watch: ConsoleWatch,
    vm: VmFd,
    kvm: Kvm,
    /// Last: outlives every KVM descriptor above.
    mem: GuestMemoryMmap,
    /// Compiled at build, installed by each thread in `run`.
    filters: Arc<Filters>,
    started: Instant,
    times: BootTimes,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .field("devices", &self.transports.len())
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// Sets up the VM `config` describes without running it.
    ///
    /// # Errors
    /// Bad input (CPU count, kernel, disks, shares, network backend), or KVM
    /// or the host refused a step.
    pub fn build(config: VmConfig) -> Result<Self, VmmError> {
        let started = Instant::now();
        if config.cpus == 0 || config.cpus > mptable::MAX_CPUS {
            return Err(mptable::MpTableError::CpuCount(config.cpus).into());
        }
        let filters = Arc::new(Filters::new(config.seccomp)?);
        // Everything the user gave is checked (and loaded) before KVM is
        // touched, so bad input gets its own error on any host.
        let pending = PendingDevices::open(&config.disks, config.control, config.entropy)?
            .with_shares(&config.shares)?;
        let pending = pending.with_net(config.net)?;
        let mut boot_source = config.boot.clone();
        boot_source.cmdline = power::cmdline(&boot_source.cmdline);
        let devices_cmdline = pending.cmdline();
        if !devices_cmdline.is_empty() {
            boot_source.cmdline = format!("{} {devices_cmdline}", boot_source.cmdline);
        }
        let mem = if config.shares.is_empty() {
            memory::create(config.memory_mib)?
        } else {
            memory::create_shared(config.memory_mib)?
        };
        let devices_ready = started.elapsed();
        let entry = boot::load(&mem, &boot_source)?;
        let loaded = started.elapsed();
        mptable::write(&mem, config.cpus)?;
        let cr3 = vcpu::write_boot_tables(&mem)?;

        let kvm = kvm::open(&config.kvm_path, config.guest_needs)?;
        let vm = kvm.create_vm().map_err(vm_err("KVM_CREATE_VM"))?;
        let times = config.boot_times.unwrap_or_default();
        times.vm_created();
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(vm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(vm_err("KVM_CREATE_IRQCHIP"))?;
        // The PIT's speaker port is a dummy: nothing to emulate for a microVM.
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(vm_err("KVM_CREATE_PIT2"))?;
        memory::register(&vm, &mem)?;
        tracing::debug!(
            "vm: kernel {:?} loaded ({:?} entry at {:#x}): devices opened and memory mapped after {:?}, kernel and initrd loaded after {:?}, KVM VM made after {:?}",
            config.boot.kernel,
            entry.format,
            entry.entry.0,
            devices_ready,
            loaded,
            started.elapsed()
        );

        let exit = match config.exit_signal {
            Some(signal) => signal,
            None => ExitSignal::new().map_err(host_err("the exit event"))?,
        };
        let watch = ConsoleWatch::new();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(host_err("the serial IRQ"))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(vm_err("KVM_IRQFD (serial)"))?;
        let (serial, input_drained) = SerialConsole::new(
            EventFdTrigger::new(serial_irq),
            ConsoleOutput::new(config.console_out, watch.clone()),
        )
        .map_err(host_err("the serial console"))?;
        let serial = Arc::new(Mutex::new(serial));

        let mut pio = Bus::new();
        let bus_err = |e: devices::BusError| VmmError::Host {
            what: "the port I/O bus",
            source: std::io::Error::other(e.to_string()),
        };
        pio.insert(serial.clone(), COM1_PORT, COM1_LEN)
            .map_err(bus_err)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            I8042_PORT,
            I8042_LEN,
        )
        .map_err(bus_err)?;
        pio.insert(
            Arc::new(Mutex::new(PowerPort::new(PowerOffLine(exit.clone())))),
            u64::from(POWER_PORT),
            POWER_LEN,
        )
        .map_err(bus_err)?;
        pio.insert(
            Arc::new(Mutex::new(BootTimer::new(times.clone()))),
            u64::from(BOOT_TIMER_PORT),
            BOOT_TIMER_LEN,
        )
        .map_err(bus_err)?;
        let mut mmio = Bus::new();

        let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new()
            .map_err(|e| VmmError::Host {
                what: "the event loop",
                source: std::io::Error::other(e.to_string()),
            })?;
        events.add_subscriber(Box::new(Lifecycle {
            fds: vec![std::os::fd::AsRawFd::as_raw_fd(exit.wake())],
            drain: vec![exit_wake(&exit)],
        }));
        if let Some(fd) = config.console_in {
            events.add_subscriber(Box::new(SerialInput::new(serial, fd, input_drained)));
        }
        let transports = pending.attach(&vm, &mem, &mut mmio, &mut events)?;

        // vCPU threads are kicked out of KVM_RUN with a signal whose handler
        // sets the thread's vCPU `immediate_exit`: KVM_RUN returns EINTR and
        // the loop reads its commands.
        register_signal_handler(SIGRTMIN(), control::kick_handler).map_err(|e| VmmError::Host {
            what: "the vCPU kick signal",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let (handle, channels) = VmmHandle::new(config.cpus, exit.clone());
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for (index, channel) in (0..config.cpus).zip(channels) {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(vm_err("KVM_CREATE_VCPU"))?;
            vcpu::configure(&kvm, &fd, index, config.cpus, entry.entry, cr3)?;
            vcpus.push((index, fd, channel));
        }
        tracing::debug!(
            "vm: {} vCPUs configured after {:?}",
            vcpus.len(),
            started.elapsed()
        );
        Ok(Self {
            vcpus,
            handle,
            events,
            transports,
            pio,
            mmio,
            exit,
            watch,
            vm,
            kvm,
            mem,
            filters,
            started,
            times,
        })
    }

    /// Pauses, resumes and stops this VM from another thread, once it runs.
    #[must_use]
    pub fn handle(&self) -> VmmHandle {
        self.handle.clone()
    }

    /// The seccomp filters of this VM's threads, for a thread of the caller
    /// that serves the VM (it installs [`ThreadKind::Control`]).
    #[must_use]
    pub fn filters(&self) -> Arc<Filters> {
        Arc::clone(&self.filters)
    }

    /// Starts the vCPU threads and runs the device event loop on the calling
    /// thread until the VM stops; returns how it ended. Opens no host path.
    ///
    /// # Errors
    /// A vCPU thread could not be started. Once the guest runs, every ending
    /// (clean or not) is an `Ok(VmExit)`.
    pub fn run(self) -> Result<VmExit, VmmError> {
        let Self {
            vcpus,
            handle,
            mut events,
            transports,
            pio,
            mmio,
            exit,
            watch,
            vm,
            kvm,
            mem,
            filters,
            started,
            times,
        } = self;
        let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(vcpus.len());
        let mut outcome = Ok(());
        for (index, fd, channel) in vcpus {
            let (pio, mmio, exit) = (pio.clone(), mmio.clone(), exit.clone());
            let filters = Arc::clone(&filters);
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    // Just before the guest runs on this vCPU.
                    if let Err(e) = filters.install(ThreadKind::Vcpu) {
                        exit.exit(VmExit::Error(format!("vCPU {index}: {}", chain(&e))));
                        return;
                    }
                    vcpu::run_loop(index, fd, &pio, &mmio, &exit, &channel);
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    outcome = Err(VmmError::Host {
                        what: "a vCPU thread",
                        source: e,
                    });
                    break;
                }
            }
        }
        handle.started(threads);
        times.vcpus_started();
        let result = match outcome {
            Ok(()) => {
                tracing::debug!("vm: vCPUs running after {:?}", started.elapsed());
                let (ended, all_stopped) = run_until_exit(&mut events, &exit, &handle, &filters);
                times.stopped();
                // The vCPUs are stopped: what the guest left in memory is final.
                let ended = power::classify(ended, &mem, watch.panic_line());
                tracing::debug!("vm: stopped after {:?}: {ended:?}", started.elapsed());
                if !all_stopped {
                    leak_guest_memory(&mem);
                }
                Ok(ended)
            }
            Err(e) => {
                // The vCPUs already running must stop before the VM goes.
                exit.exit(VmExit::Error(e.to_string()));
                if !stop_vcpus(handle.take_threads()) {
                    leak_guest_memory(&mem);
                }
                Err(e)
            }
        };
        // Every vCPU thread is joined (or its memory leaked above); the
        // devices go, then the KVM VM, and only then the guest's RAM.
        drop(transports);
        drop(events);
        drop((pio, mmio));
        drop(vm);
        drop(kvm);
        drop(mem);
        result
    }
}

/// A vCPU thread that did not stop may still be in KVM_RUN: the guest's RAM
/// must then stay mapped for as long as the process lives, or KVM would
/// write guest data into whatever the host maps there next.
fn leak_guest_memory(mem: &GuestMemoryMmap) {
    tracing::error!("vm: a vCPU thread did not stop; its guest memory stays mapped");
    // The regions are reference-counted: a clone that is never dropped keeps
    // them mapped.
    std::mem::forget(mem.clone());
}

fn exit_wake(exit: &ExitSignal) -> Arc<EventFd> {
    Arc::new(exit.wake().try_clone().unwrap_or_else(|_| dummy_event()))
}

fn dummy_event() -> EventFd {
    // Only reached if dup() fails; draining then simply does nothing useful
    // and the loop still checks the shared state after every wake.
    EventFd::new(EFD_NONBLOCK).unwrap_or_else(|_| std::process::abort())
}

/// Runs the event loop until the VM stops, while another thread stops the
/// vCPUs as soon as an exit is recorded: stopping them never waits for a
/// device handler to finish (the event loop notices the exit between two
/// bounded batches of device work). Returns once both are done, with
/// whether every vCPU thread was joined.
fn run_until_exit(
    events: &mut EventManager<Box<dyn MutEventSubscriber + Send>>,
    exit: &ExitSignal,
    handle: &VmmHandle,
    filters: &Arc<Filters>,
) -> (VmExit, bool) {
    let stopper = VcpuStopper::start(handle, exit, filters);
    // Every thread of the VM is started: this one confines itself too. A
    // filter that cannot be installed stops the VM (the loop still runs to
    // its end, so that everything is torn down).
    if let Err(e) = filters.install(ThreadKind::EventLoop) {
        exit.exit(VmExit::Error(chain(&e)));
    }
    let outcome = event_loop(events, exit);
    let all_stopped = stopper.finish();
    (outcome, all_stopped)
}

/// Stops the vCPU threads once the VM's exit is recorded.
enum VcpuStopper {
    /// A thread waits for the exit, then kicks the vCPUs; it returns whether
    /// every vCPU thread was joined.
    Thread(JoinHandle<bool>),
    /// No thread could be started: the vCPUs are stopped after the event loop.
    Inline(VmmHandle),
}

impl VcpuStopper {
    fn start(handle: &VmmHandle, exit: &ExitSignal, filters: &Arc<Filters>) -> Self {
        let (stopper_handle, exit) = (handle.clone(), exit.clone());
        let filters = Arc::clone(filters);
        let spawned = std::thread::Builder::new()
            .name("vcpu-stop".into())
            .spawn(move || {
                // Unconfined, it still stops the vCPUs.
                if let Err(e) = filters.install(ThreadKind::Stopper) {
                    exit.exit(VmExit::Error(chain(&e)));
                }
                watch_for_halt(&stopper_handle, &exit);
                stop_vcpus(stopper_handle.take_threads())
            });
        match spawned {
            Ok(thread) => Self::Thread(thread),
            Err(e) => {
                tracing::warn!(
                    "vm: no thread to stop the vCPUs ({e}); they stop after the event loop"
                );
                Self::Inline(handle.clone())
            }
        }
    }

    /// Waits until the vCPUs are stopped (the exit must be recorded);
    /// returns whether every vCPU thread was joined.
    fn finish(self) -> bool {
        match self {
            Self::Thread(thread) => thread.join().unwrap_or_else(|_| {
                tracing::warn!("vm: the vCPU stopper panicked");
                false
            }),
            Self::Inline(handle) => stop_vcpus(handle.take_threads()),
        }
    }
}

/// Until the VM's exit is recorded, looks at the vCPUs every
/// [`HALT_PROBE_EVERY`]: two looks in a row that find every vCPU halted with
/// interrupts masked (or never started) end the VM as [`VmExit::Halted`]. That is how a guest
/// without ACPI powers off or halts (its kernel's last line says so, but
/// anything in the guest can print that line); two looks, so that vCPUs
/// that each halt briefly with interrupts masked (a paravirtual spinlock
/// wait) are not taken for a stopped machine.
fn watch_for_halt(handle: &VmmHandle, exit: &ExitSignal) {
    let mut halted_before = false;
    while !exit.wait_timeout(HALT_PROBE_EVERY) {
        let halted = handle.all_halted().unwrap_or(false);
        if halted && halted_before {
            exit.exit(VmExit::Halted);
        }
        halted_before = halted;
    }
}

/// Runs device I/O until the VM stops; returns how it ended.
fn event_loop(
    events: &mut EventManager<Box<dyn MutEventSubscriber + Send>>,
    exit: &ExitSignal,
) -> VmExit {
    loop {
        if let Err(e) = events.run() {
            exit.exit(VmExit::Error(format!("event loop failed: {e}")));
        }
        if exit.stopping() {
            break;
        }
    }
    exit.reason()
        .unwrap_or_else(|| VmExit::Error("the VM stopped for no recorded reason".into()))
}

/// Kicks every vCPU thread out of KVM_RUN until it returns. A kick that lands
/// just before a thread re-enters KVM_RUN is lost, hence the repeats.
/// Returns whether every thread was joined.
fn stop_vcpus(threads: Vec<JoinHandle<()>>) -> bool {
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    let mut pending = threads;
    while !pending.is_empty() && Instant::now() < deadline {
        let (done, running): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(JoinHandle::is_finished);
        for t in done {
            let _ = t.join();
        }
        for t in &running {
            let _ = t.kill(SIGRTMIN());
        }
        pending = running;
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if !pending.is_empty() {
        tracing::warn!("{} vCPU thread(s) did not stop in time", pending.len());
    }
    pending.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A VM can be built on one thread and run on another (the monitor's
    /// VMM thread, or a process that confines itself in between).
    #[test]
    fn a_built_vmm_can_move_to_another_thread() {
        fn is_send<T: Send>() {}
        is_send::<Vmm>();
    }

    /// A device handler that never runs out of work (its event stays
    /// readable) and holds the event loop for `batch` each time.
    struct Busy {
        evt: EventFd,
        batch: Duration,
    }

    impl MutEventSubscriber for Busy {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            std::thread::sleep(self.batch);
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    /// A vCPU thread stand-in: blocks (as in KVM_RUN) until a kick or the
    /// exit, and records when it stopped.
    fn fake_vcpu(exit: &ExitSignal, stopped: &Arc<Mutex<Vec<Instant>>>) -> JoinHandle<()> {
        let (exit, stopped) = (exit.clone(), Arc::clone(stopped));
        std::thread::spawn(move || {
            while !exit.stopping() {
                // SAFETY: pause() has no preconditions; it returns when a
                // signal handler (the kick) ran.
                unsafe { libc::pause() };
            }
            stopped.lock().unwrap().push(Instant::now());
        })
    }

    #[test]
    fn vcpus_stop_at_once_while_a_device_keeps_the_event_loop_busy() {
        register_signal_handler(SIGRTMIN(), control::kick_handler).unwrap();
        let exit = ExitSignal::new().unwrap();
        let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().unwrap();
        events.add_subscriber(Box::new(Lifecycle {
            fds: vec![exit.wake().as_raw_fd()],
            drain: vec![exit_wake(&exit)],
        }));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        evt.write(1).unwrap();
        let batch = Duration::from_millis(1500);
        events.add_subscriber(Box::new(Busy { evt, batch }));

        let stopped = Arc::new(Mutex::new(Vec::new()));
        let (handle, _channels) = VmmHandle::new(2, exit.clone());
        handle.started((0..2).map(|_| fake_vcpu(&exit, &stopped)).collect());
        let asker = {
            let exit = exit.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                let at = Instant::now();
                exit.exit(VmExit::PowerOff);
                at
            })
        };
        let filters = Arc::new(Filters::new(SeccompMode::Off).unwrap());
        let (outcome, all_stopped) = run_until_exit(&mut events, &exit, &handle, &filters);
        assert!(all_stopped);
        let returned = Instant::now();
        let asked = asker.join().unwrap();

        assert_eq!(outcome, VmExit::PowerOff);
        let stopped = stopped.lock().unwrap();
        assert_eq!(stopped.len(), 2);
        for at in stopped.iter() {
            let after = at.saturating_duration_since(asked);
            assert!(
                after < Duration::from_millis(500),
                "a vCPU stopped {after:?} after the exit, behind the busy event loop"
            );
        }
        // The loop itself noticed at the end of the batch in progress.
        assert!(returned.saturating_duration_since(asked) < batch + Duration::from_secs(1));
    }
}
