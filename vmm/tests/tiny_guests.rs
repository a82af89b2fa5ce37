//! Boots tiny hand-made 64-bit guests through the whole VMM: memory, boot
//! structures, long-mode entry, port I/O bus, serial console, i8042 reset,
//! and each way a VM can end.
//!
//! These guests avoid what this project's development hosts' PVM KVM cannot
//! emulate in ring 0 (XRSTOR, INT3), so they run on any /dev/kvm. Linux guests
//! are booted by the end-to-end tests in the emulated KVM host.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly on purpose

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::{BootSource, GuestNeeds, VmConfig, VmExit};

const LOAD_ADDR: u64 = 0x10_0000;

/// VMs of the tests run side by side (read), except where a test looks at
/// every VMM thread of this process (write).
static VMS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn side_by_side() -> std::sync::RwLockReadGuard<'static, ()> {
    VMS.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A minimal ELF64 x86-64 executable: one PT_LOAD segment holding `code`,
/// loaded and entered at 1 MiB.
fn elf_with_code(code: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    f.extend_from_slice(&64u64.to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let offset = 64u64 + 56;
    let len = code.len() as u64;
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&7u32.to_le_bytes()); // RWX
    for v in [offset, LOAD_ADDR, LOAD_ADDR, len, len, 0x1000] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(code);
    f
}

/// `mov dx, 0x3f8`, then `mov al, b; out dx, al` for each byte of `text`.
fn print(text: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03];
    for b in text {
        code.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    code
}

const RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64]; // mov al, 0xfe; out 0x64, al
const SPIN: &[u8] = &[0xeb, 0xfe]; // jmp $
const UD2: &[u8] = &[0x0f, 0x0b];

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn kernel_file(name: &str, code: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("hull-tiny-{}-{name}.elf", std::process::id()));
    std::fs::write(&path, elf_with_code(code)).unwrap();
    path
}

fn config(kernel: &Path, cpus: u8, out: &Capture) -> VmConfig {
    VmConfig {
        boot: BootSource {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: "x".into(),
        },
        memory_mib: 32,
        cpus,
        kvm_path: "/dev/kvm".into(),
        guest_needs: GuestNeeds::AnyKvm,
        console_out: Box::new(out.clone()),
        console_in: None,
        disks: Vec::new(),
        shares: Vec::new(),
        control: None,
        entropy: false,
        net: None,
        exit_signal: None,
        boot_times: None,
        seccomp: vmm::SeccompMode::Off,
    }
}

fn boot(kernel: &Path, cpus: u8) -> (VmExit, String) {
    let out = Capture::default();
    let _vms = side_by_side();
    let exit = vmm::run(config(kernel, cpus, &out)).expect("the VM should start");
    let text = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    (exit, text)
}

fn run_guest(name: &str, code: &[u8], cpus: u8) -> (VmExit, String) {
    let kernel = kernel_file(name, code);
    let result = boot(&kernel, cpus);
    std::fs::remove_file(kernel).unwrap();
    result
}

#[test]
fn guest_output_reaches_the_console_and_reset_ends_the_vm() {
    let code = [
        print(b"hello from the guest\n"),
        RESET.to_vec(),
        SPIN.to_vec(),
    ]
    .concat();
    let (exit, out) = run_guest("hello", &code, 1);
    assert_eq!(out, "hello from the guest\n");
    assert_eq!(exit, VmExit::Reset);
    assert!(exit.is_clean());
}

#[test]
fn secondary_vcpus_waiting_for_sipi_are_stopped_too() {
    let code = [print(b"smp\n"), RESET.to_vec(), SPIN.to_vec()].concat();
    let started = Instant::now();
    let (exit, out) = run_guest("smp", &code, 4);
    assert_eq!((exit, out.as_str()), (VmExit::Reset, "smp\n"));
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_panic_line_on_the_console_decides_nothing() {
    let code = [
        print(b"Kernel panic - not syncing: fake\n"),
        RESET.to_vec(),
        SPIN.to_vec(),
    ]
    .concat();
    let (exit, out) = run_guest("fakepanic", &code, 1);
    assert_eq!(out, "Kernel panic - not syncing: fake\n");
    assert_eq!(exit, VmExit::Reset);
    assert!(exit.is_clean());
}

/// `mov word [0x472], 0x1234`: what Linux does before a warm reboot, which
/// `reboot=panic_warm` makes it do only after a panic.
const WARM_BOOT_MARK: &[u8] = &[0x66, 0xc7, 0x04, 0x25, 0x72, 0x04, 0, 0, 0x34, 0x12];

#[test]
fn a_reset_after_the_kernels_panic_mark_is_a_panic() {
    let code = [
        print(b"Kernel panic - not syncing: tiny test\n"),
        WARM_BOOT_MARK.to_vec(),
        RESET.to_vec(),
        SPIN.to_vec(),
    ]
    .concat();
    let (exit, _) = run_guest("panic", &code, 1);
    assert_eq!(
        exit,
        VmExit::Panic(Some("Kernel panic - not syncing: tiny test".into()))
    );
    assert!(!exit.is_clean());
    let (exit, _) = run_guest("panic-silent", &[WARM_BOOT_MARK, RESET].concat(), 1);
    assert_eq!(exit, VmExit::Panic(None));
    assert_eq!(exit.to_string(), "the guest kernel panicked");
}

/// `mov dx, 0x4f0; mov al, v; out dx, al`: hull's power-off doorbell.
fn ring_power_port(value: u8) -> Vec<u8> {
    assert_eq!(devices::pseudo::POWER_PORT, 0x4f0);
    vec![0x66, 0xba, 0xf0, 0x04, 0xb0, value, 0xee]
}

#[test]
fn the_power_off_doorbell_ends_the_vm_cleanly_at_once() {
    let code = [
        ring_power_port(0x02),
        ring_power_port(devices::pseudo::POWER_OFF),
        print(b"after\n"),
        RESET.to_vec(),
    ]
    .concat();
    let (exit, out) = run_guest("doorbell", &code, 1);
    assert_eq!(exit, VmExit::PowerOff);
    assert!(exit.is_clean());
    assert_eq!(out, "", "the guest ran on after ringing the doorbell");
}

#[test]
fn a_power_off_line_on_the_console_decides_nothing_but_a_halt_ends_the_vm() {
    // `cli; hlt`: how a kernel without ACPI powers off or halts.
    let code = [
        print(b"reboot: Power down\nreboot: System halted\n"),
        vec![0xfa, 0xf4],
        RESET.to_vec(),
    ]
    .concat();
    let (exit, _) = run_guest("halt", &code, 2);
    assert_eq!(exit, VmExit::Halted);
    assert!(exit.is_clean());
}

#[test]
fn an_idle_guest_is_not_taken_for_a_halted_one() {
    // `sti; hlt`, again and again: idle, waiting for an interrupt.
    let kernel = kernel_file("idle", &[0xfb, 0xf4, 0xeb, 0xfc]);
    let signal = vmm::ExitSignal::new().unwrap();
    let stopper = {
        let signal = signal.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(4));
            signal.exit(VmExit::Error("stopped by the host".into()));
        })
    };
    let config = VmConfig {
        boot: BootSource {
            kernel: kernel.clone(),
            initrd: None,
            cmdline: "x".into(),
        },
        memory_mib: 32,
        cpus: 1,
        kvm_path: "/dev/kvm".into(),
        guest_needs: GuestNeeds::AnyKvm,
        console_out: Box::new(std::io::sink()),
        console_in: None,
        disks: Vec::new(),
        shares: Vec::new(),
        control: None,
        entropy: false,
        net: None,
        exit_signal: Some(signal),
        boot_times: None,
        seccomp: vmm::SeccompMode::Off,
    };
    let exit = {
        let _vms = side_by_side();
        vmm::run(config).expect("the VM should start")
    };
    stopper.join().unwrap();
    std::fs::remove_file(kernel).unwrap();
    assert_eq!(exit, VmExit::Error("stopped by the host".into()));
}

#[test]
fn a_fault_with_no_idt_is_a_triple_fault() {
    let code = [UD2, SPIN].concat();
    let (exit, _) = run_guest("ud2", &code, 1);
    assert_eq!(exit, VmExit::TripleFault, "{exit}");
}

#[test]
fn a_kernel_too_big_for_memory_is_refused() {
    // A segment that ends past the 32 MiB of guest memory.
    let mut elf = elf_with_code(&[0x90; 16]);
    let memsz_at = 64 + 40;
    elf[memsz_at..memsz_at + 8].copy_from_slice(&(64u64 << 20).to_le_bytes());
    let path = std::env::temp_dir().join(format!("hull-tiny-{}-big.elf", std::process::id()));
    std::fs::write(&path, elf).unwrap();
    let config = VmConfig {
        boot: BootSource {
            kernel: path.clone(),
            initrd: None,
            cmdline: String::new(),
        },
        memory_mib: 32,
        cpus: 1,
        kvm_path: "/dev/kvm".into(),
        guest_needs: GuestNeeds::AnyKvm,
        console_out: Box::new(std::io::sink()),
        console_in: None,
        disks: Vec::new(),
        shares: Vec::new(),
        control: None,
        entropy: false,
        net: None,
        exit_signal: None,
        boot_times: None,
        seccomp: vmm::SeccompMode::Off,
    };
    let err = {
        let _vms = side_by_side();
        vmm::run(config).unwrap_err().to_string()
    };
    std::fs::remove_file(path).unwrap();
    assert!(err.contains("too small"), "{err}");
    assert!(err.contains("--memory"), "{err}");
}

#[test]
fn an_exit_signalled_from_outside_stops_a_spinning_guest_promptly() {
    let kernel = kernel_file("spin", &[print(b"up\n"), SPIN.to_vec()].concat());
    let signal = vmm::ExitSignal::new().unwrap();
    let out = Capture::default();
    let config = VmConfig {
        boot: BootSource {
            kernel: kernel.clone(),
            initrd: None,
            cmdline: "x".into(),
        },
        memory_mib: 32,
        cpus: 2,
        kvm_path: "/dev/kvm".into(),
        guest_needs: GuestNeeds::AnyKvm,
        console_out: Box::new(out.clone()),
        console_in: None,
        disks: Vec::new(),
        shares: Vec::new(),
        control: None,
        entropy: true,
        net: None,
        exit_signal: Some(signal.clone()),
        boot_times: None,
        seccomp: vmm::SeccompMode::Off,
    };
    let stopper = std::thread::spawn(move || {
        // Once the guest runs (it printed), as `hull stop` would find it.
        let give_up = Instant::now() + Duration::from_secs(20);
        while !out.0.lock().unwrap().ends_with(b"up\n") && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        let at = Instant::now();
        signal.exit(VmExit::Error("stopped by the host".into()));
        at
    });
    let exit = {
        let _vms = side_by_side();
        vmm::run(config).expect("the VM should start")
    };
    let returned = Instant::now();
    let asked = stopper.join().unwrap();
    std::fs::remove_file(kernel).unwrap();
    assert_eq!(exit, VmExit::Error("stopped by the host".into()));
    // Generous for a loaded host; the VMM gives up on vCPUs after 2 s.
    let took = returned.saturating_duration_since(asked);
    assert!(
        took < Duration::from_secs(3),
        "the VM took {took:?} to stop"
    );
}

/// What a jailed VMM process does: build while host paths are visible, then
/// lose sight of every one (here a thread with its own root, an empty
/// directory) and run. The guest must boot all the same, on every vCPU.
#[test]
fn a_built_vm_runs_where_no_host_path_can_be_seen() {
    let kernel = kernel_file(
        "jailed",
        &[print(b"jailed\n"), RESET.to_vec(), SPIN.to_vec()].concat(),
    );
    let out = Capture::default();
    let mut cfg = config(&kernel, 2, &out);
    cfg.entropy = true;
    // And confined as it will be there: the i8042 reset ends the VM under
    // every thread's filter.
    cfg.seccomp = vmm::SeccompMode::Enforce;
    let _vms = side_by_side();
    let vmm = vmm::Vmm::build(cfg).expect("the VM should build");
    std::fs::remove_file(&kernel).unwrap();
    let empty = std::env::temp_dir().join(format!("hull-tiny-{}-empty", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let root = std::ffi::CString::new(empty.as_os_str().as_encoded_bytes()).unwrap();
    let exit = std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_FS) gives this thread its own root and cwd;
        // the threads it starts share them. Plain syscalls, results checked.
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_FS), 0, "unshare(CLONE_FS)");
            assert_eq!(
                libc::chroot(root.as_ptr()),
                0,
                "chroot: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(libc::chdir(c"/".as_ptr()), 0);
        }
        assert!(!Path::new("/dev/kvm").exists());
        vmm.run()
    })
    .join()
    .unwrap()
    .expect("the VM should run");
    std::fs::remove_dir(&empty).unwrap();
    assert_eq!(
        (
            exit,
            String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned()
        ),
        (VmExit::Reset, "jailed\n".to_string())
    );
}

/// Prints `x` forever, with a pause between two: `mov dx, 0x3f8`, then
/// `mov ecx, 0x40000; loop $; mov al, 'x'; out dx, al; jmp` back.
const TICKER: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb9, 0x00, 0x00, 0x04, 0x00, 0xe2, 0xfe, 0xb0, b'x', 0xee, 0xeb, 0xf4,
];

/// The seccomp mode (`Seccomp:` in /proc) of this process's VMM threads.
fn seccomp_of_threads() -> Vec<(String, u32)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let name = name.trim().to_string();
        if !(name.starts_with("vcpu") || name == "vmm-loop") {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        found.push((name, mode));
    }
    found
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < give_up, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_running_vm_pauses_resumes_and_stops_on_command() {
    let kernel = kernel_file("ticker", TICKER);
    let out = Capture::default();
    // Two vCPUs: the second waits for a SIPI inside KVM_RUN, and must be
    // brought out of it too. With every thread's seccomp filter enforced (a
    // call outside one ends this test process with the seccomp status).
    let mut cfg = config(&kernel, 2, &out);
    cfg.entropy = true;
    cfg.seccomp = vmm::SeccompMode::Enforce;
    let _alone = VMS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let vmm = vmm::Vmm::build(cfg).expect("the VM should build");
    std::fs::remove_file(&kernel).unwrap();
    let handle = vmm.handle();
    assert!(matches!(handle.pause(), Err(vmm::ControlError::NotRunning)));
    let vm = std::thread::Builder::new()
        .name("vmm-loop".into())
        .spawn(move || vmm.run())
        .unwrap();
    let printed = || out.0.lock().unwrap().len();

    wait_for("the guest to print", || printed() > 3);
    let mut filtered = seccomp_of_threads();
    filtered.sort();
    assert_eq!(
        filtered,
        [
            ("vcpu-stop".to_string(), 2),
            ("vcpu0".to_string(), 2),
            ("vcpu1".to_string(), 2),
            ("vmm-loop".to_string(), 2)
        ]
    );
    handle.pause().expect("the vCPUs should pause");
    let at_pause = printed();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(printed(), at_pause, "the guest ran while paused");
    handle.pause().expect("pausing a paused VM is fine");

    handle.resume().expect("the vCPUs should resume");
    wait_for("the guest to print again", || printed() > at_pause + 3);

    // A paused VM stops too.
    handle.pause().expect("the vCPUs should pause again");
    let asked = Instant::now();
    handle.stop(VmExit::Error("stopped by the host".into()));
    let exit = vm.join().unwrap().expect("the VM should run");
    assert_eq!(exit, VmExit::Error("stopped by the host".into()));
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the VM took {took:?} to stop"
    );
    assert!(matches!(
        handle.resume(),
        Err(vmm::ControlError::NotRunning)
    ));
}
