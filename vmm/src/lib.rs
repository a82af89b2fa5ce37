//! hull's virtual machine monitor: one KVM microVM that boots a Linux kernel
//! directly (no firmware) and runs until the guest reboots, powers off,
//! panics or faults.
//!
//! The VMM knows nothing of containers or of the CLI: it takes a [`VmConfig`]
//! and returns a [`VmExit`].

pub mod boot;
pub mod control;
pub mod cpuid;
pub mod device_manager;
pub mod exit;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod power;
pub mod seccomp;
pub mod vcpu;
mod vm;

pub use boot::BootSource;
pub use control::{ControlError, VcpuCommand, VmmHandle};
pub use device_manager::{DiskConfig, FsShare};
pub use device_manager::{NetBackendConfig, NetConfig};
pub use devices::pseudo::{BootPoint, BootTimes};
pub use exit::{ExitSignal, VmExit};
pub use kvm::GuestNeeds;
pub use seccomp::SeccompMode;
pub use vm::{run, VmConfig, Vmm, VmmError};
