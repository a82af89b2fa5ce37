//! Tests of layer application, on the host in temporary directories. Those
//! that need root (ownership, device nodes) skip their checks otherwise.

use super::*;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;

#[derive(Clone)]
struct E {
    path: Vec<u8>,
    kind: EntryType,
    link: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    data: Vec<u8>,
    dev: (u32, u32),
    xattrs: Vec<(String, Vec<u8>)>,
}

fn e(path: &str, kind: EntryType) -> E {
    E {
        path: path.as_bytes().to_vec(),
        kind,
        link: Vec::new(),
        mode: if kind.is_dir() { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime: 1_600_000_000,
        data: Vec::new(),
        dev: (0, 0),
        xattrs: Vec::new(),
    }
}

fn dir(path: &str) -> E {
    e(path, EntryType::Directory)
}

fn file(path: &str, data: &str) -> E {
    E {
        data: data.as_bytes().to_vec(),
        ..e(path, EntryType::Regular)
    }
}

fn symlink(path: &str, target: &str) -> E {
    E {
        link: target.as_bytes().to_vec(),
        mode: 0o777,
        ..e(path, EntryType::Symlink)
    }
}

fn hardlink(path: &str, target: &str) -> E {
    E {
        link: target.as_bytes().to_vec(),
        ..e(path, EntryType::Link)
    }
}

fn whiteout(path: &str) -> E {
    e(path, EntryType::Regular)
}

/// A tar of the entries, headers written raw (so hostile paths go in as is).
fn tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if !e.xattrs.is_empty() {
            let keys: Vec<(String, &[u8])> = e
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                .collect();
            b.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
        }
        let mut h = tar::Header::new_gnu();
        if e.path.len() <= 100 && e.link.len() <= 100 {
            h.as_old_mut().name[..e.path.len()].copy_from_slice(&e.path);
            h.as_old_mut().linkname[..e.link.len()].copy_from_slice(&e.link);
        } else {
            // Long names: let the builder write GNU long-name entries.
            h.set_entry_type(e.kind);
            h.set_size(e.data.len() as u64);
            h.set_mode(e.mode);
            h.set_mtime(e.mtime);
            b.append_data(
                &mut h,
                std::str::from_utf8(&e.path).unwrap(),
                e.data.as_slice(),
            )
            .unwrap();
            continue;
        }
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_size(e.data.len() as u64);
        if matches!(e.kind, EntryType::Char | EntryType::Block) {
            h.set_device_major(e.dev.0).unwrap();
            h.set_device_minor(e.dev.1).unwrap();
        }
        h.set_cksum();
        b.append(&h, e.data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

struct T {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    u: Unpacker,
    notes: Vec<String>,
}

fn setup() -> T {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    let u = Unpacker::new(&root).unwrap();
    T {
        _tmp: tmp,
        root,
        outside,
        u,
        notes: Vec::new(),
    }
}

impl T {
    fn apply(&mut self, entries: &[E]) -> Result<LayerStats, UnpackError> {
        let notes = &mut self.notes;
        self.u
            .apply(tar(entries).as_slice(), "layer 0 (sha256:abc)", &mut |n| {
                notes.push(n);
            })
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    /// The outside directory's absolute path, as a symlink target.
    fn out(&self) -> String {
        self.outside.to_str().unwrap().to_string()
    }
    /// Where an absolute path lands inside the root.
    fn inside(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap()
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

fn both_resolvers(f: impl Fn(&mut T)) {
    for openat2 in [true, false] {
        let mut t = setup();
        t.u.openat2 = openat2;
        f(&mut t);
    }
}

#[test]
fn normalize_refuses_escapes() {
    assert_eq!(
        normalize(b"./a//b/./c/").unwrap(),
        vec![&b"a"[..], b"b", b"c"]
    );
    assert_eq!(normalize(b"/a/../b").unwrap(), vec![&b"b"[..]]);
    assert!(normalize(b"../../etc/x").is_err());
    assert!(normalize(b"a/../../x").is_err());
    assert!(normalize(b"/../x").is_err());
    assert!(normalize(b"./").unwrap().is_empty());
}

#[test]
fn files_dirs_symlinks_hardlinks_and_times() {
    let mut t = setup();
    let stats = t
        .apply(&[
            dir("./usr/"),
            dir("usr/bin/"),
            file("usr/bin/tool", "#!/bin/sh\n"),
            symlink("usr/bin/alias", "tool"),
            hardlink("usr/bin/hard", "usr/bin/tool"),
            file("implicit/parents/f", "x"),
        ])
        .unwrap();
    assert_eq!(
        stats,
        LayerStats {
            entries: 6,
            bytes: 11
        }
    );
    assert_eq!(read(&t.p("usr/bin/tool")), "#!/bin/sh\n");
    assert_eq!(
        fs::read_link(t.p("usr/bin/alias")).unwrap().to_str(),
        Some("tool")
    );
    let a = fs::metadata(t.p("usr/bin/tool")).unwrap();
    let h = fs::metadata(t.p("usr/bin/hard")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (h.ino(), 2));
    assert_eq!(a.mtime(), 1_600_000_000);
    assert_eq!(fs::metadata(t.p("usr/bin")).unwrap().mtime(), 1_600_000_000);
    assert_eq!(
        fs::symlink_metadata(t.p("usr/bin/alias")).unwrap().mtime(),
        1_600_000_000
    );
    assert_eq!(read(&t.p("implicit/parents/f")), "x");
    assert_eq!(
        fs::metadata(t.p("implicit")).unwrap().permissions().mode() & 0o777,
        0o755
    );
}

#[test]
fn modes_including_special_bits_and_read_only_dirs() {
    let mut t = setup();
    t.apply(&[
        E {
            mode: 0o4755,
            ..file("suid", "x")
        },
        E {
            mode: 0o2711,
            ..file("sgid", "x")
        },
        E {
            mode: 0o1777,
            ..dir("tmp/")
        },
        E {
            mode: 0o555,
            ..dir("ro/")
        },
        file("ro/inside", "y"),
        E {
            mode: 0o555,
            ..dir("ro/sub/")
        },
        file("ro/sub/deeper", "z"),
    ])
    .unwrap();
    let mode = |p: &str| fs::symlink_metadata(t.p(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("suid"), 0o4755);
    assert_eq!(mode("sgid"), 0o2711);
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("ro"), 0o555);
    assert_eq!(mode("ro/sub"), 0o555);
    assert_eq!(read(&t.p("ro/sub/deeper")), "z");
}

#[test]
fn ownership_from_numeric_ids() {
    let mut t = setup();
    t.apply(&[
        E {
            uid: 1234,
            gid: 4321,
            ..dir("home/")
        },
        E {
            uid: 1000,
            gid: 1001,
            ..file("home/f", "x")
        },
        E {
            uid: 7,
            gid: 8,
            ..symlink("home/l", "f")
        },
    ])
    .unwrap();
    if !sys::is_root() {
        eprintln!("not root: ownership not checked");
        return;
    }
    let own = |p: &str| {
        let m = fs::symlink_metadata(t.p(p)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(own("home"), (1234, 4321));
    assert_eq!(own("home/f"), (1000, 1001));
    assert_eq!(own("home/l"), (7, 8));
}

#[test]
fn device_nodes_and_fifos() {
    let mut t = setup();
    t.apply(&[E {
        mode: 0o600,
        ..e("pipe", EntryType::Fifo)
    }])
    .unwrap();
    assert!(fs::symlink_metadata(t.p("pipe"))
        .unwrap()
        .file_type()
        .is_fifo());
    if !sys::is_root() {
        eprintln!("not root: device nodes not checked");
        return;
    }
    t.apply(&[
        dir("dev/"),
        E {
            dev: (1, 3),
            mode: 0o666,
            ..e("dev/null", EntryType::Char)
        },
        E {
            dev: (7, 0),
            mode: 0o660,
            gid: 6,
            ..e("dev/loop0", EntryType::Block)
        },
    ])
    .unwrap();
    let null = fs::symlink_metadata(t.p("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert_eq!(null.permissions().mode() & 0o7777, 0o666);
    let lp = fs::symlink_metadata(t.p("dev/loop0")).unwrap();
    assert!(lp.file_type().is_block_device());
    assert_eq!((lp.rdev(), lp.gid()), (libc::makedev(7, 0), 6));
}

#[test]
fn xattrs_from_pax_headers() {
    let mut t = setup();
    let x = |k: &str, v: &[u8]| (k.to_string(), v.to_vec());
    t.apply(&[
        E {
            xattrs: vec![x("user.hull", b"file value")],
            ..file("f", "x")
        },
        E {
            xattrs: vec![x("user.hull", b"dir value")],
            ..dir("d/")
        },
    ])
    .unwrap();
    let get = |p: &str| {
        let fd = sys::open(
            &sys::cstr(t.p(p).as_os_str().as_encoded_bytes()).unwrap(),
            libc::O_RDONLY,
            0,
        )
        .unwrap();
        sys::fgetxattr(fd.as_fd(), c"user.hull")
    };
    match get("f") {
        Ok(v) => {
            assert_eq!(v, b"file value");
            assert_eq!(get("d").unwrap(), b"dir value");
        }
        Err(e) => {
            eprintln!("xattrs unsupported here ({e}): only the note is checked");
            assert!(!t.notes.is_empty());
        }
    }
}

#[test]
fn whiteouts_remove_lower_content_only() {
    let mut t = setup();
    t.apply(&[
        dir("a/"),
        file("a/x", "1"),
        file("a/y", "2"),
        dir("b/"),
        file("b/deep", "3"),
    ])
    .unwrap();
    t.apply(&[
        whiteout("a/.wh.x"),
        whiteout(".wh.b"),
        whiteout("a/.wh.nothing"),
        whiteout("missing/.wh.z"),
    ])
    .unwrap();
    assert!(!exists(&t.p("a/x")));
    assert_eq!(read(&t.p("a/y")), "2");
    assert!(!exists(&t.p("b")));
    assert!(!exists(&t.p("missing")));
    // A whiteout does not hide an entry of its own layer.
    t.apply(&[
        file("a/new", "n"),
        whiteout("a/.wh.new"),
        whiteout("a/.wh..wh.plnk"),
    ])
    .unwrap();
    assert_eq!(read(&t.p("a/new")), "n");
}

#[test]
fn opaque_dirs_keep_this_layers_entries_wherever_the_marker_is() {
    for marker_first in [true, false] {
        let mut t = setup();
        t.apply(&[
            dir("d/"),
            file("d/old", "o"),
            dir("d/sub/"),
            file("d/sub/old2", "o"),
            file("d/keep/old3", "o"),
        ])
        .unwrap();
        let mut l2 = vec![dir("d/"), file("d/new", "n"), file("d/keep/new2", "n")];
        let marker = whiteout("d/.wh..wh..opq");
        if marker_first {
            l2.insert(1, marker);
        } else {
            l2.push(marker);
        }
        t.apply(&l2).unwrap();
        assert!(!exists(&t.p("d/old")), "marker first: {marker_first}");
        assert!(!exists(&t.p("d/sub")));
        assert!(
            !exists(&t.p("d/keep/old3")),
            "lower content under a kept dir goes too"
        );
        assert_eq!(read(&t.p("d/new")), "n");
        assert_eq!(read(&t.p("d/keep/new2")), "n");
    }
}

#[test]
fn entries_replace_entries_of_another_type() {
    let mut t = setup();
    t.apply(&[
        dir("a/"),
        file("a/f", "1"),
        file("b", "2"),
        symlink("c", "b"),
        file("d", "3"),
        file("e", "old"),
        file("e", "new"),
        file("f", "4"),
        e("f", EntryType::Fifo),
    ])
    .unwrap();
    assert_eq!(read(&t.p("e")), "new");
    assert!(fs::symlink_metadata(t.p("f"))
        .unwrap()
        .file_type()
        .is_fifo());
    t.apply(&[
        file("a", "now a file"),
        dir("b/"),
        file("b/in", "x"),
        file("c", "was a link"),
        symlink("d", "a"),
    ])
    .unwrap();
    assert_eq!(read(&t.p("a")), "now a file");
    assert_eq!(read(&t.p("b/in")), "x");
    assert!(fs::symlink_metadata(t.p("c")).unwrap().is_file());
    assert_eq!(read(&t.p("b/in")), "x");
    assert_eq!(fs::read_link(t.p("d")).unwrap().to_str(), Some("a"));
    // An existing directory keeps its content; its metadata is updated.
    t.apply(&[E {
        mode: 0o700,
        ..dir("b/")
    }])
    .unwrap();
    assert_eq!(read(&t.p("b/in")), "x");
    assert_eq!(
        fs::metadata(t.p("b")).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn long_names_through_gnu_extensions() {
    let mut t = setup();
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(150));
    t.apply(&[file(&long, "long")]).unwrap();
    assert_eq!(read(&t.p(&long)), "long");
}

#[test]
fn hostile_dotdot_paths_are_refused() {
    let mut t = setup();
    let err = t
        .apply(&[file("../../etc/x", "pwned")])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "layer 0 (sha256:abc): entry '../../etc/x': path escapes the root"
    );
    let err = t
        .apply(&[file("a/../../x", "pwned")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("escapes the root"), "{err}");
    assert!(!exists(&t.root.parent().unwrap().join("x")));
}

#[test]
fn absolute_symlink_write_through_lands_inside_the_root() {
    both_resolvers(|t| {
        let out = t.out();
        t.apply(&[
            symlink("evil", &out),
            file("evil/x", "inside"),
            dir("evil/sub/"),
            file("evil/sub/y", "inside too"),
        ])
        .unwrap();
        assert!(
            !exists(&t.outside.join("x")),
            "wrote through to the real path"
        );
        assert!(!exists(&t.outside.join("sub")));
        assert_eq!(read(&t.inside(&format!("{out}/x"))), "inside");
        assert_eq!(read(&t.inside(&format!("{out}/sub/y"))), "inside too");
    });
}

#[test]
fn relative_symlink_escapes_are_clamped_to_the_root() {
    both_resolvers(|t| {
        t.apply(&[
            dir("a/"),
            dir("a/b/"),
            symlink("a/b/up", "../../../../../.."),
            file("a/b/up/x", "clamped"),
            symlink("a/b/out", "../../../outside"),
            file("a/b/out/y", "clamped"),
        ])
        .unwrap();
        assert_eq!(read(&t.p("x")), "clamped");
        assert_eq!(read(&t.p("outside/y")), "clamped");
        assert!(!exists(&t.outside.join("y")));
        assert!(!exists(&t.root.parent().unwrap().join("x")));
    });
}

#[test]
fn hostile_hardlinks_are_refused() {
    both_resolvers(|t| {
        let err = t
            .apply(&[hardlink("passwd", "/etc/passwd")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hardlink target '/etc/passwd' does not exist"),
            "{err}"
        );
        let err = t
            .apply(&[hardlink("x", "../../x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("escapes the root"), "{err}");
        // Through a symlinked directory: resolved inside, so missing.
        fs::write(t.outside.join("secret"), "s").unwrap();
        let out = t.out();
        let err = t
            .apply(&[symlink("o", &out), hardlink("stolen", "o/secret")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        assert!(!exists(&t.p("stolen")));
        assert_eq!(fs::metadata(t.outside.join("secret")).unwrap().nlink(), 1);
        // An absolute target that exists inside the root is the root's.
        t.apply(&[
            dir("etc/"),
            file("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
            hardlink("pw", "/etc/passwd"),
        ])
        .unwrap();
        assert_eq!(
            fs::metadata(t.p("pw")).unwrap().ino(),
            fs::metadata(t.p("etc/passwd")).unwrap().ino()
        );
        let err = t.apply(&[hardlink("d", "etc")]).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
    });
}

#[test]
fn directory_replaced_by_symlink_then_written_through_stays_inside() {
    both_resolvers(|t| {
        let out = t.out();
        t.apply(&[
            dir("d/"),
            file("d/f", "1"),
            symlink("d", &out),
            file("d/g", "2"),
            symlink("e", "/"),
            file("e/h", "3"),
        ])
        .unwrap();
        assert!(fs::symlink_metadata(t.p("d"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(read(&t.inside(&format!("{out}/g"))), "2");
        assert!(!exists(&t.outside.join("g")));
        assert_eq!(read(&t.p("h")), "3");
        // And in a later layer, through the symlink left by an earlier one.
        t.apply(&[file("d/later", "4")]).unwrap();
        assert!(!exists(&t.outside.join("later")));
        assert_eq!(read(&t.inside(&format!("{out}/later"))), "4");
    });
}

#[test]
fn whiteouts_through_symlinks_stay_inside() {
    both_resolvers(|t| {
        fs::write(t.outside.join("victim"), "v").unwrap();
        let out = t.out();
        t.apply(&[symlink("evil", &out)]).unwrap();
        t.apply(&[whiteout("evil/.wh.victim"), whiteout("evil/.wh..wh..opq")])
            .unwrap();
        assert_eq!(read(&t.outside.join("victim")), "v");
        // A whiteout of the symlink itself removes the link, not its target.
        t.apply(&[whiteout(".wh.evil")]).unwrap();
        assert!(!exists(&t.p("evil")));
        assert_eq!(read(&t.outside.join("victim")), "v");
    });
}

#[test]
fn oversized_extension_headers_are_errors_not_allocations() {
    let mut t = setup();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(EntryType::XHeader);
    h.as_old_mut().name[..4].copy_from_slice(b"pax0");
    h.set_size(1 << 40);
    h.set_cksum();
    let bytes = h.as_bytes().to_vec();
    let err =
        t.u.apply(bytes.as_slice(), "layer 3 (sha256:def)", &mut |_| {})
            .unwrap_err()
            .to_string();
    assert!(err.contains("PAX header of 1099511627776 bytes"), "{err}");
    h.set_entry_type(EntryType::GNULongName);
    h.set_cksum();
    let bytes = h.as_bytes().to_vec();
    let err =
        t.u.apply(bytes.as_slice(), "layer 3", &mut |_| {})
            .unwrap_err()
            .to_string();
    assert!(err.contains("GNU long name of"), "{err}");
}

#[test]
fn truncated_and_corrupt_layers_are_errors() {
    let mut t = setup();
    let data = tar(&[file("big", &"x".repeat(5000))]);
    let err =
        t.u.apply(&data[..2048], "layer 0", &mut |_| {})
            .unwrap_err()
            .to_string();
    assert!(err.contains("big"), "{err}");
    let mut bad = tar(&[file("f", "x")]);
    bad[10] ^= 0xff;
    assert!(t.u.apply(bad.as_slice(), "layer 0", &mut |_| {}).is_err());
}

#[test]
fn deep_symlink_loops_are_errors() {
    both_resolvers(|t| {
        let err = t
            .apply(&[symlink("a", "b"), symlink("b", "a"), file("a/x", "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry 'a/x'"), "{err}");
    });
}
