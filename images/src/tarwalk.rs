//! Walking untrusted tar streams with bounded memory.
//!
//! The `tar` crate reads GNU long names (`L`), long links (`K`) and PAX
//! headers (`x`) whole into memory, with no limit: one header claiming a
//! gigabyte costs a gigabyte. So the crate is used here in raw mode, where
//! those headers come out as ordinary entries, and their bodies are read
//! here, capped as the guest's unpacker caps them (`guest-init`'s
//! `unpack.rs`): 64 KiB for a long name or link, 1 MiB for a PAX header. PAX
//! global headers (`g`) are skipped unread. The crate has no knob for these
//! caps, hence this small hand-written layer over its raw entries.

use std::io::{self, Read};

use tar::EntryType;

/// Largest GNU long name or long link body accepted (as guest-init).
pub(crate) const MAX_LONG_NAME: u64 = 64 * 1024;
/// Largest PAX extended header body accepted (as guest-init).
pub(crate) const MAX_PAX: u64 = 1 << 20;

/// Why a tar stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The stream could not be read or a header is malformed.
    #[error("{0}")]
    Read(#[from] io::Error),
    /// An extension header is larger than accepted.
    #[error("a {what} of {size} bytes (the limit is {limit})")]
    TooLong {
        /// Which extension header.
        what: &'static str,
        /// The size its header claims.
        size: u64,
        /// The cap.
        limit: u64,
    },
    /// A PAX header that cannot be parsed.
    #[error("a bad PAX header: {0}")]
    Pax(String),
    /// A PAX size differs from the header's (raw framing would desynchronize).
    #[error("a PAX size override (files over 8 GiB) is not supported")]
    PaxSize,
    /// Extension headers with no entry after them.
    #[error("an extension header at the end of the archive describes no entry")]
    Dangling,
}

/// One entry, its extension headers applied.
#[derive(Debug)]
pub(crate) struct Member {
    /// The entry's path, as bytes (long name or PAX `path` applied).
    pub path: Vec<u8>,
    /// The link target (long link or PAX `linkpath` applied); empty if none.
    pub link: Vec<u8>,
    /// The entry type.
    pub kind: EntryType,
    /// Bytes of data.
    pub size: u64,
    /// Where the data starts in the stream.
    pub data_pos: u64,
}

#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

/// Calls `each` for every entry of `entries` (put in raw mode here) and
/// returns how many there were. Extension headers are read with the caps
/// above; entry data is skipped unless `each` reads it.
pub(crate) fn walk<R: Read, E: From<TarError>>(
    entries: tar::Entries<'_, R>,
    mut each: impl FnMut(&Member) -> Result<(), E>,
) -> Result<u64, E> {
    let mut pending = Pending::default();
    let mut n = 0u64;
    for entry in entries.raw(true) {
        let mut entry = entry.map_err(TarError::Read)?;
        let header = entry.header().clone();
        let kind = header.entry_type();
        let size = header.entry_size().map_err(TarError::Read)?;
        match kind {
            EntryType::GNULongName => {
                let body = read_capped(&mut entry, size, MAX_LONG_NAME, "GNU long name")?;
                pending.long_name = Some(strip_nuls(body));
                continue;
            }
            EntryType::GNULongLink => {
                let body = read_capped(&mut entry, size, MAX_LONG_NAME, "GNU long link")?;
                pending.long_link = Some(strip_nuls(body));
                continue;
            }
            EntryType::XHeader => {
                pending.pax = Some(read_capped(&mut entry, size, MAX_PAX, "PAX header")?);
                continue;
            }
            // Not used by images; its body is skipped by the crate, unread.
            EntryType::XGlobalHeader => continue,
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
        if let Some(pax) = pending.pax.take() {
            for ext in tar::PaxExtensions::new(&pax) {
                let ext = ext.map_err(|e| TarError::Pax(e.to_string()))?;
                match ext.key_bytes() {
                    b"path" => path = ext.value_bytes().to_vec(),
                    b"linkpath" => link = ext.value_bytes().to_vec(),
                    // In raw mode the crate frames entries by the header's
                    // size; a PAX size that differs would desynchronize it.
                    b"size" => {
                        let v = std::str::from_utf8(ext.value_bytes())
                            .ok()
                            .and_then(|v| v.trim().parse::<u64>().ok());
                        if v != Some(size) {
                            return Err(TarError::PaxSize.into());
                        }
                    }
                    _ => {}
                }
            }
        }
        each(&Member {
            path,
            link,
            kind,
            size,
            data_pos: entry.raw_file_position(),
        })?;
        n += 1;
    }
    if pending.long_name.is_some() || pending.long_link.is_some() || pending.pax.is_some() {
        return Err(TarError::Dangling.into());
    }
    Ok(n)
}

/// Reads a whole extension body, refusing one longer than `cap`.
fn read_capped(
    r: &mut impl Read,
    size: u64,
    cap: u64,
    what: &'static str,
) -> Result<Vec<u8>, TarError> {
    if size > cap {
        return Err(TarError::TooLong {
            what,
            size,
            limit: cap,
        });
    }
    let mut v = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    r.take(cap).read_to_end(&mut v)?;
    Ok(v)
}

fn strip_nuls(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_header(name: &str, kind: u8, size: u64) -> [u8; 512] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::new(kind));
        h.set_size(size);
        h.set_mode(0o644);
        let n = name.as_bytes();
        h.as_old_mut().name[..n.len()].copy_from_slice(n);
        h.set_cksum();
        *h.as_bytes()
    }

    #[test]
    fn long_names_and_pax_apply() {
        let long = "d/".repeat(100) + "file";
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_entry_type(EntryType::Regular);
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_entry_type(EntryType::Symlink);
        b.append_link(&mut h, "l", &long).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(1);
        h.set_entry_type(EntryType::Regular);
        b.append_pax_extensions([("path", &b"pax/name"[..])])
            .unwrap();
        b.append_data(&mut h, "short", &b"x"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let mut seen = Vec::new();
        let n = walk::<_, TarError>(tar::Archive::new(&bytes[..]).entries().unwrap(), |m| {
            seen.push((m.path.clone(), m.link.clone(), m.size));
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(seen[0], (long.clone().into_bytes(), vec![], 3));
        assert_eq!(seen[1], (b"l".to_vec(), long.into_bytes(), 0));
        assert_eq!(seen[2].0, b"pax/name");
    }

    #[test]
    fn huge_extension_headers_are_refused_unread() {
        for (kind, what) in [
            (b'L', "GNU long name"),
            (b'K', "GNU long link"),
            (b'x', "PAX"),
        ] {
            // The header claims 1 GiB; only the header is there: the walk
            // must refuse before reading (or allocating) any of it.
            let mut bytes = raw_header("././@LongLink", kind, 1 << 30).to_vec();
            bytes.extend_from_slice(&[b'a'; 512]);
            let err =
                walk::<_, TarError>(tar::Archive::new(&bytes[..]).entries().unwrap(), |_| Ok(()))
                    .unwrap_err();
            assert!(matches!(err, TarError::TooLong { .. }), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        }
        // Dangling extension header.
        let mut bytes = raw_header("././@LongLink", b'L', 4).to_vec();
        let mut body = [0u8; 512];
        body[..4].copy_from_slice(b"name");
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(&[0; 1024]);
        let err = walk::<_, TarError>(tar::Archive::new(&bytes[..]).entries().unwrap(), |_| Ok(()))
            .unwrap_err();
        assert!(matches!(err, TarError::Dangling), "{err}");
    }
}
