//! Thin safe wrappers over the Linux calls the unpacker and the init use.
//!
//! Every path taken here is a single component or a relative path under a
//! directory file descriptor; none of these wrappers resolves anything on its
//! own beyond what the kernel call named does.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A C string from bytes (paths, names, values).
///
/// # Errors
/// The bytes contain a NUL.
pub fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL"))
}

/// Turns a `-1`-on-error return into a `Result`.
///
/// # Errors
/// `ret` is negative: the current `errno`.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Runs a call again while it fails with `EINTR`.
fn retry(mut f: impl FnMut() -> libc::c_int) -> io::Result<libc::c_int> {
    loop {
        match check(f()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Takes ownership of a descriptor a call just returned.
fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(fd)?;
    // SAFETY: the kernel just returned this descriptor to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat(2)`; `O_CLOEXEC` is always added.
///
/// # Errors
/// The call failed.
pub fn openat(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: `path` is a valid C string; the descriptor is borrowed for the call.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                path.as_ptr(),
                flags | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        };
        match owned(fd) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// `open(2)` of an absolute or cwd-relative path; `O_CLOEXEC` is always added.
///
/// # Errors
/// The call failed.
pub fn open(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: `path` is a valid C string.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                flags | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        };
        match owned(fd) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// `openat2(2)` with `resolve` flags; `O_CLOEXEC` is always added.
///
/// # Errors
/// The call failed (`ENOSYS` on kernels older than 5.6).
pub fn openat2(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
    resolve: u64,
) -> io::Result<OwnedFd> {
    // SAFETY: `open_how` is plain data; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = u64::from((flags | libc::O_CLOEXEC).cast_unsigned());
    how.resolve = resolve;
    loop {
        // SAFETY: `path` is a valid C string and `how` a valid `open_how` whose
        // size we pass; the descriptor is borrowed for the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                std::ptr::addr_of!(how),
                std::mem::size_of::<libc::open_how>(),
            )
        };
        let fd = libc::c_int::try_from(ret).unwrap_or(-1);
        match owned(fd) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// `fstatat(2)`; `AT_SYMLINK_NOFOLLOW` when `nofollow`.
///
/// # Errors
/// The call failed.
pub fn fstatat(dir: BorrowedFd<'_>, path: &CStr, nofollow: bool) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: valid C string, valid out pointer, borrowed descriptor.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), path.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

/// `fstat(2)`.
///
/// # Errors
/// The call failed.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer, borrowed descriptor.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// The file type bits of a mode.
#[must_use]
pub fn file_type(mode: libc::mode_t) -> libc::mode_t {
    mode & libc::S_IFMT
}

/// `mkdirat(2)`.
///
/// # Errors
/// The call failed.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid C string, borrowed descriptor.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })?;
    Ok(())
}

/// `unlinkat(2)`; `AT_REMOVEDIR` when `dir_flag`.
///
/// # Errors
/// The call failed.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, dir_flag: bool) -> io::Result<()> {
    let flags = if dir_flag { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid C string, borrowed descriptor.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    Ok(())
}

/// `symlinkat(2)`: creates `dir/name` pointing at `target`.
///
/// # Errors
/// The call failed.
pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings, borrowed descriptor.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
    Ok(())
}

/// `linkat(2)` without following a final symlink.
///
/// # Errors
/// The call failed.
pub fn linkat(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
) -> io::Result<()> {
    // SAFETY: valid C strings, borrowed descriptors.
    check(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            0,
        )
    })?;
    Ok(())
}

/// `mknodat(2)`.
///
/// # Errors
/// The call failed.
pub fn mknodat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
    dev: libc::dev_t,
) -> io::Result<()> {
    // SAFETY: valid C string, borrowed descriptor.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) })?;
    Ok(())
}

/// `readlinkat(2)`, for links of up to `PATH_MAX` bytes.
///
/// # Errors
/// The call failed, or the target is longer than `PATH_MAX`.
pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4097];
    // SAFETY: valid C string, buffer of the given length, borrowed descriptor.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    if n >= buf.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    buf.truncate(n);
    Ok(buf)
}

/// `fchownat(2)` without following a final symlink.
///
/// # Errors
/// The call failed.
pub fn lchownat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    uid: libc::uid_t,
    gid: libc::gid_t,
) -> io::Result<()> {
    // SAFETY: valid C string, borrowed descriptor.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// `fchown(2)`.
///
/// # Errors
/// The call failed.
pub fn fchown(fd: BorrowedFd<'_>, uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: borrowed descriptor.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })?;
    Ok(())
}

/// `fchmod(2)`.
///
/// # Errors
/// The call failed.
pub fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: borrowed descriptor.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })?;
    Ok(())
}

/// `fchmodat(2)` (follows a final symlink: only for names we just created as
/// something else).
///
/// # Errors
/// The call failed.
pub fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid C string, borrowed descriptor.
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) })?;
    Ok(())
}

fn timespec(secs: i64, nsecs: u32) -> libc::timespec {
    // SAFETY: `timespec` is plain data; all-zero is a valid value.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    t.tv_sec = secs;
    t.tv_nsec = i64::from(nsecs.min(999_999_999));
    t
}

/// Sets access and modification times of `dir/name` (not following a final
/// symlink) to `secs.nsecs`.
///
/// # Errors
/// The call failed.
pub fn lutimensat(dir: BorrowedFd<'_>, name: &CStr, secs: i64, nsecs: u32) -> io::Result<()> {
    let ts = [timespec(secs, nsecs), timespec(secs, nsecs)];
    // SAFETY: valid C string, array of two timespecs, borrowed descriptor.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// Sets access and modification times of an open file.
///
/// # Errors
/// The call failed.
pub fn futimens(fd: BorrowedFd<'_>, secs: i64, nsecs: u32) -> io::Result<()> {
    let ts = [timespec(secs, nsecs), timespec(secs, nsecs)];
    // SAFETY: array of two timespecs, borrowed descriptor.
    check(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) })?;
    Ok(())
}

/// `fsetxattr(2)`.
///
/// # Errors
/// The call failed.
pub fn fsetxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: valid C string, buffer of the given length, borrowed descriptor.
    check(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })?;
    Ok(())
}

/// `lsetxattr(2)`.
///
/// # Errors
/// The call failed.
pub fn lsetxattr(path: &CStr, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: valid C strings, buffer of the given length.
    check(unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })?;
    Ok(())
}

/// `fgetxattr(2)` of a value of at most 64 KiB (for tests and checks).
///
/// # Errors
/// The call failed.
pub fn fgetxattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C string, buffer of the given length, borrowed descriptor.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    buf.truncate(n);
    Ok(buf)
}

/// The names in a directory (without `.` and `..`).
///
/// # Errors
/// The directory cannot be opened or read.
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    // A fresh open file description, so that the listing has its own offset
    // and `closedir` closes only it.
    let fd = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let raw: RawFd = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `raw` is an open directory descriptor we own; on success the
    // DIR stream owns it.
    let dirp = unsafe { libc::fdopendir(raw) };
    if dirp.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so we still own `raw`.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: resetting errno is how readdir's end is told from its errors.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dirp` is a valid open DIR stream.
        let ent = unsafe { libc::readdir(dirp) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated;
        // we copy it before the next readdir call.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        let b = name.to_bytes();
        if b != b"." && b != b".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `dirp` is a valid DIR stream, closed once.
    unsafe { libc::closedir(dirp) };
    result.map(|()| names)
}

/// A pipe: (read end, write end), both close-on-exec.
///
/// # Errors
/// The call failed.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: valid pointer to two ints.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Asks for a pipe buffer of `bytes` (`F_SETPIPE_SZ`; the kernel rounds
/// up to a power-of-two count of pages and caps unprivileged callers at
/// `/proc/sys/fs/pipe-max-size`).
///
/// # Errors
/// The kernel refused the size.
pub fn set_pipe_size(fd: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: borrowed descriptor; F_SETPIPE_SZ takes an int.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes) }).map(drop)
}

/// Sets or clears `O_NONBLOCK`.
///
/// # Errors
/// The call failed.
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: borrowed descriptor; F_GETFL takes no argument.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: borrowed descriptor; F_SETFL takes an int.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) })?;
    Ok(())
}

/// `read(2)`, retried on `EINTR`.
///
/// # Errors
/// The call failed (including `EAGAIN` on a non-blocking descriptor).
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buffer of the given length, borrowed descriptor.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// `write(2)`, retried on `EINTR`; may write less than asked.
///
/// # Errors
/// The call failed (including `EAGAIN` on a non-blocking descriptor).
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buffer of the given length, borrowed descriptor.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Writes all of `buf` to a blocking descriptor.
///
/// # Errors
/// The call failed.
pub fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = write(fd, buf)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// `mount(2)`.
///
/// # Errors
/// The call failed.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let (source, target, fstype) = (
        cstr(source.as_bytes())?,
        cstr(target.as_bytes())?,
        cstr(fstype.as_bytes())?,
    );
    let data = data.map(|d| cstr(d.as_bytes())).transpose()?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: valid C strings (or null data), as mount(2) takes them.
    retry(|| unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_ptr,
        )
    })?;
    Ok(())
}

/// `umount2(2)`.
///
/// # Errors
/// The call failed.
pub fn umount(target: &str, flags: libc::c_int) -> io::Result<()> {
    let target = cstr(target.as_bytes())?;
    // SAFETY: valid C string.
    retry(|| unsafe { libc::umount2(target.as_ptr(), flags) })?;
    Ok(())
}

/// `syncfs(2)` of the file system holding `fd`.
///
/// # Errors
/// The call failed.
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: borrowed descriptor.
    check(unsafe { libc::syncfs(fd.as_raw_fd()) })?;
    Ok(())
}

/// Whether the process runs as root (effective uid 0).
#[must_use]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}

/// `makedev(3)`.
#[must_use]
pub fn makedev(major: u32, minor: u32) -> libc::dev_t {
    libc::makedev(major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_pipe_widens_to_what_is_asked_and_refuses_nonsense() {
        let (r, _w) = pipe().unwrap();
        set_pipe_size(r.as_fd(), 256 << 10).unwrap();
        // SAFETY: borrowed descriptor; F_GETPIPE_SZ takes no argument.
        let size = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert_eq!(size, 256 << 10);
        assert!(set_pipe_size(r.as_fd(), -1).is_err());
    }
}
