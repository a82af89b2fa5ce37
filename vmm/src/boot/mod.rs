//! Direct kernel boot: the kernel image (ELF `vmlinux` or `bzImage`), the
//! initramfs, the command line and the zero page, written into guest memory
//! as the Linux x86 boot protocol (64-bit entry) expects.

pub mod gdt;
pub mod mptable;
pub mod paging;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START,
    ZERO_PAGE_START,
};

const E820_RAM: u32 = 1;
/// "Loader type unknown" in the boot protocol: not a registered boot loader.
const LOADER_TYPE_OTHER: u8 = 0xff;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// The 64-bit entry of a bzImage sits 0x200 bytes into its protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Linux's default (and `CONFIG_PHYSICAL_ALIGN`) 16 MiB kernel alignment.
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
const PAGE_SIZE: u64 = 4096;
const ELF_MACHINE_X86_64: u16 = 0x3e;

/// What to boot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BootSource {
    /// An uncompressed ELF `vmlinux` or a `bzImage`.
    pub kernel: PathBuf,
    /// An initramfs (cpio, optionally compressed), if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

/// The two image formats hull boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF executable (`vmlinux`).
    Elf,
    /// A compressed kernel with a real-mode setup header (`bzImage`).
    BzImage,
}

/// Errors loading the kernel and its companions into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("cannot read {what} {path}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither format.
    #[error(
        "{0} is not a Linux kernel: expected an ELF vmlinux or a bzImage \
         (`hull kernel build` prints the path of one)"
    )]
    NotAKernel(PathBuf),
    /// The loader rejected the kernel.
    #[error("cannot load kernel {path}: {detail}")]
    Load {
        /// The kernel file.
        path: PathBuf,
        /// What linux-loader said.
        detail: String,
    },
    /// Guest memory is too small for what must go in it.
    #[error("{mib} MiB of guest memory is too small for {what}; give the VM more with --memory")]
    MemoryTooSmall {
        /// The guest's memory.
        mib: u64,
        /// What did not fit.
        what: String,
    },
    /// The command line is too long or malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {0} into guest memory")]
    GuestMemory(&'static str),
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    /// The 64-bit entry point.
    pub entry: GuestAddress,
    /// The image format that was loaded.
    pub format: KernelFormat,
}

/// Tells the formats apart by their magic numbers.
///
/// # Errors
/// The file cannot be read, or is neither format.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let read_err = |source| BootError::Read {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    if filled >= 20 && head[..4] == *b"\x7fELF" {
        // 64-bit, little endian, x86-64: anything else cannot run here.
        if head[4] == 2 && head[5] == 1 && head[18..20] == ELF_MACHINE_X86_64.to_le_bytes() {
            return Ok(KernelFormat::Elf);
        }
        return Err(BootError::NotAKernel(path.to_path_buf()));
    }
    if filled >= 0x206 && head[0x202..0x206] == HDRS_MAGIC.to_le_bytes() {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel(path.to_path_buf()))
}

fn mem_mib(mem: &GuestMemoryMmap) -> u64 {
    ram_size(mem) >> 20
}

/// End of the RAM below the MMIO hole (where the initramfs goes).
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    (mem.last_addr().raw_value() + 1).min(MMIO_GAP_START)
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<(KernelLoaderResult, KernelEntry), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Read {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    })?;
    let format = detect_format(&mut file, path)?;
    let himem = Some(GuestAddress(HIMEM_START));
    // Copied into guest memory, not mapped there copy-on-write from the
    // file (tried): that saves the copy but leaves the guest's kernel on
    // small file pages instead of its RAM's huge ones, and `hull run` was
    // 14% slower for it in the emulated host.
    let result = match format {
        KernelFormat::Elf => loader::Elf::load(mem, None, &mut file, himem),
        KernelFormat::BzImage => loader::BzImage::load(mem, None, &mut file, himem),
    };
    let result = result.map_err(|e| classify_load_error(mem, path, &e))?;
    if result.kernel_end > low_ram_end(mem) {
        return Err(BootError::MemoryTooSmall {
            mib: mem_mib(mem),
            what: format!(
                "the kernel {} (it needs at least {} MiB)",
                path.display(),
                result.kernel_end.div_ceil(1 << 20)
            ),
        });
    }
    let entry = match format {
        KernelFormat::Elf => result.kernel_load,
        KernelFormat::BzImage => result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
    };
    Ok((result, KernelEntry { entry, format }))
}

/// The loader reports a kernel that runs past guest memory as a read error;
/// tell the user it is the memory size, since that is what they can change.
fn classify_load_error(mem: &GuestMemoryMmap, path: &Path, e: &loader::Error) -> BootError {
    use linux_loader::loader::{bzimage, elf};
    match e {
        loader::Error::Elf(elf::Error::ReadKernelImage)
        | loader::Error::Bzimage(bzimage::Error::ReadBzImageCompressedKernel)
        | loader::Error::MemoryOverflow => BootError::MemoryTooSmall {
            mib: mem_mib(mem),
            what: format!("the kernel {}", path.display()),
        },
        other => BootError::Load {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

/// Loads the initramfs at the top of low RAM; returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::Read {
        what: "initrd",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let top = low_ram_end(mem).min(addr_max.saturating_add(1));
    let too_small = || BootError::MemoryTooSmall {
        mib: mem_mib(mem),
        what: format!(
            "the kernel and the initrd {} ({} MiB)",
            path.display(),
            size >> 20
        ),
    };
    let addr = top.checked_sub(size).ok_or_else(too_small)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_small());
    }
    let len = usize::try_from(size).map_err(|_| too_small())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| BootError::Read {
            what: "initrd",
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
    Ok((addr, size))
}

/// The RAM map given to the guest: low memory up to the EBDA, then from 1 MiB
/// to the MMIO hole, then above 4 GiB.
#[must_use]
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push(boot_e820_entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            r#type: E820_RAM,
        });
    }
    if mem_size > MMIO_GAP_START {
        map.push(boot_e820_entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            r#type: E820_RAM,
        });
    }
    map
}

/// Validates and formats the command line.
///
/// # Errors
/// Too long, or contains a NUL.
pub fn make_cmdline(cmdline: &str) -> Result<Cmdline, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(format!("{e} (at most {} bytes)", CMDLINE_MAX_SIZE - 1)))?;
    Ok(c)
}

/// The zero page for a kernel loaded as `result`.
#[must_use]
pub fn zero_page(
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    mem_size: u64,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE_OTHER;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(0);
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = u32::try_from(addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
    }
    let map = e820_map(mem_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = u8::try_from(map.len()).unwrap_or(0);
    params
}

/// Loads everything `source` names into `mem`; returns where to start.
///
/// # Errors
/// See [`BootError`].
pub fn load(mem: &GuestMemoryMmap, source: &BootSource) -> Result<KernelEntry, BootError> {
    let cmdline = make_cmdline(&source.cmdline)?;
    let (result, entry) = load_kernel(mem, &source.kernel)?;
    // bzImages say how high they can take an initramfs; vmlinux has no header
    // and 64-bit kernels take it anywhere in low RAM.
    let addr_max = result.setup_header.map_or(u64::MAX, |h| {
        if h.initrd_addr_max == 0 {
            u64::MAX
        } else {
            u64::from(h.initrd_addr_max)
        }
    });
    let initrd = source
        .initrd
        .as_deref()
        .map(|p| load_initrd(mem, p, result.kernel_end, addr_max))
        .transpose()?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|_| BootError::GuestMemory("the command line"))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();
    let mem_size = ram_size(mem);
    let params = zero_page(result.setup_header, cmdline_len, initrd, mem_size);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::GuestMemory("the zero page"))?;
    Ok(entry)
}

/// Total guest RAM in bytes.
#[must_use]
pub fn ram_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::GuestMemoryRegion;
    mem.iter().map(GuestMemoryRegion::len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(mib: u64) -> GuestMemoryMmap {
        crate::memory::create(mib).unwrap()
    }

    #[test]
    fn e820_covers_ram_and_skips_holes() {
        let m = e820_map(256 << 20);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].addr, m[0].size), (0, EBDA_START));
        assert_eq!(
            (m[1].addr, m[1].size),
            (HIMEM_START, (256 << 20) - HIMEM_START)
        );
        let big = e820_map(4 << 30);
        assert_eq!(big.len(), 3);
        assert_eq!(big[1].addr + big[1].size, MMIO_GAP_START);
        assert_eq!({ big[2].addr }, MMIO_GAP_END);
        assert_eq!(big[1].size + big[2].size + HIMEM_START, 4 << 30);
    }

    #[test]
    fn zero_page_has_the_protocol_fields() {
        let p = zero_page(None, 42, Some((0x800_0000, 0x1000)), 128 << 20);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1000);
        assert_eq!({ p.hdr.kernel_alignment }, KERNEL_ALIGNMENT);
        assert_eq!(p.e820_entries, 2);
    }

    #[test]
    fn cmdline_is_bounded() {
        assert!(make_cmdline("console=ttyS0 panic=1").is_ok());
        let long = "a".repeat(CMDLINE_MAX_SIZE + 10);
        assert!(matches!(make_cmdline(&long), Err(BootError::Cmdline(_))));
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("hull-boot-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn a_file_that_is_no_kernel_is_refused() {
        let p = temp_file("notakernel", b"#!/bin/sh\necho this is not a kernel\n");
        let src = BootSource {
            kernel: p.clone(),
            initrd: None,
            cmdline: String::new(),
        };
        let err = load(&mem(64), &src).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel(_)), "{err}");
        assert!(err.to_string().contains("not a Linux kernel"));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn format_is_detected_by_magic() {
        let mut header = [0u8; 64];
        header[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        header[18] = 0x3e;
        let elf = temp_file("elf", &header);
        assert_eq!(
            detect_format(&mut File::open(&elf).unwrap(), &elf).unwrap(),
            KernelFormat::Elf
        );
        header[18] = 0xb7; // aarch64
        std::fs::write(&elf, header).unwrap();
        assert!(matches!(
            detect_format(&mut File::open(&elf).unwrap(), &elf),
            Err(BootError::NotAKernel(_))
        ));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzp = temp_file("bz", &bz);
        assert_eq!(
            detect_format(&mut File::open(&bzp).unwrap(), &bzp).unwrap(),
            KernelFormat::BzImage
        );
        std::fs::remove_file(elf).unwrap();
        std::fs::remove_file(bzp).unwrap();
    }

    #[test]
    fn initrd_goes_high_and_must_not_overlap_the_kernel() {
        let m = mem(64);
        let p = temp_file("initrd", &[7u8; 10_000]);
        let (addr, size) = load_initrd(&m, &p, 0x200_0000, u64::MAX).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= 64 << 20);
        let byte: u8 = m.read_obj(GuestAddress(addr + 9_999)).unwrap();
        assert_eq!(byte, 7);
        let err = load_initrd(&m, &p, (64 << 20) - 4096, u64::MAX).unwrap_err();
        assert!(matches!(err, BootError::MemoryTooSmall { .. }), "{err}");
        std::fs::remove_file(p).unwrap();
    }
}
