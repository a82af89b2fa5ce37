//! A container's log is bounded: it rotates at `--log-opt max-size`, keeping
//! `max-file` files, and `hull logs` (also `-f`, across rotations) shows
//! the newest output; bad `--log-opt`s are refused before any VM.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::process::Command;

use common::{assert_values, value, EmulatedHost};

fn number(out: &str, key: &str) -> u64 {
    value(out, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number for {key} in: {out}"))
}

/// How many lines the container prints (`seq 0 LAST`): about 8.1 MiB.
const LAST: u64 = 1_200_000;

#[test]
fn a_chatty_container_keeps_max_file_times_max_size_and_logs_shows_the_newest() {
    let script = format!(
        r#"
export PATH=/usr/local/bin:/sbin:/usr/sbin:/bin:/usr/bin HULL_KERNEL=/opt/hull/vmlinux
id=$(hull run -d --name chatty --log-opt max-size=1m --log-opt max-file=2 busybox sh -c 'seq 0 {LAST}; echo END-OF-OUTPUT')
echo "run-d=$?"
hull logs -f chatty > /tmp/follow 2>&1 &
follower=$!
echo "wait=$(hull wait chatty)"
wait $follower; echo "follow=$?"
dir=/var/lib/hull/containers/$id
ls -l $dir
echo "log-files=$(ls $dir | grep -c '^container\.log')"
echo "log-bytes=$(cat $dir/container.log* | wc -c)"
echo "console-bytes=$(cat $dir/console.log | wc -c)"
hull logs chatty > /tmp/logs; echo "logs=$?"
echo "logs-lines=$(wc -l < /tmp/logs)"
echo "logs-last=$(tail -n 1 /tmp/logs)"
# The first line may be the end of a line cut at a record boundary.
echo "logs-second=$(sed -n 2p /tmp/logs)"
echo "tail-last=$(hull logs --tail 1 chatty | tail -n 1)"
# -f started with the container and read every rotated file as it went.
(seq 0 {LAST}; echo END-OF-OUTPUT) > /tmp/want
cmp /tmp/want /tmp/follow >/dev/null; echo "follow-whole=$?"
echo "follow-last=$(tail -n 1 /tmp/follow)"
echo "inspect-max-size=$(hull inspect chatty | grep -c '"max-size": "1048576"')"
hull run --log-opt max-file=0 busybox true 2>/tmp/err; echo "bad-opt=$?"
echo "bad-opt-lines=$(wc -l < /tmp/err)"
echo "containers=$(hull ps -aq | wc -l)"
# --log-driver none: the output reaches the attached client, nothing is logged.
echo "none-out=$(hull run --name quiet --log-driver none busybox sh -c 'echo to-the-client; echo err >&2' 2>/dev/null)"
qid=$(hull inspect quiet | sed -n 's/.*"Id": *"\([0-9a-f]*\)".*/\1/p' | head -1)
echo "none-log-files=$(ls /var/lib/hull/containers/$qid | grep -c '^container\.log')"
hull logs quiet >/tmp/none 2>&1; echo "none-logs=$?"
echo "none-logs-says=$(cat /tmp/none)"
echo "none-inspect=$(hull inspect quiet | grep -c '"Type": "none"')"
hull rm quiet >/dev/null
"#
    );
    let run = EmulatedHost::new()
        .with_hull_runtime()
        .timeout(400)
        .run(&script);
    println!(
        "--- emulated host output ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    run.assert_success();
    let out = &run.stdout;
    assert_values(out, &[("run-d=", "0"), ("wait=", "0"), ("follow=", "0")]);
    // container.log and container.log.1, about 1 MiB each, nothing more.
    assert_eq!(value(out, "log-files="), Some("2"), "{out}");
    let bytes = number(out, "log-bytes=");
    assert!(
        (1 << 20..=2_306_867).contains(&bytes),
        "{bytes} bytes of log on disk, want at most ~2 MiB: {out}"
    );
    assert!(number(out, "console-bytes=") <= 1 << 20, "{out}");
    assert_eq!(value(out, "logs="), Some("0"), "{out}");
    assert_eq!(value(out, "logs-last="), Some("END-OF-OUTPUT"), "{out}");
    // The newest output: ~2 MiB of JSON holds under a quarter of the lines.
    let second = number(out, "logs-second=");
    assert!(second > LAST * 3 / 5, "logs starts at line {second}: {out}");
    assert!(number(out, "logs-lines=") < LAST / 3, "{out}");
    assert_eq!(value(out, "tail-last="), Some("END-OF-OUTPUT"), "{out}");
    assert_eq!(
        value(out, "follow-whole="),
        Some("0"),
        "logs -f lost or repeated output across rotations: {out}"
    );
    assert_values(
        out,
        &[
            ("follow-last=", "END-OF-OUTPUT"),
            ("inspect-max-size=", "1"),
            ("bad-opt=", "125"),
            ("bad-opt-lines=", "1"),
            ("containers=", "1"),
            ("none-out=", "to-the-client"),
            ("none-log-files=", "0"),
            ("none-logs=", "125"),
        ],
    );
    assert!(
        value(out, "none-logs-says=").is_some_and(|s| s.contains("--log-driver none")),
        "{out}"
    );
    assert_eq!(value(out, "none-inspect="), Some("1"), "{out}");
}

/// Bad `--log-opt`s are checked before any image, kernel or VM: this runs
/// on any host, KVM or not.
#[test]
fn a_bad_log_opt_is_one_line_and_exit_125_before_anything_starts() {
    let root = tempfile::tempdir().unwrap();
    let hull = |args: &[&str]| {
        Command::new(common::hull_bin())
            .args(args)
            .env("HULL_ROOT", root.path())
            .env("HULL_KERNEL", "/nonexistent/vmlinux")
            .output()
            .unwrap()
    };
    for (opt, says) in [
        ("max-size=lots", "max-size"),
        ("max-size=0", "max-size"),
        ("max-file=0", "max-file"),
        ("max-file=x", "max-file"),
        ("foo=1", "foo"),
        ("max-size", "KEY=VALUE"),
    ] {
        let out = hull(&["run", "--log-opt", opt, "no-such-image-anywhere", "true"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{opt}: {err}");
        assert_eq!(err.lines().count(), 1, "{opt}: {err}");
        assert!(
            err.contains("--log-opt") && err.contains(says),
            "{opt}: {err}"
        );
        assert!(
            !err.contains("no-such-image"),
            "checked after the image: {err}"
        );
    }
    for args in [
        &["--log-driver", "syslog"][..],
        &["--log-driver", "none", "--log-opt", "max-size=1m"][..],
    ] {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        all.extend(["no-such-image-anywhere", "true"]);
        let out = hull(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            !err.contains("no-such-image"),
            "checked after the image: {err}"
        );
    }
    let ps = hull(&["ps", "-aq"]);
    assert!(ps.status.success());
    assert!(ps.stdout.is_empty(), "a container was created");
}
