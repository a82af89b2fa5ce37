//! The default image, `localhost/busybox:latest`, built from the host's
//! static busybox (Debian's `busybox-static`) so hull can run something with
//! no registry at hand.
//!
//! One uncompressed layer: `/bin/busybox`, a symbolic link to it for every
//! applet (where `busybox --list-full` puts them, else in `/bin`),
//! `/etc/passwd` (root, nobody), `/etc/group`, `/tmp` (1777), `/root` and the
//! usual mount points. Config: `Cmd ["sh"]`,
//! `Env PATH=/usr/sbin:/usr/bin:/sbin:/bin`. Every timestamp is fixed, so the
//! same busybox always gives the same image ID.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crate::archive::{ingest_layer, record_image};
use crate::reference::Reference;
use crate::store::{Image, Store, StoreError};

/// Where the host's busybox is expected.
pub const HOST_BUSYBOX: &str = "/bin/busybox";
/// The default image's name.
pub const DEFAULT_IMAGE: &str = "localhost/busybox:latest";
/// The fixed modification time of every file in the layer.
const MTIME: u64 = 0;
const CREATED: &str = "1970-01-01T00:00:00Z";

const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("home", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sbin", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("var", 0o755),
];
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\n";

/// Builds (or rebuilds: same input, same ID) the default image from the
/// busybox at `busybox`.
pub(crate) fn create(store: &Store, busybox: &Path) -> Result<Image, StoreError> {
    let binary = std::fs::read(busybox).map_err(|e| StoreError::Io {
        context: format!(
            "cannot read {} for the default image (install Debian's busybox-static, or pull \
             an image instead)",
            busybox.display()
        ),
        source: e,
    })?;
    let applets = applets(busybox)?;
    let layer = build_layer(&binary, &applets)?;
    let name = Reference::parse_local(DEFAULT_IMAGE)?.to_string();

    let _gc = store.lock_gc(false)?;
    let (layer, diff_id) = ingest_layer(store, layer.as_slice(), "the default image's layer")?;
    let config = serde_json::json!({
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Cmd": ["sh"],
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{
            "created": CREATED,
            "created_by": format!("hull: default image from the host's {}", busybox.display()),
        }],
    });
    let config_bytes =
        serde_json::to_vec(&config).map_err(StoreError::json("the default image's config"))?;
    record_image(store, &config_bytes, vec![layer], vec![name])
}

/// The applet paths (relative, e.g. `usr/bin/awk`) busybox reports.
fn applets(busybox: &Path) -> Result<BTreeSet<String>, StoreError> {
    let run = |arg: &str| -> Result<Option<String>, StoreError> {
        let out = Command::new(busybox)
            .arg(arg)
            .output()
            .map_err(StoreError::io(format!(
                "cannot run {} {arg}",
                busybox.display()
            )))?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let dirs: BTreeSet<&str> = DIRS.iter().map(|(d, _)| *d).collect();
    let mut set = BTreeSet::new();
    if let Some(full) = run("--list-full")? {
        for line in full.lines().map(str::trim).filter(|l| !l.is_empty()) {
            // Only into the directories the layer has (drops e.g. /linuxrc).
            if let Some((dir, name)) = line.rsplit_once('/') {
                if dirs.contains(dir) && valid_applet(name) {
                    set.insert(line.to_string());
                }
            }
        }
    } else if let Some(list) = run("--list")? {
        for name in list.lines().map(str::trim).filter(|n| valid_applet(n)) {
            set.insert(format!("bin/{name}"));
        }
    }
    set.remove("bin/busybox");
    if set.is_empty() {
        return Err(StoreError::Other(format!(
            "{} lists no applets (`busybox --list`); is it busybox?",
            busybox.display()
        )));
    }
    Ok(set)
}

fn valid_applet(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn build_layer(binary: &[u8], applets: &BTreeSet<String>) -> Result<Vec<u8>, StoreError> {
    let ctx = "cannot build the default image's layer";
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    for (dir, mode) in DIRS {
        let mut h = header(tar::EntryType::Directory, *mode, 0);
        b.append_data(&mut h, format!("{dir}/"), std::io::empty())
            .map_err(StoreError::io(ctx))?;
    }
    let files: [(&str, u32, &[u8]); 3] = [
        ("bin/busybox", 0o755, binary),
        ("etc/group", 0o644, GROUP.as_bytes()),
        ("etc/passwd", 0o644, PASSWD.as_bytes()),
    ];
    for (path, mode, data) in files {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        b.append_data(&mut h, path, data)
            .map_err(StoreError::io(ctx))?;
    }
    for applet in applets {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, applet, "/bin/busybox")
            .map_err(StoreError::io(ctx))?;
    }
    b.into_inner().map_err(StoreError::io(ctx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn default_image_is_deterministic_and_complete() {
        let busybox = Path::new(HOST_BUSYBOX);
        assert!(
            busybox.is_file(),
            "{HOST_BUSYBOX} is missing: install Debian's busybox-static"
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(Some(dir.path().join("a"))).unwrap();
        let img = store.create_default_image().unwrap();
        assert_eq!(img.names, [DEFAULT_IMAGE]);
        let c = img.config.config().as_ref().unwrap();
        assert_eq!(c.cmd().as_ref().unwrap(), &["sh".to_string()]);
        assert_eq!(
            c.env().as_ref().unwrap(),
            &["PATH=/usr/sbin:/usr/bin:/sbin:/bin".to_string()]
        );
        assert_eq!(store.find("busybox").unwrap().unwrap().id, img.id);

        // Same ID again, and in another store.
        assert_eq!(store.create_default_image().unwrap().id, img.id);
        let other = Store::open(Some(dir.path().join("b"))).unwrap();
        assert_eq!(other.create_default_image().unwrap().id, img.id);
        assert_eq!(store.list().unwrap().len(), 1);

        // Contents.
        let mut ar = tar::Archive::new(store.layer_reader(&img.layers[0]).unwrap());
        let mut seen = std::collections::HashMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mode = e.header().mode().unwrap();
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            seen.insert(path, (mode, link, data));
        }
        assert_eq!(seen["tmp/"].0, 0o1777);
        assert_eq!(seen["root/"].0, 0o700);
        assert_eq!(seen["bin/busybox"].2, std::fs::read(busybox).unwrap());
        assert!(String::from_utf8_lossy(&seen["etc/passwd"].2).starts_with("root:x:0:0:"));
        assert!(String::from_utf8_lossy(&seen["etc/group"].2).contains("nobody"));
        let sh = seen
            .get("bin/sh")
            .unwrap_or_else(|| panic!("no bin/sh in {:?}", seen.keys()));
        assert_eq!(sh.1.as_deref(), Some("/bin/busybox"));
        let symlinks = seen.values().filter(|v| v.1.is_some()).count();
        assert!(symlinks > 100, "{symlinks} applets");
    }
}
