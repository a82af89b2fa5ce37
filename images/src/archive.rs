//! `hull load` (docker-archive and oci-archive tarballs) and `hull import`
//! (a plain root-fs tarball).
//!
//! Archive contents are treated as hostile: nothing is ever extracted to the
//! host file system by its name. The archive (decompressed first into the
//! store's scratch directory when it is gzip or zstd) is indexed once; names
//! are only used as keys to look entries up; links inside it are never
//! followed (an image that needs one is refused, naming it); JSON files are
//! read with a size bound; every blob is verified against its digest (or, for
//! docker-archive layers, against the config's diff IDs) before it is stored
//! under a digest.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;

use crate::ingest::{persist_all, Expect, Ingest};
use crate::reference::{is_hex_id, Reference};
use crate::registry::{check_platform, is_index, pick_platform};
use crate::store::{
    checked_digest, media, now_secs, read_bounded, rfc3339, sha256_digest, Compression, Image,
    ImportOptions, Layer, NewImage, Store, StoreError, TempPath, MAX_JSON_BYTES,
};
use crate::tarwalk::{self, TarError};

/// Entries an archive may have (bounds the index kept in memory).
const MAX_ENTRIES: usize = 200_000;
/// Bytes of entry names and link targets kept in the index, all together.
const MAX_NAME_BYTES: usize = 64 * 1024 * 1024;
/// The largest a compressed archive may decompress to in the scratch
/// directory.
pub(crate) const MAX_DECOMPRESSED: u64 = 64 * 1024 * 1024 * 1024;
/// Free space the scratch directory's file system keeps while an archive is
/// decompressed there.
const SCRATCH_RESERVE: u64 = 256 * 1024 * 1024;
/// How often (in bytes written) free space is checked again.
const SPACE_CHECK_EVERY: u64 = 16 * 1024 * 1024;

const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Loads every image in a docker-archive or oci-archive tarball.
pub(crate) fn load(store: &Store, path: &Path) -> Result<Vec<Image>, StoreError> {
    let _gc = store.lock_gc(false)?;
    let archive = IndexedArchive::open(store, path)?;
    if archive.contains("manifest.json") {
        load_docker(store, &archive)
    } else if archive.contains("index.json") {
        load_oci(store, &archive)
    } else {
        Err(archive.error(
            "it has neither manifest.json (a docker-archive, as `docker save` writes) nor \
             index.json (an oci-archive); is it an image archive? (a root-fs tarball is \
             imported with `hull import`)"
                .to_string(),
        ))
    }
}

/// A `docker save` manifest.json entry.
#[derive(Debug, Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

fn load_docker(store: &Store, archive: &IndexedArchive) -> Result<Vec<Image>, StoreError> {
    let entries: Vec<DockerManifestEntry> = archive.read_json("manifest.json")?;
    if entries.is_empty() {
        return Err(archive.error("manifest.json lists no images".to_string()));
    }
    let ingest = Ingest::new(store)?;
    let mut out = Vec::new();
    for entry in entries {
        // The config: its name often carries its digest (<hex>.json, or
        // blobs/sha256/<hex> since docker 25); check it when it does.
        let config_bytes = archive.read_bounded(&entry.config)?;
        let config_digest = sha256_digest(&config_bytes);
        if let Some(expected) = digest_in_name(&entry.config) {
            if expected != config_digest {
                return Err(StoreError::DigestMismatch {
                    what: archive.describe(&entry.config),
                    expected,
                    actual: config_digest,
                });
            }
        }
        let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(StoreError::json(archive.describe(&entry.config)))?;
        check_platform(&config, &archive.describe(&entry.config))?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != entry.layers.len() {
            return Err(archive.error(format!(
                "manifest.json lists {} layers for {} but its config has {} diff IDs",
                entry.layers.len(),
                entry.config,
                diff_ids.len()
            )));
        }
        let mut verified = Vec::new();
        for (i, (name, diff_id)) in entry.layers.iter().zip(diff_ids).enumerate() {
            let what = format!("layer {} ({})", i + 1, archive.describe(name));
            let diff_id = checked_digest(diff_id, &what)?;
            let expected = digest_in_name(name);
            verified.push(ingest.read(
                || archive.member(name),
                Expect {
                    digest: expected.as_deref(),
                    diff_id: Some((i, &diff_id)),
                    ..Expect::default()
                },
                &what,
            )?);
        }
        let layers = persist_all(verified)?;
        let names = entry
            .repo_tags
            .unwrap_or_default()
            .iter()
            .map(|t| Reference::parse(t).map(|r| r.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(record_image(store, &config_bytes, layers, names)?);
    }
    Ok(out)
}

fn load_oci(store: &Store, archive: &IndexedArchive) -> Result<Vec<Image>, StoreError> {
    if archive.contains("oci-layout") {
        #[derive(Deserialize)]
        struct Layout {
            #[serde(rename = "imageLayoutVersion")]
            version: String,
        }
        let layout: Layout = archive.read_json("oci-layout")?;
        if !layout.version.starts_with("1.") {
            return Err(archive.error(format!(
                "oci-layout version {:?} is not supported (1.x is)",
                layout.version
            )));
        }
    }
    let index: ImageIndex = archive.read_json("index.json")?;
    let ingest = Ingest::new(store)?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for desc in index.manifests() {
        let annotations = desc.annotations().clone().unwrap_or_default();
        if let Some(p) = desc.platform() {
            let plat = format!("{}/{}", p.os(), p.architecture());
            if plat != "linux/amd64" {
                skipped.push(plat);
                continue;
            }
        }
        let mut digest = checked_digest(desc.digest().as_ref(), &archive.describe("index.json"))?;
        let mut bytes = archive.read_blob(&digest)?;
        if is_index(&bytes, &archive.describe(&blob_name(&digest)))? {
            let nested: ImageIndex = serde_json::from_slice(&bytes)
                .map_err(StoreError::json(archive.describe(&blob_name(&digest))))?;
            digest = pick_platform(&nested, &archive.describe(&blob_name(&digest)))?;
            bytes = archive.read_blob(&digest)?;
        }
        let manifest_what = archive.describe(&blob_name(&digest));
        if is_index(&bytes, &manifest_what)? {
            return Err(StoreError::Unsupported {
                what: manifest_what,
                detail: "an image index nested two levels deep".to_string(),
            });
        }
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(StoreError::json(manifest_what.clone()))?;

        let cdesc = manifest.config();
        let config_digest = checked_digest(cdesc.digest().as_ref(), &manifest_what)?;
        let config_bytes = archive.read_blob(&config_digest)?;
        let config_what = archive.describe(&blob_name(&config_digest));
        let config: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(StoreError::json(config_what.clone()))?;
        check_platform(&config, &config_what)?;
        if config.rootfs().diff_ids().len() != manifest.layers().len() {
            return Err(archive.error(format!(
                "manifest {digest} lists {} layers but its config has {} diff IDs",
                manifest.layers().len(),
                config.rootfs().diff_ids().len()
            )));
        }

        let mut verified = Vec::new();
        let diff_ids = config.rootfs().diff_ids();
        for (i, (l, diff_id)) in manifest.layers().iter().zip(diff_ids).enumerate() {
            let ld = checked_digest(l.digest().as_ref(), &manifest_what)?;
            let name = blob_name(&ld);
            let what = format!("layer {} ({})", i + 1, archive.describe(&name));
            let diff_id = checked_digest(diff_id, &config_what)?;
            let mt = l.media_type().to_string();
            let compression =
                Compression::from_media_type(&mt).ok_or_else(|| StoreError::Unsupported {
                    what: what.clone(),
                    detail: format!("layer media type {mt} is not a plain, gzip or zstd tar"),
                })?;
            verified.push(ingest.read(
                || archive.member(&name),
                Expect {
                    digest: Some(&ld),
                    size: Some(l.size()),
                    diff_id: Some((i, &diff_id)),
                    media_type: Some((&mt, compression)),
                },
                &what,
            )?);
        }
        let layers = persist_all(verified)?;

        store.put_blob(&config_bytes, Some(&config_digest), &config_what)?;
        store.put_blob(&bytes, Some(&digest), &manifest_what)?;
        let name = annotations
            .get(ANNOTATION_CONTAINERD_NAME)
            .or_else(|| annotations.get(ANNOTATION_REF_NAME))
            .filter(|n| n.contains('/') || n.contains(':'));
        let names = match name {
            Some(n) => vec![Reference::parse(n)?.to_string()],
            None => Vec::new(),
        };
        let size = layers.iter().map(|l| l.size).sum::<u64>()
            + config_bytes.len() as u64
            + bytes.len() as u64;
        out.push(store.commit(NewImage {
            config_digest,
            config,
            manifest_digest: digest,
            layers,
            names,
            repo_digests: Vec::new(),
            size,
        })?);
    }
    if out.is_empty() {
        return Err(archive.error(if skipped.is_empty() {
            "index.json lists no images".to_string()
        } else {
            format!(
                "no linux/amd64 image in it (it has: {}); hull runs linux/amd64 images",
                skipped.join(", ")
            )
        }));
    }
    Ok(out)
}

/// Makes a one-layer image from a root-fs tarball (see [`Store::import_rootfs`]).
pub(crate) fn import_rootfs(
    store: &Store,
    tar: &Path,
    name: &str,
    opts: &ImportOptions,
) -> Result<Image, StoreError> {
    let reference = Reference::parse_local(name)?;
    let _gc = store.lock_gc(false)?;
    let f = File::open(tar).map_err(StoreError::io(format!("cannot open {}", tar.display())))?;
    let what = format!("root-fs tarball {}", tar.display());
    let (layer, diff_id) = ingest_layer(store, f, &what)?;

    let mut cfg = serde_json::Map::new();
    if let Some(c) = &opts.cmd {
        cfg.insert("Cmd".into(), serde_json::json!(c));
    }
    if let Some(e) = &opts.entrypoint {
        cfg.insert("Entrypoint".into(), serde_json::json!(e));
    }
    if !opts.env.is_empty() {
        cfg.insert("Env".into(), serde_json::json!(opts.env));
    }
    if let Some(w) = &opts.working_dir {
        cfg.insert("WorkingDir".into(), serde_json::json!(w));
    }
    let created = rfc3339(now_secs());
    let config = serde_json::json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": cfg,
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": created, "created_by": format!("hull import {}", tar.display()) }],
    });
    let config_bytes =
        serde_json::to_vec(&config).map_err(StoreError::json("the generated config"))?;
    record_image(
        store,
        &config_bytes,
        vec![layer],
        vec![reference.to_string()],
    )
}

/// Stores a layer read from `reader` (plain, gzip or zstd tar, detected from
/// its first bytes) that no config describes yet (`import`, the default
/// image): checks it is a tar archive and returns it with its diff ID.
pub(crate) fn ingest_layer(
    store: &Store,
    reader: impl Read,
    what: &str,
) -> Result<(Layer, String), StoreError> {
    let layer = Ingest::new(store)?
        .read(|| Ok(reader), Expect::default(), what)?
        .persist()?;
    let diff_id = layer.diff_id.clone();
    Ok((layer, diff_id))
}

/// Records an image whose layers are stored and whose config is given as
/// bytes: stores the config and a generated OCI manifest, then commits.
pub(crate) fn record_image(
    store: &Store,
    config_bytes: &[u8],
    layers: Vec<Layer>,
    names: Vec<String>,
) -> Result<Image, StoreError> {
    let config: ImageConfiguration =
        serde_json::from_slice(config_bytes).map_err(StoreError::json("the image config"))?;
    let config_digest = store.put_blob(config_bytes, None, "the image config")?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {
            "mediaType": media::OCI_CONFIG,
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type,
            "digest": l.digest,
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(StoreError::json("the generated manifest"))?;
    let manifest_digest = store.put_blob(&manifest_bytes, None, "the generated manifest")?;
    let size = layers.iter().map(|l| l.size).sum::<u64>()
        + config_bytes.len() as u64
        + manifest_bytes.len() as u64;
    store.commit(NewImage {
        config_digest,
        config,
        manifest_digest,
        layers,
        names,
        repo_digests: Vec::new(),
        size,
    })
}

/// `blobs/sha256/<hex>` for a digest.
fn blob_name(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

/// The digest an archive member's name carries: `<hex>.json`, `<hex>.tar`,
/// `<hex>/layer.tar`-style names do not count (docker's legacy layer IDs are
/// not content digests), `blobs/sha256/<hex>` and `<hex>.json` / `<hex>.tar`
/// do.
fn digest_in_name(name: &str) -> Option<String> {
    let norm = normalize(name);
    if let Some(hex) = norm.strip_prefix("blobs/sha256/") {
        return is_hex_id(hex).then(|| format!("sha256:{hex}"));
    }
    let stem = norm
        .strip_suffix(".json")
        .or_else(|| norm.strip_suffix(".tar"))?;
    (is_hex_id(stem)).then(|| format!("sha256:{stem}"))
}

/// Normalizes an archive member name for lookups only: drops leading `./`
/// and `/`, empty and `.` components. `..` stays as it is (it then matches
/// nothing that a manifest can sensibly name).
fn normalize(name: &str) -> String {
    name.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Why indexing an archive stopped.
#[derive(Debug, thiserror::Error)]
enum WalkError {
    #[error(transparent)]
    Tar(#[from] TarError),
    #[error(transparent)]
    Store(StoreError),
}

#[derive(Debug, Clone)]
enum Entry {
    File { offset: u64, size: u64 },
    Link { kind: &'static str, target: String },
    Other(String),
}

/// A tar archive opened for random access, its entries indexed by name.
struct IndexedArchive {
    path: PathBuf,
    file: File,
    entries: HashMap<String, Entry>,
    _decompressed: Option<TempPath>,
}

impl IndexedArchive {
    fn open(store: &Store, path: &Path) -> Result<Self, StoreError> {
        let mut f =
            File::open(path).map_err(StoreError::io(format!("cannot open {}", path.display())))?;
        let mut head = [0u8; 4];
        let n = f
            .read_at(&mut head, 0)
            .map_err(StoreError::io(format!("cannot read {}", path.display())))?;
        let compression = Compression::sniff(&head[..n]);
        let (file, tmp) = if compression == Compression::None {
            (f, None)
        } else {
            let tmp = store.temp_path("archive");
            let mut out = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp.0)
                .map_err(StoreError::io(format!(
                    "cannot create scratch file {}",
                    tmp.0.display()
                )))?;
            let mut dec = compression
                .decoder(BufReader::new(&mut f))
                .map_err(StoreError::io(format!(
                    "cannot decompress {}",
                    path.display()
                )))?;
            let dir = store.root().join("tmp");
            let mut capped = ScratchWriter::new(&mut out, &dir, MAX_DECOMPRESSED, SCRATCH_RESERVE);
            match io::copy(&mut dec, &mut capped) {
                Ok(_) => {}
                Err(e) => {
                    return Err(StoreError::Archive {
                        path: path.to_path_buf(),
                        message: match capped.refused.take() {
                            Some(why) => why,
                            None => format!("cannot decompress it: {e}"),
                        },
                    })
                }
            }
            out.flush()
                .and_then(|()| out.seek(io::SeekFrom::Start(0)).map(drop))
                .map_err(StoreError::io(format!("cannot write {}", tmp.0.display())))?;
            (out, Some(tmp))
        };
        let mut entries = HashMap::new();
        let mut name_bytes = 0usize;
        {
            let bad = |e: TarError| StoreError::Archive {
                path: path.to_path_buf(),
                message: format!("not a readable tar archive: {e}"),
            };
            let mut ar = tar::Archive::new(&file);
            let all = ar.entries_with_seek().map_err(|e| bad(e.into()))?;
            tarwalk::walk(all, |m| {
                if entries.len() >= MAX_ENTRIES {
                    return Err(WalkError::Store(StoreError::Archive {
                        path: path.to_path_buf(),
                        message: format!("it has more than {MAX_ENTRIES} entries; refused"),
                    }));
                }
                let Ok(name) = std::str::from_utf8(&m.path).map(normalize) else {
                    return Ok(());
                };
                name_bytes += name.len() + m.link.len();
                if name_bytes > MAX_NAME_BYTES {
                    return Err(WalkError::Store(StoreError::Archive {
                        path: path.to_path_buf(),
                        message: format!(
                            "its entry names add up to more than {MAX_NAME_BYTES} bytes; refused"
                        ),
                    }));
                }
                let kind = m.kind;
                let link_target = || String::from_utf8_lossy(&m.link).into_owned();
                let e = if kind.is_file() || kind == tar::EntryType::Continuous {
                    Entry::File {
                        offset: m.data_pos,
                        size: m.size,
                    }
                } else if kind.is_symlink() {
                    Entry::Link {
                        kind: "symbolic link",
                        target: link_target(),
                    }
                } else if kind.is_hard_link() {
                    Entry::Link {
                        kind: "hard link",
                        target: link_target(),
                    }
                } else if kind.is_dir() {
                    return Ok(());
                } else {
                    Entry::Other(format!("{kind:?}"))
                };
                entries.insert(name, e);
                Ok(())
            })
            .map_err(|e| match e {
                WalkError::Tar(t) => bad(t),
                WalkError::Store(e) => e,
            })?;
        }
        if entries.is_empty() {
            return Err(StoreError::Archive {
                path: path.to_path_buf(),
                message: "it is empty, or not a tar archive".to_string(),
            });
        }
        Ok(IndexedArchive {
            path: path.to_path_buf(),
            file,
            entries,
            _decompressed: tmp,
        })
    }

    fn error(&self, message: String) -> StoreError {
        StoreError::Archive {
            path: self.path.clone(),
            message,
        }
    }

    fn describe(&self, name: &str) -> String {
        format!("{name} in archive {}", self.path.display())
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(&normalize(name))
    }

    /// A reader over a regular-file member.
    fn member(&self, name: &str) -> Result<Section<'_>, StoreError> {
        match self.entries.get(&normalize(name)) {
            Some(Entry::File { offset, size }) => Ok(Section {
                file: &self.file,
                pos: *offset,
                end: offset.saturating_add(*size),
            }),
            Some(Entry::Link { kind, target }) => Err(self.error(format!(
                "{name} is a {kind} (to {target:?}); hull does not follow links inside \
                 archives. Re-create the archive with a current `docker save`, or \
                 `skopeo copy ... docker-archive:FILE`"
            ))),
            Some(Entry::Other(kind)) => {
                Err(self.error(format!("{name} is not a regular file ({kind})")))
            }
            None => Err(self.error(format!(
                "{name} is named by the archive's manifest but missing from it; the archive is \
                 incomplete"
            ))),
        }
    }

    fn size_of(&self, name: &str) -> Option<u64> {
        match self.entries.get(&normalize(name)) {
            Some(Entry::File { size, .. }) => Some(*size),
            _ => None,
        }
    }

    fn read_bounded(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        if self.size_of(name).is_some_and(|s| s > MAX_JSON_BYTES) {
            return Err(StoreError::TooLarge {
                what: self.describe(name),
                limit: MAX_JSON_BYTES,
            });
        }
        read_bounded(self.member(name)?, MAX_JSON_BYTES, &self.describe(name))
    }

    fn read_json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T, StoreError> {
        let bytes = self.read_bounded(name)?;
        serde_json::from_slice(&bytes).map_err(StoreError::json(self.describe(name)))
    }

    /// A small blob (`blobs/sha256/<hex>`), verified against its digest.
    fn read_blob(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let name = blob_name(digest);
        let bytes = self.read_bounded(&name)?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(StoreError::DigestMismatch {
                what: self.describe(&name),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(bytes)
    }
}

/// Writes a decompressed archive to its scratch file, refusing to go past
/// `cap` bytes ([`MAX_DECOMPRESSED`]) or to leave less than `reserve`
/// ([`SCRATCH_RESERVE`]) free on the file system (checked with statvfs every
/// [`SPACE_CHECK_EVERY`] bytes). A refusal is an I/O error; its reason is
/// left in `refused`.
struct ScratchWriter<'a, W> {
    out: W,
    dir: &'a Path,
    cap: u64,
    reserve: u64,
    written: u64,
    next_check: u64,
    refused: Option<String>,
}

impl<'a, W: Write> ScratchWriter<'a, W> {
    fn new(out: W, dir: &'a Path, cap: u64, reserve: u64) -> Self {
        ScratchWriter {
            out,
            dir,
            cap,
            reserve,
            written: 0,
            next_check: 0,
            refused: None,
        }
    }

    fn refuse(&mut self, why: String) -> io::Error {
        self.refused = Some(why);
        io::Error::other("refused")
    }
}

impl<W: Write> Write for ScratchWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let after = self.written.saturating_add(buf.len() as u64);
        if after > self.cap {
            return Err(self.refuse(format!(
                "it decompresses to more than {} bytes; refused (load an uncompressed \
                 archive instead)",
                self.cap
            )));
        }
        if after >= self.next_check {
            let free = free_bytes(self.dir)?;
            if free < self.reserve.saturating_add(SPACE_CHECK_EVERY) {
                return Err(self.refuse(format!(
                    "decompressing it would fill the disk: {} has {free} bytes free after \
                     {} bytes written; free some space, or load an uncompressed archive",
                    self.dir.display(),
                    self.written
                )));
            }
            self.next_check = after.saturating_add(SPACE_CHECK_EVERY);
        }
        let n = self.out.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Bytes an unprivileged user may still write on the file system of `dir`.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("path contains a NUL byte"))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st`
    // is a valid, writable statvfs for the call to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A byte range of the archive file, read with positioned reads.
struct Section<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Section<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive member is truncated",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Appends a regular file to a tar builder.
    pub(crate) fn add_file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    }

    /// A small root-fs layer (uncompressed tar).
    pub(crate) fn rootfs_tar(marker: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        add_file(&mut b, "etc/marker", marker.as_bytes());
        add_file(&mut b, "bin/hello", b"#!/bin/sh\necho hi\n");
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn config_for(diff_ids: &[String]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Cmd": ["/bin/hello"], "Env": ["PATH=/bin"] },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }))
        .unwrap()
    }

    fn hex(d: &str) -> &str {
        d.trim_start_matches("sha256:")
    }

    /// A docker-archive with two layers (one gzip), as `docker save`.
    fn docker_archive(tamper: bool) -> (Vec<u8>, String) {
        let l1 = rootfs_tar("one");
        let l2 = rootfs_tar("two");
        let config = config_for(&[sha256_digest(&l1), sha256_digest(&l2)]);
        let cd = sha256_digest(&config);
        let mut b = tar::Builder::new(Vec::new());
        let manifest = serde_json::json!([{
            "Config": format!("{}.json", hex(&cd)),
            "RepoTags": ["busybox:test", "localhost:5000/me/app:v1"],
            "Layers": ["aaa/layer.tar", "bbb/layer.tar"],
        }]);
        add_file(&mut b, "aaa/layer.tar", &l1);
        let mut l2_stored = gzip(&l2);
        if tamper {
            l2_stored = gzip(&rootfs_tar("evil"));
        }
        add_file(&mut b, "./bbb/layer.tar", &l2_stored);
        add_file(&mut b, &format!("{}.json", hex(&cd)), &config);
        add_file(
            &mut b,
            "manifest.json",
            &serde_json::to_vec(&manifest).unwrap(),
        );
        (b.into_inner().unwrap(), cd)
    }

    /// An oci-archive with one gzip layer (with `tamper_layer`, its blob has
    /// one byte flipped: same size, other digest).
    fn oci_archive(tamper_layer: bool, ref_name: &str) -> (Vec<u8>, String) {
        let layer = gzip(&rootfs_tar("oci"));
        let config = config_for(&[sha256_digest(&rootfs_tar("oci"))]);
        let cd = sha256_digest(&config);
        let stored = |l: &[u8]| {
            let mut v = l.to_vec();
            if tamper_layer {
                let n = v.len();
                v[n - 9] ^= 0xff;
            }
            v
        };
        (oci_archive_stored(&config, &[layer], ref_name, &stored), cd)
    }

    fn setup() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(Some(dir.path().join("root"))).unwrap();
        (dir, store)
    }

    fn blobs(store: &Store) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn loads_docker_archive() {
        let (dir, store) = setup();
        let (bytes, cd) = docker_archive(false);
        let path = dir.path().join("img.tar");
        std::fs::write(&path, &bytes).unwrap();
        let images = store.load_archive(&path).unwrap();
        assert_eq!(images.len(), 1);
        let img = &images[0];
        assert_eq!(img.id, cd);
        assert_eq!(
            img.names,
            ["docker.io/library/busybox:test", "localhost:5000/me/app:v1"]
        );
        assert_eq!(img.layers.len(), 2);
        assert_eq!(img.layers[0].compression, Compression::None);
        assert_eq!(img.layers[1].compression, Compression::Gzip);
        assert_eq!(
            img.config
                .config()
                .as_ref()
                .unwrap()
                .cmd()
                .as_ref()
                .unwrap(),
            &["/bin/hello".to_string()]
        );
        for d in img.blob_digests() {
            assert!(store.has_blob(d), "{d}");
        }
        // The layer reads back as the tar it was.
        let mut back = Vec::new();
        store
            .layer_reader(&img.layers[1])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, rootfs_tar("two"));
        assert_eq!(store.find("busybox:test").unwrap().unwrap().id, cd);

        // Gzip-compressed archive file: same image, nothing new.
        let gz = dir.path().join("img.tar.gz");
        std::fs::write(&gz, gzip(&bytes)).unwrap();
        let before = blobs(&store);
        let again = store.load_archive(&gz).unwrap();
        assert_eq!(again[0].id, cd);
        assert_eq!(blobs(&store), before);
        assert!(std::fs::read_dir(store.root().join("tmp"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn tampered_docker_layer_is_refused() {
        let (dir, store) = setup();
        let (bytes, _) = docker_archive(true);
        let path = dir.path().join("bad.tar");
        std::fs::write(&path, bytes).unwrap();
        let err = store.load_archive(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::DiffIdMismatch { index: 1, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("layer 2 (bbb/layer.tar"), "{msg}");
        assert!(msg.contains("refused"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(store.list().unwrap().is_empty());
        // Nothing of the refused image was stored, not even its good layer.
        assert!(blobs(&store).is_empty(), "{:?}", blobs(&store));
    }

    /// An oci-archive of `config` with these (stored, gzip) layers.
    fn oci_archive_of(config: &[u8], layers: &[Vec<u8>], ref_name: &str) -> Vec<u8> {
        oci_archive_stored(config, layers, ref_name, &<[u8]>::to_vec)
    }

    /// An oci-archive of `config` naming these gzip layers, each blob stored
    /// as `stored` makes it from the layer (under the layer's digest).
    fn oci_archive_stored(
        config: &[u8],
        layers: &[Vec<u8>],
        ref_name: &str,
        stored: &dyn Fn(&[u8]) -> Vec<u8>,
    ) -> Vec<u8> {
        let cd = sha256_digest(config);
        let descs: Vec<_> = layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "mediaType": media::OCI_LAYER_GZIP,
                    "digest": sha256_digest(l),
                    "size": l.len(),
                })
            })
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_MANIFEST,
            "config": { "mediaType": media::OCI_CONFIG, "digest": cd, "size": config.len() },
            "layers": descs,
        }))
        .unwrap();
        let md = sha256_digest(&manifest);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": media::OCI_MANIFEST, "digest": md, "size": manifest.len(),
                "annotations": { ANNOTATION_REF_NAME: ref_name },
            }],
        });
        let mut b = tar::Builder::new(Vec::new());
        add_file(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        add_file(&mut b, "index.json", &serde_json::to_vec(&index).unwrap());
        add_file(&mut b, &format!("blobs/sha256/{}", hex(&md)), &manifest);
        add_file(&mut b, &format!("blobs/sha256/{}", hex(&cd)), config);
        for l in layers {
            add_file(
                &mut b,
                &format!("blobs/sha256/{}", hex(&sha256_digest(l))),
                &stored(l),
            );
        }
        b.into_inner().unwrap()
    }

    /// A docker-archive of `config` with these (stored) layers.
    fn docker_archive_of(config: &[u8], layers: &[Vec<u8>], tag: &str) -> Vec<u8> {
        let cd = sha256_digest(config);
        let names: Vec<String> = (0..layers.len())
            .map(|i| format!("l{i}/layer.tar"))
            .collect();
        let mut b = tar::Builder::new(Vec::new());
        for (n, l) in names.iter().zip(layers) {
            add_file(&mut b, n, l);
        }
        add_file(&mut b, &format!("{}.json", hex(&cd)), config);
        let manifest = serde_json::json!([{
            "Config": format!("{}.json", hex(&cd)), "RepoTags": [tag], "Layers": names,
        }]);
        add_file(
            &mut b,
            "manifest.json",
            &serde_json::to_vec(&manifest).unwrap(),
        );
        b.into_inner().unwrap()
    }

    fn load_bytes(store: &Store, dir: &Path, bytes: &[u8]) -> Result<Vec<Image>, StoreError> {
        let path = dir.join(format!("a{}.tar", sha256_digest(bytes).get(7..19).unwrap()));
        std::fs::write(&path, bytes).unwrap();
        store.load_archive(&path)
    }

    /// A trusted image is in the store; archives that reuse its exact config
    /// (so its image ID) with other layers are refused, and the trusted
    /// record keeps its own layers and blobs.
    #[test]
    fn trusted_config_with_other_layers_is_refused() {
        let (dir, store) = setup();
        let good = rootfs_tar("trusted");
        let config = config_for(&[sha256_digest(&good)]);
        let trusted = load_bytes(
            &store,
            dir.path(),
            &oci_archive_of(&config, &[gzip(&good)], "example.com/app:1"),
        )
        .unwrap()
        .remove(0);
        assert_eq!(trusted.id, sha256_digest(&config));
        assert_eq!(trusted.diff_ids(), [sha256_digest(&good).as_str()]);
        let record = || store.find(&trusted.id).unwrap().unwrap();
        let before = record();
        let blobs_before = blobs(&store);

        let evil = gzip(&rootfs_tar("evil"));
        for (kind, archive) in [
            (
                "oci",
                oci_archive_of(&config, std::slice::from_ref(&evil), "example.com/app:1"),
            ),
            (
                "docker",
                docker_archive_of(&config, std::slice::from_ref(&evil), "example.com/app:1"),
            ),
            (
                "docker, uncompressed",
                docker_archive_of(&config, &[rootfs_tar("evil")], "example.com/evil:1"),
            ),
        ] {
            let err = load_bytes(&store, dir.path(), &archive).unwrap_err();
            assert!(
                matches!(err, StoreError::DiffIdMismatch { index: 0, .. }),
                "{kind}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&sha256_digest(&good)), "{kind}: {msg}");
            assert_eq!(record(), before, "{kind}: the trusted record changed");
            assert_eq!(blobs(&store), blobs_before, "{kind}: blobs changed");
            for d in before.blob_digests() {
                assert!(store.has_blob(d), "{kind}: {d} is gone");
            }
        }
        assert!(store.find("example.com/evil:1").unwrap().is_none());
    }

    /// The same image in another compression (its layers verified too) is
    /// merged into the existing record without replacing its layers.
    #[test]
    fn commit_never_replaces_layers() {
        let (dir, store) = setup();
        let tar = rootfs_tar("same");
        let config = config_for(&[sha256_digest(&tar)]);
        let first = load_bytes(
            &store,
            dir.path(),
            &docker_archive_of(&config, std::slice::from_ref(&tar), "example.com/a:1"),
        )
        .unwrap()
        .remove(0);
        assert_eq!(first.layers[0].compression, Compression::None);
        let second = load_bytes(
            &store,
            dir.path(),
            &oci_archive_of(&config, &[gzip(&tar)], "example.com/b:1"),
        )
        .unwrap()
        .remove(0);
        assert_eq!(second.id, first.id);
        assert_eq!(second.layers, first.layers);
        assert_eq!(second.manifest_digest, first.manifest_digest);
        assert_eq!(second.names, ["example.com/a:1", "example.com/b:1"]);
        assert_eq!(
            store.find("example.com/b:1").unwrap().unwrap().layers,
            first.layers
        );
        assert_eq!(first.chain_id(), sha256_digest(&tar));
    }

    /// Records written before diff IDs were recorded are verified when found.
    #[test]
    fn old_records_are_verified_when_found() {
        let (dir, store) = setup();
        let tar = rootfs_tar("old");
        let config = config_for(&[sha256_digest(&tar)]);
        let img = load_bytes(
            &store,
            dir.path(),
            &oci_archive_of(&config, &[gzip(&tar)], "example.com/old:1"),
        )
        .unwrap()
        .remove(0);
        let path = store.image_dir(&img.id).join("image.json");
        let strip = |v: &mut serde_json::Value| {
            for l in v["layers"].as_array_mut().unwrap() {
                l.as_object_mut().unwrap().remove("diff_id");
            }
        };
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        strip(&mut v);
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(store.list().unwrap()[0].layers[0].diff_id.is_empty());
        let found = store.find("example.com/old:1").unwrap().unwrap();
        assert_eq!(found.diff_ids(), [sha256_digest(&tar).as_str()]);
        // Written back.
        assert_eq!(store.list().unwrap()[0], found);

        // An old record whose layer is another blob (as the old commit could
        // leave): refused when found.
        let other = gzip(&rootfs_tar("other"));
        let od = store.put_blob(&other, None, "other").unwrap();
        v["layers"][0]["digest"] = serde_json::json!(od);
        v["layers"][0]["size"] = serde_json::json!(other.len());
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let err = store.find("example.com/old:1").unwrap_err();
        assert!(matches!(err, StoreError::UnverifiedImage { .. }), "{err}");
        assert!(err.to_string().contains("hull rmi"), "{err}");
    }

    /// Host-side tar reading is bounded: a layer with a GNU long name header
    /// claiming 1 GiB is refused without reading it.
    #[test]
    fn huge_long_name_in_a_layer_is_refused() {
        let (dir, store) = setup();
        let mut layer = Vec::new();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(1 << 30);
        h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        h.set_cksum();
        layer.extend_from_slice(h.as_bytes());
        layer.extend_from_slice(&[b'a'; 4096]);
        let layer = gzip(&layer);
        let config = config_for(&[sha256_digest(b"whatever")]);
        let err = load_bytes(
            &store,
            dir.path(),
            &docker_archive_of(&config, &[layer], "example.com/x:1"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("GNU long name of 1073741824 bytes"), "{msg}");
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn tampered_docker_config_is_refused() {
        let (dir, store) = setup();
        let l1 = rootfs_tar("one");
        let config = config_for(&[sha256_digest(&l1)]);
        let wrong_name = format!("{}.json", "0".repeat(64));
        let mut b = tar::Builder::new(Vec::new());
        add_file(&mut b, "l/layer.tar", &l1);
        add_file(&mut b, &wrong_name, &config);
        let manifest = serde_json::json!([{"Config": wrong_name, "Layers": ["l/layer.tar"]}]);
        add_file(
            &mut b,
            "manifest.json",
            &serde_json::to_vec(&manifest).unwrap(),
        );
        let path = dir.path().join("bad.tar");
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        let msg = store.load_archive(&path).unwrap_err().to_string();
        assert!(msg.contains(&wrong_name), "{msg}");
    }

    #[test]
    fn loads_oci_archive() {
        let (dir, store) = setup();
        let (bytes, cd) = oci_archive(false, "quay.io/me/app:2");
        let path = dir.path().join("oci.tar");
        std::fs::write(&path, bytes).unwrap();
        let images = store.load_archive(&path).unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].id, cd);
        assert_eq!(images[0].names, ["quay.io/me/app:2"]);
        assert_eq!(images[0].layers[0].compression, Compression::Gzip);
        assert_eq!(images[0].layers[0].media_type, media::OCI_LAYER_GZIP);
        assert!(store.has_blob(&images[0].manifest_digest));

        // A bare tag as ref.name: loaded, unnamed.
        let (dir2, store2) = setup();
        let (bytes, _) = oci_archive(false, "latest");
        let path = dir2.path().join("oci.tar");
        std::fs::write(&path, bytes).unwrap();
        assert!(store2.load_archive(&path).unwrap()[0].names.is_empty());
    }

    #[test]
    fn tampered_oci_blob_is_refused() {
        let (dir, store) = setup();
        let (bytes, _) = oci_archive(true, "quay.io/me/app:2");
        let path = dir.path().join("oci.tar");
        std::fs::write(&path, bytes).unwrap();
        let err = store.load_archive(&path).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains("blobs/sha256/"), "{err}");
        assert!(store.list().unwrap().is_empty());
        // No blob of the refused layer is left under any digest.
        assert!(blobs(&store)
            .iter()
            .all(|b| is_hex_id(b) || b.starts_with(".tmp")));
    }

    #[test]
    fn links_and_huge_json_are_refused() {
        let (dir, store) = setup();
        // manifest.json names a symlink pointing outside.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "cfg.json", "/etc/passwd").unwrap();
        let manifest = serde_json::json!([{"Config": "cfg.json", "Layers": []}]);
        add_file(
            &mut b,
            "manifest.json",
            &serde_json::to_vec(&manifest).unwrap(),
        );
        let path = dir.path().join("link.tar");
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        let msg = store.load_archive(&path).unwrap_err().to_string();
        assert!(
            msg.contains("symbolic link") && msg.contains("cfg.json"),
            "{msg}"
        );

        // An oversized index.json.
        let mut b = tar::Builder::new(Vec::new());
        let big = vec![b' '; usize::try_from(MAX_JSON_BYTES).unwrap() + 10];
        add_file(&mut b, "index.json", &big);
        let path = dir.path().join("big.tar");
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        let err = store.load_archive(&path).unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");

        // Not an image archive at all.
        let path = dir.path().join("rootfs.tar");
        std::fs::write(&path, rootfs_tar("x")).unwrap();
        let msg = store.load_archive(&path).unwrap_err().to_string();
        assert!(msg.contains("hull import"), "{msg}");
        // Not even a tar.
        std::fs::write(&path, b"hello world, not a tarball").unwrap();
        assert!(store.load_archive(&path).is_err());
    }

    #[test]
    fn imports_rootfs() {
        let (dir, store) = setup();
        let tar = rootfs_tar("imported");
        let path = dir.path().join("rootfs.tar.gz");
        std::fs::write(&path, gzip(&tar)).unwrap();
        let img = store.import_rootfs(&path, "myimg:1").unwrap();
        assert_eq!(img.names, ["localhost/myimg:1"]);
        assert_eq!(img.layers.len(), 1);
        assert_eq!(img.layers[0].compression, Compression::Gzip);
        assert_eq!(img.config.rootfs().diff_ids(), &[sha256_digest(&tar)]);
        assert!(img.config.config().as_ref().unwrap().cmd().is_none());
        assert_eq!(img.config.architecture().to_string(), "amd64");
        assert_eq!(store.find("myimg:1").unwrap().unwrap().id, img.id);

        let opts = ImportOptions {
            cmd: Some(vec!["/bin/hello".into()]),
            env: vec!["A=b".into()],
            ..Default::default()
        };
        let plain = dir.path().join("rootfs.tar");
        std::fs::write(&plain, &tar).unwrap();
        let img2 = store
            .import_rootfs_with(&plain, "quay.io/x/y", &opts)
            .unwrap();
        assert_eq!(img2.names, ["quay.io/x/y:latest"]);
        assert_eq!(img2.layers[0].compression, Compression::None);
        let c = img2.config.config().as_ref().unwrap();
        assert_eq!(c.cmd().as_ref().unwrap(), &["/bin/hello".to_string()]);

        std::fs::write(&plain, b"definitely not a tar archive").unwrap();
        let msg = store.import_rootfs(&plain, "bad").unwrap_err().to_string();
        assert!(msg.contains("not a valid tar"), "{msg}");
        assert!(matches!(
            store.import_rootfs(&plain, "Bad Name"),
            Err(StoreError::Reference(_))
        ));
    }

    #[test]
    fn scratch_space_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        let mut w = ScratchWriter::new(&mut out, dir.path(), 1000, 0);
        let err = io::copy(&mut io::repeat(0).take(2000), &mut w).unwrap_err();
        assert_eq!(err.to_string(), "refused");
        let why = w.refused.take().unwrap();
        assert!(why.contains("more than 1000 bytes"), "{why}");
        // No file system has this much free: the statvfs check refuses.
        let mut w = ScratchWriter::new(Vec::new(), dir.path(), u64::MAX, u64::MAX / 2);
        assert!(w.write_all(b"x").is_err());
        let why = w.refused.take().unwrap();
        assert!(
            why.contains("fill the disk") && why.contains("free"),
            "{why}"
        );
        let mut w = ScratchWriter::new(Vec::new(), dir.path(), u64::MAX, 0);
        w.write_all(&[1; 100]).unwrap();
        assert_eq!(w.out.len(), 100);
    }

    #[test]
    fn outer_archive_with_huge_long_name_is_refused() {
        let (dir, store) = setup();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(1 << 30);
        h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[b'a'; 4096]);
        let path = dir.path().join("outer.tar.gz");
        std::fs::write(&path, gzip(&bytes)).unwrap();
        let err = store.load_archive(&path).unwrap_err();
        assert!(matches!(err, StoreError::Archive { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("GNU long name of 1073741824 bytes"),
            "{err}"
        );
        assert!(std::fs::read_dir(store.root().join("tmp"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn member_names_normalize() {
        assert_eq!(normalize("./a//b/./c"), "a/b/c");
        assert_eq!(normalize("/manifest.json"), "manifest.json");
        assert_eq!(normalize("../x"), "../x");
        let h = "ab".repeat(32);
        assert_eq!(
            digest_in_name(&format!("{h}.json")),
            Some(format!("sha256:{h}"))
        );
        assert_eq!(
            digest_in_name(&format!("./blobs/sha256/{h}")),
            Some(format!("sha256:{h}"))
        );
        assert_eq!(digest_in_name(&format!("{h}/layer.tar")), None);
    }
}
