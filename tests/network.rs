//! Networking, for real in the emulated KVM host: passt (the default
//! network) with `-p` published ports (TCP and UDP), the host's loopback
//! services by `host.hull.internal`, name resolution through the host's
//! resolver, two containers talking through a published port, a stopped
//! container's port freed at once, `--network none`; and the flag errors
//! that need no VM, natively.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use common::{assert_values, hull_bin, tool_files, value, EmulatedHost, ENTER_NEW_ROOT, NEW_ROOT};

const PRELUDE: &str =
    "export PATH=/usr/local/bin:/sbin:/usr/sbin:/bin:/usr/bin HULL_KERNEL=/opt/hull/vmlinux\n";

/// Shell lines that give the emulated host an interface with an address and
/// a default route (passt copies its addressing from it) and a resolver on
/// its loopback (dnsmasq) that knows `db.test.internal`.
pub const HOST_NETWORK: &str = r#"
ip link set lo up
ip link set dummy0 up
ip addr add 192.0.2.10/24 dev dummy0
ip route add default via 192.0.2.1 dev dummy0
printf '203.0.113.7 db.test.internal\n' > /tmp/dnshosts
echo 'nameserver 127.0.0.1' > /etc/resolv.conf
dnsmasq -k --no-resolv --no-hosts --addn-hosts=/tmp/dnshosts --listen-address=127.0.0.1 \
    --bind-interfaces --port=53 --user=root --pid-file= 2>/tmp/dnsmasq.log &
"#;

/// Shell lines that build image `nettools`: busybox and the listed host
/// binaries with their libraries (already copied into the emulated host).
fn image_script(tools: &[&str]) -> String {
    let mut s = String::from(
        "mkdir -p /tmp/img/bin /tmp/img/etc /tmp/img/tmp\n\
         cp /bin/busybox /tmp/img/bin/\n\
         for a in $(busybox --list); do [ -e /tmp/img/bin/$a ] || ln -s busybox /tmp/img/bin/$a; done\n",
    );
    for tool in tools {
        for (_, dest) in tool_files(Path::new(tool), tool) {
            let dir = Path::new(&dest).parent().unwrap().display().to_string();
            writeln!(s, "mkdir -p /tmp/img{dir} && cp {dest} /tmp/img{dest}").unwrap();
        }
    }
    s.push_str("tar -C /tmp/img -cf /tmp/img.tar . && hull import /tmp/img.tar nettools >/dev/null; echo import=$?\n");
    s
}

// busybox's `wget -T SECS` (Debian's busybox-static 1.35) segfaults on any
// host, with or without hull: the scripts bound wget with `timeout` instead.
#[test]
fn passt_network_publish_host_services_dns_and_none() {
    let mut host = EmulatedHost::new()
        .with_hull_runtime()
        .host_env("HULL_NETWORK", "passt")
        .module("dummy")
        .timeout(600)
        .cpus(2);
    for tool in ["/usr/bin/passt", "/usr/sbin/dnsmasq", "/usr/bin/socat"] {
        host = host.tool(tool, tool);
    }
    let inner = format!(
        "{PRELUDE}{HOST_NETWORK}{}{}",
        image_script(&["/usr/bin/socat"]),
        r#"
mkdir -p /tmp/hostwww && echo host-page > /tmp/hostwww/index.html
httpd -p 127.0.0.1:8000 -h /tmp/hostwww
# 1. A published TCP port: the host's wget reaches the container's httpd.
hull run -d --name web -p 8080:80 busybox sh -c 'mkdir -p /www && echo container-page > /www/index.html && exec httpd -f -p 80 -h /www' >/dev/null
echo run-web=$?
for i in $(seq 1 90); do timeout 5 wget -q -O /tmp/page http://127.0.0.1:8080/ 2>/dev/null && break; sleep 1; done
echo "page=$(cat /tmp/page 2>/dev/null)"
echo "port=$(hull port web)"
echo "port-80=$(hull port web 80)"
hull ps | grep -c '0.0.0.0:8080->80/tcp' | sed 's/^/ps-ports=/'
hull inspect web | grep -E '"(IPAddress|Gateway|MacAddress|HostPort)"'
# 2. From a container: the host's loopback service by name, DNS through the
#    host's resolver, and the other container through its published port.
hull run --rm --add-host extra.test:10.9.9.9 busybox sh -c '
  echo "host-svc=$(timeout 10 wget -q -O - http://host.hull.internal:8000/)"
  echo "docker-name=$(timeout 10 wget -q -O - http://host.docker.internal:8000/)"
  echo "via-port=$(timeout 10 wget -q -O - http://host.hull.internal:8080/)"
  echo "dns=$(nslookup db.test.internal 2>&1 | grep -c 203.0.113.7)"
  echo "mtu=$(cat /sys/class/net/eth0/mtu)"
  echo "ifs=$(ls /sys/class/net | tr "\n" " ")"
  grep -q "10.9.9.9.*extra.test" /etc/hosts && echo hosts-extra=yes
  grep nameserver /etc/resolv.conf | sed "s/^/resolv=/"
  ip route | grep default | sed "s/^/route=/"
'
echo run-client=$?
# 3. UDP through -p .../udp: an echo server in the container.
hull run -d --name echo -p 127.0.0.1:5353:5353/udp nettools socat UDP4-RECVFROM:5353,fork EXEC:/bin/cat >/dev/null
echo run-echo=$?
for i in $(seq 1 60); do r=$(echo ping-udp | socat -T 2 - UDP4:127.0.0.1:5353 2>/dev/null); [ -n "$r" ] && break; sleep 1; done
echo "udp=$r"
# 4. --network none: only lo, and the host is unreachable at once.
hull run --rm --network none busybox sh -c '
  echo "none-ifs=$(ls /sys/class/net | tr "\n" " ")"
  t0=$(cut -d" " -f1 /proc/uptime)
  timeout 10 wget -q -O - http://10.0.2.2:8000/ 2>/dev/null; echo "none-wget=$?"
  t1=$(cut -d" " -f1 /proc/uptime)
  echo "none-fast=$(awk -v a=$t0 -v b=$t1 "BEGIN { print (b - a < 3) ? \"yes\" : \"no\" }")"
'
# 5. Stopping a container frees its port at once: the same -p works again.
hull stop -t 2 web >/dev/null; echo stop=$?
hull run -d --name web2 -p 8080:80 busybox sleep 100 >/dev/null; echo rerun=$?
# A port in use is one line, exit 125, and no container is left.
hull run -d -p 8080:80 busybox true 2>/tmp/inuse; echo inuse=$?
echo "inuse-lines=$(wc -l < /tmp/inuse)"; cat /tmp/inuse
hull rm -f web2 echo >/dev/null
"#
    );
    let script = format!(
        "{PRELUDE}{NEW_ROOT}cat > /newroot/inner.sh <<'HULL_INNER_EOF'\n{inner}\nHULL_INNER_EOF\n{ENTER_NEW_ROOT}"
    );
    let run = host.run(&script);
    println!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    run.assert_success();
    let out = &run.stdout;
    assert_values(
        out,
        &[
            ("import=", "0"),
            ("run-web=", "0"),
            ("page=", "container-page"),
            ("port=", "80/tcp -> 0.0.0.0:8080"),
            ("port-80=", "0.0.0.0:8080"),
            ("ps-ports=", "1"),
        ],
    );
    assert!(out.contains("\"IPAddress\": \"10.0.2.15\""), "{out}");
    assert!(out.contains("\"Gateway\": \"10.0.2.2\""), "{out}");
    assert!(out.contains("\"HostPort\": \"8080\""), "{out}");
    assert_values(
        out,
        &[
            ("host-svc=", "host-page"),
            ("docker-name=", "host-page"),
            ("via-port=", "container-page"),
            ("dns=", "1"),
            ("mtu=", "65520"),
            ("ifs=", "eth0 lo"),
            ("hosts-extra=", "yes"),
            ("resolv=", "nameserver 10.0.2.3"),
        ],
    );
    assert!(
        value(out, "route=").is_some_and(|r| r.contains("via 10.0.2.2 dev eth0")),
        "{out}"
    );
    assert_values(
        out,
        &[
            ("run-client=", "0"),
            ("run-echo=", "0"),
            ("udp=", "ping-udp"),
            ("none-ifs=", "lo"),
        ],
    );
    assert!(value(out, "none-wget=").is_some_and(|c| c != "0"), "{out}");
    assert_eq!(value(out, "none-fast="), Some("yes"), "{out}");
    assert_eq!(value(out, "stop="), Some("0"), "{out}");
    assert_eq!(
        value(out, "rerun="),
        Some("0"),
        "the port was not freed: {out}"
    );
    assert_eq!(value(out, "inuse="), Some("125"), "{out}");
    assert_eq!(value(out, "inuse-lines="), Some("1"), "{out}");
    assert!(out.contains("already in use"), "{out}");
}

/// `hull run` with `args` natively (no VM can start here: errors must come
/// before one); returns (status, stderr).
fn hull_run(root: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(hull_bin())
        .env("HULL_ROOT", root)
        .env("HULL_KERNEL", "/nonexistent/vmlinux")
        .arg("run")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_network_flags_are_one_line_errors_before_any_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let in_use = format!("127.0.0.1:{port}:80");
    for (args, needle) in [
        (vec!["-p", "8080:abc"], "invalid -p"),
        (vec!["-p", "80:80/sctp"], "not tcp or udp"),
        (vec!["-p", "1:2:3:4"], "invalid -p"),
        (vec!["--network", "bogus"], "unknown network"),
        (
            vec!["--network", "none", "-p", "80:80"],
            "publishes nothing",
        ),
        (vec!["--dns", "not-an-ip"], "invalid --dns"),
        (vec!["--add-host", "nocolon"], "invalid --add-host"),
        (vec!["-p", &in_use], "already in use"),
    ] {
        let mut all = args.clone();
        all.extend(["busybox", "true"]);
        let (code, err) = hull_run(tmp.path(), &all);
        assert_eq!(code, 125, "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Nothing was recorded.
    let containers = tmp.path().join("containers");
    let left = std::fs::read_dir(&containers).map_or(0, Iterator::count);
    assert_eq!(left, 0, "containers left behind");
    // No passt on PATH: the error names the package.
    let (code, err) = {
        let out = Command::new(hull_bin())
            .env("HULL_ROOT", tmp.path())
            .env("PATH", "/nonexistent")
            .args(["run", "busybox", "true"])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("apt-get install passt"), "{err}");
    drop(busy);
}

/// The seccomp filters of the VMM's process (enforced by default) hold
/// through a container's whole life, on every one of its threads: boot, the image disk
/// and the scratch disk (virtio-blk), passt (virtio-net), a bind mount
/// (virtio-fs), the entropy device, the control channel (virtio-console),
/// `exec`, `stop`, and the guest's power-off. A call outside a filter would
/// end the VMM with the seccomp status (its line in the container's error);
/// `HULL_SECCOMP_TEST_MODE=log` lists instead what the kernel logged (for
/// finding what a change needs).
#[test]
fn every_vmm_thread_keeps_to_its_seccomp_filter_through_a_containers_life() {
    let mode = std::env::var("HULL_SECCOMP_TEST_MODE").unwrap_or_else(|_| "enforce".into());
    let mut host = EmulatedHost::new()
        .with_hull_runtime()
        .host_env("HULL_NETWORK", "passt")
        .host_env("HULL_SECCOMP", &mode)
        .module("dummy")
        .timeout(600)
        .cpus(2);
    for tool in [
        "/usr/bin/passt",
        "/usr/sbin/dnsmasq",
        "/usr/lib/qemu/virtiofsd",
    ] {
        host = host.tool(tool, tool);
    }
    let inner = format!(
        "{PRELUDE}{HOST_NETWORK}{}",
        r#"
mkdir -p /tmp/hostwww /tmp/share && echo host-page > /tmp/hostwww/index.html && echo from-host > /tmp/share/in
httpd -p 127.0.0.1:8000 -h /tmp/hostwww
dmesg -c >/dev/null 2>&1
hull run --name one -v /tmp/share:/share busybox sh -c '
  echo "fs-in=$(cat /share/in)"; echo from-guest > /share/out
  dd if=/dev/zero of=/big bs=1M count=8 2>/dev/null && sync && rm /big && echo blk=ok
  echo "net=$(timeout 20 wget -q -O - http://host.hull.internal:8000/)"
'
echo one=$?
echo "fs-out=$(cat /tmp/share/out)"
hull run -d --name two -p 8080:80 busybox sh -c 'trap "exit 0" TERM; mkdir /www; echo container-page > /www/index.html; httpd -p 80 -h /www; while true; do sleep 1; done' >/dev/null
echo two=$?
echo "exec=$(hull exec two sh -c 'echo exec-ok')"
# The filters are on every thread of the running container's VMM process.
for p in /proc/[0-9]*; do
  case "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)" in *__vmm*)
    for t in $p/task/*; do echo "thread: $(cat $t/comm) $(grep Seccomp: $t/status | tr -d ' \t')"; done;;
  esac
done
for i in $(seq 1 60); do timeout 5 wget -q -O /tmp/page http://127.0.0.1:8080/ 2>/dev/null && break; sleep 1; done
echo "published=$(cat /tmp/page 2>/dev/null)"
hull stop -t 5 two >/dev/null; echo stop=$?
echo "wait=$(hull wait two)"
echo "audit=$(dmesg | grep -c 'type=1326')"
dmesg | grep 'type=1326' | sed 's/.*comm="\([^"]*\)".*syscall=\([0-9]*\).*/\1 \2/' | sort | uniq -c | sed 's/^/denied: /'
for f in /var/lib/hull/containers/*/monitor.log; do sed "s|^|monitor.log: |" $f; done
"#
    );
    let script = format!(
        "{PRELUDE}{NEW_ROOT}cat > /newroot/inner.sh <<'HULL_INNER_EOF'\n{inner}\nHULL_INNER_EOF\n{ENTER_NEW_ROOT}"
    );
    let run = host.run(&script);
    println!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    run.assert_success();
    let out = &run.stdout;
    assert!(!out.contains("seccomp filter forbids"), "{out}");
    let threads: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("thread: "))
        .collect();
    for name in ["vcpu0 ", "vcpu-stop ", "vmm-commands "] {
        assert!(
            threads.iter().any(|t| t.starts_with(name)),
            "no {name}thread: {out}"
        );
    }
    assert!(
        threads.iter().all(|t| t.ends_with(" Seccomp:2")),
        "a VMM thread without its filter: {out}"
    );
    for (key, want) in [
        ("one=", "0"),
        ("fs-in=", "from-host"),
        ("blk=", "ok"),
        ("net=", "host-page"),
        ("fs-out=", "from-guest"),
        ("two=", "0"),
        ("exec=", "exec-ok"),
        ("published=", "container-page"),
        ("stop=", "0"),
        ("wait=", "0"),
        ("audit=", "0"),
    ] {
        assert_eq!(value(out, key), Some(want), "{key} {out}");
    }
}
