//! The VMM's jail, for real in the emulated KVM host: while a container runs,
//! its VMM is a process of its own (`hull __vmm`, the monitor's child) in new
//! namespaces, with an empty root, its own unprivileged uid, no
//! capabilities, `no_new_privs`, rlimits and a cgroup; a VMM that dies is
//! reported in the container's record; and a normal user runs containers
//! too (rootless: the jail is built in a user namespace).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use common::{assert_values, value, EmulatedHost};

const PRELUDE: &str =
    "export PATH=/usr/local/bin:/sbin:/usr/sbin:/bin:/usr/bin HULL_KERNEL=/opt/hull/vmlinux\n";

/// A shell function: `vmm_of NAME` prints the pid of container NAME's VMM
/// (the monitor's child running `hull __vmm`), once the container runs a
/// process (`hull exec` works).
const VMM_OF: &str = r#"
vmm_of() {
  for i in $(seq 1 90); do hull exec "$1" true 2>/dev/null && break; sleep 1; done
  m=$(hull inspect "$1" | grep '"Pid"' | tr -dc 0-9)
  for c in $(cat /proc/$m/task/*/children); do
    case "$(tr '\0' ' ' < /proc/$c/cmdline)" in *__vmm*) echo "$c"; return;; esac
  done
}
# status_of PID: the status lines the checks need, one per thread, as
# "tid Uid=.. CapEff=.. CapPrm=.. CapBnd=.. NoNewPrivs=.. Seccomp=..".
threads_of() {
  for t in /proc/$1/task/*; do
    echo "thread ${t##*/} $(grep -E '^(Uid|CapEff|CapPrm|CapBnd|CapInh|CapAmb|NoNewPrivs|Seccomp):' $t/status | awk '{printf "%s%s ", $1, $2}')"
  done
}
"#;

#[test]
fn the_vmm_runs_jailed_dies_visibly_and_runs_rootless() {
    let run = EmulatedHost::new()
        .with_hull_runtime()
        .mem(1536)
        .timeout(600)
        .run(&format!(
            "{PRELUDE}{VMM_OF}{}",
            r#"
mount -t cgroup2 none /sys/fs/cgroup && echo cgroup2=mounted
hull run -d --name jailed --memory 256m --cpus 1 busybox sleep 1000 >/dev/null; echo "run=$?"
v=$(vmm_of jailed)
# A VMM made (test-only hook) to call socket(2), outside its seccomp filter (the
# image's disk is built by now: the hook would end that build's VMM too).
HULL_TEST_VMM_SECCOMP_VIOLATION=1 hull run -d --name violator --memory 256m busybox sleep 1000 >/dev/null
echo "violator-run=$?"
m=$(hull inspect jailed | grep '"Pid"' | tr -dc 0-9)
echo "vmm-found=${v:+yes}"
for ns in mnt pid net ipc uts; do
  [ "$(readlink /proc/$v/ns/$ns)" != "$(readlink /proc/$m/ns/$ns)" ] && echo "ns-$ns=own"
done
echo "nspid=$(grep NSpid /proc/$v/status | awk '{print $NF}')"
echo "root-entries=$(ls -A /proc/$v/root/ | wc -l)"
echo "root-is-host=$([ /proc/$v/root/ -ef / ] && echo yes || echo no)"
echo "uid=$(awk '/^Uid:/ {print $2}' /proc/$v/status)"
echo "groups=[$(awk '/^Groups:/ {print $2}' /proc/$v/status)]"
threads_of $v
echo "threads=$(ls /proc/$v/task | wc -l)"
echo "nofile=$(awk '/Max open files/ {print $4}' /proc/$v/limits)"
echo "fsize=$(awk '/Max file size/ {print $4}' /proc/$v/limits)"
echo "nproc=$(awk '/Max processes/ {print $3}' /proc/$v/limits)"
echo "cgroup=$(cut -d: -f3 /proc/$v/cgroup)"
cg=/sys/fs/cgroup$(cut -d: -f3 /proc/$v/cgroup)
echo "memory.max=$(cat $cg/memory.max)"
echo "cpu.max=$(cat $cg/cpu.max)"
# The container still works jailed.
echo "exec=$(hull exec jailed echo inside)"
# --debug: the VMM's messages reach the terminal (through the monitor).
hull --debug run --rm busybox echo debug-run > /tmp/debug.out 2>&1; echo "debug-run=$?"
grep -E "jail: entered|vm: vCPUs running" /tmp/debug.out
echo "debug-output=$(grep -c '^debug-run' /tmp/debug.out)"
# A VMM that dies (here: killed) ends the container with a clear error.
kill -9 "$v"
for i in $(seq 1 30); do hull ps -a | grep ' jailed$' | grep -q Exited && break; sleep 1; done
hull ps -a | grep ' jailed$'
hull inspect jailed | grep '"Error"'
echo "cgroup-left=$(find /sys/fs/cgroup/hull -mindepth 1 -type d | wc -l)"

for i in $(seq 1 90); do hull ps -a | grep ' violator$' | grep -q Exited && break; sleep 1; done
hull ps -a | grep ' violator$' | sed 's/^/violator-ps: /'
hull inspect violator | grep '"Error"' | sed 's/^ */violator-error: /'

# Rootless: a normal user in group kvm.
echo 'kvm:x:994:' >> /etc/group
echo 'user:x:1000:1000::/home/user:/bin/sh' >> /etc/passwd
echo 'user:x:1000:' >> /etc/group
mkdir -p /home/user && chown 1000:1000 /home/user
chgrp kvm /dev/kvm && chmod 660 /dev/kvm
sed -i 's/^kvm:x:994:$/kvm:x:994:user/' /etc/group
su user -c "export PATH=$PATH HULL_KERNEL=$HULL_KERNEL HULL_NETWORK=none HOME=/home/user
  id
  hull run --rm busybox echo rootless-hello; echo rootless-run=\$?
  hull run -d --name mine busybox sleep 1000 >/dev/null; echo rootless-d=\$?
  "
su user -c "export PATH=$PATH HOME=/home/user; for i in \$(seq 1 90); do hull exec mine true 2>/dev/null && break; sleep 1; done"
v=; for p in /proc/[0-9]*; do case "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)" in *__vmm*) v=${p#/proc/};; esac; done
echo "rootless-vmm-found=${v:+yes}"
echo "rootless-uid=$(awk '/^Uid:/ {print $2}' /proc/$v/status)"
[ "$(readlink /proc/$v/ns/user)" != "$(readlink /proc/1/ns/user)" ] && echo "rootless-ns-user=own"
[ "$(readlink /proc/$v/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ] && echo "rootless-ns-mnt=own"
echo "rootless-root-entries=$(ls -A /proc/$v/root/ | wc -l)"
threads_of $v | sed 's/^/rootless-/'
su user -c "export PATH=$PATH HOME=/home/user; hull stop -t 1 mine >/dev/null; echo rootless-stop=\$?"
"#
        ));
    println!(
        "--- emulated host output ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    run.assert_success();
    let out = &run.stdout;
    assert_eq!(value(out, "run="), Some("0"), "{out}");
    assert_eq!(value(out, "vmm-found="), Some("yes"), "{out}");
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        assert_eq!(
            value(out, &format!("ns-{ns}=")),
            Some("own"),
            "the VMM shares the monitor's {ns} namespace: {out}"
        );
    }
    assert_eq!(
        value(out, "nspid="),
        Some("1"),
        "the VMM is PID 1 of its namespace: {out}"
    );
    assert_eq!(
        value(out, "root-entries="),
        Some("0"),
        "its / is empty: {out}"
    );
    assert_eq!(value(out, "root-is-host="), Some("no"), "{out}");
    let uid: u32 = value(out, "uid=").unwrap().parse().unwrap();
    assert!(uid >= 0x7000_0000, "the VMM's uid is its own: {uid}: {out}");
    assert_eq!(value(out, "groups="), Some("[]"), "{out}");
    let threads: Vec<&str> = out.lines().filter(|l| l.starts_with("thread ")).collect();
    let count: usize = value(out, "threads=").unwrap().parse().unwrap();
    assert!(count >= 3, "vCPU, event loop and helpers: {out}");
    assert_eq!(threads.len(), count, "{out}");
    for t in &threads {
        for want in [
            "CapEff:0000000000000000",
            "CapPrm:0000000000000000",
            "CapBnd:0000000000000000",
            "CapInh:0000000000000000",
            "CapAmb:0000000000000000",
            "NoNewPrivs:1",
            "Seccomp:2",
        ] {
            assert!(t.contains(want), "{t} lacks {want}: {out}");
        }
        assert!(t.contains(&format!("Uid:{uid}")), "{t}: {out}");
    }
    let nofile: u64 = value(out, "nofile=").unwrap().parse().unwrap();
    assert!(nofile < 128, "RLIMIT_NOFILE {nofile}: {out}");
    assert_ne!(value(out, "fsize="), Some("unlimited"), "{out}");
    let nproc: u64 = value(out, "nproc=").unwrap().parse().unwrap();
    assert!(nproc < 32, "RLIMIT_NPROC {nproc}: {out}");
    assert!(
        value(out, "cgroup=").is_some_and(|c| c.starts_with("/hull/")),
        "{out}"
    );
    // 256 MiB of guest RAM plus the VMM's 128; one CPU plus half for devices.
    assert_values(
        out,
        &[
            ("memory.max=", "402653184"),
            ("cpu.max=", "150000 100000"),
            ("exec=", "inside"),
            ("debug-run=", "0"),
        ],
    );
    run.assert_stdout_contains("jail: entered in");
    assert_eq!(value(out, "debug-output="), Some("1"), "{out}");
    run.assert_stdout_contains("the VMM process was killed by signal 9");
    assert_eq!(value(out, "cgroup-left="), Some("0"), "{out}");

    assert_eq!(value(out, "violator-run="), Some("0"), "{out}");
    let ps = value(out, "violator-ps:").unwrap_or_default();
    assert!(ps.contains("Exited (125)"), "{out}");
    let error = value(out, "violator-error:").unwrap_or_default();
    assert!(
        error.contains("seccomp filter forbids") && error.contains("system call 41"),
        "the record names the seccomp kill and socket(2): {out}"
    );

    run.assert_stdout_contains("rootless-hello");
    assert_values(
        out,
        &[
            ("rootless-run=", "0"),
            ("rootless-d=", "0"),
            ("rootless-vmm-found=", "yes"),
            ("rootless-uid=", "1000"),
            ("rootless-ns-user=", "own"),
            ("rootless-ns-mnt=", "own"),
            ("rootless-root-entries=", "0"),
        ],
    );
    let rootless: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("rootless-thread "))
        .collect();
    assert!(!rootless.is_empty(), "{out}");
    for t in &rootless {
        for want in [
            "CapEff:0000000000000000",
            "CapBnd:0000000000000000",
            "NoNewPrivs:1",
            "Seccomp:2",
        ] {
            assert!(t.contains(want), "{t} lacks {want}: {out}");
        }
    }
    assert_eq!(value(out, "rootless-stop="), Some("0"), "{out}");
}
