//! Container lifecycle, for real in the emulated KVM host: detached
//! containers, ps/logs/stop/kill/wait/inspect/rm/prune, a monitor killed
//! with SIGKILL, exec into a running container, and errors for unknown names.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use common::{assert_values, value, EmulatedHost, HostRun};

/// The prelude every script needs: PATH with mkfs.ext4, the kernel, and a
/// helper that prints a command's status as `NAME=status`.
const PRELUDE: &str =
    "export PATH=/usr/local/bin:/sbin:/usr/sbin:/bin:/usr/bin HULL_KERNEL=/opt/hull/vmlinux\n";

fn host_run(script: &str) -> HostRun {
    let run = EmulatedHost::new()
        .with_hull_runtime()
        .timeout(400)
        .run(&format!("{PRELUDE}{script}"));
    println!(
        "--- emulated host output ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    run.assert_success();
    run
}

#[test]
fn detached_container_with_ps_logs_stop_wait_inspect_rm() {
    let run = host_run(
        r#"
id=$(hull run -d --name ticker busybox sh -c 'trap "echo got TERM; exit 0" TERM; trap "echo got USR1" USR1; i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done')
echo "run-d=$?"
# Straight after run -d the signal waits for the process to run; CONT, since
# the shell may not have set its traps yet (docker has the same race).
hull kill -s CONT ticker >/dev/null; echo "kill-early=$?"
echo "id-len=${#id}"
# Wait (bounded) until the container has printed something.
for i in $(seq 1 60); do hull logs ticker | grep -q 'tick 1' && break; sleep 1; done
hull kill -s USR1 ticker; echo "kill=$?"
for i in $(seq 1 30); do hull logs ticker | grep -q 'got USR1' && break; sleep 1; done
echo "usr1-seen=$(hull logs ticker | grep -c 'got USR1')"
hull ps > /tmp/ps; echo "ps=$?"; cat /tmp/ps
echo "ps-lists=$(grep -c ' ticker$' /tmp/ps)"
echo "ps-q=$(hull ps -q)"
echo "logs-tail=$(hull logs --tail 1 ticker | wc -l)"
hull stop -t 10 ticker; echo "stop=$?"
echo "wait=$(hull wait ticker)"
echo "ps-after=$(hull ps -q | wc -l)"
hull ps -a | grep ticker
hull logs ticker | tail -1
hull inspect ticker > /tmp/i; echo "inspect=$?"
grep -E '"(Status|ExitCode|Name)"' /tmp/i
hull rm ticker; echo "rm=$?"
echo "ps-a-after-rm=$(hull ps -aq | wc -l)"
"#,
    );
    let out = &run.stdout;
    assert_values(
        out,
        &[
            ("run-d=", "0"),
            ("id-len=", "64"),
            ("kill-early=", "0"),
            ("kill=", "0"),
        ],
    );
    assert!(value(out, "usr1-seen=").is_some_and(|n| n != "0"), "{out}");
    assert_eq!(value(out, "ps-lists="), Some("1"), "{out}");
    assert_eq!(value(out, "ps-q=").map(str::len), Some(12), "{out}");
    assert_eq!(value(out, "logs-tail="), Some("1"), "{out}");
    assert_eq!(value(out, "stop="), Some("0"), "{out}");
    assert_eq!(
        value(out, "wait="),
        Some("0"),
        "the trap exits 0 on SIGTERM: {out}"
    );
    assert_eq!(value(out, "ps-after="), Some("0"), "{out}");
    run.assert_stdout_contains("got TERM");
    run.assert_stdout_contains("\"Status\": \"exited\"");
    run.assert_stdout_contains("\"ExitCode\": 0");
    assert_eq!(value(out, "rm="), Some("0"), "{out}");
    assert_eq!(value(out, "ps-a-after-rm="), Some("0"), "{out}");
}

#[test]
fn stop_kills_a_process_that_ignores_sigterm_within_the_grace_period() {
    let run = host_run(
        r#"
hull run -d --name stubborn busybox sh -c 'trap "" TERM; echo ready; while true; do sleep 1; done' >/dev/null
for i in $(seq 1 60); do hull logs stubborn | grep -q ready && break; sleep 1; done
start=$(date +%s)
hull stop -t 2 stubborn; echo "stop=$?"
echo "took=$(( $(date +%s) - start ))"
echo "wait=$(hull wait stubborn)"
"#,
    );
    let out = &run.stdout;
    assert_eq!(value(out, "stop="), Some("0"), "{out}");
    let took: u64 = value(out, "took=").unwrap().parse().unwrap();
    // 2 s of grace, then SIGKILL and the VM's shutdown (slow under emulation).
    assert!((2..=15).contains(&took), "stop took {took} s: {out}");
    assert_eq!(value(out, "wait="), Some("137"), "{out}");
}

#[test]
fn a_killed_monitor_shows_as_exited_and_can_be_removed_and_prune_keeps_running_ones() {
    let run = host_run(
        r#"
hull run -d --name victim busybox sleep 1000 >/dev/null
hull run -d --name survivor busybox sleep 1000 >/dev/null
hull run --name done busybox true; echo "done=$?"
for i in $(seq 1 60); do [ "$(hull ps -q | wc -l)" = 2 ] && break; sleep 1; done
pid=$(hull inspect victim | grep '"Pid"' | tr -dc 0-9)
echo "pid-found=${pid:+yes}"
kill -9 "$pid"
sleep 1
hull ps -a > /tmp/ps; cat /tmp/ps
echo "victim-exited=$(grep ' victim$' /tmp/ps | grep -c Exited)"
hull inspect victim | grep '"Error"'
vid=$(hull inspect victim | grep '"Id"' | cut -d'"' -f4 | cut -c1-12)
echo "victim-socket-before=$(ls /var/lib/hull/run/ | grep -c "^$vid.sock")"
hull container prune > /tmp/prune; echo "prune=$?"; cat /tmp/prune
echo "victim-socket-after=$(ls /var/lib/hull/run/ | grep -c "^$vid.sock")"
echo "left=$(hull ps -a | grep -c -E ' (survivor|victim|done)$')"
echo "survivor-running=$(hull ps | grep -c ' survivor$')"
hull rm survivor; echo "rm-running=$?"
hull rm -f survivor; echo "rm-f=$?"
echo "all-gone=$(hull ps -aq | wc -l)"
"#,
    );
    let out = &run.stdout;
    assert_values(
        out,
        &[
            ("done=", "0"),
            ("pid-found=", "yes"),
            ("victim-exited=", "1"),
        ],
    );
    run.assert_stdout_contains("monitor died");
    assert_eq!(value(out, "prune="), Some("0"), "{out}");
    // The killed monitor's socket is cleaned with the container.
    assert_eq!(value(out, "victim-socket-before="), Some("1"), "{out}");
    assert_eq!(value(out, "victim-socket-after="), Some("0"), "{out}");
    run.assert_stdout_contains("Total reclaimed space:");
    // prune removed the dead victim and the finished one; the survivor runs on.
    assert_values(
        out,
        &[
            ("left=", "1"),
            ("survivor-running=", "1"),
            ("rm-running=", "1"),
        ],
    );
    run.assert_stdout_contains("container survivor is running: stop it first, or use `hull rm -f`");
    assert_eq!(value(out, "rm-f="), Some("0"), "{out}");
    assert_eq!(value(out, "all-gone="), Some("0"), "{out}");
}

#[test]
fn unknown_containers_are_clear_errors() {
    // No VM needed: these fail before any is started, so run them here.
    let root = tempfile::tempdir().unwrap();
    for args in [
        vec!["logs", "nosuch"],
        vec!["stop", "nosuch"],
        vec!["rm", "nosuch"],
        vec!["inspect", "nosuch"],
        vec!["exec", "nosuch", "true"],
        vec!["kill", "nosuch"],
        vec!["wait", "nosuch"],
    ] {
        let out = std::process::Command::new(common::hull_bin())
            .args(&args)
            .env("HULL_ROOT", root.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains("no such container: nosuch"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn exec_runs_in_the_running_container_with_its_own_status_env_and_stdin() {
    let run = host_run(
        r#"
hull run -d --name box -e FOO=from-run busybox sh -c 'echo hi > /tmp/made-by-main; sleep 1000' >/dev/null
# Straight after `run -d`: the exec waits for the container's process to run
# (which may not have written its file yet: wait for it, bounded).
out=$(hull exec box sh -c 'for i in $(seq 100); do [ -e /tmp/made-by-main ] && break; sleep 0.1; done; cat /tmp/made-by-main; echo "FOO=$FOO"; exit 4'); echo "exec=$?"
echo "$out" | sed 's/^/out: /'
echo "env-override=$(hull exec -e FOO=from-exec box sh -c 'echo $FOO')"
echo "stdin=$(echo piped | hull exec -i box cat)"
echo "no-stdin=[$(echo piped | hull exec box cat)]"
echo "user=$(hull exec -u 65534 box id -u)"
echo "cwd=$(hull exec -w /tmp box pwd)"
hull exec box /no/such/command; echo "missing=$?"
hull rm -f box; echo "rm-f=$?"
hull exec box true; echo "exec-after-rm=$?"
"#,
    );
    let out = &run.stdout;
    assert_eq!(value(out, "exec="), Some("4"), "{out}");
    run.assert_stdout_contains("out: hi");
    run.assert_stdout_contains("out: FOO=from-run");
    assert_values(
        out,
        &[
            ("env-override=", "from-exec"),
            ("stdin=", "piped"),
            ("no-stdin=", "[]"),
            ("user=", "65534"),
            ("cwd=", "/tmp"),
            ("missing=", "127"),
            ("rm-f=", "0"),
            ("exec-after-rm=", "125"),
        ],
    );
}

#[test]
fn run_it_gives_a_real_terminal_with_echo_window_size_and_restores_the_host_terminal() {
    // util-linux's `script` (needs only libc, already there for mkfs) drives
    // a pty: hull's stdin is a terminal, 30x100, and input is typed into it.
    let script = r#"
cat > /opt/tty.sh <<'X'
stty rows 30 cols 100
hull run -it --rm busybox sh -c 'stty size; tty; read line; echo "got:$line"'
echo "tty-exit=$?"
stty -a | tr ' ' '\n' | grep -E '^-?(icanon|echo)$' | tr '\n' ' ' | sed 's/^/host-tty-after: /'; echo
X
printf 'typed-text\r' | script -q -e -c "sh /opt/tty.sh" /opt/typescript; echo "script=$?"
"#;
    let run = EmulatedHost::new()
        .with_hull_runtime()
        .file("/usr/bin/script", "/usr/bin/script")
        .timeout(300)
        .run(&format!("{PRELUDE}{script}"));
    println!(
        "--- emulated host output ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    run.assert_success();
    let out = &run.stdout;
    assert_eq!(value(out, "script="), Some("0"), "{out}");
    assert_eq!(value(out, "tty-exit="), Some("0"), "{out}");
    // The container's terminal has the host terminal's size...
    assert!(
        out.lines()
            .any(|l| l.trim().trim_start_matches('\0').ends_with("30 100")),
        "{out}"
    );
    // ...is a pty, and its line discipline echoes what is typed and hands over the line.
    run.assert_stdout_contains("/dev/pts/");
    assert!(
        out.matches("typed-text").count() >= 2,
        "no echo of the typed text: {out}"
    );
    run.assert_stdout_contains("got:typed-text");
    // hull put the host terminal back as it found it (canonical, echoing).
    assert_eq!(value(out, "host-tty-after:"), Some("icanon echo"), "{out}");
}

#[test]
fn a_slow_reader_slows_the_container_down_and_loses_nothing() {
    // 12 MB into a reader that starts 30 s late. Under the emulated host the
    // container writes ~0.35 MB/s, so without back-pressure more than the
    // monitor's 8 MiB client limit would pile up and the reader be cut off.
    let run = host_run(
        r#"
{ hull run --rm busybox sh -c 'yes 0123456789abcdef | head -c 12000000; echo done >&2'; echo "hull=$?" >&2; } 2>/tmp/err | (sleep 30; wc -c) > /tmp/count
echo "bytes=$(tr -d ' ' < /tmp/count)"
cat /tmp/err
"#,
    );
    let out = &run.stdout;
    assert_eq!(value(out, "bytes="), Some("12000000"), "{out}");
    assert_eq!(value(out, "hull="), Some("0"), "{out}");
    run.assert_stdout_contains("done");
}
