//! The guest's initramfs: hull's init as `/init`, plus `/dev/console` so the
//! kernel can give init a console before devtmpfs is mounted.
//!
//! Written by hand: the cpio "newc" format is a fixed ASCII header per entry,
//! and the cpio crates on crates.io are unmaintained or read-only.

use std::io::{self, Write};

const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFCHR: u32 = 0o020_000;

/// A file to put in the archive.
#[derive(Debug)]
enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
    CharDev(&'a str, u32, u32),
}

fn pad4(w: &mut impl Write, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..pad])
}

fn header(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<()> {
    let namesize = name.len() + 1;
    let size = u32::try_from(size).map_err(|_| io::Error::other("file too large for cpio"))?;
    let namesize_u32 = u32::try_from(namesize).map_err(|_| io::Error::other("name too long"))?;
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        size,
        0,
        0,
        rdev.0,
        rdev.1,
        namesize_u32,
        0,
    ];
    let mut h = String::from("070701");
    for f in fields {
        h.push_str(&format!("{f:08x}"));
    }
    w.write_all(h.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, 110 + namesize)
}

fn write_archive(w: &mut impl Write, entries: &[Entry<'_>]) -> io::Result<()> {
    for (ino, entry) in (1u32..).zip(entries) {
        match entry {
            Entry::Dir(name) => header(w, ino, S_IFDIR | 0o755, 0, (0, 0), name)?,
            Entry::File(name, data, perm) => {
                header(w, ino, S_IFREG | perm, data.len(), (0, 0), name)?;
                w.write_all(data)?;
                pad4(w, data.len())?;
            }
            Entry::CharDev(name, major, minor) => {
                header(w, ino, S_IFCHR | 0o600, 0, (*major, *minor), name)?;
            }
        }
    }
    header(w, 0, 0, 0, (0, 0), "TRAILER!!!")
}

/// The initramfs bytes for `init` (the hull-init binary).
///
/// # Errors
/// Only if `init` is larger than cpio can describe (4 GiB).
pub fn build(init: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(init.len() + 1024);
    write_archive(
        &mut out,
        &[
            Entry::Dir("dev"),
            Entry::CharDev("dev/console", 5, 1),
            Entry::File("init", init, 0o755),
        ],
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses the archive back (names, modes, data) to check the layout.
    fn parse(mut data: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).unwrap(), 16)
                .unwrap()
        };
        let mut out = Vec::new();
        loop {
            assert_eq!(&data[..6], b"070701");
            let size = field(data, 6) as usize;
            let namesize = field(data, 11) as usize;
            let mode = field(data, 1);
            let name = std::str::from_utf8(&data[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            let data_start = (110 + namesize).div_ceil(4) * 4;
            let body = data[data_start..data_start + size].to_vec();
            data = &data[(data_start + size).div_ceil(4) * 4..];
            if name == "TRAILER!!!" {
                assert!(data.is_empty());
                return out;
            }
            out.push((name, mode, body));
        }
    }

    #[test]
    fn archive_holds_init_and_console() {
        let init = b"\x7fELF pretend binary of odd length";
        let entries = parse(&build(init).unwrap());
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].0, "dev/console");
        assert_eq!(entries[1].1, S_IFCHR | 0o600);
        assert_eq!(
            entries[2],
            ("init".to_string(), S_IFREG | 0o755, init.to_vec())
        );
    }

    #[test]
    fn the_system_cpio_reads_it() {
        let Ok(out) = std::process::Command::new("cpio").arg("--version").output() else {
            panic!("cpio is not installed: run ./dev setup");
        };
        assert!(out.status.success());
        let dir = std::env::temp_dir().join(format!("hull-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let archive = dir.join("a.cpio");
        std::fs::write(&archive, build(b"#!/bin/true\n").unwrap()).unwrap();
        let listing = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -it --quiet < {}", archive.display()))
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&listing.stdout),
            "dev\ndev/console\ninit\n"
        );
    }
}
