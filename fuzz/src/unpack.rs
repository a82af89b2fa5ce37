//! guest-init's layer unpacker ([`Unpacker`]) on hostile tar streams, into
//! a fresh directory each time.
//!
//! The input: a byte of choices (1: two layers, the first one's length in
//! the next u16; 2: resolve parents by the component walk instead of
//! `openat2`), then the layers.
//!
//! The root lies three levels down a sandbox of this process's own
//! (`$TMPDIR/hull-fuzz-unpack.PID/a/b/root`), with a canary beside it at
//! each level. Oracle, checked after each input: no panic; each level
//! holds only what it held (a `..` escape shows up there), the canaries
//! are untouched, `/` holds the same names (an absolute escape), and no
//! file in the root has links outside it (a hard link to a host file).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use guest_init::unpack::Unpacker;

use crate::Input;

const CANARY: &[u8] = b"hull fuzz canary\n";

struct Sandbox {
    /// Outermost first; the last one is the root's parent.
    levels: Vec<PathBuf>,
    root: PathBuf,
    slash: BTreeSet<std::ffi::OsString>,
}

fn names(dir: &Path) -> BTreeSet<std::ffi::OsString> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect()
}

impl Sandbox {
    fn new() -> Self {
        let top = std::env::temp_dir().join(format!("hull-fuzz-unpack.{}", std::process::id()));
        let _ = fs::remove_dir_all(&top);
        let levels = vec![top.clone(), top.join("a"), top.join("a/b")];
        for level in &levels {
            fs::create_dir_all(level).unwrap();
            fs::write(level.join("canary"), CANARY).unwrap();
        }
        let root = top.join("a/b/root");
        fs::create_dir(&root).unwrap();
        Self {
            levels,
            root,
            slash: names(Path::new("/")),
        }
    }

    fn check(&self) {
        for (i, level) in self.levels.iter().enumerate() {
            let expected: BTreeSet<std::ffi::OsString> = match self.levels.get(i + 1) {
                Some(next) => [next.file_name().unwrap().into(), "canary".into()].into(),
                None => ["root".into(), "canary".into()].into(),
            };
            assert_eq!(
                names(level),
                expected,
                "something was written in {}",
                level.display()
            );
            let canary = level.join("canary");
            let meta = fs::symlink_metadata(&canary).unwrap();
            assert!(
                meta.is_file() && meta.nlink() == 1,
                "{} was replaced or linked",
                canary.display()
            );
            assert_eq!(
                fs::read(&canary).unwrap(),
                CANARY,
                "{} was written",
                canary.display()
            );
        }
        assert_eq!(
            names(Path::new("/")),
            self.slash,
            "something was written in /"
        );
        // Every link of a file in the root is in the root.
        let dev = fs::symlink_metadata(&self.root).unwrap().dev();
        let mut links: HashMap<u64, (u64, u64)> = HashMap::new();
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                let meta = fs::symlink_metadata(entry.path()).unwrap();
                assert_eq!(
                    meta.dev(),
                    dev,
                    "{} is on another file system",
                    entry.path().display()
                );
                if meta.is_dir() {
                    dirs.push(entry.path());
                } else {
                    let seen = links.entry(meta.ino()).or_insert((0, meta.nlink()));
                    seen.0 += 1;
                }
            }
        }
        for (ino, (seen, nlink)) in links {
            assert_eq!(seen, nlink, "inode {ino} has links outside the root");
        }
    }

    /// Empties the root for the next input.
    fn clear(&self) {
        make_removable(&self.root);
        fs::remove_dir_all(&self.root).unwrap();
        fs::create_dir(&self.root).unwrap();
    }
}

/// Without root's privileges, a directory needs write and search
/// permission for its entries to go.
fn make_removable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_removable(&entry.path());
            }
        }
    }
}

fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(Sandbox::new)
}

/// Runs one fuzz input (see the [module documentation](self)).
///
/// # Panics
/// When something was written outside the root.
pub fn run(data: &[u8]) {
    let sandbox = sandbox();
    let mut input = Input::new(data);
    let how = input.u8();
    let mut layers = Vec::new();
    if how & 1 != 0 {
        let n = usize::from(input.u16());
        layers.push(input.bytes(n));
    }
    layers.push(input.rest());
    let mut unpacker = Unpacker::new(&sandbox.root).unwrap();
    if how & 2 != 0 {
        unpacker = unpacker.without_openat2();
    }
    for (i, layer) in layers.into_iter().enumerate() {
        if unpacker
            .apply(layer, &format!("layer {i}"), &mut |_| {})
            .is_err()
        {
            break;
        }
    }
    sandbox.check();
    sandbox.clear();
}
