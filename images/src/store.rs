//! The local image store: content-addressed blobs plus one JSON record per
//! image.
//!
//! Layout under the root:
//!
//! ```text
//! images.lock              flock: exclusive around metadata changes, shared for reads
//! gc.lock                  flock: shared while blobs are added (pull, load, import),
//!                          exclusive while unreferenced blobs are deleted (rmi, prune)
//! blobs/sha256/<hex>       blobs, written to a temporary file in the same directory,
//!                          digest verified while streaming, then renamed
//! images/<hex>/image.json  the record of the image whose ID (config digest) is sha256:<hex>
//! images/<hex>/...         free for the runtime (e.g. a cached root-fs disk); removed with
//!                          the image
//! tmp/                     scratch space (decompressed archives)
//! ```
//!
//! Lock order is always `gc.lock` before `images.lock`, so the two cannot
//! deadlock.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use oci_spec::image::ImageConfiguration;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::reference::{is_hex_id, validate_digest, Reference, ReferenceError};

/// The most bytes of JSON (manifests, configs, indexes, records) read into
/// memory from any source.
pub const MAX_JSON_BYTES: u64 = 4 * 1024 * 1024;

/// Shortest image-ID prefix accepted by lookups.
pub const MIN_ID_PREFIX: usize = 3;

/// OCI media types used for what this crate generates.
pub(crate) mod media {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
}

/// Everything that can go wrong in the image store, the registry client and
/// the archive readers. Messages say what failed, where, and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A reference could not be parsed.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// No local image matches.
    #[error(
        "image {0:?} is not in the local store; `hull images` lists what is, \
         `hull pull {0}` fetches it"
    )]
    NotFound(String),
    /// An image-ID prefix matches more than one image.
    #[error("image ID prefix {prefix:?} is ambiguous: it matches {}; give more digits", matches.join(", "))]
    AmbiguousId {
        /// The prefix given.
        prefix: String,
        /// The IDs it matches.
        matches: Vec<String>,
    },
    /// Content did not hash to the digest that names it.
    #[error(
        "{what}: the content does not match its digest (expected {expected}, got {actual}); \
         the source is corrupt or was tampered with, so it was refused"
    )]
    DigestMismatch {
        /// The blob, naming where it came from.
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },
    /// A layer's uncompressed content does not hash to the diff ID the image
    /// config gives it.
    #[error(
        "{what}: its uncompressed content is {actual} but the image config's diff_ids[{index}] \
         is {expected}; the image was refused and not stored: get it again from a source you trust"
    )]
    DiffIdMismatch {
        /// The layer, naming where it came from.
        what: String,
        /// Its position in the config's `rootfs.diff_ids`.
        index: usize,
        /// The config's diff ID.
        expected: String,
        /// The digest of the uncompressed content.
        actual: String,
    },
    /// An image recorded before hull verified layers has layers that do not
    /// match its config.
    #[error(
        "image {id}: its stored layers do not match its config (it was stored before hull \
         verified layers): {detail}; remove it with `hull rmi {id}` and pull or load it again"
    )]
    UnverifiedImage {
        /// The image ID.
        id: String,
        /// What did not match.
        detail: String,
    },
    /// Content was not the size its descriptor announced.
    #[error("{what}: {actual} bytes, but its descriptor says {expected}; refused")]
    SizeMismatch {
        /// The blob, naming where it came from.
        what: String,
        /// The announced size.
        expected: u64,
        /// The size received.
        actual: u64,
    },
    /// Something is larger than this crate reads into memory.
    #[error("{what} is larger than {limit} bytes; refused")]
    TooLarge {
        /// What was being read.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// The registry refused or failed a request.
    #[error("registry {registry}: {message}")]
    Registry {
        /// The registry host.
        registry: String,
        /// What happened and what to do.
        message: String,
    },
    /// The registry rejected the credentials.
    #[error(
        "registry {registry}: authentication failed ({detail}); check the user name and \
         password, then run `hull login {registry}`"
    )]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// What the registry said.
        detail: String,
    },
    /// A format, media type or platform this crate does not handle.
    #[error("{what}: {detail}")]
    Unsupported {
        /// What was unsupported, naming where it came from.
        what: String,
        /// Why, and what is supported.
        detail: String,
    },
    /// An archive given to `load` or `import` is malformed.
    #[error("archive {}: {message}", path.display())]
    Archive {
        /// The archive file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// JSON that could not be parsed.
    #[error("{what}: invalid JSON: {source}")]
    Json {
        /// What was being parsed, naming where it came from.
        what: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// Anything else, with a message that explains it.
    #[error("{0}")]
    Other(String),
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }

    pub(crate) fn json(what: impl Into<String>) -> impl FnOnce(serde_json::Error) -> StoreError {
        let what = what.into();
        move |source| StoreError::Json { what, source }
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression a layer media type implies, or `None` (the Rust one)
    /// when the media type is not a layer type this crate handles.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }

    /// Guesses the compression from the first bytes of a blob.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The OCI layer media type for this compression.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => media::OCI_LAYER_TAR,
            Compression::Gzip => media::OCI_LAYER_GZIP,
            Compression::Zstd => media::OCI_LAYER_ZSTD,
        }
    }

    /// Wraps `r` in the matching decompressor.
    pub fn decoder<'a, R: Read + Send + 'a>(self, r: R) -> io::Result<Box<dyn Read + Send + 'a>> {
        Ok(match self {
            Compression::None => Box::new(r),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        })
    }
}

/// One layer of an image, in order from the bottom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The digest of the blob as stored (compressed, if it is).
    pub digest: String,
    /// The media type from the manifest.
    pub media_type: String,
    /// Size of the stored blob in bytes.
    pub size: u64,
    /// How the blob is compressed.
    pub compression: Compression,
    /// The digest of the layer's uncompressed tar stream, as hull computed
    /// it when it stored the layer and found it equal to the config's
    /// `rootfs.diff_ids` entry. Empty in records written before hull checked
    /// this: [`Store::find`] verifies such records (and fills it in) before
    /// it returns them.
    #[serde(default)]
    pub diff_id: String,
}

/// A stored image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Image {
    /// The image ID: the digest of its config blob (`sha256:<hex>`), as docker.
    pub id: String,
    /// The names pointing at this image, fully qualified
    /// (`docker.io/library/alpine:latest`, `localhost/busybox:latest`, or
    /// `REPO@sha256:...` for images pulled by digest). Empty: dangling.
    pub names: Vec<String>,
    /// `REPO@sha256:...` for the manifest (or index) digests the image was
    /// pulled as, as docker's RepoDigests.
    #[serde(default)]
    pub repo_digests: Vec<String>,
    /// The digest of the image manifest (stored as a blob).
    pub manifest_digest: String,
    /// The parsed image configuration.
    pub config: ImageConfiguration,
    /// The layers, bottom first.
    pub layers: Vec<Layer>,
    /// The `created` time from the config (RFC 3339), if it has one.
    pub created: Option<String>,
    /// When this store first got the image (seconds since the epoch).
    pub added: u64,
    /// Bytes of the image's blobs (config, manifest and layers as stored,
    /// i.e. compressed where they are).
    pub size: u64,
}

impl Image {
    /// The 64 hex digits of the ID.
    pub fn hex_id(&self) -> &str {
        self.id.strip_prefix("sha256:").unwrap_or(&self.id)
    }

    /// The first 12 hex digits of the ID, as `docker images` shows them.
    pub fn short_id(&self) -> &str {
        let h = self.hex_id();
        &h[..h.len().min(12)]
    }

    /// The diff IDs of the layers, bottom first: the digests of their
    /// uncompressed tar streams, verified against the config when the layers
    /// were stored. An entry is empty only for a layer of an old record that
    /// was never verified (see [`Layer::diff_id`]).
    pub fn diff_ids(&self) -> Vec<&str> {
        self.layers.iter().map(|l| l.diff_id.as_str()).collect()
    }

    /// The OCI ChainID of the layer stack (`sha256:<hex>`): the first diff
    /// ID, then `sha256(chain + " " + next diff ID)` for each layer above.
    /// It names the exact file system the layers make, whatever their
    /// compression, so it keys anything built from them. An image without
    /// layers gets the digest of the empty string.
    pub fn chain_id(&self) -> String {
        let mut ids = self.layers.iter().map(|l| l.diff_id.as_str());
        let Some(first) = ids.next() else {
            return sha256_digest(b"");
        };
        ids.fold(first.to_string(), |chain, d| {
            sha256_digest(format!("{chain} {d}").as_bytes())
        })
    }

    /// Whether every layer has a verified diff ID.
    pub(crate) fn layers_verified(&self) -> bool {
        self.layers.iter().all(|l| !l.diff_id.is_empty())
    }

    /// Digests of every blob the image uses.
    pub fn blob_digests(&self) -> impl Iterator<Item = &str> {
        [self.id.as_str(), self.manifest_digest.as_str()]
            .into_iter()
            .chain(self.layers.iter().map(|l| l.digest.as_str()))
    }
}

/// Options for [`Store::pull`].
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Use plain HTTP even when the registry is not on loopback.
    pub insecure: bool,
    /// Show per-layer progress on stderr (only when stderr is a terminal).
    pub progress: bool,
}

/// Options for [`Store::import_rootfs_with`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The config's Cmd (none by default).
    pub cmd: Option<Vec<String>>,
    /// The config's Entrypoint (none by default).
    pub entrypoint: Option<Vec<String>>,
    /// The config's Env (none by default).
    pub env: Vec<String>,
    /// The config's WorkingDir.
    pub working_dir: Option<String>,
}

/// What [`Store::remove`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    /// Names (and digest references) removed.
    pub untagged: Vec<String>,
    /// The ID of the image deleted, if it was (no names left, or removed by ID).
    pub deleted: Option<String>,
    /// Blobs deleted because nothing references them any more.
    pub blobs_removed: usize,
    /// Bytes freed.
    pub bytes_freed: u64,
}

/// What [`Store::prune`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// IDs of the dangling images deleted.
    pub images_removed: Vec<String>,
    /// Unreferenced blobs deleted.
    pub blobs_removed: usize,
    /// Bytes freed.
    pub bytes_freed: u64,
}

/// The local image store. Cheap to open; safe to use from several threads
/// and processes at once (each operation takes its own file locks).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// An image about to be recorded: all its blobs are already in the store.
#[derive(Debug)]
pub(crate) struct NewImage {
    pub config_digest: String,
    pub config: ImageConfiguration,
    pub manifest_digest: String,
    pub layers: Vec<Layer>,
    pub names: Vec<String>,
    pub repo_digests: Vec<String>,
    pub size: u64,
}

enum Matched {
    Name(String),
    Id,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, or at the default
    /// root: `$HULL_ROOT`; else `/var/lib/hull` when running as root; else
    /// `$XDG_DATA_HOME/hull`, else `~/.local/share/hull`.
    pub fn open(root: Option<PathBuf>) -> Result<Self, StoreError> {
        let root = match root {
            Some(r) => r,
            None => default_root()?,
        };
        let store = Store { root };
        for dir in [
            store.root.clone(),
            store.root.join("blobs/sha256"),
            store.root.join("images"),
            store.root.join("tmp"),
        ] {
            create_dir_all_mode(&dir, 0o700).map_err(StoreError::io(format!(
                "cannot create the image store directory {}",
                dir.display()
            )))?;
        }
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` (`sha256:<hex>`) lives (whether or not it
    /// exists). An invalid digest gives a path that never exists.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        match digest.strip_prefix("sha256:") {
            Some(hex) if is_hex_id(hex) => self.root.join("blobs/sha256").join(hex),
            _ => self.root.join("blobs/invalid-digest"),
        }
    }

    /// The per-image directory for image `id` (`sha256:<hex>` or `<hex>`):
    /// it holds the image's record, and the runtime may keep derived files
    /// there (they are removed with the image).
    pub fn image_dir(&self, id: &str) -> PathBuf {
        let hex = id.strip_prefix("sha256:").unwrap_or(id);
        if is_hex_id(hex) {
            self.root.join("images").join(hex)
        } else {
            self.root.join("images/invalid-id")
        }
    }

    /// Whether a blob is present.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a layer for reading, decompressed: a tar stream.
    pub fn layer_reader(&self, layer: &Layer) -> Result<Box<dyn Read + Send>, StoreError> {
        let path = self.blob_path(&layer.digest);
        let f = File::open(&path).map_err(StoreError::io(format!(
            "cannot open layer {} ({})",
            layer.digest,
            path.display()
        )))?;
        layer
            .compression
            .decoder(BufReader::new(f))
            .map_err(StoreError::io(format!(
                "cannot decompress layer {}",
                layer.digest
            )))
    }

    /// Pulls `reference` from its registry (see [`crate::registry`]).
    pub fn pull(&self, reference: &str, opts: &PullOptions) -> Result<Image, StoreError> {
        crate::registry::pull(self, reference, opts)
    }

    /// Loads every image of a docker-archive or oci-archive tarball (see
    /// [`crate::archive`]).
    pub fn load_archive(&self, path: &Path) -> Result<Vec<Image>, StoreError> {
        crate::archive::load(self, path)
    }

    /// Makes a one-layer image named `name` from a plain root-fs tarball
    /// (uncompressed, gzip or zstd); config linux/amd64 with no command.
    pub fn import_rootfs(&self, tar: &Path, name: &str) -> Result<Image, StoreError> {
        crate::archive::import_rootfs(self, tar, name, &ImportOptions::default())
    }

    /// [`Store::import_rootfs`] with config settings.
    pub fn import_rootfs_with(
        &self,
        tar: &Path,
        name: &str,
        opts: &ImportOptions,
    ) -> Result<Image, StoreError> {
        crate::archive::import_rootfs(self, tar, name, opts)
    }

    /// Builds `localhost/busybox:latest` from the host's `/bin/busybox` (see
    /// [`crate::default_image`]).
    pub fn create_default_image(&self) -> Result<Image, StoreError> {
        crate::default_image::create(self, Path::new(crate::default_image::HOST_BUSYBOX))
    }

    /// Finds an image by name (a short name tries `localhost/` first, then
    /// `docker.io/`), by `name@digest`, or by full or unambiguous short ID
    /// (at least 3 hex digits, optionally prefixed `sha256:`).
    ///
    /// A record written before hull verified layers is verified here first
    /// (its layers hashed against the config's diff IDs, once; the record is
    /// then rewritten with them): an image that fails is an error, never
    /// returned.
    pub fn find(&self, reference: &str) -> Result<Option<Image>, StoreError> {
        let found = {
            let _lock = self.lock_images(false)?;
            let all = self.read_records()?;
            resolve(&all, reference)?.map(|(i, _)| all[i].clone())
        };
        match found {
            Some(img) if !img.layers_verified() => self.upgrade_record(img).map(Some),
            other => Ok(other),
        }
    }

    /// Verifies the layers of an old record that has no diff IDs, and
    /// records them.
    fn upgrade_record(&self, mut img: Image) -> Result<Image, StoreError> {
        // Blobs stay while they are hashed (gc.lock before images.lock).
        let _gc = self.lock_gc(false)?;
        self.verify_old_layers(&mut img)?;
        let _lock = self.lock_images(true)?;
        let mut all = self.read_records()?;
        let Some(current) = all.iter_mut().find(|i| i.id == img.id) else {
            // Removed meanwhile: what was verified is still what was asked.
            return Ok(img);
        };
        let same = current.layers.len() == img.layers.len()
            && current
                .layers
                .iter()
                .zip(&img.layers)
                .all(|(a, b)| a.digest == b.digest);
        if same {
            for (c, v) in current.layers.iter_mut().zip(&img.layers) {
                c.diff_id.clone_from(&v.diff_id);
            }
            self.write_record(current)?;
            return Ok(current.clone());
        }
        Ok(img)
    }

    /// Hashes every layer of `img` that has no diff ID and checks it against
    /// the config; fills the diff IDs in.
    fn verify_old_layers(&self, img: &mut Image) -> Result<(), StoreError> {
        let expected = img.config.rootfs().diff_ids().clone();
        if expected.len() != img.layers.len() {
            return Err(StoreError::UnverifiedImage {
                id: img.id.clone(),
                detail: format!(
                    "{} layers but {} diff IDs in the config",
                    img.layers.len(),
                    expected.len()
                ),
            });
        }
        for (i, (layer, want)) in img.layers.iter_mut().zip(&expected).enumerate() {
            if !layer.diff_id.is_empty() {
                continue;
            }
            let what = format!("layer {} ({}) of image {}", i + 1, layer.digest, img.id);
            let actual = crate::ingest::stored_diff_id(self, layer, &what)?;
            if &actual != want {
                return Err(StoreError::UnverifiedImage {
                    id: img.id.clone(),
                    detail: format!("{what} is {actual}, the config says {want}"),
                });
            }
            layer.diff_id = actual;
        }
        Ok(())
    }

    /// Digest -> diff ID of every layer a record lists with a verified diff
    /// ID (records are written only by this crate, after verification).
    pub(crate) fn known_diff_ids(&self) -> Result<HashMap<String, String>, StoreError> {
        let _lock = self.lock_images(false)?;
        Ok(self
            .read_records()?
            .into_iter()
            .flat_map(|i| i.layers)
            .filter(|l| !l.diff_id.is_empty())
            .map(|l| (l.digest, l.diff_id))
            .collect())
    }

    /// All images, newest first.
    pub fn list(&self) -> Result<Vec<Image>, StoreError> {
        let _lock = self.lock_images(false)?;
        let mut all = self.read_records()?;
        all.sort_by(|a, b| b.added.cmp(&a.added).then_with(|| a.id.cmp(&b.id)));
        Ok(all)
    }

    /// Removes a name from its image; the image itself (record, directory and
    /// the blobs nothing else uses) goes when no names are left, or at once
    /// when `reference` is an ID.
    pub fn remove(&self, reference: &str) -> Result<Removed, StoreError> {
        let _gc = self.lock_gc(true)?;
        let _lock = self.lock_images(true)?;
        let mut all = self.read_records()?;
        let Some((idx, matched)) = resolve(&all, reference)? else {
            return Err(StoreError::NotFound(reference.to_string()));
        };
        let mut out = Removed::default();
        let delete = match matched {
            Matched::Id => {
                out.untagged = all[idx].names.clone();
                true
            }
            Matched::Name(name) => {
                let img = &mut all[idx];
                img.names.retain(|n| n != &name);
                img.repo_digests.retain(|n| n != &name);
                out.untagged.push(name);
                img.names.is_empty()
            }
        };
        if delete {
            let img = all.remove(idx);
            self.delete_image_dir(&img.id)?;
            out.deleted = Some(img.id);
            let (n, bytes) = self.collect_garbage(&all)?;
            out.blobs_removed = n;
            out.bytes_freed = bytes;
        } else {
            self.write_record(&all[idx])?;
        }
        Ok(out)
    }

    /// Deletes dangling images (no names) and blobs no image references.
    pub fn prune(&self) -> Result<PruneReport, StoreError> {
        let _gc = self.lock_gc(true)?;
        let _lock = self.lock_images(true)?;
        let all = self.read_records()?;
        let mut report = PruneReport::default();
        let mut keep = Vec::new();
        for img in all {
            if img.names.is_empty() {
                self.delete_image_dir(&img.id)?;
                report.images_removed.push(img.id);
            } else {
                keep.push(img);
            }
        }
        // Image directories without a record (an interrupted removal).
        let keep_ids: HashSet<&str> = keep.iter().map(Image::hex_id).collect();
        for entry in read_dir_names(&self.root.join("images"))? {
            if is_hex_id(&entry) && !keep_ids.contains(entry.as_str()) {
                self.delete_image_dir(&entry)?;
            }
        }
        let (n, bytes) = self.collect_garbage(&keep)?;
        report.blobs_removed = n;
        report.bytes_freed = bytes;
        Ok(report)
    }

    // ---- crate-internal building blocks ----

    /// Takes `gc.lock`: shared while adding blobs, exclusive while deleting.
    pub(crate) fn lock_gc(&self, exclusive: bool) -> Result<FileLock, StoreError> {
        FileLock::acquire(&self.root.join("gc.lock"), exclusive)
    }

    /// Takes `images.lock`: exclusive around metadata changes, shared for reads.
    pub(crate) fn lock_images(&self, exclusive: bool) -> Result<FileLock, StoreError> {
        FileLock::acquire(&self.root.join("images.lock"), exclusive)
    }

    /// A writer for a new blob (see [`BlobWriter`]).
    pub(crate) fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        BlobWriter::new(&self.root.join("blobs/sha256"))
    }

    /// Stores `bytes` as a blob; with `expected`, refuses content that does
    /// not hash to it. Returns the digest.
    pub(crate) fn put_blob(
        &self,
        bytes: &[u8],
        expected: Option<&str>,
        what: &str,
    ) -> Result<String, StoreError> {
        let actual = sha256_digest(bytes);
        if let Some(e) = expected {
            if e != actual {
                return Err(StoreError::DigestMismatch {
                    what: what.to_string(),
                    expected: e.to_string(),
                    actual,
                });
            }
        }
        if self.has_blob(&actual) {
            return Ok(actual);
        }
        let mut w = self.blob_writer()?;
        w.write_all(bytes)
            .map_err(StoreError::io(format!("cannot write {what} to the store")))?;
        let (d, _) = w.finish(Some(&actual), None, what)?;
        Ok(d)
    }

    /// Reads a blob that is known to be small (JSON), bounded.
    pub(crate) fn read_blob_bounded(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        let f = File::open(&path).map_err(StoreError::io(format!(
            "cannot open blob {digest} ({})",
            path.display()
        )))?;
        read_bounded(f, MAX_JSON_BYTES, &format!("blob {digest}"))
    }

    /// A scratch path under `<root>/tmp`, deleted when the guard drops.
    pub(crate) fn temp_path(&self, what: &str) -> TempPath {
        TempPath(self.root.join("tmp").join(unique_name(what)))
    }

    /// Records an image whose blobs are all stored: merges with an existing
    /// record of the same ID and moves each name to this image.
    pub(crate) fn commit(&self, new: NewImage) -> Result<Image, StoreError> {
        let _lock = self.lock_images(true)?;
        let mut all = self.read_records()?;
        let new_names: Vec<String> = new.names.clone();
        let image = match all.iter().position(|i| i.id == new.config_digest) {
            Some(at) => {
                let mut old = all.swap_remove(at);
                for n in new.names {
                    if !old.names.contains(&n) {
                        old.names.push(n);
                    }
                }
                for d in new.repo_digests {
                    if !old.repo_digests.contains(&d) {
                        old.repo_digests.push(d);
                    }
                }
                // The ID is trusted only with the layers first verified for
                // it: a later image with the same config never replaces them
                // (its own layers, verified too, differ only in compression;
                // its new blobs are garbage for `image prune`). A record from
                // before hull verified layers is not trusted at all: the new,
                // just verified layers of the same config take its place.
                if !old.layers_verified() {
                    old.layers = new.layers;
                    old.manifest_digest = new.manifest_digest;
                    old.size = new.size;
                }
                old
            }
            None => Image {
                created: new.config.created().clone(),
                id: new.config_digest,
                names: new.names,
                repo_digests: new.repo_digests,
                manifest_digest: new.manifest_digest,
                config: new.config,
                layers: new.layers,
                added: now_secs(),
                size: new.size,
            },
        };
        // Nothing can fail between here and the record but writing: names
        // move only once the image they move to is settled.
        for other in &mut all {
            let before = other.names.len();
            other.names.retain(|n| !new_names.contains(n));
            if other.names.len() != before {
                self.write_record(other)?;
            }
        }
        self.write_record(&image)?;
        Ok(image)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.image_dir(id).join("image.json")
    }

    fn write_record(&self, image: &Image) -> Result<(), StoreError> {
        let dir = self.image_dir(&image.id);
        create_dir_all_mode(&dir, 0o700)
            .map_err(StoreError::io(format!("cannot create {}", dir.display())))?;
        let bytes = serde_json::to_vec_pretty(image)
            .map_err(StoreError::json(format!("image record {}", image.id)))?;
        let tmp = dir.join(".image.json.tmp");
        let dest = self.record_path(&image.id);
        let ctx = || format!("cannot write the image record {}", dest.display());
        let mut f = File::create(&tmp).map_err(StoreError::io(ctx()))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(StoreError::io(ctx()))?;
        fs::rename(&tmp, &dest).map_err(StoreError::io(ctx()))
    }

    fn read_records(&self) -> Result<Vec<Image>, StoreError> {
        let mut out = Vec::new();
        for name in read_dir_names(&self.root.join("images"))? {
            if !is_hex_id(&name) {
                continue;
            }
            let path = self.root.join("images").join(&name).join("image.json");
            let f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(StoreError::Io {
                        context: format!("cannot read the image record {}", path.display()),
                        source: e,
                    })
                }
            };
            let bytes = read_bounded(f, MAX_JSON_BYTES, &path.display().to_string())?;
            match serde_json::from_slice::<Image>(&bytes) {
                Ok(img) if img.hex_id() == name => out.push(img),
                Ok(img) => tracing::warn!(
                    "ignoring image record {}: it names image {}",
                    path.display(),
                    img.id
                ),
                Err(e) => {
                    tracing::warn!("ignoring unreadable image record {}: {e}", path.display());
                }
            }
        }
        Ok(out)
    }

    fn delete_image_dir(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.image_dir(id);
        // The record first, so an interrupted removal leaves no half image.
        match fs::remove_file(self.record_path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::Io {
                    context: format!("cannot remove the record of image {id}"),
                    source: e,
                })
            }
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io {
                context: format!("cannot remove {}", dir.display()),
                source: e,
            }),
        }
    }

    /// Deletes every blob `keep` does not reference, and stale temporary
    /// files. Call with `gc.lock` held exclusively (no writer is active).
    fn collect_garbage(&self, keep: &[Image]) -> Result<(usize, u64), StoreError> {
        let referenced: HashSet<&str> = keep
            .iter()
            .flat_map(Image::blob_digests)
            .filter_map(|d| d.strip_prefix("sha256:"))
            .collect();
        let dir = self.root.join("blobs/sha256");
        let (mut n, mut bytes) = (0, 0);
        for name in read_dir_names(&dir)? {
            let stale_tmp = name.starts_with(".tmp-");
            if !stale_tmp && (!is_hex_id(&name) || referenced.contains(name.as_str())) {
                continue;
            }
            let path = dir.join(&name);
            let size = fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(&path) {
                Ok(()) => {
                    if !stale_tmp {
                        n += 1;
                    }
                    bytes += size;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::Io {
                        context: format!("cannot remove blob {}", path.display()),
                        source: e,
                    })
                }
            }
        }
        for name in read_dir_names(&self.root.join("tmp"))? {
            let p = self.root.join("tmp").join(name);
            let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir_all(&p));
        }
        Ok((n, bytes))
    }
}

/// Finds the record `reference` means: names first, then an ID prefix.
fn resolve(all: &[Image], reference: &str) -> Result<Option<(usize, Matched)>, StoreError> {
    let id_prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
    let looks_like_id = id_prefix.len() >= MIN_ID_PREFIX
        && id_prefix.len() <= 64
        && id_prefix
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    match Reference::parse(reference) {
        Ok(r) => {
            for cand in r.local_candidates() {
                let full = cand.to_string();
                if let Some(i) = all.iter().position(|img| img.names.contains(&full)) {
                    return Ok(Some((i, Matched::Name(full))));
                }
                if let Some(d) = cand.digest() {
                    let by_digest = format!("{}@{d}", cand.name());
                    if let Some(i) = all
                        .iter()
                        .position(|img| img.repo_digests.contains(&by_digest))
                    {
                        return Ok(Some((i, Matched::Name(by_digest))));
                    }
                }
            }
        }
        Err(e) if !looks_like_id => return Err(e.into()),
        Err(_) => {}
    }
    if !looks_like_id {
        return Ok(None);
    }
    let hits: Vec<usize> = (0..all.len())
        .filter(|&i| all[i].hex_id().starts_with(id_prefix))
        .collect();
    match hits.as_slice() {
        [] => Ok(None),
        [i] => Ok(Some((*i, Matched::Id))),
        many => Err(StoreError::AmbiguousId {
            prefix: reference.to_string(),
            matches: many
                .iter()
                .map(|&i| all[i].short_id().to_string())
                .collect(),
        }),
    }
}

fn default_root() -> Result<PathBuf, StoreError> {
    if let Some(r) = std::env::var_os("HULL_ROOT").filter(|r| !r.is_empty()) {
        return Ok(PathBuf::from(r));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/var/lib/hull"));
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").map(PathBuf::from) {
        if x.is_absolute() {
            return Ok(x.join("hull"));
        }
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/hull")),
        None => Err(StoreError::Other(
            "cannot choose where to keep images: HOME is not set; set HULL_ROOT to a directory"
                .to_string(),
        )),
    }
}

/// An flock(2) on a lock file, released when dropped.
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    fn acquire(path: &Path, exclusive: bool) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(StoreError::io(format!(
                "cannot open lock file {}",
                path.display()
            )))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: flock only reads the descriptor number, which `file`
            // keeps open for the duration of the call.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(FileLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(StoreError::Io {
                    context: format!("cannot lock {}", path.display()),
                    source: e,
                });
            }
        }
    }
}

/// Writes a blob to a temporary file next to its final place, hashing as it
/// goes; [`BlobWriter::finish`] verifies and renames. Dropped unfinished, the
/// temporary file is removed: no partial blob ever sits under a digest.
#[derive(Debug)]
pub(crate) struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    dir: PathBuf,
    hasher: Sha256,
    written: u64,
    /// Set once sealed.
    digest: Option<String>,
    /// Moved into place.
    persisted: bool,
}

impl BlobWriter {
    fn new(dir: &Path) -> Result<Self, StoreError> {
        let tmp = dir.join(unique_name(".tmp"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(StoreError::io(format!(
                "cannot create a temporary blob in {}",
                dir.display()
            )))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            dir: dir.to_path_buf(),
            hasher: Sha256::new(),
            written: 0,
            digest: None,
            persisted: false,
        })
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Verifies the content against `expected` digest and size (when given)
    /// and moves it into place. Returns the digest and size.
    pub(crate) fn finish(
        mut self,
        expected: Option<&str>,
        expected_size: Option<u64>,
        what: &str,
    ) -> Result<(String, u64), StoreError> {
        let (digest, _) = self.seal(expected, expected_size, what)?;
        let size = self.persist(what)?;
        Ok((digest, size))
    }

    /// Ends writing: syncs the temporary file and verifies it against
    /// `expected` digest and size (when given), leaving it where it is (see
    /// [`BlobWriter::sealed_path`]) until [`BlobWriter::persist`]. Returns the
    /// digest and size.
    pub(crate) fn seal(
        &mut self,
        expected: Option<&str>,
        expected_size: Option<u64>,
        what: &str,
    ) -> Result<(String, u64), StoreError> {
        let file = self
            .file
            .take()
            .ok_or_else(|| StoreError::Other(format!("{what}: blob writer already finished")))?;
        let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if let Some(size) = expected_size {
            if size != self.written {
                return Err(StoreError::SizeMismatch {
                    what: what.to_string(),
                    expected: size,
                    actual: self.written,
                });
            }
        }
        if let Some(e) = expected {
            if e != actual {
                return Err(StoreError::DigestMismatch {
                    what: what.to_string(),
                    expected: e.to_string(),
                    actual,
                });
            }
        }
        file.sync_all()
            .map_err(StoreError::io(format!("cannot write {what} to the store")))?;
        self.digest = Some(actual.clone());
        Ok((actual, self.written))
    }

    /// The sealed, not yet persisted content (for reading it back).
    pub(crate) fn sealed_path(&self) -> &Path {
        &self.tmp
    }

    /// Moves sealed content into place under its digest. Returns its size,
    /// as the file on disk has it.
    pub(crate) fn persist(mut self, what: &str) -> Result<u64, StoreError> {
        let digest = self
            .digest
            .take()
            .ok_or_else(|| StoreError::Other(format!("{what}: blob not sealed")))?;
        let hex = digest.trim_start_matches("sha256:");
        let dest = self.dir.join(hex);
        fs::rename(&self.tmp, &dest).map_err(StoreError::io(format!(
            "cannot move {what} into place at {}",
            dest.display()
        )))?;
        self.persisted = true;
        let size = fs::metadata(&dest)
            .map_err(StoreError::io(format!("cannot stat {}", dest.display())))?
            .len();
        Ok(size)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("blob writer already finished"))?;
        let n = f.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Unfinished, refused, or sealed but not persisted: nothing stays.
        if !self.persisted {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A path removed (file or directory) when dropped.
#[derive(Debug)]
pub(crate) struct TempPath(pub PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0).or_else(|_| fs::remove_dir_all(&self.0));
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Reads all of `r`, refusing more than `limit` bytes.
pub(crate) fn read_bounded(r: impl Read, limit: u64, what: &str) -> Result<Vec<u8>, StoreError> {
    let mut buf = Vec::new();
    r.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(StoreError::io(format!("cannot read {what}")))?;
    if buf.len() as u64 > limit {
        return Err(StoreError::TooLarge {
            what: what.to_string(),
            limit,
        });
    }
    Ok(buf)
}

/// Checks a digest from untrusted input before it is used as a file name.
pub(crate) fn checked_digest(d: &str, what: &str) -> Result<String, StoreError> {
    validate_digest(d).map_err(|reason| StoreError::Unsupported {
        what: format!("{what}: digest {d:?}"),
        detail: reason,
    })?;
    Ok(d.to_string())
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Formats seconds since the epoch as RFC 3339 UTC (`2024-01-02T03:04:05Z`).
pub(crate) fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm), for days >= 0.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{}-{n}-{nanos}", std::process::id())
}

fn read_dir_names(dir: &Path) -> Result<BTreeSet<String>, StoreError> {
    let ctx = || format!("cannot list {}", dir.display());
    let mut out = BTreeSet::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(StoreError::Io {
                context: ctx(),
                source: e,
            })
        }
    };
    for entry in rd {
        let entry = entry.map_err(StoreError::io(ctx()))?;
        if let Ok(name) = entry.file_name().into_string() {
            out.insert(name);
        }
    }
    Ok(out)
}

fn create_dir_all_mode(dir: &Path, mode: u32) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{ImageConfigurationBuilder, RootFsBuilder};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(Some(dir.path().join("root"))).unwrap();
        (dir, store)
    }

    /// Records a small fake image whose config differs by `seed`.
    fn fake_image(store: &Store, seed: &str, names: &[&str]) -> Image {
        let _gc = store.lock_gc(false).unwrap();
        let layer = format!("layer for {seed}");
        let layer_digest = store.put_blob(layer.as_bytes(), None, "layer").unwrap();
        let config = ImageConfigurationBuilder::default()
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![layer_digest.clone()])
                    .build()
                    .unwrap(),
            )
            .author(seed)
            .build()
            .unwrap();
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_digest = store.put_blob(&config_bytes, None, "config").unwrap();
        let manifest = format!("manifest {seed}");
        let manifest_digest = store
            .put_blob(manifest.as_bytes(), None, "manifest")
            .unwrap();
        store
            .commit(NewImage {
                config_digest,
                config,
                manifest_digest,
                layers: vec![Layer {
                    digest: layer_digest.clone(),
                    media_type: media::OCI_LAYER_TAR.to_string(),
                    size: layer.len() as u64,
                    compression: Compression::None,
                    diff_id: layer_digest.clone(),
                }],
                names: names.iter().map(ToString::to_string).collect(),
                repo_digests: vec![],
                size: 1,
            })
            .unwrap()
    }

    fn blob_count(store: &Store) -> usize {
        fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .count()
    }

    #[test]
    fn blobs_are_verified_and_never_partial() {
        let (_d, store) = store();
        let good = sha256_digest(b"hello");
        let wrong = sha256_digest(b"other");
        let err = store
            .put_blob(b"hello", Some(&wrong), "test blob")
            .unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains("test blob"), "{err}");
        assert_eq!(blob_count(&store), 0);

        // Streamed writer, wrong digest: nothing left behind.
        let mut w = store.blob_writer().unwrap();
        w.write_all(b"hello").unwrap();
        assert!(w.finish(Some(&wrong), None, "streamed").is_err());
        assert_eq!(blob_count(&store), 0);
        // Wrong size.
        let mut w = store.blob_writer().unwrap();
        w.write_all(b"hello").unwrap();
        let err = w.finish(Some(&good), Some(4), "sized").unwrap_err();
        assert!(matches!(err, StoreError::SizeMismatch { .. }), "{err}");
        // Dropped unfinished.
        let mut w = store.blob_writer().unwrap();
        w.write_all(b"partial").unwrap();
        drop(w);
        assert_eq!(blob_count(&store), 0);

        let d = store.put_blob(b"hello", Some(&good), "good").unwrap();
        assert_eq!(d, good);
        assert_eq!(fs::read(store.blob_path(&good)).unwrap(), b"hello");
        assert_eq!(blob_count(&store), 1);
        assert_eq!(
            store.blob_path("sha256:../../etc"),
            store.root().join("blobs/invalid-digest")
        );
    }

    #[test]
    fn concurrent_writers_of_the_same_blob() {
        let (_d, store) = store();
        let data: Vec<u8> = (0..200_000u32).flat_map(u32::to_le_bytes).collect();
        let digest = sha256_digest(&data);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let mut w = store.blob_writer().unwrap();
                    for chunk in data.chunks(4096) {
                        w.write_all(chunk).unwrap();
                    }
                    w.finish(Some(&digest), Some(data.len() as u64), "x")
                        .unwrap();
                });
            }
        });
        assert_eq!(fs::read(store.blob_path(&digest)).unwrap(), data);
        assert_eq!(blob_count(&store), 1);
    }

    #[test]
    fn concurrent_commits_keep_every_name() {
        let (_d, store) = store();
        std::thread::scope(|s| {
            for i in 0..6 {
                let store = &store;
                s.spawn(move || {
                    let name = format!("localhost/img{i}:latest");
                    fake_image(store, "same", &[&name]);
                });
            }
        });
        let all = store.list().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].names.len(), 6);
    }

    #[test]
    fn find_by_name_id_and_prefix() {
        let (_d, store) = store();
        let a = fake_image(&store, "a", &["localhost/busybox:latest"]);
        let b = fake_image(&store, "b", &["docker.io/library/busybox:1.36"]);
        let c = fake_image(&store, "c", &["docker.io/library/busybox:latest"]);

        let id = |r: &str| store.find(r).unwrap().map(|i| i.id);
        // Short names: localhost first, then docker.io.
        assert_eq!(id("busybox"), Some(a.id.clone()));
        assert_eq!(id("busybox:1.36"), Some(b.id.clone()));
        assert_eq!(id("docker.io/busybox"), Some(c.id.clone()));
        assert_eq!(id("localhost/busybox:latest"), Some(a.id.clone()));
        assert_eq!(id("busybox:nope"), None);
        // IDs.
        assert_eq!(id(&a.id), Some(a.id.clone()));
        assert_eq!(id(a.hex_id()), Some(a.id.clone()));
        assert_eq!(id(a.short_id()), Some(a.id.clone()));
        assert_eq!(
            id(&format!("sha256:{}", &a.hex_id()[..10])),
            Some(a.id.clone())
        );
        // Too short to be an ID prefix, and not a known name.
        assert_eq!(id(&a.hex_id()[..2]), None);
        // Ambiguous prefix: find two IDs sharing a first digit.
        let all = store.list().unwrap();
        let mut by_first: std::collections::HashMap<char, usize> = Default::default();
        for i in &all {
            *by_first
                .entry(i.hex_id().chars().next().unwrap())
                .or_default() += 1;
        }
        // A bad reference is an error, not "not found".
        assert!(matches!(
            store.find("Bad Name"),
            Err(StoreError::Reference(_))
        ));
    }

    #[test]
    fn ambiguous_id_prefix() {
        let (_d, store) = store();
        // Make images until two IDs share 3 leading digits (birthday bound:
        // with 4096 buckets this takes ~80 images on average).
        let mut seen: std::collections::HashMap<String, String> = Default::default();
        for i in 0..2000 {
            let img = fake_image(&store, &format!("s{i}"), &[]);
            let p = img.hex_id()[..3].to_string();
            if let Some(other) = seen.insert(p.clone(), img.id.clone()) {
                let err = store.find(&p).unwrap_err();
                assert!(matches!(err, StoreError::AmbiguousId { .. }), "{err}");
                assert!(err.to_string().contains(&other[7..19]), "{err}");
                return;
            }
        }
        panic!("no collision found");
    }

    #[test]
    fn names_move_between_images() {
        let (_d, store) = store();
        let a = fake_image(&store, "a", &["localhost/x:latest", "localhost/y:latest"]);
        let b = fake_image(&store, "b", &["localhost/x:latest"]);
        assert_eq!(store.find("x").unwrap().unwrap().id, b.id);
        let a2 = store.find(&a.id).unwrap().unwrap();
        assert_eq!(a2.names, ["localhost/y:latest"]);
    }

    #[test]
    fn remove_untags_then_deletes() {
        let (_d, store) = store();
        let a = fake_image(&store, "a", &["localhost/x:latest", "localhost/y:latest"]);
        let _b = fake_image(&store, "b", &["localhost/z:latest"]);
        fs::write(store.image_dir(&a.id).join("rootfs.img"), b"disk").unwrap();
        let before = blob_count(&store);

        let r = store.remove("x").unwrap();
        assert_eq!(r.untagged, ["localhost/x:latest"]);
        assert_eq!(r.deleted, None);
        assert_eq!(blob_count(&store), before);

        let r = store.remove("localhost/y").unwrap();
        assert_eq!(r.deleted, Some(a.id.clone()));
        assert_eq!(r.blobs_removed, 3);
        assert!(r.bytes_freed > 0);
        assert!(!store.image_dir(&a.id).exists());
        assert_eq!(blob_count(&store), before - 3);
        assert!(store.find(&a.id).unwrap().is_none());

        let err = store.remove("x").unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("hull pull"), "{err}");

        // By ID: deleted whatever names it has.
        let c = fake_image(&store, "c", &["localhost/c1:latest", "localhost/c2:latest"]);
        let r = store.remove(c.short_id()).unwrap();
        assert_eq!(r.deleted, Some(c.id.clone()));
        assert_eq!(r.untagged.len(), 2);
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn prune_removes_dangling_and_unreferenced() {
        let (_d, store) = store();
        let a = fake_image(&store, "a", &["localhost/x:latest"]);
        let b = fake_image(&store, "b", &["localhost/x:latest"]); // a is now dangling
        let stray = store.put_blob(b"stray", None, "stray").unwrap();
        fs::write(store.root().join("blobs/sha256/.tmp-old"), b"junk").unwrap();
        let report = store.prune().unwrap();
        assert_eq!(report.images_removed, std::slice::from_ref(&a.id));
        assert_eq!(report.blobs_removed, 4);
        assert!(report.bytes_freed > 0);
        assert!(!store.has_blob(&stray));
        assert!(!store.root().join("blobs/sha256/.tmp-old").exists());
        for d in b.blob_digests() {
            assert!(store.has_blob(d), "{d}");
        }
        assert_eq!(store.prune().unwrap(), PruneReport::default());
    }

    #[test]
    fn default_root_rules() {
        // Only the HULL_ROOT rule is testable without changing the process
        // environment for other tests; check the explicit root instead.
        let (_d, store) = store();
        assert!(store.root().join("blobs/sha256").is_dir());
        assert!(store.root().join("images").is_dir());
    }

    #[test]
    fn rfc3339_format() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
