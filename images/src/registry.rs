//! Pulling from OCI distribution registries, and `login`.
//!
//! The wire protocol (token and basic auth, manifests, blobs) is
//! `oci-client`'s; this module picks the platform (linux/amd64), verifies
//! every digest itself, skips blobs already stored and records the image.
//! `oci-client` is async: each call here runs a current-thread tokio runtime.
//!
//! Plain HTTP is used when asked (`insecure`) or when the registry is on
//! loopback (127.0.0.0/8, `localhost`, `[::1]`); HTTPS otherwise (rustls with
//! the system's root certificates).
//!
//! Credentials come from docker's `config.json` (`$DOCKER_CONFIG/config.json`,
//! else `~/.docker/config.json`): `auths.<registry>.auth` (base64 of
//! `user:password`) or `username`/`password`. [`login`] checks credentials
//! against the registry and stores them there in the same format.

use std::fs::{self, OpenOptions};
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use oci_spec::image::{Arch, ImageConfiguration, ImageIndex, ImageManifest, Os};

use crate::ingest::{persist_all, Expect, Ingest};
use crate::reference::{is_loopback_host, Reference, DEFAULT_REGISTRY};
use crate::store::{
    checked_digest, media, read_bounded, sha256_digest, BlobWriter, Compression, Image, NewImage,
    PullOptions, Store, StoreError, MAX_JSON_BYTES,
};

/// The manifest media types a pull accepts.
const ACCEPT: &[&str] = &[
    media::OCI_MANIFEST,
    media::OCI_INDEX,
    media::DOCKER_MANIFEST,
    media::DOCKER_MANIFEST_LIST,
];
const CONFIG_TYPES: &[&str] = &[
    media::OCI_CONFIG,
    "application/vnd.docker.container.image.v1+json",
];
/// Layers downloaded at once.
const PARALLEL_DOWNLOADS: usize = 3;
/// Where docker keeps Docker Hub credentials in config.json.
const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// Pulls `reference` into `store` (see the module docs).
pub(crate) fn pull(
    store: &Store,
    reference: &str,
    opts: &PullOptions,
) -> Result<Image, StoreError> {
    let r = Reference::parse(reference)?;
    // Blobs land before the record names them: keep rmi/prune's garbage
    // collection away until the record is written.
    let _gc = store.lock_gc(false)?;
    let auth = match credentials(r.registry())? {
        Some((user, pass)) => RegistryAuth::Basic(user, pass),
        None => RegistryAuth::Anonymous,
    };
    runtime()?.block_on(pull_async(store, &r, opts, &auth))
}

fn runtime() -> Result<tokio::runtime::Runtime, StoreError> {
    // reqwest is built without a default crypto provider: install ring's
    // (an error only means one is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StoreError::io("cannot start the network runtime"))
}

fn use_http(registry: &str, insecure: bool) -> bool {
    insecure || is_loopback_host(registry)
}

/// The host oci-client / HTTP requests go to for a registry.
fn endpoint(registry: &str) -> &str {
    if registry == DEFAULT_REGISTRY {
        "registry-1.docker.io"
    } else {
        registry
    }
}

fn client(registry: &str, insecure: bool) -> Result<Client, StoreError> {
    let config = ClientConfig {
        protocol: if use_http(registry, insecure) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        // This module picks the platform itself.
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(120)),
        ..ClientConfig::default()
    };
    Client::try_from(config).map_err(|e| StoreError::Registry {
        registry: registry.to_string(),
        message: format!("cannot set up the HTTP client: {e}"),
    })
}

/// Turns an oci-client error into one that says what to do.
fn registry_error(r: &Reference, what: &str, e: OciDistributionError) -> StoreError {
    let registry = r.registry().to_string();
    match e {
        OciDistributionError::UnauthorizedError { .. } => StoreError::Unauthorized {
            registry,
            detail: format!(
                "{what} of {r} was refused; the repository may not exist, or it needs \
                 credentials"
            ),
        },
        OciDistributionError::AuthenticationFailure(msg) => StoreError::Unauthorized {
            registry,
            detail: msg.trim().to_string(),
        },
        OciDistributionError::ImageManifestNotFoundError(msg) => StoreError::Registry {
            registry,
            message: format!("{r}: manifest not found ({msg}); check the name and tag"),
        },
        OciDistributionError::ServerError { code: 404, .. } => StoreError::Registry {
            registry,
            message: format!("{what} of {r}: not found; check the name and tag"),
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let msgs: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect();
            let unknown = msgs.iter().any(|m| m.contains("Unknown"));
            StoreError::Registry {
                registry,
                message: format!(
                    "{what} of {r}: {}{}",
                    msgs.join("; "),
                    if unknown {
                        " (check the name and tag)"
                    } else {
                        ""
                    }
                ),
            }
        }
        OciDistributionError::RequestError(e) => StoreError::Registry {
            registry: registry.clone(),
            message: format!(
                "cannot reach the registry for {what} of {r}: {}; check the address, the \
                 network and whether it speaks HTTPS (plain-HTTP registries off loopback need \
                 --insecure)",
                error_chain(&e)
            ),
        },
        OciDistributionError::DigestError(d) => StoreError::Registry {
            registry,
            message: format!(
                "{what} of {r}: {d}; the registry sent content that does not match its \
                 digest, so it was refused"
            ),
        },
        other => StoreError::Registry {
            registry,
            message: format!("{what} of {r}: {other}"),
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn oci_ref(r: &Reference) -> oci_client::Reference {
    let registry = endpoint(r.registry()).to_string();
    let repo = r.repository().to_string();
    match (r.tag(), r.digest()) {
        (_, Some(d)) => oci_client::Reference::with_digest(registry, repo, d.to_string()),
        (Some(t), None) => oci_client::Reference::with_tag(registry, repo, t.to_string()),
        (None, None) => oci_client::Reference::with_tag(registry, repo, "latest".to_string()),
    }
}

async fn pull_async(
    store: &Store,
    r: &Reference,
    opts: &PullOptions,
    auth: &RegistryAuth,
) -> Result<Image, StoreError> {
    let client = client(r.registry(), opts.insecure)?;
    let oref = oci_ref(r);
    client
        .auth(&oref, auth, RegistryOperation::Pull)
        .await
        .map_err(|e| registry_error(r, "authentication", e))?;

    // The top-level manifest (or index), verified against the reference's
    // digest when there is one.
    let (top, _) = client
        .pull_manifest_raw(&oref, auth, ACCEPT)
        .await
        .map_err(|e| registry_error(r, "fetching the manifest", e))?;
    check_len(top.len(), &format!("the manifest of {r}"))?;
    let top_digest = sha256_digest(&top);
    if let Some(want) = r.digest() {
        if want != top_digest {
            return Err(StoreError::DigestMismatch {
                what: format!("the manifest of {r}"),
                expected: want.to_string(),
                actual: top_digest,
            });
        }
    }

    let (manifest_bytes, manifest_digest) = if is_index(&top, &format!("the manifest of {r}"))? {
        let index: ImageIndex = serde_json::from_slice(&top)
            .map_err(StoreError::json(format!("the image index of {r}")))?;
        let chosen = pick_platform(&index, &r.to_string())?;
        let child = oref.clone_with_digest(chosen.clone());
        let (bytes, _) = client
            .pull_manifest_raw(&child, auth, ACCEPT)
            .await
            .map_err(|e| registry_error(r, "fetching the linux/amd64 manifest", e))?;
        check_len(bytes.len(), &format!("the linux/amd64 manifest of {r}"))?;
        let actual = sha256_digest(&bytes);
        if actual != chosen {
            return Err(StoreError::DigestMismatch {
                what: format!("the linux/amd64 manifest of {r}"),
                expected: chosen,
                actual,
            });
        }
        (bytes.to_vec(), actual)
    } else {
        (top.to_vec(), top_digest.clone())
    };
    let what_manifest = format!("the manifest {manifest_digest} of {r}");
    if is_index(&manifest_bytes, &what_manifest)? {
        return Err(StoreError::Unsupported {
            what: what_manifest,
            detail: "an image index nested in an image index".to_string(),
        });
    }
    let manifest: ImageManifest =
        serde_json::from_slice(&manifest_bytes).map_err(StoreError::json(what_manifest.clone()))?;

    // Config.
    let cdesc = manifest.config();
    let config_type = cdesc.media_type().to_string();
    if !CONFIG_TYPES.contains(&config_type.as_str()) {
        return Err(StoreError::Unsupported {
            what: format!("{r}"),
            detail: format!(
                "its config has media type {config_type}: it is not a container image (an \
                 artifact such as a Helm chart or a signature?)"
            ),
        });
    }
    let config_digest = checked_digest(cdesc.digest().as_ref(), &format!("config of {r}"))?;
    if cdesc.size() > MAX_JSON_BYTES {
        return Err(StoreError::TooLarge {
            what: format!("the config of {r}"),
            limit: MAX_JSON_BYTES,
        });
    }
    if !store.has_blob(&config_digest) {
        let mut buf: Vec<u8> = Vec::new();
        client
            .pull_blob(&oref, config_digest.as_str(), &mut buf)
            .await
            .map_err(|e| registry_error(r, "fetching the config", e))?;
        check_len(buf.len(), &format!("the config of {r}"))?;
        if buf.len() as u64 != cdesc.size() {
            return Err(StoreError::SizeMismatch {
                what: format!("the config of {r}"),
                expected: cdesc.size(),
                actual: buf.len() as u64,
            });
        }
        store.put_blob(&buf, Some(&config_digest), &format!("the config of {r}"))?;
    }
    let config_bytes = store.read_blob_bounded(&config_digest)?;
    let config: ImageConfiguration = serde_json::from_slice(&config_bytes).map_err(
        StoreError::json(format!("the config {config_digest} of {r}")),
    )?;
    check_platform(&config, &r.to_string())?;

    // Layers: downloaded (those not in the store) to temporary files, then
    // each verified against the config's diff ID; only when all passed do
    // their blobs move into place.
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(StoreError::Other(format!(
            "{r}: the manifest lists {} layers but the config {} describes {}; the image \
             is malformed",
            manifest.layers().len(),
            config_digest,
            diff_ids.len()
        )));
    }
    let mut wanted = Vec::new();
    for (i, (l, diff_id)) in manifest.layers().iter().zip(diff_ids).enumerate() {
        let mt = l.media_type().to_string();
        let what = format!("layer {} of {r}", i + 1);
        let compression =
            Compression::from_media_type(&mt).ok_or_else(|| StoreError::Unsupported {
                what: what.clone(),
                detail: format!(
                    "media type {mt} is not a tar layer (plain, gzip or zstd) that hull can unpack"
                ),
            })?;
        let digest = checked_digest(l.digest().as_ref(), &what)?;
        wanted.push(Wanted {
            what: format!("layer {} ({digest}) of {r}", i + 1),
            diff_id: checked_digest(diff_id, &format!("the config {config_digest} of {r}"))?,
            digest,
            media_type: mt,
            size: l.size(),
            compression,
        });
    }
    let ingest = Ingest::new(store)?;
    let progress = Progress::new(opts.progress, &wanted);
    let (client, oref, progress_ref) = (&client, &oref, &progress);
    let mut downloaded: Vec<(usize, Option<BlobWriter>)> = stream::iter(wanted.iter().enumerate())
        .map(|(i, layer)| async move {
            download_layer(store, client, oref, r, i, layer, progress_ref)
                .await
                .map(|w| (i, w))
        })
        .buffer_unordered(PARALLEL_DOWNLOADS)
        .try_collect()
        .await?;
    downloaded.sort_by_key(|(i, _)| *i);
    let mut verified = Vec::new();
    for ((i, blob), layer) in downloaded.into_iter().zip(&wanted) {
        progress.set(i, "Verifying".to_string(), true);
        let expect = Expect {
            digest: Some(&layer.digest),
            size: Some(layer.size),
            diff_id: Some((i, &layer.diff_id)),
            media_type: Some((&layer.media_type, layer.compression)),
        };
        verified.push(match blob {
            Some(w) => ingest.written(w, expect, &layer.what)?,
            None => ingest.stored(&layer.digest, expect, &layer.what)?,
        });
        progress.set(i, "Pull complete".to_string(), true);
    }
    progress.finish();
    let layers = persist_all(verified)?;

    store.put_blob(
        &manifest_bytes,
        Some(&manifest_digest),
        &format!("the manifest of {r}"),
    )?;
    let name = match r.digest() {
        Some(d) => format!("{}@{d}", r.name()),
        None => r.to_string(),
    };
    let size = layers.iter().map(|l| l.size).sum::<u64>()
        + config_bytes.len() as u64
        + manifest_bytes.len() as u64;
    store.commit(NewImage {
        config_digest,
        config,
        manifest_digest,
        layers,
        names: vec![name],
        repo_digests: vec![format!("{}@{top_digest}", r.name())],
        size,
    })
}

/// A layer the manifest lists.
struct Wanted {
    what: String,
    digest: String,
    diff_id: String,
    media_type: String,
    size: u64,
    compression: Compression,
}

/// Downloads a layer that is not in the store into a blob writer (left for
/// [`Ingest::written`] to verify); `None` when the store has it.
async fn download_layer(
    store: &Store,
    client: &Client,
    oref: &oci_client::Reference,
    r: &Reference,
    index: usize,
    layer: &Wanted,
    progress: &Progress,
) -> Result<Option<BlobWriter>, StoreError> {
    let what = &layer.what;
    if store.has_blob(&layer.digest) {
        progress.set(index, "Already exists".to_string(), true);
        return Ok(None);
    }
    progress.set(index, "Downloading".to_string(), true);
    let mut s = client
        .pull_blob_stream(oref, layer.digest.as_str())
        .await
        .map_err(|e| registry_error(r, &format!("fetching {what}"), e))?;
    let mut w = store.blob_writer()?;
    while let Some(chunk) = s.stream.next().await {
        let chunk = chunk.map_err(|e| StoreError::Registry {
            registry: r.registry().to_string(),
            message: format!("downloading {what}: {}", error_chain(&e)),
        })?;
        w.write_all(&chunk)
            .map_err(StoreError::io(format!("cannot write {what} to the store")))?;
        if w.written() > layer.size {
            return Err(StoreError::SizeMismatch {
                what: what.clone(),
                expected: layer.size,
                actual: w.written(),
            });
        }
        progress.set(
            index,
            format!(
                "Downloading {} / {}",
                human_bytes(w.written()),
                human_bytes(layer.size)
            ),
            false,
        );
    }
    progress.set(index, "Downloaded".to_string(), true);
    Ok(Some(w))
}

fn check_len(len: usize, what: &str) -> Result<(), StoreError> {
    if len as u64 > MAX_JSON_BYTES {
        return Err(StoreError::TooLarge {
            what: what.to_string(),
            limit: MAX_JSON_BYTES,
        });
    }
    Ok(())
}

/// Whether manifest JSON is an index / manifest list (by media type, else
/// by shape).
pub(crate) fn is_index(bytes: &[u8], what: &str) -> Result<bool, StoreError> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(bytes).map_err(StoreError::json(what.to_string()))?;
    if p.schema_version != Some(2) {
        return Err(StoreError::Unsupported {
            what: what.to_string(),
            detail: format!(
                "schema version {:?}; only schema 2 (OCI, docker v2 schema 2) manifests are \
                 supported",
                p.schema_version
            ),
        });
    }
    Ok(match p.media_type.as_deref() {
        Some(media::OCI_INDEX | media::DOCKER_MANIFEST_LIST) => true,
        Some(media::OCI_MANIFEST | media::DOCKER_MANIFEST) => false,
        Some(other) => {
            return Err(StoreError::Unsupported {
                what: what.to_string(),
                detail: format!("manifest media type {other}"),
            })
        }
        None => p.manifests.is_some(),
    })
}

/// The digest of the linux/amd64 manifest in an index.
pub(crate) fn pick_platform(index: &ImageIndex, what: &str) -> Result<String, StoreError> {
    let mut seen = Vec::new();
    for m in index.manifests() {
        if let Some(p) = m.platform() {
            if *p.os() == Os::Linux && *p.architecture() == Arch::Amd64 {
                return checked_digest(m.digest().as_ref(), what);
            }
            seen.push(format!("{}/{}", p.os(), p.architecture()));
        }
    }
    Err(StoreError::Unsupported {
        what: what.to_string(),
        detail: format!(
            "no linux/amd64 image in its index (it has: {}); hull runs linux/amd64 images",
            if seen.is_empty() {
                "no platforms".to_string()
            } else {
                seen.join(", ")
            }
        ),
    })
}

/// Refuses configs for other platforms.
pub(crate) fn check_platform(config: &ImageConfiguration, what: &str) -> Result<(), StoreError> {
    if *config.os() != Os::Linux || *config.architecture() != Arch::Amd64 {
        return Err(StoreError::Unsupported {
            what: what.to_string(),
            detail: format!(
                "the image is for {}/{}; hull runs linux/amd64 images",
                config.os(),
                config.architecture()
            ),
        });
    }
    Ok(())
}

// ---- progress ----

/// One line per layer on stderr, redrawn in place; only on a terminal.
struct Progress {
    enabled: bool,
    state: Mutex<ProgressState>,
}

struct ProgressState {
    rows: Vec<(String, String)>,
    drawn: usize,
    last: Option<Instant>,
}

impl Progress {
    fn new(wanted: bool, layers: &[Wanted]) -> Self {
        let rows = layers
            .iter()
            .map(|l| {
                let hex = l.digest.trim_start_matches("sha256:");
                (hex[..hex.len().min(12)].to_string(), "Waiting".to_string())
            })
            .collect();
        let p = Progress {
            enabled: wanted && std::io::stderr().is_terminal(),
            state: Mutex::new(ProgressState {
                rows,
                drawn: 0,
                last: None,
            }),
        };
        p.draw(true);
        p
    }

    fn set(&self, row: usize, status: String, force: bool) {
        if !self.enabled {
            return;
        }
        if let Ok(mut st) = self.state.lock() {
            if let Some(r) = st.rows.get_mut(row) {
                r.1 = status;
            }
        }
        self.draw(force);
    }

    fn draw(&self, force: bool) {
        if !self.enabled {
            return;
        }
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if !force
            && st
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        let mut out = String::new();
        if st.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", st.drawn));
        }
        for (label, status) in &st.rows {
            out.push_str(&format!("\r\x1b[2K{label}: {status}\n"));
        }
        st.drawn = st.rows.len();
        st.last = Some(Instant::now());
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(out.as_bytes());
        let _ = err.flush();
    }

    fn finish(&self) {
        self.draw(true);
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

// ---- credentials ----

/// The docker config file: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Reduces a registry name or a config.json `auths` key
/// (`https://index.docker.io/v1/`, `http://host:5000`, `host:5000/v2/`) to
/// the registry host as references spell it.
pub fn normalize_registry(s: &str) -> String {
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or(s).to_ascii_lowercase();
    match host.as_str() {
        "" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DEFAULT_REGISTRY.to_string()
        }
        _ => host,
    }
}

fn read_docker_config() -> Result<(Option<PathBuf>, serde_json::Value), StoreError> {
    match docker_config_path() {
        Some(path) => {
            let v = read_docker_config_at(&path)?;
            Ok((Some(path), v))
        }
        None => Ok((None, serde_json::json!({}))),
    }
}

fn read_docker_config_at(path: &std::path::Path) -> Result<serde_json::Value, StoreError> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(serde_json::json!({})),
        Err(e) => {
            return Err(StoreError::Io {
                context: format!("cannot read the docker config {}", path.display()),
                source: e,
            })
        }
    };
    let bytes = read_bounded(f, MAX_JSON_BYTES, &path.display().to_string())?;
    serde_json::from_slice(&bytes).map_err(StoreError::json(format!(
        "the docker config {} (fix or remove it)",
        path.display()
    )))
}

/// The user name and password stored for `registry` in docker's config.json.
pub fn credentials(registry: &str) -> Result<Option<(String, String)>, StoreError> {
    let (path, cfg) = read_docker_config()?;
    let shown = path.map_or(String::new(), |p| p.display().to_string());
    credentials_in(&cfg, &shown, registry)
}

/// [`credentials`] from a parsed config.json (`path` only for messages).
fn credentials_in(
    cfg: &serde_json::Value,
    path: &str,
    registry: &str,
) -> Result<Option<(String, String)>, StoreError> {
    let want = normalize_registry(registry);
    let Some(auths) = cfg.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    for (key, entry) in auths {
        if normalize_registry(key) != want {
            continue;
        }
        if let Some(b64) = entry
            .get("auth")
            .and_then(|a| a.as_str())
            .filter(|a| !a.is_empty())
        {
            let bad = || {
                StoreError::Other(format!(
                    "the docker config {path}: auths.{key}.auth is not base64 of \
                     USER:PASSWORD; run `hull login {want}` again"
                ))
            };
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| bad())?;
            let text = String::from_utf8(raw).map_err(|_| bad())?;
            let (u, p) = text.split_once(':').ok_or_else(bad)?;
            return Ok(Some((u.to_string(), p.to_string())));
        }
        let user = entry.get("username").and_then(|u| u.as_str());
        let pass = entry.get("password").and_then(|p| p.as_str());
        if let (Some(u), Some(p)) = (user, pass) {
            return Ok(Some((u.to_string(), p.to_string())));
        }
    }
    Ok(None)
}

/// Checks `user`/`password` against `registry` and stores them in docker's
/// config.json (created mode 0600). Plain HTTP for loopback registries.
pub fn login(registry: &str, user: &str, password: &str) -> Result<(), StoreError> {
    login_with(registry, user, password, false)
}

/// [`login`], with plain HTTP also for registries off loopback when
/// `insecure`.
pub fn login_with(
    registry: &str,
    user: &str,
    password: &str,
    insecure: bool,
) -> Result<(), StoreError> {
    let registry = normalize_registry(registry);
    if user.is_empty() || user.contains(':') {
        return Err(StoreError::Other(format!(
            "login to {registry}: the user name must be non-empty and contain no ':'"
        )));
    }
    runtime()?.block_on(check_login(&registry, user, password, insecure))?;
    store_credentials(&registry, user, password)
}

/// Removes stored credentials for `registry`; returns whether there were any.
pub fn logout(registry: &str) -> Result<bool, StoreError> {
    let want = normalize_registry(registry);
    let (path, mut cfg) = read_docker_config()?;
    let Some(path) = path else {
        return Ok(false);
    };
    let Some(auths) = cfg.get_mut("auths").and_then(|a| a.as_object_mut()) else {
        return Ok(false);
    };
    let keys: Vec<String> = auths
        .keys()
        .filter(|k| normalize_registry(k) == want)
        .cloned()
        .collect();
    for k in &keys {
        auths.remove(k);
    }
    if !keys.is_empty() {
        write_docker_config(&path, &cfg)?;
    }
    Ok(!keys.is_empty())
}

async fn check_login(
    registry: &str,
    user: &str,
    password: &str,
    insecure: bool,
) -> Result<(), StoreError> {
    let scheme = if use_http(registry, insecure) {
        "http"
    } else {
        "https"
    };
    let url = format!("{scheme}://{}/v2/", endpoint(registry));
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| StoreError::Registry {
            registry: registry.to_string(),
            message: format!("cannot set up the HTTP client: {e}"),
        })?;
    let unreachable = |e: reqwest::Error| StoreError::Registry {
        registry: registry.to_string(),
        message: format!(
            "cannot reach {url}: {}; check the address and the network",
            error_chain(&e)
        ),
    };
    let res = http.get(&url).send().await.map_err(unreachable)?;
    if res.status().is_success() {
        // The registry needs no credentials; docker stores them anyway.
        return Ok(());
    }
    if res.status() != reqwest::StatusCode::UNAUTHORIZED {
        return Err(StoreError::Registry {
            registry: registry.to_string(),
            message: format!("GET {url} answered {}; is this a registry?", res.status()),
        });
    }
    let challenge = res
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (scheme_name, params) = parse_challenge(&challenge);
    let res = if scheme_name.eq_ignore_ascii_case("bearer") {
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| StoreError::Registry {
                registry: registry.to_string(),
                message: format!("its token challenge has no realm: {challenge:?}"),
            })?;
        let mut query: Vec<(&str, &str)> = vec![
            ("account", user),
            ("client_id", "hull"),
            ("offline_token", "true"),
        ];
        if let Some((_, s)) = params.iter().find(|(k, _)| k == "service") {
            query.push(("service", s.as_str()));
        }
        http.get(&realm)
            .query(&query)
            .basic_auth(user, Some(password))
            .send()
            .await
            .map_err(unreachable)?
    } else if scheme_name.eq_ignore_ascii_case("basic") {
        http.get(&url)
            .basic_auth(user, Some(password))
            .send()
            .await
            .map_err(unreachable)?
    } else {
        return Err(StoreError::Registry {
            registry: registry.to_string(),
            message: format!("unsupported authentication challenge {challenge:?}"),
        });
    };
    let status = res.status();
    if status.is_success() {
        return Ok(());
    }
    let body = res.text().await.unwrap_or_default();
    let body: String = body.chars().take(300).collect();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(StoreError::Unauthorized {
            registry: registry.to_string(),
            detail: format!("{status}: {}", body.trim()),
        });
    }
    Err(StoreError::Registry {
        registry: registry.to_string(),
        message: format!("login check answered {status}: {}", body.trim()),
    })
}

/// Parses a `WWW-Authenticate` value: the scheme and its `key="value"` params.
fn parse_challenge(h: &str) -> (String, Vec<(String, String)>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ','))
            .collect::<String>()
            .trim()
            .to_ascii_lowercase();
        if key.is_empty() {
            break;
        }
        if chars.next_if_eq(&'=').is_none() {
            params.push((key, String::new()));
            continue;
        }
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                .collect::<String>()
                .trim()
                .to_string();
        }
        params.push((key, value));
    }
    (scheme.to_string(), params)
}

fn store_credentials(registry: &str, user: &str, password: &str) -> Result<(), StoreError> {
    let (path, mut cfg) = read_docker_config()?;
    let path = path.ok_or_else(|| {
        StoreError::Other(
            "cannot store credentials: neither DOCKER_CONFIG nor HOME is set".to_string(),
        )
    })?;
    set_credentials(&mut cfg, &path, registry, user, password)?;
    write_docker_config(&path, &cfg)
}

/// Puts credentials for `registry` into a parsed config.json, replacing other
/// spellings of the same registry and keeping everything else.
fn set_credentials(
    cfg: &mut serde_json::Value,
    path: &std::path::Path,
    registry: &str,
    user: &str,
    password: &str,
) -> Result<(), StoreError> {
    if !cfg.is_object() {
        return Err(StoreError::Other(format!(
            "the docker config {} is not a JSON object; fix or remove it",
            path.display()
        )));
    }
    let key = if registry == DEFAULT_REGISTRY {
        DOCKER_HUB_AUTH_KEY.to_string()
    } else {
        registry.to_string()
    };
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let auths = cfg
        .as_object_mut()
        .map(|o| o.entry("auths").or_insert_with(|| serde_json::json!({})))
        .and_then(|a| a.as_object_mut())
        .ok_or_else(|| {
            StoreError::Other(format!(
                "the docker config {}: `auths` is not an object; fix or remove it",
                path.display()
            ))
        })?;
    // Drop other spellings of the same registry, then write ours.
    auths.retain(|k, _| normalize_registry(k) != registry);
    auths.insert(key, serde_json::json!({ "auth": auth }));
    Ok(())
}

fn write_docker_config(path: &std::path::Path, cfg: &serde_json::Value) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let ctx = || format!("cannot write the docker config {}", path.display());
    if !dir.is_dir() {
        fs::create_dir_all(dir).map_err(StoreError::io(ctx()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(StoreError::io(ctx()))?;
    }
    let mut bytes = serde_json::to_vec_pretty(cfg).map_err(StoreError::json(ctx()))?;
    bytes.push(b'\n');
    let tmp = dir.join(format!(".config.json.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(StoreError::io(ctx()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_keys_normalize() {
        assert_eq!(
            normalize_registry("https://index.docker.io/v1/"),
            "docker.io"
        );
        assert_eq!(normalize_registry("docker.io"), "docker.io");
        assert_eq!(normalize_registry("registry-1.docker.io"), "docker.io");
        assert_eq!(
            normalize_registry("http://127.0.0.1:5000/v2/"),
            "127.0.0.1:5000"
        );
        assert_eq!(normalize_registry("Quay.IO"), "quay.io");
    }

    #[test]
    fn challenges_parse() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(
            p,
            [
                (
                    "realm".to_string(),
                    "https://auth.docker.io/token".to_string()
                ),
                ("service".to_string(), "registry.docker.io".to_string()),
                (
                    "scope".to_string(),
                    "repository:library/alpine:pull".to_string()
                ),
            ]
        );
        let (s, p) = parse_challenge(r#"Basic realm="basic-realm""#);
        assert_eq!(s, "Basic");
        assert_eq!(p, [("realm".to_string(), "basic-realm".to_string())]);
        let (s, p) = parse_challenge("Basic");
        assert_eq!((s.as_str(), p.len()), ("Basic", 0));
    }

    #[test]
    fn index_detection_and_platform() {
        let idx = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","platform":{"os":"linux","architecture":"arm64"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","platform":{"os":"linux","architecture":"amd64"}}]}"#;
        assert!(is_index(idx, "x").unwrap());
        let index: ImageIndex = serde_json::from_slice(idx).unwrap();
        assert_eq!(
            pick_platform(&index, "x").unwrap(),
            format!("sha256:{}", "2".repeat(64))
        );
        let arm_only = br#"{"schemaVersion":2,"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","platform":{"os":"linux","architecture":"arm64"}}]}"#;
        assert!(is_index(arm_only, "x").unwrap());
        let index: ImageIndex = serde_json::from_slice(arm_only).unwrap();
        let e = pick_platform(&index, "x").unwrap_err().to_string();
        assert!(
            e.contains("linux/arm64") && e.contains("linux/amd64"),
            "{e}"
        );
        let v1 = br#"{"schemaVersion":1,"name":"x"}"#;
        assert!(is_index(v1, "x")
            .unwrap_err()
            .to_string()
            .contains("schema 2"));
    }

    #[test]
    fn docker_config_credentials() {
        let mut cfg = serde_json::json!({
            "auths": {
                "https://index.docker.io/v1/": { "auth": "dXNlcjpwYTpzcw==" },
                "quay.io": { "username": "q", "password": "p" },
                "bad.example": { "auth": "!!!" },
            },
            "credsStore": "desktop",
        });
        let get = |cfg: &serde_json::Value, r: &str| credentials_in(cfg, "cfg", r);
        // base64("user:pa:ss"): the password may contain ':'.
        assert_eq!(
            get(&cfg, "docker.io").unwrap(),
            Some(("user".to_string(), "pa:ss".to_string()))
        );
        assert_eq!(
            get(&cfg, "quay.io").unwrap(),
            Some(("q".to_string(), "p".to_string()))
        );
        assert_eq!(get(&cfg, "127.0.0.1:5000").unwrap(), None);
        let e = get(&cfg, "bad.example").unwrap_err().to_string();
        assert!(e.contains("hull login bad.example"), "{e}");

        let path = std::path::Path::new("/nonexistent/config.json");
        set_credentials(&mut cfg, path, "docker.io", "new", "pw").unwrap();
        set_credentials(&mut cfg, path, "127.0.0.1:5000", "a", "b").unwrap();
        assert_eq!(
            get(&cfg, "docker.io").unwrap(),
            Some(("new".to_string(), "pw".to_string()))
        );
        assert_eq!(
            cfg["auths"]["127.0.0.1:5000"]["auth"],
            base64::engine::general_purpose::STANDARD.encode("a:b")
        );
        assert_eq!(cfg["credsStore"], "desktop");
        assert_eq!(cfg["auths"].as_object().unwrap().len(), 4);

        let mut not_obj = serde_json::json!([1]);
        assert!(set_credentials(&mut not_obj, path, "x.io", "a", "b").is_err());
    }

    #[test]
    fn https_client_builds() {
        let _ = runtime().unwrap();
        client("registry.example.com", false).unwrap();
        client("registry.example.com", true).unwrap();
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }
}
