//! Telling a guest kernel's panic from a clean reboot without reading the
//! guest's console (anything in the guest can print a panic line).
//!
//! Linux's pvpanic drivers bind through ACPI (`QEMU0001`), a device tree or
//! PCI (`1b36:0011`), and hull's guest has none of them: adding PCI for one
//! device would cost boot time (bus probing under emulation) and kernel size,
//! and pstore/ramoops would need a reserved region and a parser of records
//! the guest writes. The stock x86 kernel already tells "firmware" how it
//! restarts: just before it resets the CPUs it writes the BIOS warm-boot
//! flag, the 16-bit word at 0x472 (0x1234 for a warm reboot, 0 for a cold
//! one; `native_machine_emergency_restart`), and `reboot=panic_warm` makes it
//! choose warm only when the reboot follows a panic. So the VMM adds
//! `reboot=cold,panic_warm` (and a `panic=-1` default, so that a panic does
//! reboot) to the command line, and reads the word once the vCPUs stopped.
//! Only the guest kernel (or guest root through `/sys/kernel/reboot/mode`)
//! can set it, and only for its own VM; console text cannot.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::exit::VmExit;

/// Goes before the user's command line: a panic reboots at once unless the
/// user's own `panic=` says otherwise (the last one wins).
pub const CMDLINE_BEFORE: &str = "panic=-1";
/// Goes after the user's command line (so its reboot mode wins): a normal
/// reboot is cold, a reboot after a panic warm.
pub const CMDLINE_AFTER: &str = "reboot=cold,panic_warm";

/// The BIOS data area's warm-boot flag.
const WARM_BOOT_FLAG: GuestAddress = GuestAddress(0x472);
/// What Linux writes there before a warm reboot.
const WARM_BOOT: u16 = 0x1234;

/// The command line the guest gets: `cmdline` between the VMM's additions.
#[must_use]
pub fn cmdline(cmdline: &str) -> String {
    format!("{CMDLINE_BEFORE} {cmdline} {CMDLINE_AFTER}")
}

/// How the VM ended, once its vCPUs stopped: a reset (or the triple fault a
/// kernel falls back to) after the kernel marked a warm reboot is a panic,
/// with `panic_line` (the console's last panic line) as its message.
#[must_use]
pub fn classify(exit: VmExit, mem: &GuestMemoryMmap, panic_line: Option<String>) -> VmExit {
    if !matches!(exit, VmExit::Reset | VmExit::TripleFault) {
        return exit;
    }
    match mem.read_obj::<u16>(WARM_BOOT_FLAG) {
        Ok(WARM_BOOT) => VmExit::Panic(panic_line),
        _ => exit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_reset_after_the_panic_mark_is_a_panic() {
        let mem = crate::memory::create(2).unwrap();
        let line = || Some("Kernel panic - not syncing: fake".to_string());
        assert_eq!(classify(VmExit::Reset, &mem, line()), VmExit::Reset);
        mem.write_obj(WARM_BOOT, WARM_BOOT_FLAG).unwrap();
        assert_eq!(classify(VmExit::Reset, &mem, line()), VmExit::Panic(line()));
        assert_eq!(
            classify(VmExit::TripleFault, &mem, None),
            VmExit::Panic(None)
        );
        // The doorbell and host-side stops are what they are.
        assert_eq!(classify(VmExit::PowerOff, &mem, line()), VmExit::PowerOff);
        mem.write_obj(0u16, WARM_BOOT_FLAG).unwrap();
        assert_eq!(
            classify(VmExit::TripleFault, &mem, line()),
            VmExit::TripleFault
        );
    }

    #[test]
    fn the_user_keeps_the_last_word_on_panic_but_not_on_the_reboot_mode() {
        let c = cmdline("console=ttyS0 reboot=k panic=1");
        assert_eq!(
            c,
            "panic=-1 console=ttyS0 reboot=k panic=1 reboot=cold,panic_warm"
        );
    }
}
