//! Applying OCI image layers (tar streams) onto a root directory.
//!
//! Everything in a layer is hostile. Entry paths are normalized lexically and
//! refused when `..` would leave the root; every parent directory is resolved
//! *inside* the root (`openat2` with `RESOLVE_IN_ROOT`, or a component-by-
//! component walk that follows symlinks itself, clamped to the root), and the
//! final component is always handled with `*at` calls that never follow it.
//! So an absolute symlink `evil -> /etc` followed by `evil/x` writes
//! `ROOT/etc/x`, as docker and containerd do, and never the real `/etc/x`.
//!
//! OCI semantics: whiteouts `.wh.NAME` remove `NAME` from the layers below,
//! `.wh..wh..opq` empties a directory of the layers below (keeping what this
//! layer adds, wherever the marker sits in the stream); an entry replaces an
//! existing one of another type, an existing directory keeps its content.
//! Directory modes and times are applied once the whole layer is in, so that
//! a `0555` directory can still be filled.
//!
//! Memory stays bounded: file data is streamed, and GNU long names and PAX
//! headers (which the `tar` crate reads whole, with no limit) are read here,
//! capped, with the crate in raw mode.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;

use tar::EntryType;

use crate::sys;

/// Largest GNU long name or long link body accepted.
const MAX_LONG_NAME: u64 = 64 * 1024;
/// Largest PAX extended header body accepted.
const MAX_PAX: u64 = 1 << 20;
/// Longest entry path or link target accepted (the kernel's `PATH_MAX`).
const MAX_PATH: usize = 4096;
/// Deepest directory tree removed or walked recursively.
const MAX_DEPTH: usize = 512;
/// Most symlinks followed while resolving one path (the kernel's limit).
const MAX_SYMLINKS: u32 = 40;
/// Size of the copy buffer for file contents.
const COPY_BUF: usize = 256 * 1024;

/// The opaque-directory marker.
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of whiteout names.
const WHITEOUT: &[u8] = b".wh.";
/// Prefix of whiteout meta files (aufs), ignored.
const WHITEOUT_META: &[u8] = b".wh..wh.";

/// A layer could not be applied; the message names the layer and the entry.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UnpackError(pub String);

/// What applying one layer did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries applied (extension headers not counted).
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// Applies layers onto one root directory.
pub struct Unpacker {
    root: OwnedFd,
    /// Running as root: ownership is applied (skipped otherwise, for tests).
    chown: bool,
    /// `openat2` works here (cleared at its first `ENOSYS`/`EPERM`-like failure).
    openat2: bool,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Unpacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unpacker")
            .field("root", &self.root)
            .field("chown", &self.chown)
            .field("openat2", &self.openat2)
            .finish_non_exhaustive()
    }
}

/// One entry's metadata, extension headers applied.
#[derive(Debug)]
struct Meta {
    path: Vec<u8>,
    link: Vec<u8>,
    kind: EntryType,
    mode: libc::mode_t,
    uid: libc::uid_t,
    gid: libc::gid_t,
    mtime: (i64, u32),
    size: u64,
    dev: (u32, u32),
    xattrs: Vec<(CString, Vec<u8>)>,
}

/// Extension headers waiting for the entry they describe.
#[derive(Debug, Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

/// A directory whose mode and times are applied at the end of the layer.
#[derive(Debug)]
struct DeferredDir {
    path: Vec<u8>,
    mode: libc::mode_t,
    mtime: (i64, u32),
}

/// State for applying one layer.
struct Layer<'u, 'n> {
    u: &'u mut Unpacker,
    note: &'n mut dyn FnMut(String),
    /// Lexical paths this layer put in place, with all their ancestors.
    added: HashSet<Vec<u8>>,
    /// Directories to finish, in stream order; the index by path dedups.
    dirs: Vec<DeferredDir>,
    dir_index: HashMap<Vec<u8>, usize>,
    /// The last parent directory resolved, by lexical path.
    cache: Option<(Vec<u8>, Rc<OwnedFd>)>,
    /// xattr failures already noted (by errno), so notes do not flood.
    xattr_noted: HashSet<i32>,
    stats: LayerStats,
}

fn err(e: &io::Error) -> String {
    e.to_string()
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Splits a path into normal components: `.` and empty ones dropped, `..`
/// applied lexically; a leading `/` is ignored (layer paths are relative to
/// the root).
///
/// # Errors
/// A `..` would leave the root.
pub fn normalize(path: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err("path escapes the root".into());
                }
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

fn child_path(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, b"/", name].concat()
    }
}

/// Reads a whole extension body, refusing one longer than `cap`.
fn read_capped(r: &mut impl Read, size: u64, cap: u64, what: &str) -> Result<Vec<u8>, String> {
    if size > cap {
        return Err(format!("{what} of {size} bytes (limit {cap})"));
    }
    let mut v = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    r.take(cap)
        .read_to_end(&mut v)
        .map_err(|e| format!("reading a {what}: {e}"))?;
    Ok(v)
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// A PAX time (`secs[.frac]`) as seconds and nanoseconds.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nsecs = 0u32;
    let mut digits = 0;
    for c in frac.chars() {
        let d = c.to_digit(10)?;
        if digits < 9 {
            nsecs = nsecs * 10 + d;
            digits += 1;
        }
    }
    for _ in digits..9 {
        nsecs *= 10;
    }
    Some((secs, nsecs))
}

fn strip_nuls(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

impl Unpacker {
    /// An unpacker for the directory `root` (which must exist).
    ///
    /// # Errors
    /// `root` cannot be opened as a directory.
    pub fn new(root: &Path) -> io::Result<Self> {
        let p = sys::cstr(root.as_os_str().as_encoded_bytes())?;
        let root = sys::open(&p, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        Ok(Self {
            root,
            chown: sys::is_root(),
            openat2: true,
            buf: vec![0; COPY_BUF],
        })
    }

    /// Resolves parent directories by the component-by-component walk only
    /// (as where `openat2` is missing), for the fuzz targets in `fuzz/`.
    #[cfg(feature = "fuzzing")]
    #[must_use]
    pub fn without_openat2(mut self) -> Self {
        self.openat2 = false;
        self
    }

    /// Applies one layer's tar stream (already decompressed). `label` starts
    /// every error message (e.g. `layer 2 (sha256:…)`); `note` receives
    /// remarks that are not errors (skipped xattrs).
    ///
    /// # Errors
    /// The stream is not a valid tar, or an entry is hostile or cannot be
    /// applied; the root is then left partly updated.
    pub fn apply(
        &mut self,
        input: impl Read,
        label: &str,
        note: &mut dyn FnMut(String),
    ) -> Result<LayerStats, UnpackError> {
        let mut layer = Layer {
            u: self,
            note,
            added: HashSet::new(),
            dirs: Vec::new(),
            dir_index: HashMap::new(),
            cache: None,
            xattr_noted: HashSet::new(),
            stats: LayerStats::default(),
        };
        let mut archive = tar::Archive::new(input);
        let entries = archive
            .entries()
            .map_err(|e| UnpackError(format!("{label}: reading the layer: {e}")))?
            .raw(true);
        let mut pending = Pending::default();
        for entry in entries {
            let mut entry =
                entry.map_err(|e| UnpackError(format!("{label}: reading the layer: {e}")))?;
            let at = |path: &[u8], why: String| {
                UnpackError(format!("{label}: entry '{}': {why}", show(path)))
            };
            let meta = match collect(&mut entry, &mut pending) {
                Ok(Some(meta)) => meta,
                Ok(None) => continue,
                Err((path, why)) => return Err(at(&path, why)),
            };
            layer
                .entry(&meta, &mut entry)
                .map_err(|why| at(&meta.path, why))?;
            layer.stats.entries += 1;
        }
        if pending.long_name.is_some() || pending.long_link.is_some() || pending.pax.is_some() {
            return Err(UnpackError(format!(
                "{label}: extension header at the end of the layer"
            )));
        }
        layer
            .finish_dirs()
            .map_err(|(path, why)| at_path(label, &path, &why))?;
        Ok(layer.stats)
    }
}

fn at_path(label: &str, path: &[u8], why: &str) -> UnpackError {
    UnpackError(format!("{label}: entry '{}': {why}", show(path)))
}

/// Reads an entry's header and the extension headers before it; `None` for
/// extension headers themselves (kept in `pending`) and ignored entries.
fn collect<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    pending: &mut Pending,
) -> Result<Option<Meta>, (Vec<u8>, String)> {
    let header = entry.header().clone();
    let kind = header.entry_type();
    let size = header
        .entry_size()
        .map_err(|e| (header.path_bytes().to_vec(), e.to_string()))?;
    let bad = |why: String| (header.path_bytes().to_vec(), why);
    match kind {
        EntryType::GNULongName => {
            pending.long_name = Some(strip_nuls(
                read_capped(entry, size, MAX_LONG_NAME, "GNU long name").map_err(bad)?,
            ));
            return Ok(None);
        }
        EntryType::GNULongLink => {
            pending.long_link = Some(strip_nuls(
                read_capped(entry, size, MAX_LONG_NAME, "GNU long link").map_err(bad)?,
            ));
            return Ok(None);
        }
        EntryType::XHeader => {
            pending.pax = Some(read_capped(entry, size, MAX_PAX, "PAX header").map_err(bad)?);
            return Ok(None);
        }
        EntryType::XGlobalHeader => {
            // Global defaults are not used by image layers; skip (bounded: the
            // tar crate skips the body without reading it into memory).
            return Ok(None);
        }
        _ => {}
    }
    let mut path = pending
        .long_name
        .take()
        .unwrap_or_else(|| header.path_bytes().into_owned());
    let mut link = pending.long_link.take().unwrap_or_else(|| {
        header
            .link_name_bytes()
            .map(std::borrow::Cow::into_owned)
            .unwrap_or_default()
    });
    // Like Go's archive/tar, an empty numeric field (NULs and spaces) is 0.
    let num = |r: io::Result<u64>, raw: &[u8], what: &str| -> Result<u64, (Vec<u8>, String)> {
        match r {
            Ok(v) => Ok(v),
            Err(_) if raw.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
            Err(e) => Err((path.clone(), format!("bad {what}: {e}"))),
        }
    };
    let old = header.as_old();
    let mut uid = num(header.uid(), &old.uid, "uid")?;
    let mut gid = num(header.gid(), &old.gid, "gid")?;
    let secs = num(header.mtime(), &old.mtime, "mtime")?;
    let mut mtime = (i64::try_from(secs).unwrap_or(i64::MAX), 0u32);
    let mode = num(header.mode().map(u64::from), &old.mode, "mode")?;
    let mut xattrs = Vec::new();
    if let Some(pax) = pending.pax.take() {
        for ext in tar::PaxExtensions::new(&pax) {
            let ext = ext.map_err(|e| (path.clone(), format!("bad PAX header: {e}")))?;
            let (key, value) = (ext.key_bytes(), ext.value_bytes());
            let bad_value = || (path.clone(), format!("bad PAX value for {}", show(key)));
            match key {
                b"path" => path = value.to_vec(),
                b"linkpath" => link = value.to_vec(),
                b"uid" => uid = parse_decimal(value).ok_or_else(bad_value)?,
                b"gid" => gid = parse_decimal(value).ok_or_else(bad_value)?,
                b"mtime" => mtime = parse_pax_time(value).ok_or_else(bad_value)?,
                // In raw mode the tar crate frames entries by the header's
                // size; a PAX size that differs would desynchronize it.
                b"size" if parse_decimal(value) != Some(size) => {
                    return Err((
                        path,
                        "PAX size override (files over 8 GiB) is not supported".into(),
                    ));
                }
                k if k.starts_with(b"GNU.sparse.") => {
                    return Err((path, "sparse files are not supported".into()));
                }
                k if k.starts_with(b"SCHILY.xattr.") => {
                    let name = &k[b"SCHILY.xattr.".len()..];
                    let name = sys::cstr(name)
                        .ok()
                        .filter(|n| !n.is_empty())
                        .ok_or_else(|| (path.clone(), "bad xattr name".to_string()))?;
                    xattrs.push((name, value.to_vec()));
                }
                _ => {}
            }
        }
    }
    let kind = match kind {
        // Old archives mark directories with a trailing slash on a regular entry.
        EntryType::Regular if header.as_bytes()[156] == 0 && path.ends_with(b"/") => {
            EntryType::Directory
        }
        EntryType::GNUSparse => return Err((path, "sparse files are not supported".into())),
        k if k.as_byte() == b'V' => return Ok(None),
        k @ (EntryType::Regular
        | EntryType::Continuous
        | EntryType::Directory
        | EntryType::Symlink
        | EntryType::Link
        | EntryType::Char
        | EntryType::Block
        | EntryType::Fifo) => k,
        k => {
            return Err((
                path,
                format!("unsupported entry type {:?}", char::from(k.as_byte())),
            ))
        }
    };
    if path.len() > MAX_PATH || link.len() > MAX_PATH {
        return Err((path, "path or link longer than PATH_MAX".into()));
    }
    let id = |v: u64, what: &str| {
        libc::uid_t::try_from(v).map_err(|_| (path.clone(), format!("{what} {v} out of range")))
    };
    let (uid, gid) = (id(uid, "uid")?, id(gid, "gid")?);
    let dev = if matches!(kind, EntryType::Char | EntryType::Block) {
        let major = header.device_major().ok().flatten().unwrap_or(0);
        let minor = header.device_minor().ok().flatten().unwrap_or(0);
        (major, minor)
    } else {
        (0, 0)
    };
    let mode = libc::mode_t::try_from(mode & 0o7777).unwrap_or(0);
    Ok(Some(Meta {
        path,
        link,
        kind,
        mode,
        uid,
        gid,
        mtime,
        size,
        dev,
        xattrs,
    }))
}

impl Layer<'_, '_> {
    fn root(&self) -> BorrowedFd<'_> {
        self.u.root.as_fd()
    }

    fn open_root(&self) -> io::Result<OwnedFd> {
        sys::openat(self.root(), c".", libc::O_PATH | libc::O_DIRECTORY, 0)
    }

    /// Opens the directory at `comps` (lexical components, no `..`), resolved
    /// inside the root; missing directories are created (0755) when `create`.
    fn resolve_dir(&mut self, comps: &[&[u8]], create: bool) -> io::Result<OwnedFd> {
        if comps.is_empty() {
            return self.open_root();
        }
        if self.u.openat2 {
            let p = sys::cstr(&join(comps))?;
            match sys::openat2(
                self.root(),
                &p,
                libc::O_PATH | libc::O_DIRECTORY,
                libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
            ) {
                Ok(fd) => return Ok(fd),
                Err(e) if matches!(errno(&e), libc::ENOSYS | libc::EPERM | libc::EINVAL) => {
                    self.u.openat2 = false;
                }
                // Missing or odd components: the walk creates or reports them.
                Err(_) => {}
            }
        }
        self.walk(comps, create)
    }

    /// The same resolution as `openat2(RESOLVE_IN_ROOT)`, one component at a
    /// time: every component is opened with `O_NOFOLLOW` under the previous
    /// one, symlinks are read and followed by hand (absolute ones from the
    /// root), and `..` never goes above the root.
    fn walk(&self, comps: &[&[u8]], create: bool) -> io::Result<OwnedFd> {
        let mut todo: Vec<Vec<u8>> = comps.iter().rev().map(|c| c.to_vec()).collect();
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut cur = self.open_root()?;
        let mut links = 0;
        while let Some(c) = todo.pop() {
            if c.is_empty() || c == b"." {
                continue;
            }
            if c == b".." {
                if names.pop().is_some() {
                    cur = self.reopen(&names)?;
                }
                continue;
            }
            let cn = sys::cstr(&c)?;
            match sys::fstatat(cur.as_fd(), &cn, true) {
                Ok(st) => match sys::file_type(st.st_mode) {
                    libc::S_IFDIR => {
                        cur = sys::openat(
                            cur.as_fd(),
                            &cn,
                            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                            0,
                        )?;
                        names.push(c);
                    }
                    libc::S_IFLNK => {
                        links += 1;
                        if links > MAX_SYMLINKS {
                            return Err(io::Error::from_raw_os_error(libc::ELOOP));
                        }
                        let target = sys::readlinkat(cur.as_fd(), &cn)?;
                        if target.starts_with(b"/") {
                            names.clear();
                            cur = self.open_root()?;
                        }
                        todo.extend(
                            target
                                .split(|b| *b == b'/')
                                .rev()
                                .filter(|t| !t.is_empty())
                                .map(<[u8]>::to_vec),
                        );
                    }
                    _ => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
                },
                Err(e) if create && errno(&e) == libc::ENOENT => {
                    sys::mkdirat(cur.as_fd(), &cn, 0o755)?;
                    cur = sys::openat(
                        cur.as_fd(),
                        &cn,
                        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        0,
                    )?;
                    names.push(c);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(cur)
    }

    /// Re-opens a path of real directories (no symlinks) from the root.
    fn reopen(&self, names: &[Vec<u8>]) -> io::Result<OwnedFd> {
        let mut cur = self.open_root()?;
        for n in names {
            let cn = sys::cstr(n)?;
            cur = sys::openat(
                cur.as_fd(),
                &cn,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
        }
        Ok(cur)
    }

    /// The parent directory for an entry, through a one-entry cache (tar
    /// streams list a directory's files together).
    fn parent(&mut self, comps: &[&[u8]]) -> io::Result<Rc<OwnedFd>> {
        let key = join(comps);
        if let Some((k, fd)) = &self.cache {
            if *k == key {
                return Ok(Rc::clone(fd));
            }
        }
        let fd = Rc::new(self.resolve_dir(comps, true)?);
        self.cache = Some((key, Rc::clone(&fd)));
        Ok(fd)
    }

    /// Records a lexical path (and its ancestors) as put in place by this layer.
    fn mark_added(&mut self, path: &[u8]) {
        let mut p = path.to_vec();
        loop {
            if !self.added.insert(p.clone()) {
                break;
            }
            match p.iter().rposition(|b| *b == b'/') {
                Some(i) => p.truncate(i),
                None => break,
            }
        }
    }

    fn note_xattr(&mut self, path: &[u8], name: &CStr, e: &io::Error) {
        if self.xattr_noted.insert(errno(e)) {
            (self.note)(format!(
                "xattr {} on '{}' skipped: {e} (further such failures not shown)",
                name.to_string_lossy(),
                show(path)
            ));
        }
    }

    fn entry(&mut self, m: &Meta, data: &mut dyn Read) -> Result<(), String> {
        let comps = normalize(&m.path)?;
        let Some((&name, parent)) = comps.split_last() else {
            // The root itself ("./"): only a directory makes sense.
            if !m.kind.is_dir() {
                return Err("the root must be a directory".into());
            }
            let fd = sys::openat(self.root(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
                .map_err(|e| err(&e))?;
            if self.u.chown {
                sys::fchown(fd.as_fd(), m.uid, m.gid).map_err(|e| format!("chown: {e}"))?;
            }
            self.defer_dir(Vec::new(), m);
            return Ok(());
        };
        if name.starts_with(WHITEOUT) {
            return self.whiteout(parent, name);
        }
        let path = join(&comps);
        let pfd = self
            .parent(parent)
            .map_err(|e| format!("parent directory: {e}"))?;
        let pfd = pfd.as_fd();
        let cname = sys::cstr(name).map_err(|e| err(&e))?;
        // Creations are tried first; what is in the way is looked at only
        // on EEXIST (new names are the common case, and syscalls count).
        if m.kind.is_hard_link() {
            let existing = match sys::fstatat(pfd, &cname, true) {
                Ok(st) => Some(st),
                Err(e) if errno(&e) == libc::ENOENT => None,
                Err(e) => return Err(err(&e)),
            };
            self.hardlink(m, pfd, &cname, existing.as_ref())?;
        } else if m.kind.is_dir() {
            match sys::mkdirat(pfd, &cname, 0o700) {
                Ok(()) => {}
                Err(e) if errno(&e) == libc::EEXIST => {
                    let st = sys::fstatat(pfd, &cname, true).map_err(|e| err(&e))?;
                    // An existing directory keeps its content.
                    if sys::file_type(st.st_mode) != libc::S_IFDIR {
                        self.remove(pfd, &cname, &st)?;
                        sys::mkdirat(pfd, &cname, 0o700).map_err(|e| format!("mkdir: {e}"))?;
                    }
                }
                Err(e) => return Err(format!("mkdir: {e}")),
            }
            if self.u.chown {
                sys::lchownat(pfd, &cname, m.uid, m.gid).map_err(|e| format!("chown: {e}"))?;
            }
            self.xattrs_at(m, pfd, &cname);
            self.defer_dir(path.clone(), m);
        } else if m.kind.is_file() || m.kind.is_contiguous() {
            self.file(m, pfd, &cname, data)?;
        } else {
            self.special(m, pfd, &cname)?;
        }
        self.mark_added(&path);
        Ok(())
    }

    fn file(
        &mut self,
        m: &Meta,
        dir: BorrowedFd<'_>,
        name: &CStr,
        data: &mut dyn Read,
    ) -> Result<(), String> {
        let fd = self.create(dir, name, || {
            sys::openat(
                dir,
                name,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o600,
            )
        })?;
        let mut written = 0u64;
        let mut limited = data.take(m.size);
        loop {
            let n = match limited.read(&mut self.u.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("reading the layer: {e}")),
            };
            sys::write_all(fd.as_fd(), &self.u.buf[..n]).map_err(|e| format!("write: {e}"))?;
            written += n as u64;
        }
        if written != m.size {
            return Err(format!(
                "layer ended inside the file ({written} of {} bytes)",
                m.size
            ));
        }
        self.stats.bytes += written;
        if self.u.chown {
            sys::fchown(fd.as_fd(), m.uid, m.gid).map_err(|e| format!("chown: {e}"))?;
        }
        sys::fchmod(fd.as_fd(), m.mode).map_err(|e| format!("chmod: {e}"))?;
        for (xname, value) in &m.xattrs {
            if let Err(e) = sys::fsetxattr(fd.as_fd(), xname, value) {
                self.note_xattr(&m.path, xname, &e);
            }
        }
        sys::futimens(fd.as_fd(), m.mtime.0, m.mtime.1).map_err(|e| format!("set times: {e}"))?;
        Ok(())
    }

    /// Symlinks, devices and fifos.
    fn special(&mut self, m: &Meta, dir: BorrowedFd<'_>, name: &CStr) -> Result<(), String> {
        if m.kind.is_symlink() {
            if m.link.is_empty() {
                return Err("symlink with an empty target".into());
            }
            let target = sys::cstr(&m.link).map_err(|e| err(&e))?;
            self.create(dir, name, || sys::symlinkat(&target, dir, name))?;
            if self.u.chown {
                sys::lchownat(dir, name, m.uid, m.gid).map_err(|e| format!("chown: {e}"))?;
            }
        } else {
            let ft = match m.kind {
                EntryType::Char => libc::S_IFCHR,
                EntryType::Block => libc::S_IFBLK,
                _ => libc::S_IFIFO,
            };
            let dev = sys::makedev(m.dev.0, m.dev.1);
            self.create(dir, name, || sys::mknodat(dir, name, ft | m.mode, dev))?;
            if self.u.chown {
                sys::lchownat(dir, name, m.uid, m.gid).map_err(|e| format!("chown: {e}"))?;
            }
            // The name is the node just made, not a symlink: following is moot.
            sys::fchmodat(dir, name, m.mode).map_err(|e| format!("chmod: {e}"))?;
        }
        self.xattrs_at(m, dir, name);
        sys::lutimensat(dir, name, m.mtime.0, m.mtime.1).map_err(|e| format!("set times: {e}"))?;
        Ok(())
    }

    /// Sets xattrs on `dir/name` without following it (through the
    /// `/proc/self/fd` link of the parent: `lsetxattr` takes only paths).
    fn xattrs_at(&mut self, m: &Meta, dir: BorrowedFd<'_>, name: &CStr) {
        if m.xattrs.is_empty() {
            return;
        }
        let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        p.extend_from_slice(name.to_bytes());
        let Ok(p) = sys::cstr(&p) else { return };
        for (xname, value) in &m.xattrs {
            if let Err(e) = sys::lsetxattr(&p, xname, value) {
                self.note_xattr(&m.path, xname, &e);
            }
        }
    }

    fn hardlink(
        &mut self,
        m: &Meta,
        dir: BorrowedFd<'_>,
        name: &CStr,
        existing: Option<&libc::stat>,
    ) -> Result<(), String> {
        let target = normalize(&m.link)
            .map_err(|_| format!("hardlink target '{}' escapes the root", show(&m.link)))?;
        let missing = || {
            format!(
                "hardlink target '{}' does not exist in the layers",
                show(&m.link)
            )
        };
        let Some((&tname, tparent)) = target.split_last() else {
            return Err("hardlink to the root".into());
        };
        let tdir = self.resolve_dir(tparent, false).map_err(|_| missing())?;
        let tcname = sys::cstr(tname).map_err(|e| err(&e))?;
        let tst = sys::fstatat(tdir.as_fd(), &tcname, true).map_err(|_| missing())?;
        if sys::file_type(tst.st_mode) == libc::S_IFDIR {
            return Err(format!(
                "hardlink target '{}' is a directory",
                show(&m.link)
            ));
        }
        if let Some(st) = existing {
            if st.st_dev == tst.st_dev && st.st_ino == tst.st_ino {
                return Ok(());
            }
            self.remove(dir, name, st)?;
        }
        sys::linkat(tdir.as_fd(), &tcname, dir, name).map_err(|e| format!("link: {e}"))
    }

    fn whiteout(&mut self, parent: &[&[u8]], name: &[u8]) -> Result<(), String> {
        let gone = |e: &io::Error| matches!(errno(e), libc::ENOENT | libc::ENOTDIR | libc::ELOOP);
        if name == OPAQUE {
            let dir = match self.resolve_dir(parent, false) {
                Ok(fd) => fd,
                Err(e) if gone(&e) => return Ok(()),
                Err(e) => return Err(format!("opaque directory: {e}")),
            };
            let lex = join(parent);
            self.cache = None;
            return self
                .opaque(dir.as_fd(), &lex, 0)
                .map_err(|e| format!("opaque directory: {e}"));
        }
        if name.starts_with(WHITEOUT_META) {
            return Ok(());
        }
        let victim = &name[WHITEOUT.len()..];
        if victim.is_empty() || victim == b"." || victim == b".." {
            return Err("invalid whiteout".into());
        }
        // Whiteouts hide the layers below only, never this layer's own entries.
        if self.added.contains(&child_path(&join(parent), victim)) {
            return Ok(());
        }
        let dir = match self.resolve_dir(parent, false) {
            Ok(fd) => fd,
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(format!("whiteout: {e}")),
        };
        let cname = sys::cstr(victim).map_err(|e| err(&e))?;
        match sys::fstatat(dir.as_fd(), &cname, true) {
            Ok(st) => self.remove(dir.as_fd(), &cname, &st),
            Err(e) if errno(&e) == libc::ENOENT => Ok(()),
            Err(e) => Err(format!("whiteout: {e}")),
        }
    }

    /// Empties `dir` (lexical path `lex`) of everything this layer did not add.
    fn opaque(&self, dir: BorrowedFd<'_>, lex: &[u8], depth: usize) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(io::Error::other("directory tree too deep"));
        }
        for child in sys::list_dir(dir)? {
            let child_lex = child_path(lex, child.to_bytes());
            let st = sys::fstatat(dir, &child, true)?;
            if !self.added.contains(&child_lex) {
                remove_any(dir, &child, &st, 0)?;
            } else if sys::file_type(st.st_mode) == libc::S_IFDIR {
                let sub = sys::openat(
                    dir,
                    &child,
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )?;
                self.opaque(sub.as_fd(), &child_lex, depth + 1)?;
            }
        }
        Ok(())
    }

    /// Runs `make` (an exclusive creation of `dir/name`); if something is in
    /// the way, removes it (whatever it is) and runs `make` again.
    fn create<T>(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        make: impl Fn() -> io::Result<T>,
    ) -> Result<T, String> {
        match make() {
            Err(e) if errno(&e) == libc::EEXIST => {
                let st = sys::fstatat(dir, name, true).map_err(|e| err(&e))?;
                self.remove(dir, name, &st)?;
                make().map_err(|e| format!("create: {e}"))
            }
            other => other.map_err(|e| format!("create: {e}")),
        }
    }

    /// Removes an existing entry about to be replaced.
    fn remove(&mut self, dir: BorrowedFd<'_>, name: &CStr, st: &libc::stat) -> Result<(), String> {
        // Removing a directory or a symlink can change what cached paths mean.
        self.cache = None;
        remove_any(dir, name, st, 0).map_err(|e| format!("removing the existing entry: {e}"))
    }

    fn defer_dir(&mut self, path: Vec<u8>, m: &Meta) {
        let d = DeferredDir {
            path: path.clone(),
            mode: m.mode,
            mtime: m.mtime,
        };
        if let Some(&i) = self.dir_index.get(&path) {
            self.dirs[i] = d;
        } else {
            self.dir_index.insert(path, self.dirs.len());
            self.dirs.push(d);
        }
    }

    /// Applies directory modes and times, deepest (latest) first. A directory
    /// that a later entry removed or replaced is skipped.
    fn finish_dirs(&mut self) -> Result<(), (Vec<u8>, String)> {
        let dirs = std::mem::take(&mut self.dirs);
        for d in dirs.iter().rev() {
            let comps = normalize(&d.path).map_err(|e| (d.path.clone(), e))?;
            let fd = match comps.split_last() {
                None => sys::openat(self.root(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0),
                Some((&name, parent)) => {
                    let cname = sys::cstr(name).map_err(|e| (d.path.clone(), err(&e)))?;
                    self.resolve_dir(parent, false).and_then(|p| {
                        sys::openat(
                            p.as_fd(),
                            &cname,
                            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                            0,
                        )
                    })
                }
            };
            let fd = match fd {
                Ok(fd) => fd,
                Err(e) if matches!(errno(&e), libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => {
                    continue
                }
                Err(e) => return Err((d.path.clone(), err(&e))),
            };
            sys::fchmod(fd.as_fd(), d.mode).map_err(|e| (d.path.clone(), format!("chmod: {e}")))?;
            sys::futimens(fd.as_fd(), d.mtime.0, d.mtime.1)
                .map_err(|e| (d.path.clone(), format!("set times: {e}")))?;
        }
        Ok(())
    }
}

/// Removes `dir/name` whatever it is (a directory with all its content),
/// never following symlinks.
fn remove_any(dir: BorrowedFd<'_>, name: &CStr, st: &libc::stat, depth: usize) -> io::Result<()> {
    if sys::file_type(st.st_mode) != libc::S_IFDIR {
        return sys::unlinkat(dir, name, false);
    }
    if depth > MAX_DEPTH {
        return Err(io::Error::other("directory tree too deep"));
    }
    let sub = sys::openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    for child in sys::list_dir(sub.as_fd())? {
        match sys::unlinkat(sub.as_fd(), &child, false) {
            Ok(()) => {}
            Err(e) if errno(&e) == libc::EISDIR => {
                let cst = sys::fstatat(sub.as_fd(), &child, true)?;
                remove_any(sub.as_fd(), &child, &cst, depth + 1)?;
            }
            Err(e) => return Err(e),
        }
    }
    sys::unlinkat(dir, name, true)
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
