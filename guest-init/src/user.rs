//! Resolving a docker `--user` string against the container's own
//! `/etc/passwd` and `/etc/group` (parsed here: no NSS), with runc's rules
//! (`github.com/moby/sys/user`, `GetExecUser`).

/// The identity the container's process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Home directory (for `HOME` when the environment has none).
    pub home: String,
}

/// One `/etc/passwd` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Passwd<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

/// One `/etc/group` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

/// Lines of a passwd-style file: trimmed, without blanks and comments.
fn lines(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect())
}

fn passwd_entries(text: &str) -> impl Iterator<Item = Passwd<'_>> {
    lines(text).filter_map(|f| {
        Some(Passwd {
            name: f.first().copied()?,
            uid: f.get(2)?.parse().ok()?,
            gid: f.get(3)?.parse().ok()?,
            home: f.get(5).copied().unwrap_or(""),
        })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = Group<'_>> {
    lines(text).filter_map(|f| {
        Some(Group {
            name: f.first().copied()?,
            gid: f.get(2)?.parse().ok()?,
            members: f.get(3).map_or_else(Vec::new, |m| {
                m.split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .collect()
            }),
        })
    })
}

/// Resolves `spec` ("", "name", "uid", "name:group", "uid:gid", …) given the
/// contents of the container's `/etc/passwd` and `/etc/group` (`None` when
/// the file does not exist).
///
/// # Errors
/// An unknown user or group name, as docker words it (exit status 125).
pub fn resolve(spec: &str, passwd: Option<&str>, group: Option<&str>) -> Result<ExecUser, String> {
    let (user_arg, group_arg) = spec.split_once(':').unwrap_or((spec, ""));
    let uid_arg: Option<u32> = user_arg.parse().ok();
    let gid_arg: Option<u32> = group_arg.parse().ok();
    let mut out = ExecUser {
        uid: 0,
        gid: 0,
        groups: Vec::new(),
        home: "/".into(),
    };

    let found = passwd.and_then(|text| {
        passwd_entries(text).find(|p| match (user_arg, uid_arg) {
            ("", _) => p.uid == 0,
            (_, Some(uid)) => p.uid == uid,
            (name, None) => p.name == name,
        })
    });
    match (&found, uid_arg) {
        (Some(p), _) => {
            out.uid = p.uid;
            out.gid = p.gid;
            out.home = p.home.to_string();
        }
        (None, Some(uid)) => out.uid = uid,
        (None, None) if user_arg.is_empty() => {}
        (None, None) => {
            return Err(format!(
                "unable to find user {user_arg}: no matching entries in passwd file"
            ));
        }
    }

    if group_arg.is_empty() {
        if let (Some(p), Some(text)) = (&found, group) {
            out.groups = group_entries(text)
                .filter(|g| g.members.contains(&p.name))
                .map(|g| g.gid)
                .collect();
        }
    } else {
        let g = group.and_then(|text| {
            group_entries(text).find(|g| match gid_arg {
                Some(gid) => g.gid == gid,
                None => g.name == group_arg,
            })
        });
        out.gid = match (g, gid_arg) {
            (Some(g), _) => g.gid,
            (None, Some(gid)) => gid,
            (None, None) => {
                return Err(format!(
                    "unable to find group {group_arg}: no matching entries in group file"
                ));
            }
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/ash
# a comment

daemon:x:2:2:daemon:/sbin:/sbin/nologin
nobody:x:65534:65534:nobody:/:/sbin/nologin
app:x:1000:1001:App:/home/app:/bin/sh
broken:x:notanumber:1::/x:
";
    const GROUP: &str = "\
root:x:0:root
bin:x:1:root,bin,daemon
daemon:x:2:root,bin,daemon
wheel:x:10:root, app
app:x:1001:
staff:x:50:
";

    fn user(uid: u32, gid: u32, groups: &[u32], home: &str) -> ExecUser {
        ExecUser {
            uid,
            gid,
            groups: groups.to_vec(),
            home: home.into(),
        }
    }

    #[test]
    fn default_user_is_root_with_its_groups() {
        assert_eq!(
            resolve("", Some(PASSWD), Some(GROUP)).unwrap(),
            user(0, 0, &[0, 1, 2, 10], "/root")
        );
        assert_eq!(resolve("", None, None).unwrap(), user(0, 0, &[], "/"));
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(
            resolve("app", Some(PASSWD), Some(GROUP)).unwrap(),
            user(1000, 1001, &[10], "/home/app")
        );
        assert_eq!(
            resolve("1000", Some(PASSWD), Some(GROUP)).unwrap(),
            user(1000, 1001, &[10], "/home/app")
        );
        assert_eq!(
            resolve("daemon", Some(PASSWD), Some(GROUP)).unwrap(),
            user(2, 2, &[1, 2], "/sbin")
        );
        // A numeric uid with no entry: allowed, gid 0, home /.
        assert_eq!(
            resolve("4242", Some(PASSWD), Some(GROUP)).unwrap(),
            user(4242, 0, &[], "/")
        );
        assert_eq!(
            resolve("4242", None, None).unwrap(),
            user(4242, 0, &[], "/")
        );
    }

    #[test]
    fn explicit_groups() {
        assert_eq!(
            resolve("app:staff", Some(PASSWD), Some(GROUP)).unwrap(),
            user(1000, 50, &[], "/home/app")
        );
        assert_eq!(
            resolve("app:7", Some(PASSWD), Some(GROUP)).unwrap(),
            user(1000, 7, &[], "/home/app")
        );
        assert_eq!(
            resolve("4242:4343", None, None).unwrap(),
            user(4242, 4343, &[], "/")
        );
        assert_eq!(
            resolve("0:wheel", Some(PASSWD), Some(GROUP)).unwrap(),
            user(0, 10, &[], "/root")
        );
    }

    #[test]
    fn unknown_names_are_docker_errors() {
        assert_eq!(
            resolve("ghost", Some(PASSWD), Some(GROUP)).unwrap_err(),
            "unable to find user ghost: no matching entries in passwd file"
        );
        assert_eq!(
            resolve("ghost", None, None).unwrap_err(),
            "unable to find user ghost: no matching entries in passwd file"
        );
        assert_eq!(
            resolve("app:ghosts", Some(PASSWD), Some(GROUP)).unwrap_err(),
            "unable to find group ghosts: no matching entries in group file"
        );
        // Malformed lines are skipped, not matched.
        assert!(resolve("broken", Some(PASSWD), Some(GROUP)).is_err());
    }
}
