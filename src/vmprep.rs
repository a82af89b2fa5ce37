//! The monitor's side of a container's start: everything its VM needs on
//! the host (kernel and initramfs, the image disk, scratch disk, volumes,
//! virtio-fs servers, network backend, console log, control stream),
//! prepared in the monitor process. The CLI side (`hull run`/`create`:
//! flags, image, the container record, starting the monitor) is
//! [`crate::run`].

use std::os::unix::net::UnixStream;

use hull_protocol::spec::{IMAGE_DISK_SERIAL, SCRATCH_DISK_SERIAL};
use images::{Image, Store};

use crate::container::{files, Container};
use crate::{disks, guest, imagedisk};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// A VM ready to start, and what the monitor needs around it.
pub struct PreparedVm {
    /// The VM, for its own process.
    pub vm: crate::vmmproc::Launch,
    /// The run spec for the init.
    pub spec_json: Vec<u8>,
    /// The host end of the control stream.
    pub host_end: UnixStream,
    /// The container's passt, if it has one (killed when dropped).
    pub passt: Option<crate::network::Passt>,
    /// The container's named volumes, held while it runs.
    pub volumes: Vec<crate::volume::InUse>,
    /// The virtio-fs servers of its bind mounts (stopped when dropped).
    pub shares: Vec<crate::virtiofs::Server>,
}

/// Prepares `container`'s VM: kernel, initramfs, the image disk (read-only;
/// built first if it went missing since the container was created), scratch
/// disk, console log.
///
/// # Errors
/// A file could not be prepared.
pub fn prepare_vm(
    store: &Store,
    image: &Image,
    container: &Container,
    debug: bool,
) -> Result<PreparedVm> {
    let started = std::time::Instant::now();
    let initrd = guest::initramfs(&guest::init_binary()?, &store.root().join("cache"))?;
    let image_disk = imagedisk::ensure(store, image, &container.config.kernel, debug)?;
    let disk_ready = started.elapsed();
    let scratch = container.path(files::SCRATCH);
    disks::make_scratch(&scratch, &store.root().join("cache"))?;
    let scratch_ready = started.elapsed();
    let mounts = crate::volume::prepare(store.root(), &container.config.mounts)?;
    let (shares, shares_cfg) = crate::virtiofs::start_all(
        &store.root().join("run"),
        &container.dir,
        container.short_id(),
        &mounts.shares,
    )?;
    let mut disks_cfg = vec![
        vmm::DiskConfig {
            path: image_disk,
            read_only: true,
            serial: IMAGE_DISK_SERIAL.into(),
            then: Vec::new(),
        },
        vmm::DiskConfig {
            path: scratch,
            read_only: false,
            serial: SCRATCH_DISK_SERIAL.into(),
            then: Vec::new(),
        },
    ];
    disks_cfg.extend(mounts.disks);
    let console = if debug {
        None
    } else {
        Some(std::fs::File::create(container.path(files::CONSOLE))?)
    };
    let (host_end, guest_end) = UnixStream::pair()?;
    let (net, passt) = crate::network::prepare(container.config.network.as_ref())?;
    let jail = if crate::jail::enabled() {
        Some(crate::jail::plan(
            &container.dir,
            &container.config.id,
            container.config.memory_mib,
            container.config.spec.security.cpu_millis,
        )?)
    } else {
        tracing::debug!("jail: HULL_JAIL=off: the VMM runs unconfined");
        None
    };
    tracing::debug!(
        "vm prep: initramfs and image disk after {disk_ready:?}, scratch disk after \
         {scratch_ready:?}, all after {:?}",
        started.elapsed()
    );
    let vm = crate::vmmproc::Launch {
        boot: vmm::BootSource {
            kernel: container.config.kernel.clone(),
            initrd: Some(initrd),
            cmdline: crate::guest::CONTAINER_CMDLINE.into(),
        },
        memory_mib: container.config.memory_mib,
        cpus: container.config.cpus,
        console,
        disks: disks_cfg,
        shares: shares_cfg,
        control: guest_end,
        net,
        jail,
    };
    Ok(PreparedVm {
        vm,
        spec_json: serde_json::to_vec(&container.config.spec)?,
        host_end,
        passt,
        volumes: mounts.held,
        shares,
    })
}
