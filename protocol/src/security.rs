//! What a container's processes may do, by docker's rules: capabilities
//! (`--cap-add`, `--cap-drop`, `--privileged`), resource limits
//! (`--ulimit`), and the names of kernel parameters (`--sysctl`). Pure
//! tables and parsing, shared by the host (which validates the flags) and
//! the init (which applies them).

use serde::{Deserialize, Serialize};

/// Every capability of Linux 6.1 (the guest kernel), by number.
pub const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Docker's default capability set (moby `oci/caps/defaults.go`): what a
/// container's root has without `--cap-add`/`--privileged`. No
/// CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE...
pub const DOCKER_DEFAULT: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// `CAP_X` for a name as docker takes it (`net_admin`, `NET_ADMIN`,
/// `CAP_NET_ADMIN`); `None` when there is no such capability.
#[must_use]
pub fn normalize_cap(name: &str) -> Option<&'static str> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAPABILITIES
        .iter()
        .copied()
        .find(|c| c.strip_prefix("CAP_") == Some(bare))
}

/// The capability set docker gives a container (moby's
/// `TweakCapabilities`): `--privileged` is all of them; `--cap-add ALL` is
/// all but the dropped ones; `--cap-drop ALL` is only the added ones;
/// otherwise docker's default, less the dropped ones, plus the added ones.
/// Sorted by number.
///
/// # Errors
/// An unknown capability name (the message names it).
pub fn capabilities(
    add: &[String],
    drop: &[String],
    privileged: bool,
) -> Result<Vec<String>, String> {
    let is_all = |s: &String| s.trim().eq_ignore_ascii_case("ALL");
    let names = |list: &[String], flag: &str| -> Result<Vec<&'static str>, String> {
        list.iter()
            .filter(|s| !is_all(s))
            .map(|s| {
                normalize_cap(s).ok_or_else(|| {
                    format!("invalid {flag} {s:?}: no such capability (e.g. NET_ADMIN, SYS_PTRACE, ALL)")
                })
            })
            .collect()
    };
    let adds = names(add, "--cap-add")?;
    let drops = names(drop, "--cap-drop")?;
    let set: Vec<&str> = if privileged {
        CAPABILITIES.to_vec()
    } else if add.iter().any(is_all) {
        CAPABILITIES
            .iter()
            .copied()
            .filter(|c| !drops.contains(c))
            .collect()
    } else if drop.iter().any(is_all) {
        adds
    } else {
        DOCKER_DEFAULT
            .iter()
            .copied()
            .filter(|c| !drops.contains(c))
            .chain(adds)
            .collect()
    };
    Ok(CAPABILITIES
        .iter()
        .filter(|c| set.contains(c))
        .map(|c| (*c).to_string())
        .collect())
}

/// The bit mask of a capability set (unknown names are ignored: the host
/// validated them).
#[must_use]
pub fn cap_mask(names: &[String]) -> u64 {
    names
        .iter()
        .filter_map(|n| CAPABILITIES.iter().position(|c| c == n))
        .fold(0, |m, i| m | (1 << i))
}

/// One resource limit: `soft` and `hard` ([`UNLIMITED`] for none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulimit {
    /// docker's name (`nofile`, `nproc`, ...).
    pub name: String,
    /// The soft limit.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// `RLIM_INFINITY`.
pub const UNLIMITED: u64 = u64::MAX;

/// docker's `--ulimit` names and their `RLIMIT_*` numbers (Linux, x86_64).
pub const RLIMITS: &[(&str, u32)] = &[
    ("cpu", 0),
    ("fsize", 1),
    ("data", 2),
    ("stack", 3),
    ("core", 4),
    ("rss", 5),
    ("nproc", 6),
    ("nofile", 7),
    ("memlock", 8),
    ("as", 9),
    ("locks", 10),
    ("sigpending", 11),
    ("msgqueue", 12),
    ("nice", 13),
    ("rtprio", 14),
    ("rttime", 15),
];

/// The number of open files a container may have, docker's default
/// (dockerd's own `LimitNOFILE=infinity`, which is the kernel's `nr_open`).
pub const DEFAULT_NOFILE: u64 = 1_048_576;

/// The limits every container starts with, as docker on a systemd host gives
/// them (dockerd's unit: `LimitNOFILE`, `LimitNPROC` and `LimitCORE` are
/// infinity); `--ulimit` replaces them by name.
#[must_use]
pub fn default_ulimits() -> Vec<Ulimit> {
    let u = |name: &str, soft, hard| Ulimit {
        name: name.into(),
        soft,
        hard,
    };
    vec![
        u("nofile", DEFAULT_NOFILE, DEFAULT_NOFILE),
        u("nproc", UNLIMITED, UNLIMITED),
        u("core", UNLIMITED, UNLIMITED),
    ]
}

fn limit_value(text: &str) -> Option<u64> {
    match text.trim() {
        "-1" | "unlimited" | "infinity" => Some(UNLIMITED),
        t => t.parse().ok(),
    }
}

/// Parses docker's `--ulimit NAME=SOFT[:HARD]` (`-1` or `unlimited`: no limit).
///
/// # Errors
/// An unknown name, a bad number, or a soft limit above the hard one.
pub fn parse_ulimit(text: &str) -> Result<Ulimit, String> {
    let bad = |why: &str| format!("invalid --ulimit {text:?}: {why}");
    let (name, values) = text
        .split_once('=')
        .ok_or_else(|| bad("use NAME=SOFT[:HARD], e.g. nofile=1024:2048"))?;
    let name = name.trim().to_ascii_lowercase();
    if !RLIMITS.iter().any(|(n, _)| *n == name) {
        let names: Vec<&str> = RLIMITS.iter().map(|(n, _)| *n).collect();
        return Err(bad(&format!("unknown limit (one of {})", names.join(", "))));
    }
    let (soft, hard) = values.split_once(':').unwrap_or((values, values));
    let soft = limit_value(soft).ok_or_else(|| bad("not a number"))?;
    let hard = limit_value(hard).ok_or_else(|| bad("not a number"))?;
    if soft > hard {
        return Err(bad("the soft limit is above the hard limit"));
    }
    if name == "nofile" && hard != UNLIMITED && hard > DEFAULT_NOFILE {
        return Err(bad(&format!(
            "nofile cannot exceed the kernel's nr_open ({DEFAULT_NOFILE})"
        )));
    }
    Ok(Ulimit { name, soft, hard })
}

/// The container's limits: the defaults, with `ulimits` replacing (by name).
#[must_use]
pub fn merge_ulimits(ulimits: Vec<Ulimit>) -> Vec<Ulimit> {
    let mut out = default_ulimits();
    for u in ulimits {
        out.retain(|o| o.name != u.name);
        out.push(u);
    }
    out
}

/// Kernel parameters docker sets in every container with its own network
/// namespace (moby, since 20.10): any user may bind low ports and ping.
pub const DEFAULT_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ip_unprivileged_port_start", "0"),
    ("net.ipv4.ping_group_range", "0 2147483647"),
];

/// Parses `--sysctl KEY=VALUE`. Every parameter may be set: the kernel is
/// the container's own (docker only allows namespaced ones because it shares
/// the host's).
///
/// # Errors
/// Not `KEY=VALUE`, or a key that is not a plain dotted name.
pub fn parse_sysctl(text: &str) -> Result<(String, String), String> {
    let bad = |why: &str| format!("invalid --sysctl {text:?}: {why}");
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| bad("use KEY=VALUE, e.g. net.ipv4.ip_forward=1"))?;
    let key = key.trim();
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/');
    if key.is_empty()
        || !key.chars().all(ok_char)
        || key.starts_with(['.', '/'])
        || key.split(['.', '/']).any(|p| p.is_empty() || p == "..")
    {
        return Err(bad("the key is not a kernel parameter name"));
    }
    if value.len() > 4096 || value.contains('\0') {
        return Err(bad("the value is too long or holds a NUL byte"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// The file under `/proc/sys` of a parameter (`net.ipv4.ip_forward` ->
/// `net/ipv4/ip_forward`; a key already in `/` form is kept).
#[must_use]
pub fn sysctl_path(key: &str) -> String {
    if key.contains('/') {
        format!("/proc/sys/{key}")
    } else {
        format!("/proc/sys/{}", key.replace('.', "/"))
    }
}

/// Signal names (x86_64 numbers).
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// A signal as docker's `--stop-signal` and an image's `StopSignal` take it:
/// a number, or a name with or without `SIG` (`TERM`, `SIGRTMIN+3`).
///
/// # Errors
/// No such signal.
pub fn parse_signal(text: &str) -> Result<i32, String> {
    let bad = || format!("invalid signal {text:?}: use a name like SIGTERM or a number");
    let t = text.trim();
    if let Ok(n) = t.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(bad())
        };
    }
    let upper = t.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(rest) = name.strip_prefix("RTMIN") {
        let off: i32 = if rest.is_empty() {
            0
        } else {
            rest.strip_prefix('+')
                .and_then(|n| n.parse().ok())
                .ok_or_else(bad)?
        };
        return if (0..=30).contains(&off) {
            Ok(34 + off)
        } else {
            Err(bad())
        };
    }
    if let Some(rest) = name.strip_prefix("RTMAX") {
        let off: i32 = if rest.is_empty() {
            0
        } else {
            rest.strip_prefix('-')
                .and_then(|n| n.parse().ok())
                .ok_or_else(bad)?
        };
        return if (0..=30).contains(&off) {
            Ok(64 - off)
        } else {
            Err(bad())
        };
    }
    SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("SIGTERM").unwrap(), 15);
        assert_eq!(parse_signal("quit").unwrap(), 3);
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("SIGRTMIN+3").unwrap(), 37);
        assert_eq!(parse_signal("RTMAX").unwrap(), 64);
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("RTMIN+31").is_err());
    }

    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn docker_default_mask_is_a80425fb() {
        let caps = capabilities(&[], &[], false).unwrap();
        assert_eq!(caps.len(), 14);
        assert_eq!(cap_mask(&caps), 0xa804_25fb);
        assert_eq!(CAPABILITIES.len(), 41);
        assert_eq!(
            cap_mask(&capabilities(&[], &[], true).unwrap()),
            0x1ff_ffff_ffff
        );
    }

    #[test]
    fn cap_add_and_drop_follow_moby() {
        let c = capabilities(&v(&["net_admin", "CAP_SYS_PTRACE"]), &v(&["mknod"]), false).unwrap();
        assert!(c.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(c.contains(&"CAP_SYS_PTRACE".to_string()));
        assert!(!c.contains(&"CAP_MKNOD".to_string()));
        assert_eq!(
            capabilities(&v(&["chown"]), &v(&["ALL"]), false).unwrap(),
            v(&["CAP_CHOWN"])
        );
        let all_but = capabilities(&v(&["all"]), &v(&["sys_admin"]), false).unwrap();
        assert_eq!(all_but.len(), 40);
        assert!(!all_but.contains(&"CAP_SYS_ADMIN".to_string()));
        let e = capabilities(&v(&["NET_ADMINN"]), &[], false).unwrap_err();
        assert!(e.contains("--cap-add \"NET_ADMINN\""), "{e}");
    }

    #[test]
    fn ulimits_parse_as_docker() {
        assert_eq!(
            parse_ulimit("nofile=1024:2048").unwrap(),
            Ulimit {
                name: "nofile".into(),
                soft: 1024,
                hard: 2048
            }
        );
        assert_eq!(parse_ulimit("core=-1").unwrap().hard, UNLIMITED);
        assert_eq!(parse_ulimit("nproc=10").unwrap().soft, 10);
        assert!(parse_ulimit("nofile=10:5").is_err());
        assert!(parse_ulimit("bogus=1").is_err());
        assert!(parse_ulimit("nofile").is_err());
        assert!(parse_ulimit("nofile=x").is_err());
        assert!(parse_ulimit("nofile=2000000").is_err());
        let merged = merge_ulimits(vec![parse_ulimit("nofile=100").unwrap()]);
        assert_eq!(merged.len(), 3);
        assert_eq!(
            merged.iter().find(|u| u.name == "nofile").unwrap().soft,
            100
        );
    }

    #[test]
    fn sysctl_keys_are_plain_names() {
        assert_eq!(
            parse_sysctl("net.ipv4.ip_forward=1").unwrap(),
            ("net.ipv4.ip_forward".into(), "1".into())
        );
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward"),
            "/proc/sys/net/ipv4/ip_forward"
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.1/rp_filter"),
            "/proc/sys/net/ipv4/conf/eth0.1/rp_filter"
        );
        for bad in [
            "x",
            "=1",
            "a..b=1",
            "../etc=1",
            "/abs=1",
            "a b=1",
            "net/../x=1",
        ] {
            assert!(parse_sysctl(bad).is_err(), "{bad}");
        }
    }
}
