//! Self-test of the emulated KVM host (`tests/emulated-host/run`) and of the
//! `tests/common` wrapper: KVM is there (or not, on request), files arrive
//! intact, exit statuses and timeouts come back.

#[path = "../common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{EmulatedHost, EXIT_TIMEOUT};

fn sha256_of(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("running sha256sum on the host: {e}"));
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A file with non-trivial content, so that a truncated or reordered copy shows.
fn sample_file() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("emulated-host-sample.bin");
    let mut data = Vec::with_capacity(3 << 20);
    let mut x: u32 = 0x1234_5678;
    while data.len() < 3 << 20 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&path, &data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

#[test]
fn kvm_files_and_exit_status() {
    let sample = sample_file();
    let want = sha256_of(&sample);
    let run = EmulatedHost::new()
        .file(&sample, "/opt/sample.bin")
        .with_stripped_hull()
        .run(
            "echo svm=$(grep -c -w svm /proc/cpuinfo)\n\
             test -c /dev/kvm && echo kvm=yes\n\
             sha256sum /opt/sample.bin\n\
             hull --version\n\
             exit 3\n",
        );
    run.assert_code(3)
        .assert_stdout_contains(concat!("hull ", env!("CARGO_PKG_VERSION")))
        .assert_stdout_contains("kvm=yes")
        .assert_stdout_contains(&format!("{want}  /opt/sample.bin"))
        .assert_stdout_lacks("svm=0");
    assert!(run.boot_secs.is_some(), "no timing line:\n{run}");
}

#[test]
fn no_kvm() {
    EmulatedHost::new()
        .no_kvm()
        .run("test -e /dev/kvm && echo kvm=yes; echo done")
        .assert_success()
        .assert_stdout_contains("done")
        .assert_stdout_lacks("kvm=yes");
}

#[test]
fn timeout() {
    let run = EmulatedHost::new().timeout(2).run("sleep 100");
    assert_eq!(run.code, EXIT_TIMEOUT, "expected a timeout:\n{run}");
    assert!(run.timed_out());
}
