//! Volumes end to end, in the emulated KVM host: named volumes (kept
//! across containers, filled from the image, refused removal while used),
//! anonymous volumes, `--tmpfs`, `--read-only`, bad mount flags; bind
//! mounts over virtio-fs (both ways, owners, `:ro`, symlinks that point out
//! of the share); and `hull cp` both ways.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{install_busybox, run_checked, value, EmulatedHost, HostRun, OciImage};

/// PATH, the kernel, and `hull run` without a network (these tests need none).
const PRELUDE: &str = "export PATH=/usr/local/bin:/sbin:/usr/sbin:/bin:/usr/bin \
                       HULL_KERNEL=/opt/hull/vmlinux\n\
                       hull() { if [ \"$1\" = run ]; then shift; command hull run --network none \"$@\"; \
                       else command hull \"$@\"; fi; }\n";

/// Debian's virtiofsd (qemu-system-common).
const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

/// An image whose config declares `Volumes: /data`, with `/data/seed` in
/// it, as an oci-archive (`volimg:latest`) in `dir`.
fn image_with_a_volume(dir: &Path) -> PathBuf {
    common::require_image_tools();
    let img = OciImage::new(dir);
    img.layer(|root| {
        install_busybox(root);
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(root.join("data/seed"), "seeded\n").unwrap();
    });
    img.config(&[
        "--config.volume",
        "/data",
        "--config.cmd",
        "/bin/sh",
        "--config.env",
        "PATH=/bin",
    ]);
    let archive = dir.join("volimg.tar");
    run_checked(Command::new("skopeo").args([
        "copy",
        &format!("oci:{}", img.image_ref()),
        &format!("oci-archive:{}:volimg:latest", archive.display()),
    ]));
    archive
}

fn host_run(script: &str, virtiofsd: bool) -> HostRun {
    host_run_with(script, virtiofsd, &[])
}

fn host_run_with(script: &str, virtiofsd: bool, files: &[(&Path, &str)]) -> HostRun {
    let mut host = EmulatedHost::new().with_hull_runtime().timeout(600);
    for (src, dest) in files {
        host = host.file(src, dest);
    }
    if virtiofsd {
        host = host.tool(VIRTIOFSD, VIRTIOFSD);
    }
    let run = host.run(&format!("{PRELUDE}{script}"));
    println!(
        "--- emulated host output ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    run
}

#[track_caller]
fn expect(out: &str, key: &str, want: &str) {
    assert_eq!(value(out, key), Some(want), "{key}: {out}");
}

#[test]
fn named_volumes_tmpfs_read_only_and_bad_mount_flags() {
    let dir = tempfile::tempdir().unwrap();
    let archive = image_with_a_volume(dir.path());
    let run = host_run_with(
        r#"
bad() { hull run --rm "$@" busybox true 2>/tmp/err; echo "code=$? lines=$(wc -l </tmp/err) $(cat /tmp/err)"; }
echo "bad-hostdir: $(bad -v /nonexistent:/x)"
echo "bad-relative: $(bad -v /tmp:rel)"
echo "bad-proc: $(bad -v data:/proc/x)"
echo "bad-dev: $(bad --tmpfs /dev/shm2:size=1m --tmpfs /dev)"
echo "bad-mount-opt: $(bad --mount type=volume,src=v,dst=/x,bogus=1)"
hull volume create --opt color=red v1 2>/tmp/err; echo "bad-volume-opt: code=$? $(cat /tmp/err)"
echo "containers-after-bad=$(hull ps -aq | wc -l) volumes-after-bad=$(hull volume ls -q | wc -l)"

# A named volume, created on first use, kept across containers.
hull run --rm -v data:/data busybox sh -c 'echo one > /data/f; chown 1000:1000 /data/f; ls -a /data'
echo "write=$?"
echo "read=$(hull run --rm -v data:/data:ro busybox sh -c 'cat /data/f; stat -c %u:%g /data/f; { echo x > /data/g; } 2>/dev/null || echo ro-refused' | tr '\n' ' ')"
hull volume ls
hull volume inspect data | grep -E '"(Name|Driver)"'
hull volume create --opt size=64m small; echo "create-small=$?"
hull volume inspect small | grep '"size"'

# Filled from the image when new, kept as it was afterwards.
echo "prefill=$(hull run --rm -v etc:/etc busybox sh -c 'grep -c ^root: /etc/passwd; echo mine > /etc/marker')"
echo "kept=$(hull run --rm -v etc:/etc busybox cat /etc/marker)"

# In use: refused removal, refused to a second container.
hull run -d --name holder -v data:/data busybox sleep 300 >/dev/null; echo "holder=$?"
hull volume rm data 2>/tmp/err; echo "rm-in-use: code=$? $(cat /tmp/err)"
hull run --rm -v data:/data busybox true 2>/tmp/err; echo "second-user: code=$? $(cat /tmp/err)"
hull rm -f holder >/dev/null
hull volume rm data; echo "rm-after=$?"
echo "volumes-left=$(hull volume ls -q | tr '\n' ' ')"

# tmpfs, with a size; --read-only keeps mounts writable.
hull run --rm --tmpfs /scratch:size=1m --tmpfs /x busybox sh -c 'grep " /scratch " /proc/mounts; dd if=/dev/zero of=/scratch/big bs=1k count=2048 2>/dev/null; echo "dd=$?"; cp /bin/busybox /x/bb && /x/bb true 2>/dev/null; echo "exec=$?"'
hull run --rm --read-only --tmpfs /tmp -v rw:/rw busybox sh -c 'touch /root-file 2>/dev/null; echo "root-write=$?"; touch /tmp/t && echo tmp-ok; touch /rw/t && echo vol-ok; grep " / " /proc/mounts | grep -c "[ ,]ro[ ,]"'

# An anonymous volume (-v /path) lives with its container.
hull run --name anon -v /cache busybox sh -c 'echo a > /cache/f'
echo "anon-volumes=$(hull volume ls -q | wc -l)"
hull rm anon >/dev/null; hull volume prune
echo "after-prune=$(hull volume ls -q | tr '\n' ' ')"

# The image's Volumes: an anonymous volume, filled from the image; --rm
# removes it with the container, a kept container keeps it.
hull load -i /opt/volimg.tar >/dev/null; echo "load=$?"
before=$(hull volume ls -q | wc -l)
echo "image-volume=$(hull run --rm volimg:latest sh -c 'cat /data/seed; grep -c " /data " /proc/mounts' | tr '\n' ' ')"
echo "after-rm=$(( $(hull volume ls -q | wc -l) - before ))"
hull run --name keep volimg:latest true
echo "image-kept=$(( $(hull volume ls -q | wc -l) - before )) mounts=$(hull inspect keep | grep -c '"Type": "volume"')"
"#,
        false,
        &[(archive.as_path(), "/opt/volimg.tar")],
    );
    run.assert_success();
    let out = &run.stdout;
    for key in [
        "bad-hostdir:",
        "bad-relative:",
        "bad-proc:",
        "bad-dev:",
        "bad-mount-opt:",
    ] {
        let v = value(out, key).unwrap_or_default();
        assert!(v.starts_with("code=125 lines=1 "), "{key} {v}: {out}");
    }
    assert!(
        value(out, "bad-hostdir:")
            .unwrap()
            .contains("does not exist"),
        "{out}"
    );
    assert!(
        value(out, "bad-relative:").unwrap().contains("absolute"),
        "{out}"
    );
    assert!(value(out, "bad-proc:").unwrap().contains("/proc"), "{out}");
    assert!(
        value(out, "bad-mount-opt:")
            .unwrap()
            .contains("unknown option"),
        "{out}"
    );
    assert!(
        value(out, "bad-volume-opt:")
            .is_some_and(|v| v.starts_with("code=125") && v.contains("unknown volume option")),
        "{out}"
    );
    expect(out, "containers-after-bad=", "0 volumes-after-bad=0");
    expect(out, "write=", "0");
    expect(out, "read=", "one 1000:1000 ro-refused");
    assert!(out.contains("local     data"), "{out}");
    expect(out, "create-small=", "0");
    assert!(out.contains("\"size\": \"67108864\""), "{out}");
    expect(out, "prefill=", "1");
    expect(out, "kept=", "mine");
    expect(out, "holder=", "0");
    let rm = value(out, "rm-in-use:").unwrap_or_default();
    assert!(rm.starts_with("code=1 ") && rm.contains("in use"), "{out}");
    let second = value(out, "second-user:").unwrap_or_default();
    assert!(
        second.starts_with("code=125 ") && second.contains("in use"),
        "{out}"
    );
    expect(out, "rm-after=", "0");
    assert!(
        !value(out, "volumes-left=")
            .unwrap()
            .split(' ')
            .any(|v| v == "data"),
        "{out}"
    );
    assert!(
        out.contains("tmpfs /scratch tmpfs rw,nosuid,nodev,noexec"),
        "{out}"
    );
    assert!(out.contains("size=1024k"), "{out}");
    assert!(
        value(out, "dd=").is_some_and(|v| v != "0"),
        "a 1m tmpfs took 2 MiB: {out}"
    );
    assert!(
        value(out, "exec=").is_some_and(|v| v != "0"),
        "noexec: {out}"
    );
    assert!(value(out, "root-write=").is_some_and(|v| v != "0"), "{out}");
    assert!(out.contains("tmp-ok") && out.contains("vol-ok"), "{out}");
    let anon: usize = value(out, "anon-volumes=").unwrap().parse().unwrap();
    let after = value(out, "after-prune=").unwrap_or_default();
    expect(out, "load=", "0");
    expect(out, "image-volume=", "seeded 1");
    expect(out, "after-rm=", "0");
    expect(out, "image-kept=", "1 mounts=1");
    assert_eq!(
        after.split_whitespace().count() + 1,
        anon,
        "prune removed the anonymous volume: {out}"
    );
}

#[test]
fn bind_mounts_over_virtio_fs_and_cp_both_ways() {
    let run = host_run(
        r#"
mkdir -p /srv/share && chmod 777 /srv/share
echo from-host > /srv/share/hostfile
echo 2000 > /srv/share/owned && chown 2000:3000 /srv/share/owned
ln -s /etc /srv/share/etclink
echo TOPSECRET > /etc/hull-host-secret
hull run --rm -v /srv/share:/src busybox sh -c '
  echo "seen=$(cat /src/hostfile)"
  echo "owner-in=$(stat -c %u:%g /src/owned)"
  echo from-ctr > /src/ctrfile; chown 1000:1000 /src/ctrfile; mkdir /src/dir
  echo "secret=$(cat /src/etclink/hull-host-secret 2>&1 | head -c 60)"
  echo "through-link=$(cat /src/etclink/hostname >/dev/null && echo guest-etc)"
  echo "dotdot=$(ls /src/../../etc/hull-host-secret 2>&1 | grep -c "No such")"
'
echo "rc=$?"
echo "ctrfile=$(cat /srv/share/ctrfile) owner=$(stat -c %u:%g /srv/share/ctrfile) dir=$(test -d /srv/share/dir && echo yes)"
hull run --rm -u 1000:1000 -v /srv/share:/src busybox sh -c 'echo u > /src/byuser'
echo "byuser=$(stat -c %u:%g /srv/share/byuser)"
# With CAP_SYS_ADMIN the guest can remount the share rw: the host still refuses.
hull run --rm --cap-add SYS_ADMIN -v /srv/share:/src:ro busybox sh -c '
  { echo x > /src/ro1; } 2>/dev/null; echo "ro-write=$?"
  mount -o remount,rw /src; echo "remount=$?"
  { echo y > /src/ro2; } 2>/dev/null; echo "ro-remounted-write=$?"
  cat /src/hostfile
'
echo "ro-files=$(ls /srv/share | grep -c '^ro')"
echo "mount-ro=$(hull run --rm --mount type=bind,src=/srv/share,dst=/m,readonly busybox sh -c 'cat /m/hostfile; { touch /m/z; } 2>/dev/null || echo refused' | tr '\n' ' ')"

# hull cp, both ways, with a tree.
hull run -d --name box busybox sleep 300 >/dev/null
mkdir -p /srv/tree/a/b && echo deep > /srv/tree/a/b/f && chown 1234:4321 /srv/tree/a/b/f && chmod 640 /srv/tree/a/b/f
ln -s /etc /srv/tree/link
hull cp /srv/tree box:/tmp/; echo "cp-in=$?"
hull exec box sh -c 'echo "in: $(cat /tmp/tree/a/b/f) $(stat -c "%u:%g %a" /tmp/tree/a/b/f) $(readlink /tmp/tree/link)"'
hull exec box sh -c 'mkdir -p /tmp/gen/x && echo gen > /tmp/gen/x/y && chown 77:88 /tmp/gen/x/y && chmod 4755 /tmp/gen/x/y && ln -s /etc/passwd /tmp/gen/pw'
hull cp -a box:/tmp/gen /srv/out; echo "cp-out=$?"
echo "out: $(cat /srv/out/x/y) $(stat -c '%u:%g %a' /srv/out/x/y) $(readlink /srv/out/pw)"
mkdir /srv/outdir; hull cp box:/tmp/gen /srv/outdir; echo "into-dir=$(cat /srv/outdir/gen/x/y) $(stat -c '%u:%g %a' /srv/outdir/gen/x/y)"
echo "stdout-tar=$(hull cp box:/tmp/gen - | tar -t | sort | tr '\n' ' ')"
hull exec box mkdir /tmp/in
tar -C /srv/tree -c a | hull cp - box:/tmp/in; echo "cp-stdin=$?"
hull exec box cat /tmp/in/a/b/f
hull cp box:/nonexistent /srv/none 2>/tmp/err; echo "cp-missing: code=$? $(cat /tmp/err)"
hull rm -f box >/dev/null
# The copy runs in the container: its mounts, and only its capabilities.
hull run -d --name cbox --cap-add SYS_ADMIN --cap-drop DAC_OVERRIDE --cap-drop DAC_READ_SEARCH busybox sleep 300 >/dev/null
hull exec cbox sh -c 'mkdir -p /mnt/t && mount -t tmpfs none /mnt/t && echo inner > /mnt/t/f; echo s > /tmp/locked; chmod 000 /tmp/locked'
echo "ns-cp=$(hull cp cbox:/mnt/t/f - | tar -xO)"
hull cp cbox:/tmp/locked /srv/locked 2>/tmp/err; echo "locked: code=$? $(cat /tmp/err)"
hull rm -f cbox >/dev/null
"#,
        true,
    );
    run.assert_success();
    let out = &run.stdout;
    expect(out, "seen=", "from-host");
    expect(out, "owner-in=", "2000:3000");
    let secret = value(out, "secret=").unwrap_or_default();
    assert!(
        !secret.contains("TOPSECRET"),
        "a symlink reached a host file: {out}"
    );
    expect(out, "through-link=", "guest-etc");
    expect(out, "dotdot=", "1");
    expect(out, "rc=", "0");
    expect(out, "ctrfile=", "from-ctr owner=1000:1000 dir=yes");
    expect(out, "byuser=", "1000:1000");
    assert!(value(out, "ro-write=").is_some_and(|v| v != "0"), "{out}");
    expect(out, "remount=", "0");
    assert!(
        value(out, "ro-remounted-write=").is_some_and(|v| v != "0"),
        "{out}"
    );
    expect(out, "ro-files=", "0");
    expect(out, "mount-ro=", "from-host refused");
    expect(out, "cp-in=", "0");
    expect(out, "in:", "deep 1234:4321 640 /etc");
    expect(out, "cp-out=", "0");
    expect(out, "out:", "gen 77:88 4755 /etc/passwd");
    expect(out, "into-dir=", "gen 0:0 755");
    expect(out, "ns-cp=", "inner");
    let locked = value(out, "locked:").unwrap_or_default();
    assert!(
        locked.starts_with("code=125") && locked.contains("ermission denied"),
        "{out}"
    );
    let listed = value(out, "stdout-tar=").unwrap_or_default();
    assert!(
        listed.contains("gen/pw") && listed.contains("gen/x/y"),
        "{out}"
    );
    expect(out, "cp-stdin=", "0");
    assert!(out.lines().any(|l| l.trim() == "deep"), "{out}");
    let missing = value(out, "cp-missing:").unwrap_or_default();
    assert!(
        missing.starts_with("code=125") && missing.contains("could not find"),
        "{out}"
    );
}
