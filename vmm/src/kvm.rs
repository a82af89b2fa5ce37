//! Opening `/dev/kvm` and checking that it can run a Linux guest at all.

use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, Kvm};

/// Why `/dev/kvm` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node does not exist.
    #[error(
        "{0} does not exist: this host has no KVM. Enable hardware virtualization (VT-x/AMD-V) \
         in the firmware or the cloud instance type, and load the kvm_intel or kvm_amd module"
    )]
    Missing(PathBuf),
    /// The device exists but cannot be opened.
    #[error("cannot open {path}: {source}. Add your user to the 'kvm' group or run as root")]
    Open {
        /// The device path.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The device is the PVM hypervisor, which cannot run a Linux kernel.
    #[error(
        "{0} is the PVM hypervisor (kernel module kvm_pvm), which runs guest user code but \
         cannot run a Linux guest kernel; hull needs hardware KVM (VT-x/AMD-V). On this \
         machine, run hull inside an emulated KVM host (see tests/emulated-host/run)"
    )]
    Pvm(PathBuf),
    /// The KVM API is too old or lacks something hull relies on.
    #[error("{path} lacks the KVM capability {cap}: this kernel's KVM is too old for hull")]
    MissingCap {
        /// The device path.
        path: PathBuf,
        /// The missing capability.
        cap: &'static str,
    },
    /// The KVM API version is not 12.
    #[error("{path} speaks KVM API version {version}, hull needs 12")]
    ApiVersion {
        /// The device path.
        path: PathBuf,
        /// What the device reported.
        version: i32,
    },
}

/// The default KVM device.
pub const KVM_PATH: &str = "/dev/kvm";

/// Capabilities hull's VMM cannot work without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// True when the running kernel's KVM is the PVM hypervisor.
///
/// PVM exposes the normal `/dev/kvm` API, so the only reliable sign is its
/// module. Guest kernels then fault in ring 0 (XRSTOR, INT3) instead of booting.
fn is_pvm(sys_module: &Path) -> bool {
    sys_module.join("kvm_pvm").exists()
}

/// What the guest needs from KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum GuestNeeds {
    /// A Linux kernel: refuse a KVM that cannot run one (PVM).
    #[default]
    LinuxKernel,
    /// A hand-made guest that avoids what PVM cannot emulate (tests only).
    AnyKvm,
}

/// Opens `path` and checks it can run the guest.
///
/// # Errors
/// See [`KvmError`]: each variant says what to do.
pub fn open(path: &Path, needs: GuestNeeds) -> Result<Kvm, KvmError> {
    if !path.exists() {
        return Err(KvmError::Missing(path.to_path_buf()));
    }
    if needs == GuestNeeds::LinuxKernel && is_pvm(Path::new("/sys/module")) {
        return Err(KvmError::Pvm(path.to_path_buf()));
    }
    let open_err = |source| KvmError::Open {
        path: path.to_path_buf(),
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| open_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let kvm = Kvm::new_with_path(c_path).map_err(|e| open_err(e.into()))?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmError::ApiVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(KvmError::MissingCap {
                path: path.to_path_buf(),
                cap: name,
            });
        }
    }
    Ok(kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_says_what_to_do() {
        let err = open(Path::new("/nonexistent/kvm"), GuestNeeds::LinuxKernel).unwrap_err();
        assert!(matches!(err, KvmError::Missing(_)));
        assert!(err.to_string().contains("hardware virtualization"));
    }

    #[test]
    fn pvm_is_recognised_by_its_module() {
        let dir = std::env::temp_dir().join(format!("hull-pvm-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert!(is_pvm(&dir));
        std::fs::remove_dir_all(dir.join("kvm_pvm")).unwrap();
        assert!(!is_pvm(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
