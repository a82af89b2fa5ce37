//! What the host asks the init to run: sent once, as JSON, in the first
//! [`Frame::Spec`](crate::frame::Frame::Spec).

use serde::{Deserialize, Serialize};

/// One container run.
///
/// Fields added later carry `#[serde(default)]` and a `Default`, so that
/// literals can leave them out with `..RunSpec::default()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The command: the image's entrypoint and cmd as the host resolved them
    /// (docker's rules), never empty.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs: the image's, then the user's (later wins).
    pub env: Vec<String>,
    /// Working directory inside the container (absolute; created if missing).
    pub cwd: String,
    /// User as docker takes it: "", "name", "uid", "name:group", "uid:gid";
    /// names are resolved from the container's /etc/passwd and /etc/group.
    pub user: String,
    /// The container's hostname.
    pub hostname: String,
    /// Give the process a pseudo-terminal (stdout and stderr merge into it).
    pub tty: bool,
    /// Keep stdin open and forward the host's (`-i`); otherwise stdin is /dev/null.
    pub stdin: bool,
    /// Where the container's root filesystem comes from.
    pub rootfs: RootfsSpec,
    /// The container's network: its interface (none: loopback only), resolvers and hosts.
    #[serde(default)]
    pub network: NetworkSpec,
    /// What the container's processes may do and see (capabilities, limits,
    /// `/proc` masks, cgroup limits, `--init`...), by docker's rules.
    #[serde(default)]
    pub security: SecuritySpec,
    /// Volumes, bind mounts and tmpfs mounts, in the order they are mounted
    /// (a parent before what is mounted inside it).
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// The container's root is read-only (`--read-only`); its mounts are not.
    #[serde(default)]
    pub read_only: bool,
}

/// One mount in the container, as the init makes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// What is mounted.
    pub source: MountSource,
    /// Where, in the container (absolute, normalised; never `/`, `/proc`,
    /// `/sys`, `/dev` or below them).
    pub target: String,
    /// Read-only in the container.
    #[serde(default)]
    pub read_only: bool,
}

/// The source of a [`MountSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum MountSource {
    /// A host directory shared over virtio-fs under this tag.
    Virtiofs {
        /// The virtio-fs tag (at most 36 bytes).
        tag: String,
    },
    /// A volume: an ext4 disk (virtio-blk serial) whose `_data/` is mounted.
    /// An empty volume (no `_data/` yet) is first filled with what the image
    /// has at the target, as docker does.
    Volume {
        /// The disk's virtio-blk serial.
        serial: String,
    },
    /// A fresh tmpfs.
    Tmpfs {
        /// Its size limit in bytes (`None`: the kernel's default, half the RAM).
        size: Option<u64>,
        /// Mode of its root (docker: 1777).
        mode: u32,
        /// Allow executables on it (docker's default is `noexec`).
        exec: bool,
    },
}

/// The directory inside a volume's file system that holds its data (the
/// file system's root also holds `lost+found`), as docker's `_data`.
pub const VOLUME_DATA_DIR: &str = "_data";

/// Serial of the disk of volume mount `n`.
#[must_use]
pub fn volume_disk_serial(n: usize) -> String {
    format!("hull-vol-{n}")
}

/// virtio-fs tag of bind mount `n`.
#[must_use]
pub fn share_tag(n: usize) -> String {
    format!("hull-share-{n}")
}

/// The container's confinement and the limits it sees, as docker gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SecuritySpec {
    /// The capabilities of the container's root (`CAP_X` names; a non-root
    /// user starts with none, as under docker); also the bounding set.
    pub capabilities: Vec<String>,
    /// `--privileged`: every capability, `/sys` and `/sys/fs/cgroup`
    /// writable, `/proc` unmasked, more devices in `/dev`.
    pub privileged: bool,
    /// Resource limits (defaults merged with `--ulimit`).
    pub ulimits: Vec<crate::security::Ulimit>,
    /// Kernel parameters set before the process starts (docker's defaults,
    /// then `--sysctl`).
    pub sysctls: Vec<(String, String)>,
    /// Size of `/dev/shm` in bytes (`--shm-size`, docker's default 64 MiB).
    pub shm_size: u64,
    /// `--init`: a small reaper is PID 1 of the container, the command its child.
    pub init: bool,
    /// The signal `hull stop` sends first (`--stop-signal`, the image's
    /// `StopSignal`, else SIGTERM).
    pub stop_signal: i32,
    /// The container cgroup's `memory.max` in bytes (the VM's memory); 0: none.
    pub memory_bytes: u64,
    /// The container cgroup's CPU quota in thousandths of a CPU (`--cpus`
    /// 1.5 is 1500: `cpu.max` 150000 100000); 0: none.
    pub cpu_millis: u64,
}

/// docker's default `/dev/shm` size.
pub const DEFAULT_SHM_SIZE: u64 = 64 << 20;

impl Default for SecuritySpec {
    fn default() -> Self {
        Self {
            capabilities: crate::security::DOCKER_DEFAULT
                .iter()
                .map(ToString::to_string)
                .collect(),
            privileged: false,
            ulimits: crate::security::default_ulimits(),
            sysctls: crate::security::DEFAULT_SYSCTLS
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            shm_size: DEFAULT_SHM_SIZE,
            init: false,
            stop_signal: 15,
            memory_bytes: 0,
            cpu_millis: 0,
        }
    }
}

/// The container's network as the init sets it up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkSpec {
    /// `eth0` (the virtio-net interface); `None`: only `lo`.
    pub interface: Option<InterfaceSpec>,
    /// Name servers for `/etc/resolv.conf` (none: the file says so).
    pub dns: Vec<String>,
    /// Search domains for `/etc/resolv.conf`.
    pub dns_search: Vec<String>,
    /// Extra `/etc/hosts` entries, after the standard ones.
    pub hosts: Vec<HostEntry>,
}

/// The container's `eth0`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct InterfaceSpec {
    /// The IPv4 address and prefix length, e.g. `10.0.2.15/24`; `None`:
    /// ask for one by DHCP.
    pub address: Option<String>,
    /// The default route's gateway (with a static address).
    pub gateway: Option<String>,
    /// The MTU (0: the device's).
    pub mtu: u32,
}

/// One `/etc/hosts` line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    /// The address.
    pub address: String,
    /// The names it has.
    pub names: Vec<String>,
}

/// A process to start in a running container (`hull exec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// The command (never empty); resolved through the container's PATH.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs added to (replacing) the container's environment.
    pub env: Vec<String>,
    /// Working directory; `None`: the container's.
    pub cwd: Option<String>,
    /// User as in [`RunSpec::user`]; `None`: the container's.
    pub user: Option<String>,
    /// Give the process a pseudo-terminal.
    pub tty: bool,
    /// Forward the host's stdin; otherwise stdin is /dev/null.
    pub stdin: bool,
}

/// The container's root: the image's file system (an ext4 disk, always
/// read-only for a container) under an overlay whose upper layer is the
/// container's scratch disk.
///
/// With [`build`](Self::build) set, the init runs in *build-only* mode
/// instead: it unpacks the layers into the (then writable) image disk, writes
/// the disk's marker, and ends; no workload runs in that VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsSpec {
    /// virtio-blk serial of the image's root file system disk (ext4).
    pub image_disk: String,
    /// virtio-blk serial of the container's writable disk (ext4, empty at
    /// first); unused in build-only mode.
    pub scratch_disk: String,
    /// The image's layer chain: the uncompressed layers' digests (the config's
    /// `rootfs.diff_ids`), bottom first. The image disk's marker must be
    /// exactly [`image_marker`] of it.
    pub chain: Vec<String>,
    /// Build-only mode: unpack these layers (one per entry of `chain`), in
    /// order, into the empty image disk, then end.
    pub build: Option<Vec<LayerSpec>>,
}

/// Version of the recipe that turns layers into an image disk (the
/// unpacker's rules and the disk's layout). A change that makes the same
/// layers unpack differently bumps it, so that disks built by the old recipe
/// are never used again.
pub const UNPACK_RECIPE_VERSION: u32 = 2;

/// The content of a finished image disk's marker file: the recipe version
/// and the layer chain. The host keys the cached disk by its hash and the
/// guest refuses a disk whose marker differs: one truth for both.
#[must_use]
pub fn image_marker(chain: &[String]) -> String {
    let mut out = format!("hull-image recipe {UNPACK_RECIPE_VERSION}\n");
    for diff_id in chain {
        out.push_str(diff_id);
        out.push('\n');
    }
    out
}

/// One image layer, attached as a read-only raw disk holding the layer blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// virtio-blk serial of the disk.
    pub disk: String,
    /// Where the blob starts on the disk (several layers can share one disk).
    #[serde(default)]
    pub offset: u64,
    /// The blob's length in bytes (the disk is padded to whole sectors).
    pub size: u64,
    /// How the tar stream is compressed.
    pub compression: Compression,
    /// The blob's digest, for messages.
    pub digest: String,
}

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar.
    None,
    /// tar+gzip.
    Gzip,
    /// tar+zstd.
    Zstd,
}

/// Serial of the image disk, as the host names it (virtio-blk serials hold
/// at most 20 bytes).
pub const IMAGE_DISK_SERIAL: &str = "hull-image";
/// Serial of the scratch disk.
pub const SCRATCH_DISK_SERIAL: &str = "hull-scratch";
/// Serial of layer disk `n`.
#[must_use]
pub fn layer_disk_serial(n: usize) -> String {
    format!("hull-layer-{n}")
}
/// Serial of the disk holding every layer blob, one after the other.
pub const LAYERS_DISK_SERIAL: &str = "hull-layers";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_as_json() {
        let spec = RunSpec {
            args: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: String::new(),
            hostname: "abc".into(),
            stdin: true,
            rootfs: RootfsSpec {
                image_disk: IMAGE_DISK_SERIAL.into(),
                scratch_disk: SCRATCH_DISK_SERIAL.into(),
                chain: vec!["sha256:11".into()],
                build: Some(vec![LayerSpec {
                    disk: layer_disk_serial(0),
                    offset: 0,
                    size: 1234,
                    compression: Compression::Gzip,
                    digest: "sha256:00".into(),
                }]),
            },
            ..RunSpec::default()
        };
        let json = serde_json::to_vec(&spec).unwrap();
        assert!(String::from_utf8_lossy(&json).contains("\"gzip\""));
        assert_eq!(serde_json::from_slice::<RunSpec>(&json).unwrap(), spec);
        assert!(layer_disk_serial(99).len() <= 20);
    }

    #[test]
    fn marker_names_recipe_and_every_layer_in_order() {
        let a = image_marker(&["sha256:aa".into(), "sha256:bb".into()]);
        assert_eq!(
            a,
            format!("hull-image recipe {UNPACK_RECIPE_VERSION}\nsha256:aa\nsha256:bb\n")
        );
        assert_ne!(a, image_marker(&["sha256:bb".into(), "sha256:aa".into()]));
        assert_ne!(a, image_marker(&["sha256:aa".into()]));
    }
}
