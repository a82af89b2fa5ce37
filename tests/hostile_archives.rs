//! `hull load` of hostile archives, natively (no KVM needed): host-side tar
//! reading must stay bounded in memory whatever the archive claims.
//!
//! The archive is generated here at run time, streaming: a docker-archive
//! whose one layer is a gzip-compressed tar starting with a GNU long-name
//! (`L`) header that claims, and carries, 1 GiB of name bytes. Compressed, the
//! layer is about 5 MB. The `tar` crate on its own reads such a name whole
//! into memory; hull must refuse it with a one-line error (exit 125) and a
//! peak RSS far below the name's size, measured with `/usr/bin/time -v`
//! (Debian's `time` package, which `./dev` installs).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// The GNU long name's claimed and actual size.
const LONG_NAME: u64 = 1 << 30;
/// The most memory `hull load` may use on it.
const MAX_RSS_KIB: u64 = 256 * 1024;

/// A tar header block (GNU magic), by hand: the root package's tests have no
/// tar crate, and a header is 512 bytes of fixed fields.
fn header(name: &str, kind: u8, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
        let s = format!("{v:0w$o}", w = len - 1);
        assert_eq!(s.len(), len - 1, "{v} does not fit");
        h[at..at + len - 1].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, 0o644); // mode
    octal(&mut h, 108, 8, 0); // uid
    octal(&mut h, 116, 8, 0); // gid
    octal(&mut h, 124, 12, size);
    octal(&mut h, 136, 12, 0); // mtime
    h[156] = kind;
    h[257..265].copy_from_slice(b"ustar  \0");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// Appends a regular file to a tar stream being written.
fn append_file(out: &mut impl Write, name: &str, data: &[u8]) {
    out.write_all(&header(name, b'0', data.len() as u64))
        .unwrap();
    out.write_all(data).unwrap();
    let pad = (512 - data.len() % 512) % 512;
    out.write_all(&vec![0; pad]).unwrap();
}

/// The layer: `L` header claiming LONG_NAME bytes, the bytes, the entry it
/// names, end of archive; gzip-compressed by `gzip -1` as it is generated.
fn hostile_layer(path: &Path) {
    let out = std::fs::File::create(path).unwrap();
    let mut gzip = Command::new("gzip")
        .arg("-1")
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .expect("gzip is needed by this test");
    {
        let mut w = std::io::BufWriter::new(gzip.stdin.take().unwrap());
        w.write_all(&header("././@LongLink", b'L', LONG_NAME))
            .unwrap();
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..LONG_NAME / chunk.len() as u64 {
            w.write_all(&chunk).unwrap();
        }
        w.write_all(&header("x", b'0', 0)).unwrap();
        w.write_all(&[0; 1024]).unwrap();
        w.flush().unwrap();
    }
    assert!(gzip.wait().unwrap().success());
}

#[test]
fn gigabyte_gnu_long_name_in_a_layer_is_refused_with_bounded_memory() {
    let time = Path::new("/usr/bin/time");
    assert!(
        time.exists(),
        "/usr/bin/time is needed by this test: install Debian's `time` package \
         (`apt-get install time`; ./dev does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer.tar.gz");
    hostile_layer(&layer);
    let layer = std::fs::read(&layer).unwrap();
    assert!(layer.len() < 16 << 20, "{} bytes", layer.len());

    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{}", "0".repeat(64))] },
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": "config.json",
        "RepoTags": ["example.com/hostile:1"],
        "Layers": ["l/layer.tar"],
    }]))
    .unwrap();
    let archive = dir.path().join("hostile.tar");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&archive).unwrap());
        append_file(&mut out, "l/layer.tar", &layer);
        append_file(&mut out, "config.json", &config);
        append_file(&mut out, "manifest.json", &manifest);
        out.write_all(&[0; 1024]).unwrap();
        out.flush().unwrap();
    }

    let root = dir.path().join("root");
    let out = Command::new(time)
        .arg("-v")
        .arg(env!("CARGO_BIN_EXE_hull"))
        .args(["load", "-i"])
        .arg(&archive)
        .env("HULL_ROOT", &root)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    // hull's own lines come before time's report.
    let hull_err: Vec<&str> = stderr
        .lines()
        .take_while(|l| !l.trim_start().starts_with("Command"))
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(hull_err.len(), 1, "one line: {hull_err:?}");
    let line = hull_err[0];
    assert!(line.starts_with("hull: "), "{line}");
    assert!(
        line.contains("GNU long name") && line.contains("l/layer.tar"),
        "{line}"
    );
    let rss: u64 = stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .expect("time -v reports the peak RSS")
        .trim()
        .parse()
        .unwrap();
    assert!(
        rss < MAX_RSS_KIB,
        "hull load peaked at {rss} KiB (limit {MAX_RSS_KIB} KiB)"
    );
    // Nothing was stored.
    let images = std::fs::read_dir(root.join("images")).unwrap().count();
    assert_eq!(images, 0);
}
