//! The process's environment and executable, as docker and runc settle them.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// `PATH` when the environment has none (docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A failure to start the command: the exit status docker uses and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError {
    /// 125 runtime error, 126 not executable, 127 not found.
    pub code: i32,
    /// For the user.
    pub message: String,
}

impl StartError {
    /// A start error.
    #[must_use]
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The error for a failed `execve` (or `stat`) of `name`, docker's way:
    /// 127 when something does not exist, 126 otherwise.
    #[must_use]
    pub fn exec(name: &str, e: &io::Error) -> Self {
        let code = if e.raw_os_error() == Some(libc::ENOENT) {
            127
        } else {
            126
        };
        Self::new(code, format!("exec: {name:?}: {}", os_message(e)))
    }
}

/// An OS error's text without Rust's " (os error N)" suffix.
#[must_use]
pub fn os_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => {
            let mut m = s[..i].to_string();
            // "No such file or directory" -> "no such file or directory", as Go prints it.
            if let Some(first) = m.get(..1) {
                let lower = first.to_ascii_lowercase();
                m.replace_range(..1, &lower);
            }
            m
        }
        None => s,
    }
}

fn key(entry: &str) -> &str {
    entry.split_once('=').map_or(entry, |(k, _)| k)
}

/// The value of `name` in a `KEY=VALUE` list.
#[must_use]
pub fn getenv<'a>(env: &'a [String], name: &str) -> Option<&'a str> {
    env.iter().rev().find_map(|e| {
        e.split_once('=')
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v)
    })
}

/// The environment the process gets: `env` with duplicates merged (first
/// position, last value), then docker's additions when missing: `PATH`
/// (default), `HOSTNAME`, `TERM=xterm` with a tty, and `HOME` (the user's).
#[must_use]
pub fn environment(env: &[String], home: &str, hostname: &str, tty: bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(env.len() + 4);
    for e in env {
        if e.contains('=') {
            if let Some(slot) = out.iter_mut().find(|o| o.contains('=') && key(o) == key(e)) {
                slot.clone_from(e);
                continue;
            }
        }
        out.push(e.clone());
    }
    let has = |out: &[String], k: &str| out.iter().any(|o| o.contains('=') && key(o) == k);
    let mut front = Vec::new();
    if !has(&out, "PATH") {
        front.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has(&out, "HOSTNAME") && !hostname.is_empty() {
        front.push(format!("HOSTNAME={hostname}"));
    }
    if tty && !has(&out, "TERM") {
        front.push("TERM=xterm".to_string());
    }
    if !has(&out, "HOME") {
        out.push(format!("HOME={home}"));
    }
    front.extend(out);
    front
}

/// Where `p` (a path in the container) is from here: `root` is `/` in the
/// guest, a directory standing for the container's root in tests.
fn host_path(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Go's `findExecutable`: a file (through symlinks) with some execute bit.
fn check_executable(root: &Path, p: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(host_path(root, p))?;
    if meta.is_dir() {
        Err(io::Error::from_raw_os_error(libc::EISDIR))
    } else if meta.permissions().mode() & 0o111 != 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EACCES))
    }
}

/// Resolves the command's `args[0]` the way runc does (Go's `exec.LookPath`,
/// after changing to `cwd`): a name with a `/` is taken as is (relative to
/// `cwd`), another is searched in `path_env`.
///
/// # Errors
/// Not found (127) or not executable (126), with docker's messages.
pub fn find_executable(
    name: &str,
    path_env: &str,
    cwd: &str,
    root: &Path,
) -> Result<PathBuf, StartError> {
    let cwd = Path::new(if cwd.is_empty() { "/" } else { cwd });
    if name.is_empty() {
        return Err(StartError::new(
            127,
            "exec: \"\": executable file not found in $PATH",
        ));
    }
    if name.contains('/') {
        let p: PathBuf = cwd.join(name).components().collect();
        return match check_executable(root, &p) {
            Ok(()) => Ok(p),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(StartError::new(
                127,
                format!("exec: {name:?}: stat {name}: {}", os_message(&e)),
            )),
            Err(e) => Err(StartError::exec(name, &e)),
        };
    }
    for dir in path_env.split(':') {
        let p: PathBuf = cwd.join(dir).join(name).components().collect();
        if check_executable(root, &p).is_ok() {
            return Ok(p);
        }
    }
    Err(StartError::new(
        127,
        format!("exec: {name:?}: executable file not found in $PATH"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn environment_defaults_and_merging() {
        assert_eq!(
            environment(&s(&["A=1", "B=2", "A=3"]), "/root", "box", false),
            s(&[
                &format!("PATH={DEFAULT_PATH}"),
                "HOSTNAME=box",
                "A=3",
                "B=2",
                "HOME=/root"
            ])
        );
        assert_eq!(
            environment(
                &s(&["PATH=/bin", "HOME=/h", "HOSTNAME=x", "TERM=vt100"]),
                "/root",
                "box",
                true
            ),
            s(&["PATH=/bin", "HOME=/h", "HOSTNAME=x", "TERM=vt100"])
        );
        let env = environment(&[], "/", "", true);
        assert_eq!(
            env,
            s(&[&format!("PATH={DEFAULT_PATH}"), "TERM=xterm", "HOME=/"])
        );
        assert_eq!(getenv(&env, "HOME"), Some("/"));
        assert_eq!(getenv(&env, "NOPE"), None);
    }

    #[test]
    fn lookup_follows_path_and_docker_codes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for d in ["bin", "usr/bin", "work", "etc"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let exe = |p: &str, mode: u32| {
            fs::write(root.join(p), "#!/bin/sh\n").unwrap();
            fs::set_permissions(root.join(p), fs::Permissions::from_mode(mode)).unwrap();
        };
        exe("usr/bin/tool", 0o755);
        exe("bin/tool", 0o755);
        exe("bin/noexec", 0o644);
        exe("usr/bin/noexec", 0o644);
        exe("work/local", 0o700);
        fs::create_dir(root.join("bin/adir")).unwrap();
        std::os::unix::fs::symlink("tool", root.join("bin/link")).unwrap();

        let path = "/usr/bin:/bin";
        assert_eq!(
            find_executable("tool", path, "/", root).unwrap(),
            Path::new("/usr/bin/tool")
        );
        assert_eq!(
            find_executable("tool", "/bin:/usr/bin", "/", root).unwrap(),
            Path::new("/bin/tool")
        );
        assert_eq!(
            find_executable("link", path, "/", root).unwrap(),
            Path::new("/bin/link")
        );
        assert_eq!(
            find_executable("local", "/bin::", "/work", root).unwrap(),
            Path::new("/work/local")
        );

        let e = find_executable("nope", path, "/", root).unwrap_err();
        assert_eq!(
            e,
            StartError::new(127, "exec: \"nope\": executable file not found in $PATH")
        );
        // Not executable or a directory on PATH: skipped, so "not found".
        assert_eq!(
            find_executable("noexec", path, "/", root).unwrap_err().code,
            127
        );
        assert_eq!(
            find_executable("adir", path, "/", root).unwrap_err().code,
            127
        );

        assert_eq!(
            find_executable("/bin/tool", "", "/", root).unwrap(),
            Path::new("/bin/tool")
        );
        assert_eq!(
            find_executable("./local", "", "/work", root).unwrap(),
            Path::new("/work/local")
        );
        assert_eq!(
            find_executable("/bin/noexec", path, "/", root).unwrap_err(),
            StartError::new(126, "exec: \"/bin/noexec\": permission denied")
        );
        assert_eq!(
            find_executable("/etc", path, "/", root).unwrap_err(),
            StartError::new(126, "exec: \"/etc\": is a directory")
        );
        assert_eq!(
            find_executable("/nonexistent", path, "/", root).unwrap_err(),
            StartError::new(
                127,
                "exec: \"/nonexistent\": stat /nonexistent: no such file or directory"
            )
        );
    }
}
