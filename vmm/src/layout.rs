//! Where things live in guest-physical memory (x86-64, the layout Firecracker
//! and most microVM monitors use, so the guest kernel meets nothing unusual).

/// GDT used for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level 4 page table (PML4); the PDPT and PD follow at +4 KiB and +8 KiB.
pub const PML4_START: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line hull passes (the kernel's x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table sits here and the RAM
/// map stops here.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory: where protected-mode kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole below 4 GiB (virtio-mmio devices, IOAPIC,
/// local APIC). Guest RAM above it is placed past 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The IOAPIC's MMIO address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO address.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS on Intel hosts, just below the BIOS area.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
