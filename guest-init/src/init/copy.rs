//! `hull cp` inside the guest: a tar archive of a container path, or one
//! unpacked into the container, done by a forked child of the init that
//! the event loop treats as an exec'd process (its stdout is the archive
//! out, its stdin the archive in, its exit code the result, its stderr the
//! message), so back-pressure and the host's relay are the exec's own.
//!
//! docker's rules: an archive of `PATH` holds `basename(PATH)` (a
//! directory with everything under it, symlinks as symlinks), with owners,
//! modes and times. An archive sent to `DEST` is unpacked into `DEST` when
//! it is a directory; otherwise its top entry becomes `DEST` (in `DEST`'s
//! parent, which must exist).
//!
//! The child is confined as an exec'd process is (`security::enter`,
//! `limit`, `drop_privileges`): it joins the main process's mount and
//! cgroup namespaces, whose root is the container's, so every path, and
//! every symlink an archive entry's parents meet, resolves inside the
//! container; and it holds only the container's capabilities, so it reads
//! and writes only what a process of the container could.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::command::StartError;
use crate::init::process::Child;
use crate::init::security::{self, Confinement};
use crate::sys;

/// Which way a copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// An archive of a container path, to the host.
    Out,
    /// An archive from the host, into the container.
    In,
}

fn runtime(what: &str, e: &io::Error) -> StartError {
    StartError::new(125, format!("{what}: {e}"))
}

/// Starts the copy of `path` as a child whose pipes the event loop serves,
/// confined by `confine` (the container's, as for an exec'd process).
///
/// # Errors
/// Pipes or the fork failed.
pub fn spawn(
    direction: Direction,
    path: &[u8],
    confine: &Confinement,
) -> Result<Child, StartError> {
    let path = PathBuf::from(OsStr::from_bytes(path));
    let (in_r, in_w) = if direction == Direction::In {
        let (r, w) = sys::pipe().map_err(|e| runtime("pipe", &e))?;
        (r, Some(w))
    } else {
        (
            sys::open(c"/dev/null", libc::O_RDONLY, 0)
                .map_err(|e| runtime("open /dev/null", &e))?,
            None,
        )
    };
    let (out_r, out_w) = sys::pipe().map_err(|e| runtime("pipe", &e))?;
    let (err_r, err_w) = sys::pipe().map_err(|e| runtime("pipe", &e))?;
    // SAFETY: the init is single-threaded, so the child may do anything the
    // parent could; it runs `child_main`, which never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(runtime("fork", &io::Error::last_os_error()));
    }
    if pid == 0 {
        child_main(direction, &path, confine, &in_r, &out_w, &err_w);
    }
    drop((in_r, out_w, err_w));
    for fd in in_w.iter().chain([&out_r, &err_r]) {
        sys::set_nonblocking(std::os::fd::AsFd::as_fd(fd), true)
            .map_err(|e| runtime("set O_NONBLOCK", &e))?;
    }
    Ok(Child {
        pid,
        stdin: in_w,
        stdout: Some(out_r),
        stderr: Some(err_r),
        pty: None,
    })
}

/// Into the container, with its privileges: as an exec'd process as root.
fn confine_self(c: &Confinement) -> Result<(), String> {
    security::enter(c)?;
    security::limit(c)?;
    security::drop_privileges(c)
}

fn child_main(
    direction: Direction,
    path: &Path,
    confine: &Confinement,
    stdin: &OwnedFd,
    stdout: &OwnedFd,
    stderr: &OwnedFd,
) -> ! {
    // SAFETY: valid descriptors onto 0, 1, 2; then an unblocked mask so the
    // child dies of the signals the host sends.
    unsafe {
        libc::dup2(stdin.as_raw_fd(), 0);
        libc::dup2(stdout.as_raw_fd(), 1);
        libc::dup2(stderr.as_raw_fd(), 2);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if let Err(m) = confine_self(confine) {
        let _ = writeln!(io::stderr(), "cannot enter the container: {m}");
        // SAFETY: ending the child without the parent's atexit handlers.
        unsafe { libc::_exit(125) }
    }
    let result = match direction {
        // SAFETY: descriptors 0 and 1 were just set up and are this child's.
        Direction::Out => archive(path, unsafe { std::fs::File::from_raw_fd(1) }),
        // SAFETY: as above.
        Direction::In => unpack(unsafe { std::fs::File::from_raw_fd(0) }, path),
    };
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(io::stderr(), "{e}");
            1
        }
    };
    // SAFETY: ending the child without the parent's atexit handlers.
    unsafe { libc::_exit(code) }
}

/// The name an archive of `path` holds it under.
fn top_name(path: &Path) -> PathBuf {
    path.file_name()
        .map_or_else(|| PathBuf::from("."), PathBuf::from)
}

/// Writes a tar archive of `path` to `out`.
///
/// # Errors
/// `path` does not exist or cannot be read.
pub fn archive(path: &Path, out: impl Write) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("could not find {} in the container: {e}", path.display()),
        )
    })?;
    let mut b = tar::Builder::new(io::BufWriter::with_capacity(1 << 16, out));
    b.mode(tar::HeaderMode::Complete);
    b.follow_symlinks(false);
    let name = top_name(path);
    if meta.is_dir() {
        b.append_dir_all(&name, path)?;
    } else {
        b.append_path_with_name(path, &name)?;
    }
    b.into_inner()?.flush()
}

/// Relative, normal components only (an archive from the host is trusted
/// input, but a stray `..` must not climb out of the destination).
fn clean(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Unpacks the tar archive `input` at `dest` by docker's rules.
///
/// # Errors
/// `dest`'s parent does not exist, an entry cannot be written.
pub fn unpack(input: impl Read, dest: &Path) -> io::Result<()> {
    let (base, rename) = if dest.is_dir() {
        (dest.to_path_buf(), None)
    } else {
        let parent = dest.parent().unwrap_or(Path::new("/"));
        if !parent.is_dir() {
            return Err(io::Error::other(format!(
                "no such directory in the container: {}",
                parent.display()
            )));
        }
        (parent.to_path_buf(), dest.file_name().map(PathBuf::from))
    };
    let mut ar = tar::Archive::new(input);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    let mut top: Option<PathBuf> = None;
    for entry in ar.entries()? {
        let mut entry = entry?;
        let Some(rel) = clean(&entry.path()?) else {
            return Err(io::Error::other("an archive entry leaves the destination"));
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        let rel = match &rename {
            None => rel,
            Some(new) => {
                let first = rel
                    .components()
                    .next()
                    .map(|c| PathBuf::from(c.as_os_str()));
                let first = top
                    .get_or_insert_with(|| first.clone().unwrap_or_default())
                    .clone();
                match rel.strip_prefix(&first) {
                    Ok(rest) => new.join(rest),
                    Err(_) => rel,
                }
            }
        };
        if let Some(parent) = rel.parent() {
            std::fs::create_dir_all(base.join(parent))?;
        }
        entry.unpack(base.join(&rel))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn archives_unpack_by_dockers_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("tree");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::write(src.join("a/b/f"), "hello").unwrap();
        std::fs::set_permissions(src.join("a/b/f"), std::fs::Permissions::from_mode(0o751))
            .unwrap();
        std::os::unix::fs::symlink("/etc", src.join("link")).unwrap();
        let mut tar = Vec::new();
        archive(&src, &mut tar).unwrap();

        // Into an existing directory: tree/ inside it.
        let into = tmp.path().join("into");
        std::fs::create_dir(&into).unwrap();
        unpack(tar.as_slice(), &into).unwrap();
        assert_eq!(
            std::fs::read_to_string(into.join("tree/a/b/f")).unwrap(),
            "hello"
        );
        let mode = std::fs::metadata(into.join("tree/a/b/f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o751);
        assert_eq!(
            std::fs::read_link(into.join("tree/link")).unwrap(),
            Path::new("/etc")
        );

        // To a new name: the tree becomes it.
        let renamed = tmp.path().join("copy");
        unpack(tar.as_slice(), &renamed).unwrap();
        assert_eq!(
            std::fs::read_to_string(renamed.join("a/b/f")).unwrap(),
            "hello"
        );

        // A missing parent is an error; so is a missing source.
        assert!(unpack(tar.as_slice(), &tmp.path().join("no/such")).is_err());
        assert!(archive(&tmp.path().join("none"), Vec::new()).is_err());
    }
}
