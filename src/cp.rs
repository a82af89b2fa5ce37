//! `hull cp`: files between a running container and the host, as tar
//! archives over the control channel (the guest's side is
//! `guest-init/src/init/copy.rs`; the monitor relays it like an exec).
//!
//! What comes from the guest is hostile. The host reads its archive with
//! bounded memory (GNU long names and links capped at 64 KiB, PAX headers
//! at 1 MiB, as the image store's tar walk caps them) and unpacks it with
//! every directory opened beneath the destination (`openat2`
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`): no entry, symlink or hard
//! link can write outside it. Device nodes and sockets are skipped.

use std::ffi::{CString, OsStr};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};

use hull_protocol::frame::Frame;
use tar::EntryType;

use crate::container::Containers;
use crate::flags::UsageError;
use crate::monitor::Request;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Largest GNU long name or link accepted.
const MAX_LONG_NAME: u64 = 64 * 1024;
/// Largest PAX extended header accepted.
const MAX_PAX: u64 = 1 << 20;
/// Most of the guest's error text kept while it arrives.
const MAX_MESSAGE: usize = 4096;
/// Most of the guest's error text shown.
const MAX_SHOWN: usize = 1024;
/// Chunks of an archive sent to the guest.
const CHUNK: usize = 64 << 10;
/// `RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`.
const BENEATH: u64 = 0x04 | 0x08;

fn usage(msg: impl Into<String>) -> Box<dyn std::error::Error> {
    Box::new(UsageError(msg.into()))
}

/// One side of `hull cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    /// `CONTAINER:PATH`.
    Container(String, String),
    /// A host path.
    Host(PathBuf),
    /// `-`: a tar archive on stdin or stdout.
    Stream,
}

/// Parses an operand as docker does: `NAME:PATH` is a container's unless it
/// starts like a path (`/`, `.`).
#[must_use]
pub fn parse_operand(s: &str) -> Operand {
    if s == "-" {
        return Operand::Stream;
    }
    if !s.starts_with('/') && !s.starts_with('.') {
        if let Some((c, p)) = s.split_once(':') {
            if !c.is_empty() {
                return Operand::Container(c.to_string(), p.to_string());
            }
        }
    }
    Operand::Host(PathBuf::from(s))
}

/// `hull cp SRC DEST`; `keep_owners` (`-a`) keeps the archive's owners on
/// the host when copying out.
///
/// # Errors
/// Bad operands, the container is not running, the copy failed.
pub fn cp(source: &str, destination: &str, keep_owners: bool) -> Result<()> {
    let (src, dst) = (parse_operand(source), parse_operand(destination));
    let store = images::Store::open(None)?;
    let containers = Containers::new(store.root());
    match (src, dst) {
        (Operand::Container(c, path), to @ (Operand::Host(_) | Operand::Stream)) => {
            let path = absolute(&path)?;
            let container = containers.find(&c)?;
            let stream = crate::client::connect(&store, &container)?;
            let mut archive = start(stream, &Request::CopyOut { path: path.clone() })?;
            match to {
                Operand::Host(dest) => {
                    unpack_on_host(&mut archive, &dest, top_name(&path).as_deref(), keep_owners)?;
                }
                _ => {
                    io::copy(&mut archive, &mut io::stdout().lock())?;
                }
            }
            archive.finish()
        }
        (from @ (Operand::Host(_) | Operand::Stream), Operand::Container(c, path)) => {
            let path = absolute(&path)?;
            let container = containers.find(&c)?;
            if let Operand::Host(src) = &from {
                std::fs::symlink_metadata(src).map_err(|e| {
                    usage(format!("cannot copy {}: {e}", src.display()))
                })?;
            }
            let stream = crate::client::connect(&store, &container)?;
            let writer = stream.try_clone()?;
            let mut session = start(stream, &Request::CopyIn { path })?;
            let sender = std::thread::spawn(move || -> std::result::Result<(), String> {
                let mut out = FrameWriter(writer);
                match from {
                    Operand::Host(src) => archive_host(&src, &mut out).map_err(|e| e.to_string())?,
                    _ => {
                        io::copy(&mut io::stdin().lock(), &mut out).map_err(|e| e.to_string())?;
                    }
                }
                Frame::StdinEof
                    .write_to(&mut out.0)
                    .map_err(|e| e.to_string())
            });
            // The guest's answer (it may fail before reading everything).
            io::copy(&mut session, &mut io::sink())?;
            let result = session.finish();
            let sent = sender.join().map_err(|_| "the archive sender panicked")?;
            result?;
            sent.map_err(|e| usage(format!("cannot send the archive: {e}")))
        }
        (Operand::Container(..), Operand::Container(..)) => Err(usage(
            "copying between containers is not supported: copy through the host",
        )),
        _ => Err(usage(
            "one of SRC and DEST must be CONTAINER:PATH (hull cp CONTAINER:PATH HOSTPATH, or HOSTPATH CONTAINER:PATH)",
        )),
    }
}

fn absolute(p: &str) -> Result<String> {
    if p.starts_with('/') {
        Ok(p.to_string())
    } else if p.is_empty() {
        Ok("/".into())
    } else {
        // docker takes container paths relative to the root.
        Ok(format!("/{p}"))
    }
}

/// The guest's text as it may reach the user's terminal: no control or
/// formatting characters (escape sequences, carriage returns, bidi
/// overrides), one line, at most `MAX_SHOWN` bytes.
fn shown(text: &str) -> String {
    let mut out = String::new();
    for word in text
        .split(|c: char| c.is_control() || c.is_whitespace() || is_format(c))
        .filter(|w| !w.is_empty())
    {
        let sep = usize::from(!out.is_empty());
        if out.len() + sep + word.len() > MAX_SHOWN {
            if !out.is_empty() {
                out.push(' ');
            }
            for c in word.chars() {
                if out.len() + c.len_utf8() > MAX_SHOWN {
                    break;
                }
                out.push(c);
            }
            break;
        }
        if sep == 1 {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Unicode's invisible formatting characters a terminal may act on.
fn is_format(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// Chunks what is written into `Stdin` frames.
struct FrameWriter(UnixStream);

impl Write for FrameWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK);
        Frame::Stdin(buf[..n].to_vec())
            .write_to(&mut self.0)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The guest's side of a copy: its stdout as a reader, then how it ended.
struct Session {
    stream: UnixStream,
    buf: Vec<u8>,
    pos: usize,
    end: Option<std::result::Result<(), String>>,
    message: String,
}

fn start(mut stream: UnixStream, request: &Request) -> Result<Session> {
    Frame::Spec(serde_json::to_vec(request)?).write_to(&mut stream)?;
    Ok(Session {
        stream,
        buf: Vec::new(),
        pos: 0,
        end: None,
        message: String::new(),
    })
}

impl Session {
    fn next(&mut self) -> io::Result<bool> {
        loop {
            if self.end.is_some() {
                return Ok(false);
            }
            let frame = match Frame::read_from(&mut self.stream) {
                Ok(f) => f,
                Err(hull_protocol::frame::ProtocolError::Closed) => {
                    self.end = Some(Err("the container's monitor went away".into()));
                    return Ok(false);
                }
                Err(e) => return Err(io::Error::other(e.to_string())),
            };
            match frame {
                Frame::Stdout(data) => {
                    self.buf = data;
                    self.pos = 0;
                    return Ok(true);
                }
                Frame::Stderr(data) => {
                    let room = MAX_MESSAGE.saturating_sub(self.message.len());
                    let text = String::from_utf8_lossy(&data[..data.len().min(room)]).into_owned();
                    self.message.push_str(&text);
                }
                Frame::Exited(0) => self.end = Some(Ok(())),
                Frame::Exited(code) => {
                    let m = shown(&self.message);
                    self.end = Some(Err(if m.is_empty() {
                        format!("the copy failed in the container (status {code})")
                    } else {
                        m
                    }));
                }
                Frame::Failed { message, .. } => self.end = Some(Err(shown(&message))),
                _ => {}
            }
        }
    }

    /// How the guest ended the copy.
    fn finish(mut self) -> Result<()> {
        while self.next()? {}
        match self.end.take() {
            Some(Ok(())) => Ok(()),
            Some(Err(m)) => Err(usage(m)),
            None => Err(usage("the copy ended without a result")),
        }
    }
}

impl Read for Session {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            if !self.next()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Writes a tar archive of host path `src` (as `basename(src)`) to `out`.
fn archive_host(src: &Path, out: impl Write) -> Result<()> {
    let name = src
        .file_name()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let mut b = tar::Builder::new(io::BufWriter::with_capacity(1 << 16, out));
    b.mode(tar::HeaderMode::Complete);
    b.follow_symlinks(false);
    if std::fs::symlink_metadata(src)?.is_dir() {
        b.append_dir_all(&name, src)?;
    } else {
        b.append_path_with_name(src, &name)?;
    }
    b.into_inner()?.flush()?;
    Ok(())
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("a NUL byte in a path"))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe {
        libc::open(
            cstr(path)?.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    // SAFETY: open returned a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `rel` beneath `dir`, refusing any symlink on the way and anything
/// that would leave `dir`.
fn open_beneath(dir: BorrowedFd<'_>, rel: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `open_how` is plain data; all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = u64::from((flags | libc::O_CLOEXEC).cast_unsigned());
    how.resolve = BENEATH;
    let p = if rel.as_os_str().is_empty() {
        CString::from(c".")
    } else {
        cstr(rel)?
    };
    // SAFETY: valid C string and `open_how` of the size passed; borrowed fd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            p.as_ptr(),
            std::ptr::addr_of!(how),
            std::mem::size_of::<libc::open_how>(),
        )
    };
    let fd = libc::c_int::try_from(r).unwrap_or(-1);
    check(fd)?;
    // SAFETY: openat2 returned a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Relative, normal components only.
fn clean(p: &[u8]) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(p)).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// One archive member, extension headers applied.
struct Member {
    path: Vec<u8>,
    link: Vec<u8>,
    kind: EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

fn read_capped(r: &mut impl Read, size: u64, limit: u64, what: &str) -> io::Result<Vec<u8>> {
    if size > limit {
        return Err(io::Error::other(format!(
            "the container sent a {what} of {size} bytes (the limit is {limit})"
        )));
    }
    let mut v = Vec::new();
    r.take(size).read_to_end(&mut v)?;
    Ok(v)
}

fn pax_records(data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Some(sp) = rest.iter().position(|b| *b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= sp + 1 || len > rest.len() {
            break;
        }
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(eq) = rec.iter().position(|b| *b == b'=') {
            out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        }
        rest = &rest[len..];
    }
    out
}

/// The name an archive of container path `path` holds it under (as the
/// guest's `copy::top_name` names it): `basename(path)`, or `None` when
/// the archive is the contents of a directory (`/`, `..`).
fn top_name(path: &str) -> Option<std::ffi::OsString> {
    Path::new(path).file_name().map(OsStr::to_os_string)
}

/// Where archive entry `rel` goes beneath the destination: under the
/// expected top name `top` (renamed to `rename` when given), or `None` when
/// the entry is not under `top` (a hostile guest adding siblings).
fn place(rel: &Path, top: Option<&OsStr>, rename: Option<&Path>) -> Option<PathBuf> {
    let rest = match top {
        Some(t) => {
            if rel.as_os_str().is_empty() {
                return Some(PathBuf::new());
            }
            let mut c = rel.components();
            if c.next().map(Component::as_os_str) != Some(t) {
                return None;
            }
            c.as_path()
        }
        None => rel,
    };
    Some(match rename {
        Some(new) if rest.as_os_str().is_empty() => new.to_path_buf(),
        Some(new) => new.join(rest),
        None => rel.to_path_buf(),
    })
}

/// Unpacks the guest's archive of a container path whose basename is `top`
/// (`None`: the contents of a directory) at host path `dest` by docker's
/// rules: into `dest` if it is a directory, else `top` becomes `dest`.
/// Every entry (and hard link target) must sit under `top`; a directory
/// that already exists on the host keeps its owner and mode. What is made
/// belongs to the invoking user unless `keep_owners` (`--archive`), and
/// keeps setuid/setgid bits only where the archive's owner was kept.
///
/// # Errors
/// `dest`'s parent does not exist, the archive is bad or oversized, an
/// entry would leave the destination or is not under `top`.
pub fn unpack_on_host(
    input: &mut impl Read,
    dest: &Path,
    top: Option<&OsStr>,
    keep_owners: bool,
) -> Result<()> {
    let (base, rename) = match std::fs::metadata(dest) {
        Ok(m) if m.is_dir() => (dest.to_path_buf(), None),
        _ => {
            let parent = match dest.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let name = dest
                .file_name()
                .ok_or_else(|| usage(format!("invalid destination {}", dest.display())))?;
            (parent, Some(PathBuf::from(name)))
        }
    };
    let dir =
        open_dir(&base).map_err(|e| usage(format!("cannot copy to {}: {e}", base.display())))?;
    let mut ar = tar::Archive::new(input);
    let mut entries = ar.entries()?.raw(true);
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut made = std::collections::HashSet::new();
    for entry in entries.by_ref() {
        let mut entry = entry?;
        let h = entry.header().clone();
        let kind = h.entry_type();
        let size = h.entry_size()?;
        match kind {
            EntryType::GNULongName => {
                long_name = Some(read_capped(&mut entry, size, MAX_LONG_NAME, "long name")?);
                continue;
            }
            EntryType::GNULongLink => {
                long_link = Some(read_capped(&mut entry, size, MAX_LONG_NAME, "long link")?);
                continue;
            }
            EntryType::XHeader => {
                pax = pax_records(&read_capped(&mut entry, size, MAX_PAX, "PAX header")?);
                continue;
            }
            EntryType::XGlobalHeader => continue,
            _ => {}
        }
        let mut m = Member {
            path: long_name
                .take()
                .unwrap_or_else(|| h.path_bytes().into_owned()),
            link: long_link.take().unwrap_or_else(|| {
                h.link_name_bytes()
                    .map(std::borrow::Cow::into_owned)
                    .unwrap_or_default()
            }),
            kind,
            mode: h.mode().unwrap_or(0o644),
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
            mtime: h.mtime().unwrap_or(0),
        };
        for (k, v) in std::mem::take(&mut pax) {
            match k.as_slice() {
                b"path" => m.path = v,
                b"linkpath" => m.link = v,
                b"size"
                    if std::str::from_utf8(&v)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        != Some(size) =>
                {
                    return Err(usage(
                        "the container's archive has a PAX size override (not supported)",
                    ));
                }
                _ => {}
            }
        }
        let Some(rel) = clean(&m.path) else {
            return Err(usage(
                "the container's archive has an entry outside the destination",
            ));
        };
        let Some(rel) = place(&rel, top, rename.as_deref()) else {
            return Err(usage(
                "the container's archive has an entry outside the copied path",
            ));
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        let link = if m.kind == EntryType::Link {
            match clean(&m.link).and_then(|t| place(&t, top, rename.as_deref())) {
                Some(t) if !t.as_os_str().is_empty() => Some(t),
                _ => {
                    return Err(usage(
                        "the container's archive links outside the copied path",
                    ))
                }
            }
        } else {
            None
        };
        write_member(
            dir.as_fd(),
            &rel,
            &m,
            &mut entry,
            keep_owners,
            link.as_deref(),
            &mut made,
        )?;
    }
    Ok(())
}

/// Creates the parents of `rel` beneath `dir` (noting those it made in
/// `made`); returns the parent's fd and the name.
fn parent_of(
    dir: BorrowedFd<'_>,
    rel: &Path,
    made: &mut std::collections::HashSet<PathBuf>,
) -> io::Result<(OwnedFd, CString)> {
    let name = rel
        .file_name()
        .ok_or_else(|| io::Error::other("an entry without a name"))?;
    let mut cur = open_beneath(dir, Path::new(""), libc::O_RDONLY | libc::O_DIRECTORY)?;
    if let Some(parent) = rel.parent() {
        let mut sofar = PathBuf::new();
        for c in parent.components() {
            sofar.push(c);
            let c = cstr(Path::new(c.as_os_str()))?;
            // SAFETY: valid C string and descriptor.
            let r = unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), 0o755) };
            if r == 0 {
                made.insert(sofar.clone());
            } else if io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return Err(io::Error::last_os_error());
            }
            cur = open_beneath(
                cur.as_fd(),
                Path::new(OsStr::from_bytes(c.as_bytes())),
                libc::O_RDONLY | libc::O_DIRECTORY,
            )?;
        }
    }
    Ok((cur, cstr(Path::new(name))?))
}

/// Removes what is at `name` in `dir` unless it is a directory.
fn clear(dir: BorrowedFd<'_>, name: &CString) {
    // SAFETY: valid C string and descriptor; failure (nothing there, a
    // directory) is fine.
    unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
}

fn write_member(
    dir: BorrowedFd<'_>,
    rel: &Path,
    m: &Member,
    data: &mut impl Read,
    keep_owners: bool,
    link: Option<&Path>,
    made: &mut std::collections::HashSet<PathBuf>,
) -> Result<()> {
    let (parent, name) = parent_of(dir, rel, made)?;
    let p = parent.as_raw_fd();
    // docker's rules: what is copied out belongs to the invoking user
    // unless `--archive` keeps the archive's owners; setuid and setgid bits
    // stay only on a file whose owner was kept.
    let owner = |fd: libc::c_int, name: Option<&CString>| -> bool {
        if !keep_owners {
            return false;
        }
        let (Ok(uid), Ok(gid)) = (libc::uid_t::try_from(m.uid), libc::gid_t::try_from(m.gid))
        else {
            return false;
        };
        // SAFETY: valid descriptor (and C string); failure (not root, an
        // owner the host refuses) leaves the invoking user's.
        let r = unsafe {
            match name {
                Some(n) => libc::fchownat(fd, n.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW),
                None => libc::fchown(fd, uid, gid),
            }
        };
        r == 0
    };
    let perm = |kept: bool| {
        if kept {
            m.mode & 0o7777
        } else {
            m.mode & 0o1777
        }
    };
    let times = |fd: libc::c_int| {
        let t = libc::timespec {
            tv_sec: m.mtime.try_into().unwrap_or(0),
            tv_nsec: 0,
        };
        // SAFETY: valid descriptor and two timespecs.
        unsafe { libc::futimens(fd, [t, t].as_ptr()) };
    };
    match m.kind {
        EntryType::Directory => {
            // SAFETY: valid C string and descriptor.
            let r = unsafe { libc::mkdirat(p, name.as_ptr(), 0o700) };
            if r == 0 {
                made.insert(rel.to_path_buf());
            } else if io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return Err(io::Error::last_os_error().into());
            }
            let d = open_beneath(
                parent.as_fd(),
                Path::new(OsStr::from_bytes(name.as_bytes())),
                libc::O_RDONLY | libc::O_DIRECTORY,
            )?;
            // A directory that was on the host before this copy keeps its
            // owner, mode and times.
            if !made.contains(rel) {
                return Ok(());
            }
            let kept = owner(d.as_raw_fd(), None);
            // SAFETY: valid descriptor.
            unsafe { libc::fchmod(d.as_raw_fd(), perm(kept)) };
            times(d.as_raw_fd());
        }
        EntryType::Regular | EntryType::Continuous => {
            clear(parent.as_fd(), &name);
            // SAFETY: valid C string and descriptor; the result is checked.
            let fd = unsafe {
                libc::openat(
                    p,
                    name.as_ptr(),
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    0o600,
                )
            };
            check(fd)?;
            // SAFETY: a new descriptor nobody else owns.
            let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
            io::copy(data, &mut f)?;
            let kept = owner(f.as_raw_fd(), None);
            // SAFETY: valid descriptor.
            unsafe { libc::fchmod(f.as_raw_fd(), perm(kept)) };
            times(f.as_raw_fd());
        }
        EntryType::Symlink => {
            clear(parent.as_fd(), &name);
            let target = CString::new(m.link.clone()).map_err(|_| "a NUL byte in a link")?;
            // SAFETY: valid C strings and descriptor.
            check(unsafe { libc::symlinkat(target.as_ptr(), p, name.as_ptr()) })?;
            owner(p, Some(&name));
        }
        EntryType::Link => {
            let Some(target) = link else {
                return Err(usage(
                    "the container's archive links outside the destination",
                ));
            };
            let (tparent, tname) = parent_of(dir, target, made)?;
            clear(parent.as_fd(), &name);
            // SAFETY: valid C strings and descriptors; no symlink is followed.
            check(unsafe {
                libc::linkat(tparent.as_raw_fd(), tname.as_ptr(), p, name.as_ptr(), 0)
            })?;
        }
        EntryType::Fifo => {
            clear(parent.as_fd(), &name);
            // SAFETY: valid C string and descriptor.
            check(unsafe { libc::mkfifoat(p, name.as_ptr(), perm(false)) })?;
            owner(p, Some(&name));
        }
        // Device nodes and anything else are not made on the host.
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: EntryType, path: &str, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_path(path).unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    #[test]
    fn guest_messages_are_one_short_clean_line() {
        assert_eq!(
            shown("no such file\n\x1b]0;owned\x07\r\u{202e}txt.exe\t x"),
            "no such file ]0;owned txt.exe x"
        );
        assert_eq!(shown(" \n "), "");
        let long = shown(&"é".repeat(4096));
        assert!(
            long.len() <= MAX_SHOWN && long.len() > MAX_SHOWN - 2,
            "{}",
            long.len()
        );
        assert!(!long.contains(char::is_control));
        // Through a session: the guest's stderr, and its Failed message.
        for end in [
            Frame::Exited(1),
            Frame::Failed {
                code: 125,
                message: "bad\x1b[2J\nthing".into(),
            },
        ] {
            let (host, mut guest) = UnixStream::pair().unwrap();
            let session = start(host, &Request::CopyOut { path: "/x".into() }).unwrap();
            Frame::Stderr(b"bad\x1b[2J\nthing\n".to_vec())
                .write_to(&mut guest)
                .unwrap();
            end.write_to(&mut guest).unwrap();
            let err = session.finish().unwrap_err().to_string();
            assert_eq!(err, "bad [2J thing");
        }
    }

    #[test]
    fn operands_follow_docker() {
        assert_eq!(parse_operand("-"), Operand::Stream);
        assert_eq!(
            parse_operand("web:/etc"),
            Operand::Container("web".into(), "/etc".into())
        );
        assert_eq!(parse_operand("/tmp/a:b"), Operand::Host("/tmp/a:b".into()));
        assert_eq!(parse_operand("./x:y"), Operand::Host("./x:y".into()));
        assert_eq!(parse_operand("plain"), Operand::Host("plain".into()));
    }

    #[test]
    fn unpacks_a_tree_and_renames_its_top() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("l")).unwrap();
        let mut tar = Vec::new();
        archive_host(&src, &mut tar).unwrap();
        let into = tmp.path().join("into");
        std::fs::create_dir(&into).unwrap();
        unpack_on_host(&mut tar.as_slice(), &into, Some(OsStr::new("src")), false).unwrap();
        assert_eq!(std::fs::read_to_string(into.join("src/d/f")).unwrap(), "x");
        assert_eq!(
            std::fs::read_link(into.join("src/l")).unwrap(),
            Path::new("/etc/passwd")
        );
        let renamed = tmp.path().join("renamed");
        unpack_on_host(
            &mut tar.as_slice(),
            &renamed,
            Some(OsStr::new("src")),
            false,
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(renamed.join("d/f")).unwrap(), "x");
    }

    #[test]
    fn hostile_archives_cannot_write_outside_the_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        // A symlink to a directory outside, then a file through it.
        let evil = tar_of(|b| {
            let mut h = header(EntryType::Symlink, "top/esc", 0);
            h.set_link_name(outside.to_str().unwrap()).unwrap();
            h.set_cksum();
            b.append(&h, io::empty()).unwrap();
            b.append(&header(EntryType::Regular, "top/esc/pwned", 1), &b"x"[..])
                .unwrap();
        });
        assert!(
            unpack_on_host(&mut evil.as_slice(), &dest, Some(OsStr::new("top")), false).is_err()
        );
        assert!(!outside.join("pwned").exists());
        // `..` in a path, and a hard link to a host file.
        let mut dotdot = header(EntryType::Regular, "x", 1);
        dotdot.as_gnu_mut().unwrap().name[..6].copy_from_slice(b"../pwn");
        dotdot.set_cksum();
        let up = tar_of(|b| b.append(&dotdot, &b"x"[..]).unwrap());
        assert!(unpack_on_host(&mut up.as_slice(), &dest, Some(OsStr::new("top")), false).is_err());
        assert!(!tmp.path().join("pwn").exists());
        let link = tar_of(|b| {
            let mut h = header(EntryType::Link, "top/hl", 0);
            h.as_gnu_mut().unwrap().linkname[..16].copy_from_slice(b"../../etc/passwd");
            h.set_cksum();
            b.append(&h, io::empty()).unwrap();
        });
        assert!(
            unpack_on_host(&mut link.as_slice(), &dest, Some(OsStr::new("top")), false).is_err()
        );
    }

    /// `hull cp web:/var/log/app.log ~/` with a guest that adds siblings:
    /// nothing but `app.log` lands, into a directory or renamed, and a
    /// directory already on the host keeps its mode.
    #[test]
    fn hostile_archives_cannot_add_siblings_of_the_copied_path() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let sibling = tar_of(|b| {
            b.append(&header(EntryType::Regular, "app.log", 1), &b"x"[..])
                .unwrap();
            b.append(&header(EntryType::Directory, ".ssh", 0), io::empty())
                .unwrap();
            b.append(
                &header(EntryType::Regular, ".ssh/authorized_keys", 3),
                &b"key"[..],
            )
            .unwrap();
        });
        let app = Some(OsStr::new("app.log"));
        assert!(unpack_on_host(&mut sibling.as_slice(), &home, app, false).is_err());
        assert!(!home.join(".ssh").exists());
        assert_eq!(std::fs::read(home.join("app.log")).unwrap(), b"x");
        // Renamed: the sibling is not put beside the new name either.
        assert!(
            unpack_on_host(&mut sibling.as_slice(), &home.join("copy.log"), app, false).is_err()
        );
        assert!(!home.join(".ssh").exists());
        assert_eq!(std::fs::read(home.join("copy.log")).unwrap(), b"x");
        // A hard link to a sibling's path.
        let link = tar_of(|b| {
            let mut h = header(EntryType::Link, "app.log", 0);
            h.set_link_name(".bashrc").unwrap();
            h.set_cksum();
            b.append(&h, io::empty()).unwrap();
        });
        std::fs::write(home.join(".bashrc"), "mine").unwrap();
        assert!(unpack_on_host(&mut link.as_slice(), &home.join("new"), app, false).is_err());
        assert!(!home.join("new").exists());
        // `hull cp web:/data ~/` with a ~/data already there: its mode stays.
        std::fs::create_dir(home.join("data")).unwrap();
        std::fs::set_permissions(home.join("data"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        let data = tar_of(|b| {
            let mut h = header(EntryType::Directory, "data", 0);
            h.set_mode(0o777);
            h.set_cksum();
            b.append(&h, io::empty()).unwrap();
            b.append(&header(EntryType::Regular, "data/f", 1), &b"y"[..])
                .unwrap();
        });
        unpack_on_host(&mut data.as_slice(), &home, Some(OsStr::new("data")), false).unwrap();
        let mode = std::fs::metadata(home.join("data"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o700);
        assert_eq!(std::fs::read(home.join("data/f")).unwrap(), b"y");
        // A directory's contents (`hull cp web:/ dir`) go under the new name.
        let root = tar_of(|b| {
            b.append(&header(EntryType::Directory, "./", 0), io::empty())
                .unwrap();
            b.append(&header(EntryType::Regular, "./etc", 1), &b"z"[..])
                .unwrap();
        });
        unpack_on_host(&mut root.as_slice(), &home.join("rootfs"), None, false).unwrap();
        assert_eq!(std::fs::read(home.join("rootfs/etc")).unwrap(), b"z");
    }

    /// What is copied out belongs to the invoking user and loses setuid and
    /// setgid, as docker does; `--archive` keeps owners (as root) and with
    /// them the bits.
    #[test]
    fn copied_out_files_belong_to_the_user_without_setuid() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let suid = tar_of(|b| {
            let mut h = header(EntryType::Directory, "d", 0);
            h.set_mode(0o3775);
            h.set_uid(1234);
            h.set_gid(1234);
            h.set_cksum();
            b.append(&h, io::empty()).unwrap();
            let mut h = header(EntryType::Regular, "d/sh", 1);
            h.set_mode(0o6755);
            h.set_uid(1234);
            h.set_gid(1234);
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
        });
        // SAFETY: geteuid and getegid cannot fail.
        let (me, group) = unsafe { (libc::geteuid(), libc::getegid()) };
        let plain = tmp.path().join("plain");
        std::fs::create_dir(&plain).unwrap();
        unpack_on_host(&mut suid.as_slice(), &plain, Some(OsStr::new("d")), false).unwrap();
        for (p, mode) in [("d", 0o1775), ("d/sh", 0o755)] {
            let m = std::fs::metadata(plain.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (me, group), "{p}");
            assert_eq!(m.mode() & 0o7777, mode, "{p}");
        }
        let kept = tmp.path().join("kept");
        std::fs::create_dir(&kept).unwrap();
        unpack_on_host(&mut suid.as_slice(), &kept, Some(OsStr::new("d")), true).unwrap();
        let m = std::fs::metadata(kept.join("d/sh")).unwrap();
        if me == 0 {
            assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1234, 1234, 0o6755));
        } else {
            // Not root: the owner could not be kept, so neither are the bits.
            assert_eq!((m.uid(), m.mode() & 0o7777), (me, 0o755));
        }
    }

    #[test]
    fn oversized_long_names_are_refused_unread() {
        let tmp = tempfile::tempdir().unwrap();
        let mut h = header(EntryType::GNULongName, "././@LongLink", 1 << 30);
        h.set_cksum();
        let mut data = h.as_bytes().to_vec();
        data.extend_from_slice(&[0u8; 1024]);
        let err = unpack_on_host(&mut data.as_slice(), tmp.path(), None, false).unwrap_err();
        assert!(err.to_string().contains("long name"), "{err}");
    }
}
