//! Writing hull's pseudo-device ports from the guest (their numbers and
//! values: [`hull_protocol::ports`]).

pub use hull_protocol::ports::*;

/// Writes `value` to `port` from user space: access to the one port is
/// granted (`ioperm`, which needs `CAP_SYS_RAWIO`), used and taken back at
/// once, so that no process the init forks inherits it.
///
/// # Errors
/// The kernel refused the access (no `CONFIG_X86_IOPL_IOPERM`, no capability).
#[cfg(target_arch = "x86_64")]
pub fn write(port: u16, value: u8) -> std::io::Result<()> {
    let from = libc::c_ulong::from(port);
    // SAFETY: plain call; it only changes this thread's I/O permission bitmap.
    crate::sys::check(unsafe { libc::ioperm(from, 1, 1) })?;
    // SAFETY: `port` is one of the VMM's pseudo devices above (the ioperm
    // just granted covers exactly it); an `out` to it touches no memory and
    // at worst ends the VM, which is what the caller asks for.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem, preserves_flags));
    }
    // SAFETY: plain call, as above.
    crate::sys::check(unsafe { libc::ioperm(from, 1, 0) })?;
    Ok(())
}

/// There are no such ports on other architectures.
///
/// # Errors
/// Always `Unsupported`.
#[cfg(not(target_arch = "x86_64"))]
pub fn write(_port: u16, _value: u8) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Marks `mark` on the VMM's boot timer; a VMM without one (or a kernel
/// without `ioperm`) just misses the mark.
pub fn mark(mark: BootMark) {
    let _ = write(BOOT_TIMER_PORT, mark as u8);
}
