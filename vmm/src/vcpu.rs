//! vCPU set-up for the 64-bit Linux entry, and the loop that runs a vCPU and
//! dispatches its port and MMIO accesses to the device buses.

use devices::Bus;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{gdt, paging};
use crate::control::{RunArea, VcpuAnswer, VcpuChannel, VcpuCommand};
use crate::cpuid;
use crate::exit::{ExitSignal, VmExit};
use crate::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, ZERO_PAGE_START};

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("cannot set up vCPU {index}: {what}")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing the GDT or page tables into guest memory failed.
    #[error("cannot write the boot {0} into guest memory")]
    GuestMemory(&'static str),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn kvm_err(index: u8, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm {
        index,
        what,
        source,
    }
}

/// Writes the boot GDT and an empty IDT; shared by all vCPUs.
///
/// # Errors
/// Guest memory is too small.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<u64, VcpuError> {
    for (i, entry) in (0u64..).zip(gdt::BOOT_GDT) {
        mem.write_obj(entry, GuestAddress(BOOT_GDT_START + i * 8))
            .map_err(|_| VcpuError::GuestMemory("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| VcpuError::GuestMemory("IDT"))?;
    paging::write_identity_tables(mem).map_err(|_| VcpuError::GuestMemory("page tables"))
}

/// The boot MSRs Linux expects to find in a known state.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

fn set_lapic_lvt(vcpu: &VcpuFd, index: u8) -> Result<(), VcpuError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err(index, "KVM_GET_LAPIC"))?;
    let mut update = |offset: usize, mode: u32| {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i].to_le_bytes()[0]);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[offset + i] = i8::from_le_bytes([b]);
        }
    };
    update(APIC_LVT0, APIC_MODE_EXTINT);
    update(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err(index, "KVM_SET_LAPIC"))
}

/// Configures vCPU `index` of `count`: CPUID, MSRs, FPU, local APIC, and the
/// registers of the 64-bit entry at `entry` (which only the boot vCPU uses;
/// the others start when the kernel sends them INIT/SIPI).
///
/// # Errors
/// A KVM ioctl failed.
pub fn configure(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    index: u8,
    count: u8,
    entry: GuestAddress,
    cr3: u64,
) -> Result<(), VcpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err(index, "KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    cpuid::patch(&mut cpuid, index, count, tsc_deadline);
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_err(index, "KVM_SET_CPUID2"))?;

    let msrs = Msrs::from_entries(&boot_msrs()).map_err(|_| VcpuError::Kvm {
        index,
        what: "MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(kvm_err(index, "KVM_SET_MSRS"))?;
    if written != msrs.as_slice().len() {
        let failed = msrs.as_slice().get(written).map_or(0, |m| m.index);
        tracing::warn!("vCPU {index}: KVM did not take MSR {failed:#x}");
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err(index, "KVM_SET_FPU"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm_err(index, "KVM_GET_SREGS"))?;
    let code = gdt::segment_from_gdt(gdt::BOOT_GDT[1], 1);
    let data = gdt::segment_from_gdt(gdt::BOOT_GDT[2], 2);
    let tss = gdt::segment_from_gdt(gdt::BOOT_GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&gdt::BOOT_GDT) - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = u16::try_from(std::mem::size_of::<u64>() - 1).unwrap_or(u16::MAX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(kvm_err(index, "KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(kvm_err(index, "KVM_SET_REGS"))?;
    set_lapic_lvt(vcpu, index)
}

/// Reads this vCPU's pending commands (waiting for one while paused);
/// returns false once the thread must end.
fn obey(index: u8, vcpu: &VcpuFd, channel: &VcpuChannel, paused: &mut bool) -> bool {
    loop {
        let command = if *paused {
            channel.commands.recv().unwrap_or(VcpuCommand::Stop)
        } else {
            match channel.commands.try_recv() {
                Ok(command) => command,
                Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => VcpuCommand::Stop,
            }
        };
        // The VMM may be gone (it then stops this thread): answers may be lost.
        match command {
            VcpuCommand::Pause => {
                *paused = true;
                let _ = channel.answers.send(VcpuAnswer::Paused(index));
            }
            VcpuCommand::Resume => {
                *paused = false;
                let _ = channel.answers.send(VcpuAnswer::Resumed(index));
            }
            VcpuCommand::Stop => return false,
            VcpuCommand::Probe => {
                let _ = channel
                    .answers
                    .send(VcpuAnswer::Probed(index, halted_for_good(vcpu)));
            }
        }
    }
}

/// Whether `vcpu` (out of `KVM_RUN`) stopped for good unless another CPU
/// wakes it: halted with interrupts masked, or a secondary CPU still waiting
/// for its INIT/start-up IPI (the guest never brought it up).
fn halted_for_good(vcpu: &VcpuFd) -> bool {
    /// RFLAGS.IF.
    const INTERRUPTS_ENABLED: u64 = 1 << 9;
    match vcpu.get_mp_state().map(|s| s.mp_state) {
        Ok(kvm_bindings::KVM_MP_STATE_HALTED) => vcpu
            .get_regs()
            .is_ok_and(|r| r.rflags & INTERRUPTS_ENABLED == 0),
        Ok(kvm_bindings::KVM_MP_STATE_UNINITIALIZED | kvm_bindings::KVM_MP_STATE_INIT_RECEIVED) => {
            true
        }
        _ => false,
    }
}

/// Runs `vcpu` until the VM stops, forwarding port I/O to `pio` and MMIO to
/// `mmio`, and obeying the commands on `channel` (read each time `KVM_RUN`
/// returns: the VMM kicks the thread after sending one). Every way the guest
/// can end is reported to `exit`.
pub(crate) fn run_loop(
    index: u8,
    mut vcpu: VcpuFd,
    pio: &Bus,
    mmio: &Bus,
    exit: &ExitSignal,
    channel: &VcpuChannel,
) {
    let run: *mut kvm_bindings::kvm_run = vcpu.get_kvm_run();
    // SAFETY: `run` is this vCPU's kvm_run mapping, which lives as long as
    // `vcpu`; `_area` is declared after `vcpu` (a parameter), so it is
    // dropped, and the kick handler forgets the pointer, first.
    let _area = unsafe { RunArea::enter(run) };
    let mut paused = false;
    while obey(index, &vcpu, channel, &mut paused) && !exit.stopping() {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                // Nothing decodes an unclaimed port on a PC bus: it reads as all ones.
                if !pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
            }
            Ok(VcpuExit::Shutdown) => exit.exit(VmExit::TripleFault),
            Ok(VcpuExit::Hlt) => exit.exit(VmExit::PowerOff),
            Ok(VcpuExit::SystemEvent(kind, _)) => exit.exit(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                other => VmExit::Error(format!("vCPU {index}: guest system event {other}")),
            }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => exit.exit(VmExit::Error(format!(
                "vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => {
                let run = vcpu.get_kvm_run();
                // SAFETY: KVM fills the `internal` member of the exit union
                // for KVM_EXIT_INTERNAL_ERROR, which is the exit just returned.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                exit.exit(VmExit::Error(format!(
                    "vCPU {index}: KVM internal error (suberror {suberror}): this host's KVM \
                     cannot run this guest"
                )));
            }
            Ok(VcpuExit::IrqWindowOpen | VcpuExit::Intr) => {}
            Ok(other) => {
                exit.exit(VmExit::Error(format!("vCPU {index}: unexpected KVM exit {other:?}")));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked by the VMM (or a stray signal): the loop reads the
                // commands and `stopping` again.
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => exit.exit(VmExit::Error(format!("vCPU {index}: KVM_RUN failed: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_enable_fast_strings_and_wb_mtrr() {
        let m = boot_msrs();
        assert!(m
            .iter()
            .any(|e| e.index == MSR_IA32_MISC_ENABLE && e.data == 1));
        assert!(m
            .iter()
            .any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == 0x806));
    }

    #[test]
    fn boot_tables_land_where_the_registers_point() {
        let mem = crate::memory::create(2).unwrap();
        let cr3 = write_boot_tables(&mem).unwrap();
        assert_eq!(cr3, crate::layout::PML4_START);
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, gdt::BOOT_GDT[1]);
    }
}
