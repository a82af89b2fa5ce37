//! Storing layers: the one code path every route takes (`pull`, `load` of
//! docker- and oci-archives, `import`, the default image).
//!
//! A layer blob is written to a temporary file next to its final place, its
//! digest and size checked, then read back through its decompressor as a
//! tar stream (walked with bounded memory, see [`crate::tarwalk`]) while the
//! uncompressed bytes are hashed: that digest must be the config's diff ID
//! for the layer. Only then may the blob move into place, and callers move
//! an image's blobs only once all of its layers passed: a refused image
//! leaves nothing behind. A blob already in the store is checked the same
//! way (by the diff ID an image record verified for it, else by hashing
//! it), and its size is the file's, never a manifest's.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;

use sha2::{Digest as _, Sha256};

use crate::store::{BlobWriter, Compression, Layer, Store, StoreError};
use crate::tarwalk::{self, TarError};

/// What a layer must be; `None` fields are not checked.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Expect<'a> {
    /// The blob's digest.
    pub digest: Option<&'a str>,
    /// The blob's size.
    pub size: Option<u64>,
    /// The layer's index in the config's `rootfs.diff_ids`, and that diff ID.
    pub diff_id: Option<(usize, &'a str)>,
    /// The media type and the compression it implies; `None`: sniffed from
    /// the blob's first bytes (given an OCI media type).
    pub media_type: Option<(&'a str, Compression)>,
}

/// A layer whose content passed every check; its blob (when it was not in
/// the store already) waits for [`Verified::persist`], and is removed if
/// dropped instead.
#[derive(Debug)]
pub(crate) struct Verified {
    layer: Layer,
    blob: Option<BlobWriter>,
    what: String,
}

impl Verified {
    /// Moves the blob into place (if it is new) and returns the layer.
    pub(crate) fn persist(self) -> Result<Layer, StoreError> {
        let mut layer = self.layer;
        if let Some(blob) = self.blob {
            layer.size = blob.persist(&self.what)?;
        }
        Ok(layer)
    }
}

/// Moves every blob into place, in order, once all of them are verified.
pub(crate) fn persist_all(verified: Vec<Verified>) -> Result<Vec<Layer>, StoreError> {
    verified.into_iter().map(Verified::persist).collect()
}

/// Ingests layers into one store.
#[derive(Debug)]
pub(crate) struct Ingest<'s> {
    store: &'s Store,
    /// Digest -> diff ID, as image records verified them.
    known: HashMap<String, String>,
}

impl<'s> Ingest<'s> {
    /// Call with `gc.lock` held (shared) until the image is committed.
    pub(crate) fn new(store: &'s Store) -> Result<Self, StoreError> {
        Ok(Ingest {
            store,
            known: store.known_diff_ids()?,
        })
    }

    /// A layer read from `open()` (not called when the blob with the
    /// expected digest is in the store already).
    pub(crate) fn read<R: Read>(
        &self,
        open: impl FnOnce() -> Result<R, StoreError>,
        expect: Expect<'_>,
        what: &str,
    ) -> Result<Verified, StoreError> {
        if let Some(d) = expect.digest {
            if self.store.has_blob(d) {
                return self.stored(d, expect, what);
            }
        }
        let mut reader = open()?;
        let mut w = self.store.blob_writer()?;
        io::copy(&mut reader, &mut w)
            .map_err(StoreError::io(format!("cannot copy {what} into the store")))?;
        self.written(w, expect, what)
    }

    /// A layer whose bytes were all written to `w` (not yet sealed).
    pub(crate) fn written(
        &self,
        mut w: BlobWriter,
        expect: Expect<'_>,
        what: &str,
    ) -> Result<Verified, StoreError> {
        let (digest, size) = w.seal(expect.digest, expect.size, what)?;
        let file = File::open(w.sealed_path()).map_err(StoreError::io(format!(
            "cannot read back {what} ({})",
            w.sealed_path().display()
        )))?;
        let (media_type, compression) = media(&file, expect, what)?;
        let diff_id = match self.known.get(&digest) {
            Some(d) => d.clone(),
            None => diff_id(file, compression, what)?,
        };
        check_diff_id(expect, &diff_id, what)?;
        Ok(Verified {
            layer: Layer {
                digest,
                media_type,
                size,
                compression,
                diff_id,
            },
            blob: Some(w),
            what: what.to_string(),
        })
    }

    /// A layer whose blob `digest` is in the store.
    pub(crate) fn stored(
        &self,
        digest: &str,
        expect: Expect<'_>,
        what: &str,
    ) -> Result<Verified, StoreError> {
        let path = self.store.blob_path(digest);
        let file = File::open(&path).map_err(StoreError::io(format!(
            "cannot open the stored blob of {what} ({})",
            path.display()
        )))?;
        let size = file
            .metadata()
            .map_err(StoreError::io(format!("cannot stat {}", path.display())))?
            .len();
        if let Some(want) = expect.size.filter(|w| *w != size) {
            return Err(StoreError::SizeMismatch {
                what: what.to_string(),
                expected: want,
                actual: size,
            });
        }
        let (media_type, compression) = media(&file, expect, what)?;
        let diff_id = match self.known.get(digest) {
            Some(d) => d.clone(),
            None => diff_id(file, compression, what)?,
        };
        check_diff_id(expect, &diff_id, what)?;
        Ok(Verified {
            layer: Layer {
                digest: digest.to_string(),
                media_type,
                size,
                compression,
                diff_id,
            },
            blob: None,
            what: what.to_string(),
        })
    }
}

/// The diff ID of a layer in the store, hashed from its blob.
pub(crate) fn stored_diff_id(
    store: &Store,
    layer: &Layer,
    what: &str,
) -> Result<String, StoreError> {
    let path = store.blob_path(&layer.digest);
    let file = File::open(&path).map_err(StoreError::io(format!(
        "cannot open {what} ({})",
        path.display()
    )))?;
    diff_id(file, layer.compression, what)
}

fn media(file: &File, expect: Expect<'_>, what: &str) -> Result<(String, Compression), StoreError> {
    if let Some((mt, c)) = expect.media_type {
        return Ok((mt.to_string(), c));
    }
    let mut head = [0u8; 4];
    let n = file
        .read_at(&mut head, 0)
        .map_err(StoreError::io(format!("cannot read {what}")))?;
    let c = Compression::sniff(&head[..n]);
    Ok((c.oci_media_type().to_string(), c))
}

fn check_diff_id(expect: Expect<'_>, actual: &str, what: &str) -> Result<(), StoreError> {
    match expect.diff_id {
        Some((index, want)) if want != actual => Err(StoreError::DiffIdMismatch {
            what: what.to_string(),
            index,
            expected: want.to_string(),
            actual: actual.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The sha256 of a layer's uncompressed tar stream, walking its entries on
/// the way with bounded memory (an error if it is not a tar archive).
fn diff_id(file: File, compression: Compression, what: &str) -> Result<String, StoreError> {
    let invalid = |e: &dyn std::fmt::Display| {
        StoreError::Other(format!(
            "{what} is not a valid {}tar archive: {e}; refused",
            match compression {
                Compression::None => "",
                Compression::Gzip => "gzip-compressed ",
                Compression::Zstd => "zstd-compressed ",
            }
        ))
    };
    let inner = compression
        .decoder(BufReader::with_capacity(256 * 1024, file))
        .map_err(|e| invalid(&e))?;
    let mut hashing = HashingReader {
        inner,
        hasher: Sha256::new(),
        bytes: 0,
    };
    {
        // No entries is fine: docker's empty layer (1024 zero bytes, from a
        // `RUN` that changed nothing) is a valid, empty archive.
        let mut ar = tar::Archive::new(&mut hashing);
        let entries = ar.entries().map_err(|e| invalid(&e))?;
        tarwalk::walk::<_, TarError>(entries, |_| Ok(())).map_err(|e| invalid(&e))?;
    }
    // The rest (end-of-archive blocks, padding) is part of the diff ID too;
    // tar pads to a record (10 KiB by default), not to more than this.
    let rest = io::copy(&mut (&mut hashing).take(MAX_TRAILER + 1), &mut io::sink())
        .map_err(|e| invalid(&e))?;
    if rest > MAX_TRAILER {
        return Err(invalid(&format_args!(
            "more than {MAX_TRAILER} bytes follow its end-of-archive marker"
        )));
    }
    Ok(format!("sha256:{}", hex::encode(hashing.hasher.finalize())))
}

/// Bytes allowed after a layer's end-of-archive marker.
const MAX_TRAILER: u64 = 1 << 20;
/// Uncompressed bytes of one layer, at most: past this, hashing (and the
/// guest's unpacking) of a decompression bomb stops.
const MAX_LAYER_UNCOMPRESSED: u64 = 64 << 30;

/// Hashes what is read through it, refusing a stream longer than
/// [`MAX_LAYER_UNCOMPRESSED`].
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        if self.bytes > MAX_LAYER_UNCOMPRESSED {
            return Err(io::Error::other(format!(
                "it expands to more than {} GiB",
                MAX_LAYER_UNCOMPRESSED >> 30
            )));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f.rewind().unwrap();
        f
    }

    #[test]
    fn docker_empty_layer_is_a_valid_layer() {
        // 1024 zero bytes: two end-of-archive blocks, no entries.
        let empty = [0u8; 1024];
        let want = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";
        assert_eq!(
            diff_id(file_with(&empty), Compression::None, "l").unwrap(),
            want
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&empty).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(
            diff_id(file_with(&gz), Compression::Gzip, "l").unwrap(),
            want
        );
    }

    #[test]
    fn garbage_after_the_end_of_archive_is_bounded() {
        let mut bytes = vec![0u8; 1024];
        bytes.resize(1024 + usize::try_from(MAX_TRAILER).unwrap() + 1, b'x');
        let e = diff_id(file_with(&bytes), Compression::None, "layer 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("follow its end-of-archive marker"), "{e}");
        assert!(diff_id(
            file_with(b"not a tar at all, not at all"),
            Compression::None,
            "l"
        )
        .is_err());
    }
}
