//! `hull boot` on a real Linux guest: the project's kernel, booted by hull
//! inside the emulated KVM host, with a tiny busybox init as the guest's PID 1.
//! Also the errors a user meets with bad input, on this host directly.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{EmulatedHost, HostRun, HULL_IN_HOST, KERNEL_IN_HOST};

const MARKER: &str = "HULL-GUEST-MARKER: init is running";
const INITRD_IN_HOST: &str = "/opt/hull/guest-initrd.cpio";
const BZIMAGE_IN_HOST: &str = "/opt/hull/bzImage";

/// A guest initramfs: busybox-static as /bin/*, and `init_body` as /init.
fn guest_initrd(name: &str, init_body: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("initrd-{name}"));
    let _ = std::fs::remove_dir_all(&root);
    for dir in ["bin", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static must be installed (./dev setup installs it)");
    for applet in ["sh", "mount", "grep", "cat", "reboot", "poweroff", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let init = format!(
        "#!/bin/sh\nexport PATH=/bin\nmount -t proc proc /proc\nmount -t sysfs sys /sys\n\
         echo '{MARKER}'\n{init_body}\n"
    );
    std::fs::write(root.join("init"), init).unwrap();
    let exec = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(root.join("init"), exec).unwrap();
    let cpio = root.with_extension("cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            root.display(),
            cpio.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "cpio failed (./dev setup installs it)");
    cpio
}

fn bzimage() -> PathBuf {
    let kernel = common::test_kernel();
    let bz = kernel.with_file_name("bzImage");
    assert!(bz.is_file(), "no bzImage next to {}", kernel.display());
    bz
}

/// Runs `hull_args` with the guest initrd in the emulated host and prints
/// everything (the guest's console included) into the test log.
fn boot_in_host(initrd: &Path, hull_args: &str) -> HostRun {
    let script = format!(
        "{HULL_IN_HOST} --debug boot --kernel {KERNEL_IN_HOST} --initrd {INITRD_IN_HOST} {hull_args}\n\
         echo \"hull-exit=$?\""
    );
    let run = EmulatedHost::new()
        .with_hull()
        .with_test_kernel()
        .file(bzimage(), BZIMAGE_IN_HOST)
        .file(initrd, INITRD_IN_HOST)
        .run(&script);
    println!(
        "--- emulated host output ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    run.assert_success();
    run
}

fn line_value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
}

#[test]
fn vmlinux_boots_to_init_and_a_reboot_ends_hull_with_0() {
    let initrd = guest_initrd(
        "marker",
        "echo \"cpus=$(grep -c ^processor /proc/cpuinfo)\"\ngrep MemTotal /proc/meminfo\nreboot -f",
    );
    let run = boot_in_host(&initrd, "");
    run.assert_stdout_contains(MARKER);
    assert_eq!(
        line_value(&run.stdout, "hull-exit="),
        Some("0"),
        "{}",
        run.stdout
    );
    assert_eq!(
        line_value(&run.stdout, "cpus="),
        Some("1"),
        "{}",
        run.stdout
    );
    // The guest had the default 512 MiB; the kernel keeps a few MiB itself.
    let kib: u64 = line_value(&run.stdout, "MemTotal:")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {}", run.stdout));
    assert!(
        (400 * 1024..=512 * 1024).contains(&kib),
        "MemTotal {kib} kB"
    );
}

#[test]
fn bzimage_boots_too() {
    let initrd = guest_initrd("bz", "reboot -f");
    let script = format!(
        "{HULL_IN_HOST} boot --kernel {BZIMAGE_IN_HOST} --initrd {INITRD_IN_HOST}\necho \"hull-exit=$?\""
    );
    let run = EmulatedHost::new()
        .with_hull()
        .file(bzimage(), BZIMAGE_IN_HOST)
        .file(&initrd, INITRD_IN_HOST)
        .run(&script);
    println!("{}\n{}", run.stdout, run.stderr);
    run.assert_success().assert_stdout_contains(MARKER);
    assert_eq!(
        line_value(&run.stdout, "hull-exit="),
        Some("0"),
        "{}",
        run.stdout
    );
}

#[test]
fn cpus_and_memory_flags_reach_the_guest() {
    let initrd = guest_initrd(
        "smp",
        "echo \"cpus=$(grep -c ^processor /proc/cpuinfo)\"\ngrep MemTotal /proc/meminfo\nreboot -f",
    );
    let run = boot_in_host(&initrd, "--cpus 2 --memory 256");
    assert_eq!(
        line_value(&run.stdout, "hull-exit="),
        Some("0"),
        "{}",
        run.stdout
    );
    assert_eq!(
        line_value(&run.stdout, "cpus="),
        Some("2"),
        "{}",
        run.stdout
    );
    let kib: u64 = line_value(&run.stdout, "MemTotal:")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {}", run.stdout));
    assert!(
        (200 * 1024..=256 * 1024).contains(&kib),
        "MemTotal {kib} kB"
    );
}

#[test]
fn a_guest_that_powers_off_ends_hull_with_0() {
    let initrd = guest_initrd("poweroff", "poweroff -f");
    let run = boot_in_host(&initrd, "");
    run.assert_stdout_contains(MARKER);
    assert_eq!(
        line_value(&run.stdout, "hull-exit="),
        Some("0"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_panic_line_printed_by_the_guest_decides_nothing() {
    // hull learns of a panic from the kernel's reset, not from the console.
    let initrd = guest_initrd(
        "fakepanic",
        "echo 'Kernel panic - not syncing: fake'\nsleep 3\nreboot -f",
    );
    let run = boot_in_host(&initrd, "");
    run.assert_stdout_contains("Kernel panic - not syncing: fake");
    assert_eq!(
        line_value(&run.stdout, "hull-exit="),
        Some("0"),
        "{}",
        run.stdout
    );
    run.assert_stdout_lacks("panicked");
}

#[test]
fn a_guest_kernel_panic_is_a_failure_with_a_clear_message() {
    // PID 1 exiting makes the kernel panic ("Attempted to kill init").
    let initrd = guest_initrd("panic", "exit 3");
    let run = boot_in_host(&initrd, "");
    run.assert_stdout_contains(MARKER);
    assert_eq!(
        line_value(&run.stdout, "hull-exit="),
        Some("1"),
        "{}",
        run.stdout
    );
    run.assert_stdout_contains("hull: the guest kernel panicked: ");
    run.assert_stdout_contains("Attempted to kill init");
}

#[test]
fn no_kvm_in_the_host_is_a_one_line_error() {
    let initrd = guest_initrd("nokvm", "reboot -f");
    let script = format!(
        "{HULL_IN_HOST} boot --kernel {KERNEL_IN_HOST} --initrd {INITRD_IN_HOST}; echo \"hull-exit=$?\""
    );
    let run = EmulatedHost::new()
        .no_kvm()
        .with_hull()
        .with_test_kernel()
        .file(&initrd, INITRD_IN_HOST)
        .run(&script);
    println!("{}", run.stdout);
    run.assert_success();
    run.assert_stdout_contains("hull: /dev/kvm does not exist: this host has no KVM");
    assert_eq!(
        line_value(&run.stdout, "hull-exit="),
        Some("125"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("panicked"), "{}", run.stdout);
}

/// Runs hull on this host (no VM is started) and returns (status, stderr).
fn hull_here(args: &[&str]) -> (i32, String) {
    let out = Command::new(common::hull_bin())
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

#[track_caller]
fn assert_one_line_error(stderr: &str, needle: &str) {
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("hull: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "expected {needle:?} in: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
fn a_missing_kernel_file_is_a_one_line_error() {
    let (code, err) = hull_here(&["boot", "--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, 125);
    assert_one_line_error(
        &err,
        "cannot read kernel /nonexistent/vmlinux: No such file",
    );
}

#[test]
fn a_file_that_is_not_a_kernel_is_a_one_line_error() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("not-a-kernel.txt");
    std::fs::write(
        &path,
        "just some text, long enough to have a header or not\n".repeat(20),
    )
    .unwrap();
    let (code, err) = hull_here(&["boot", "--kernel", path.to_str().unwrap()]);
    assert_eq!(code, 125);
    assert_one_line_error(
        &err,
        "is not a Linux kernel: expected an ELF vmlinux or a bzImage",
    );
}

#[test]
fn memory_too_small_for_the_kernel_is_a_one_line_error() {
    let kernel = common::test_kernel();
    let (code, err) = hull_here(&[
        "boot",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "8",
    ]);
    assert_eq!(code, 125);
    assert_one_line_error(&err, "8 MiB of guest memory is too small for the kernel");
    assert!(err.contains("--memory"), "{err}");
}

#[test]
fn a_pvm_host_is_refused_with_an_explanation() {
    if !Path::new("/sys/module/kvm_pvm").exists() {
        println!("this host's KVM is not PVM: the refusal cannot be observed here");
        return;
    }
    let kernel = common::test_kernel();
    let (code, err) = hull_here(&["boot", "--kernel", kernel.to_str().unwrap()]);
    assert_eq!(code, 125);
    assert_one_line_error(&err, "is the PVM hypervisor (kernel module kvm_pvm)");
}

/// The VMM names the control port and the guest init looks it up by that
/// name: two crates, one fact.
#[test]
fn host_and_guest_agree_on_the_control_port_name() {
    assert_eq!(
        devices::virtio::CONSOLE_PORT_NAME,
        guest_init::init::channel::PORT_NAME
    );
}
