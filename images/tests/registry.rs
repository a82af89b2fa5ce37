//! Pulls from a real registry (Debian's `docker-registry`, the CNCF
//! distribution registry) on loopback, filled with images built by `umoci`
//! and pushed by `skopeo`; and `login` + an authenticated pull against one
//! with htpasswd (bcrypt) basic auth.
//!
//! The tools are required: a missing one fails the test with what to install.

// Test helpers outside #[test] functions panic on failure, like the tests.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use images::{Compression, PullOptions, Store, StoreError};
use sha2::{Digest as _, Sha256};

/// Every test shares one DOCKER_CONFIG (the environment is process-wide).
fn docker_config_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"));
    std::env::set_var("DOCKER_CONFIG", dir.path());
    dir.path()
}

fn require_tools() {
    for (tool, arg, package) in [
        ("docker-registry", "--version", "docker-registry"),
        ("skopeo", "--version", "skopeo"),
        ("umoci", "--version", "umoci"),
    ] {
        match Command::new(tool).arg(arg).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "`{tool} {arg}` failed ({}): {}; reinstall it with `apt-get install {package}`",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!(
                "{tool} is required by this test but cannot be run ({e}); install it with \
                 `apt-get install {package}`"
            ),
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A docker-registry process, killed when dropped.
struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Registry {
    fn start(dir: &Path, htpasswd: Option<&Path>) -> Registry {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
            l.local_addr().expect("local addr").port()
        };
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        );
        if let Some(h) = htpasswd {
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: hull-test\n    path: {}\n",
                h.display()
            ));
        }
        let cfg_path = dir.join("registry.yml");
        std::fs::write(&cfg_path, cfg).expect("write registry config");
        let log = dir.join("registry.log");
        let logf = std::fs::File::create(&log).expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .expect("start docker-registry");
        let reg = Registry { child, port, log };
        reg.wait_ready();
        reg
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let req = format!(
                    "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                    self.port
                );
                if s.write_all(req.as_bytes()).is_ok() {
                    let mut resp = String::new();
                    let _ = s.read_to_string(&mut resp);
                    if resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.1 401") {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "docker-registry did not answer on port {} within 15 s; its log:\n{}",
            self.port,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// An OCI layout `L` with image `L:latest`: two gzip layers (busybox + sh
/// link; /etc/motd), Cmd /bin/sh, Env PATH=/bin. Built with umoci.
fn build_umoci_image(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let img = format!("{}:latest", layout.display());
    let rootless: &[&str] = if is_root() { &[] } else { &["--rootless"] };
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &img]));
    for step in 0..2 {
        run(Command::new("umoci")
            .arg("unpack")
            .args(rootless)
            .args(["--image", &img])
            .arg(&bundle));
        let rootfs = bundle.join("rootfs");
        if step == 0 {
            std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir bin");
            std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
            std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("symlink sh");
        } else {
            std::fs::create_dir_all(rootfs.join("etc")).expect("mkdir etc");
            std::fs::write(rootfs.join("etc/motd"), "hello from hull\n").expect("motd");
        }
        run(Command::new("umoci")
            .arg("repack")
            .args(["--image", &img])
            .arg(&bundle));
        std::fs::remove_dir_all(&bundle).expect("rm bundle");
    }
    run(Command::new("umoci").args([
        "config",
        "--image",
        &img,
        "--config.cmd",
        "/bin/sh",
        "--config.env",
        "PATH=/bin",
    ]));
    run(Command::new("umoci").args(["gc", "--layout"]).arg(&layout));
    layout
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn write_blob(layout: &Path, bytes: &[u8]) -> String {
    let d = sha256(bytes);
    std::fs::write(
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:")),
        bytes,
    )
    .expect("write blob");
    d
}

/// Adds to `layout`: tag `multi`, an image index with an arm64 and an amd64
/// entry (both the `latest` manifest); and tag `zstd`, a one-layer image whose
/// layer is zstd-compressed. Returns the `latest` manifest digest.
fn extend_layout(layout: &Path) -> String {
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).expect("read index")).expect("json");
    let latest = index["manifests"][0].clone();
    let entry = |arch: &str| {
        serde_json::json!({
            "mediaType": latest["mediaType"], "digest": latest["digest"], "size": latest["size"],
            "platform": { "architecture": arch, "os": "linux" },
        })
    };
    let nested = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry("arm64"), entry("amd64")],
    });
    let nested_bytes = serde_json::to_vec(&nested).expect("json");
    let nd = write_blob(layout, &nested_bytes);

    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    let data = b"compressed with zstd\n";
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, "etc/zstd-marker", &data[..])
        .expect("tar");
    let tar = tar.into_inner().expect("tar");
    let layer = zstd::encode_all(&tar[..], 3).expect("zstd");
    let ld = write_blob(layout, &layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": [sha256(&tar)] },
    }))
    .expect("json");
    let cd = write_blob(layout, &config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": ld, "size": layer.len() }],
    }))
    .expect("json");
    let md = write_blob(layout, &manifest);

    let manifests = index["manifests"].as_array_mut().expect("manifests");
    manifests.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": nd,
        "size": nested_bytes.len(), "annotations": { "org.opencontainers.image.ref.name": "multi" },
    }));
    manifests.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
        "size": manifest.len(), "annotations": { "org.opencontainers.image.ref.name": "zstd" },
    }));
    std::fs::write(&index_path, serde_json::to_vec(&index).expect("json")).expect("index");
    latest["digest"].as_str().expect("digest").to_string()
}

fn push(layout: &Path, tag: &str, dest: &str, extra: &[&str]) {
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .args(extra)
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}")));
}

fn blob_count(store: &Store) -> usize {
    std::fs::read_dir(store.root().join("blobs/sha256"))
        .expect("blobs dir")
        .count()
}

fn layer_files(store: &Store, layer: &images::Layer) -> Vec<String> {
    let mut ar = tar::Archive::new(store.layer_reader(layer).expect("layer reader"));
    ar.entries()
        .expect("entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string()
        })
        .collect()
}

fn opts() -> PullOptions {
    PullOptions {
        insecure: false,
        progress: true,
    }
}

#[test]
fn pull_from_local_registry() {
    require_tools();
    docker_config_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = build_umoci_image(dir.path());
    let latest_manifest = extend_layout(&layout);
    let reg = Registry::start(dir.path(), None);
    let host = reg.host();
    push(
        &layout,
        "latest",
        &format!("{host}/test/busybox:latest"),
        &[],
    );
    push(
        &layout,
        "latest",
        &format!("{host}/test/docker:v2s2"),
        &["--format", "v2s2"],
    );
    push(
        &layout,
        "multi",
        &format!("{host}/test/multi:latest"),
        &["--all"],
    );
    push(&layout, "zstd", &format!("{host}/test/zstd:latest"), &[]);

    let store = Store::open(Some(dir.path().join("store"))).expect("open store");

    // OCI manifest, two gzip layers.
    let name = format!("{host}/test/busybox:latest");
    let img = store.pull(&name, &opts()).expect("pull busybox");
    assert_eq!(img.names, std::slice::from_ref(&name));
    assert_eq!(img.manifest_digest, latest_manifest);
    assert_eq!(
        img.repo_digests,
        [format!("{host}/test/busybox@{latest_manifest}")]
    );
    assert_eq!(img.layers.len(), 2);
    assert!(img
        .layers
        .iter()
        .all(|l| l.compression == Compression::Gzip));
    let cfg = img.config.config().as_ref().expect("config");
    assert_eq!(cfg.cmd().as_deref(), Some(&["/bin/sh".to_string()][..]));
    assert_eq!(cfg.env().as_deref(), Some(&["PATH=/bin".to_string()][..]));
    let files = layer_files(&store, &img.layers[0]);
    assert!(files.iter().any(|f| f == "bin/busybox"), "{files:?}");
    assert!(layer_files(&store, &img.layers[1])
        .iter()
        .any(|f| f == "etc/motd"));
    for d in img.blob_digests() {
        assert!(store.has_blob(d), "{d} missing");
    }
    assert_eq!(
        store.find(&name).expect("find").map(|i| i.id),
        Some(img.id.clone())
    );
    assert_eq!(
        store.find(img.short_id()).expect("find").map(|i| i.id),
        Some(img.id.clone())
    );

    // Again: nothing new.
    let blobs = blob_count(&store);
    assert_eq!(store.pull(&name, &opts()).expect("re-pull").id, img.id);
    assert_eq!(blob_count(&store), blobs);

    // Docker v2 schema 2 manifest.
    let v2 = store
        .pull(&format!("{host}/test/docker:v2s2"), &opts())
        .expect("pull v2s2");
    assert_eq!(v2.layers.len(), 2);
    // Same config, so the same image: its record keeps the layers it was
    // first verified with (a later pull never replaces them).
    assert_eq!(v2.id, img.id);
    assert_eq!(v2.layers, img.layers);
    assert_eq!(v2.diff_ids(), img.diff_ids());
    // In a fresh store, the docker media types are recorded.
    let docker_store = Store::open(Some(dir.path().join("docker-store"))).expect("open store");
    let v2 = docker_store
        .pull(&format!("{host}/test/docker:v2s2"), &opts())
        .expect("pull v2s2");
    for l in &v2.layers {
        assert_eq!(
            l.media_type,
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
        assert_eq!(l.compression, Compression::Gzip);
    }

    // Image index: the linux/amd64 entry is chosen.
    let multi = store
        .pull(&format!("{host}/test/multi"), &opts())
        .expect("pull index");
    assert_eq!(multi.manifest_digest, latest_manifest);
    assert_eq!(multi.id, img.id);
    assert!(multi.names.contains(&format!("{host}/test/multi:latest")));
    let multi_prefix = format!("{host}/test/multi@sha256:");
    assert!(
        multi
            .repo_digests
            .iter()
            .any(|d| d.starts_with(&multi_prefix) && !d.ends_with(&latest_manifest)),
        "the index digest is recorded: {:?}",
        multi.repo_digests
    );

    // zstd layer.
    let z = store
        .pull(&format!("{host}/test/zstd:latest"), &opts())
        .expect("pull zstd");
    assert_eq!(z.layers[0].compression, Compression::Zstd);
    assert_eq!(layer_files(&store, &z.layers[0]), ["etc/zstd-marker"]);

    // By digest, into a fresh store.
    let by_digest = format!("{host}/test/busybox@{latest_manifest}");
    let store2 = Store::open(Some(dir.path().join("store2"))).expect("open store2");
    let d = store2.pull(&by_digest, &opts()).expect("pull by digest");
    assert_eq!(d.id, img.id);
    assert_eq!(d.names, std::slice::from_ref(&by_digest));
    assert_eq!(
        store2.find(&by_digest).expect("find").map(|i| i.id),
        Some(img.id.clone())
    );

    // Errors.
    let missing = format!("{host}/test/busybox@sha256:{}", "0".repeat(64));
    let err = store2.pull(&missing, &opts()).expect_err("unknown digest");
    eprintln!("unknown digest: {err}");
    let err = store2
        .pull(&format!("{host}/test/nope:latest"), &opts())
        .expect_err("unknown repository");
    eprintln!("unknown repository: {err}");
    assert!(err.to_string().contains("test/nope"), "{err}");
    let err = store2
        .pull("127.0.0.1:1/x/y:latest", &opts())
        .expect_err("nothing listens");
    assert!(err.to_string().contains("cannot reach"), "{err}");
    assert!(matches!(
        store2.pull("Not A Reference", &opts()),
        Err(StoreError::Reference(_))
    ));

    // Two concurrent pulls of the same image both succeed.
    let store3 = Store::open(Some(dir.path().join("store3"))).expect("open store3");
    let ids: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| s.spawn(|| store3.pull(&name, &opts()).map(|i| i.id)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("thread").expect("concurrent pull"))
            .collect()
    });
    assert_eq!(ids, [img.id.clone(), img.id.clone()]);
    assert_eq!(store3.list().expect("list").len(), 1);

    // rmi: untag first, then delete by ID; blobs another image uses stay.
    let r = store.remove(&name).expect("rmi name");
    assert_eq!(r.untagged, std::slice::from_ref(&name));
    assert_eq!(r.deleted, None, "other names still point at it");
    let r = store.remove(&img.id).expect("rmi id");
    assert_eq!(r.deleted, Some(img.id.clone()));
    assert!(store.find(&img.id).expect("find").is_none());
    if v2.id != img.id {
        assert!(store.find(&v2.id).expect("find").is_some());
        for l in &v2.layers {
            assert!(store.has_blob(&l.digest), "{} was shared", l.digest);
        }
    }
    let report = store.prune().expect("prune");
    assert!(report.images_removed.is_empty(), "{report:?}");
    drop(reg);
}

#[test]
fn login_and_authenticated_pull() {
    require_tools();
    let config_dir = docker_config_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = build_umoci_image(dir.path());
    let hash = bcrypt::hash("s3cret pass", 5).expect("bcrypt");
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("hulluser:{hash}\n")).expect("htpasswd");
    let reg = Registry::start(dir.path(), Some(&htpasswd));
    let host = reg.host();
    let name = format!("{host}/private/busybox:latest");
    push(
        &layout,
        "latest",
        &name,
        &["--dest-creds", "hulluser:s3cret pass"],
    );
    let store = Store::open(Some(dir.path().join("store"))).expect("open store");

    let err = store.pull(&name, &opts()).expect_err("anonymous pull");
    assert!(matches!(err, StoreError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("hull login"), "{err}");

    let err = images::login(&host, "hulluser", "wrong").expect_err("wrong password");
    assert!(matches!(err, StoreError::Unauthorized { .. }), "{err}");
    let config_json = config_dir.join("config.json");
    assert!(!config_json.exists());

    images::login(&host, "hulluser", "s3cret pass").expect("login");
    let mode = std::fs::metadata(&config_json)
        .expect("config.json")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_json).expect("read")).expect("json");
    let auth = cfg["auths"][host.as_str()]["auth"]
        .as_str()
        .expect("auth entry");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(auth)
            .expect("base64"),
        b"hulluser:s3cret pass"
    );

    let img = store.pull(&name, &opts()).expect("authenticated pull");
    assert_eq!(img.layers.len(), 2);
    assert_eq!(img.names, std::slice::from_ref(&name));

    assert!(images::logout(&host).expect("logout"));
    let fresh = Store::open(Some(dir.path().join("fresh"))).expect("open");
    assert!(matches!(
        fresh.pull(&name, &opts()),
        Err(StoreError::Unauthorized { .. })
    ));
    drop(reg);
}

#[test]
fn load_archives_written_by_skopeo() {
    require_tools();
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = build_umoci_image(dir.path());
    let src = format!("oci:{}:latest", layout.display());
    let docker_tar = dir.path().join("docker.tar");
    let oci_tar = dir.path().join("oci.tar");
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy"])
        .arg(&src)
        .arg(format!(
            "docker-archive:{}:example.com/team/app:v1",
            docker_tar.display()
        )));
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy"])
        .arg(&src)
        .arg(format!(
            "oci-archive:{}:quay.io/team/app:v2",
            oci_tar.display()
        )));

    let store = Store::open(Some(dir.path().join("store"))).expect("open store");
    let d = store
        .load_archive(&docker_tar)
        .expect("load docker-archive");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].names, ["example.com/team/app:v1"]);
    assert_eq!(d[0].layers.len(), 2);
    let files = layer_files(&store, &d[0].layers[0]);
    assert!(files.iter().any(|f| f == "bin/busybox"), "{files:?}");

    let o = store.load_archive(&oci_tar).expect("load oci-archive");
    assert_eq!(o.len(), 1);
    // Same config either way, so the same image, now with both names.
    assert_eq!(
        o[0].names,
        ["example.com/team/app:v1", "quay.io/team/app:v2"]
    );
    assert_eq!(o[0].id, d[0].id);
    assert_eq!(store.list().expect("list").len(), 1);
}

/// Adds tag `evil` to `layout`: the `latest` image's exact config (so its
/// image ID) with its first layer swapped for another one.
fn add_evil_tag(layout: &Path) {
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).expect("read index")).expect("json");
    let latest = index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&latest)).expect("manifest")).expect("json");
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    let data = b"#!/bin/sh\necho pwned\n";
    h.set_size(data.len() as u64);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, "bin/sh", &data[..]).expect("tar");
    let tar = tar.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    let layer = gz.finish().expect("gzip");
    let ld = write_blob(layout, &layer);
    manifest["layers"][0]["digest"] = serde_json::json!(ld);
    manifest["layers"][0]["size"] = serde_json::json!(layer.len());
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let md = write_blob(layout, &bytes);
    index["manifests"]
        .as_array_mut()
        .expect("manifests")
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
            "size": bytes.len(), "annotations": { "org.opencontainers.image.ref.name": "evil" },
        }));
    std::fs::write(&index_path, serde_json::to_vec(&index).expect("json")).expect("index");
}

/// A registry image that reuses a trusted image's config with other layers
/// is refused on pull; the trusted image keeps its record and blobs.
#[test]
fn pull_of_trusted_config_with_other_layers_is_refused() {
    require_tools();
    docker_config_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = build_umoci_image(dir.path());
    add_evil_tag(&layout);
    let reg = Registry::start(dir.path(), None);
    let host = reg.host();
    let good = format!("{host}/test/good:latest");
    let evil = format!("{host}/test/evil:latest");
    push(&layout, "latest", &good, &[]);
    push(&layout, "evil", &evil, &[]);

    let store = Store::open(Some(dir.path().join("store"))).expect("open store");
    let trusted = store.pull(&good, &opts()).expect("pull the trusted image");
    assert!(trusted.diff_ids().iter().all(|d| d.starts_with("sha256:")));
    let blobs = blob_count(&store);

    let err = store
        .pull(&evil, &opts())
        .expect_err("pull of other layers");
    assert!(
        matches!(err, StoreError::DiffIdMismatch { index: 0, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("layer 1") && msg.contains("test/evil"),
        "{msg}"
    );
    assert_eq!(
        store.find(&trusted.id).expect("find"),
        Some(trusted.clone()),
        "the trusted record changed"
    );
    assert!(store.find(&evil).expect("find").is_none());
    assert_eq!(blob_count(&store), blobs, "the refused layer was stored");
    for d in trusted.blob_digests() {
        assert!(store.has_blob(d), "{d} is gone");
    }

    // Into a fresh store: refused the same, nothing recorded.
    let fresh = Store::open(Some(dir.path().join("fresh"))).expect("open");
    assert!(matches!(
        fresh.pull(&evil, &opts()),
        Err(StoreError::DiffIdMismatch { .. })
    ));
    assert!(fresh.list().expect("list").is_empty());
    drop(reg);
}
