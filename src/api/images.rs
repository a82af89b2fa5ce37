//! `/images/...`: hull's image store (list, inspect, pull with docker's
//! progress stream, remove, load, prune).

use std::io::Write;
use std::sync::Arc;

use ::images::Image;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::StatusCode;
use serde_json::{json, Value};

use super::{
    blocking, json_line, ok_json, parse_rfc3339, rfc3339, streaming, Api, ApiError, ApiResult,
    Query,
};

/// The largest archive `images/load` takes (it is spooled to disk).
const MAX_LOAD: u64 = 64 << 30;

/// A name as docker shows it: `docker.io/library/` and `docker.io/` dropped.
fn short_name(name: &str) -> String {
    name.strip_prefix("docker.io/library/")
        .or_else(|| name.strip_prefix("docker.io/"))
        .unwrap_or(name)
        .to_string()
}

fn repo_tags(image: &Image) -> Vec<String> {
    image
        .names
        .iter()
        .filter(|n| !n.contains('@'))
        .map(|n| short_name(n))
        .collect()
}

fn created(image: &Image) -> u64 {
    image
        .created
        .as_deref()
        .map(parse_rfc3339)
        .filter(|&t| t > 0)
        .unwrap_or(image.added)
}

fn summary(image: &Image) -> Value {
    let labels = image
        .config
        .config()
        .as_ref()
        .and_then(|c| c.labels().clone())
        .unwrap_or_default();
    json!({
        "Id": image.id,
        "ParentId": "",
        "RepoTags": repo_tags(image),
        "RepoDigests": image.repo_digests.iter().map(|d| short_name(d)).collect::<Vec<_>>(),
        "Created": created(image),
        "Size": image.size,
        "SharedSize": -1,
        "VirtualSize": image.size,
        "Labels": labels,
        "Containers": -1,
    })
}

pub async fn list(api: Arc<Api>, query: &Query) -> ApiResult {
    let filters = super::parse_filters(query.get("filters"))?;
    super::check_filters(&filters, &["reference", "dangling", "label"])?;
    let list = blocking(move || api.store.list().map_err(|e| ApiError::internal(&e))).await?;
    let out: Vec<Value> = list
        .iter()
        .filter(|i| {
            filters.iter().all(|(k, v)| match k.as_str() {
                "reference" => repo_tags(i)
                    .iter()
                    .any(|t| t == v || t.split(':').next() == Some(v.as_str())),
                "dangling" => (v == "true") == i.names.is_empty(),
                _ => true,
            })
        })
        .map(summary)
        .collect();
    ok_json(&Value::Array(out))
}

/// The image `name`; the built-in `busybox` is made on first use, as
/// `hull run` makes it (compose inspects an image before it creates).
fn find(api: &Api, name: &str) -> Result<Image, ApiError> {
    if let Some(image) = api.store.find(name).map_err(|e| ApiError::hull(&e))? {
        return Ok(image);
    }
    if crate::run::is_builtin_image(name) {
        return api
            .store
            .create_default_image()
            .map_err(|e| ApiError::internal(&e));
    }
    Err(ApiError::not_found(format!("No such image: {name}")))
}

pub async fn inspect(api: Arc<Api>, name: &str) -> ApiResult {
    let name = name.to_string();
    let image = blocking(move || find(&api, &name)).await?;
    let config = image
        .config
        .config()
        .as_ref()
        .and_then(|c| serde_json::to_value(c).ok())
        .unwrap_or_else(|| json!({}));
    ok_json(&json!({
        "Id": image.id,
        "RepoTags": repo_tags(&image),
        "RepoDigests": image.repo_digests.iter().map(|d| short_name(d)).collect::<Vec<_>>(),
        "Parent": "",
        "Comment": "",
        "Created": image.created.clone().unwrap_or_else(|| rfc3339(image.added)),
        "Container": "",
        "DockerVersion": "",
        "Author": "",
        "Config": config,
        "Architecture": "amd64",
        "Os": "linux",
        "Size": image.size,
        "VirtualSize": image.size,
        "GraphDriver": { "Name": "hull", "Data": null },
        "RootFS": { "Type": "layers", "Layers": image.diff_ids() },
        "Metadata": { "LastTagTime": "0001-01-01T00:00:00Z" },
    }))
}

/// The reference `images/create` pulls: `fromImage` with `tag` (a tag or a
/// digest) unless it has one.
fn pull_reference(from: &str, tag: Option<&str>) -> String {
    let last = from.rsplit('/').next().unwrap_or(from);
    match tag.filter(|t| !t.is_empty()) {
        Some(t) if !last.contains(':') && !from.contains('@') => {
            if t.starts_with("sha256:") {
                format!("{from}@{t}")
            } else {
                format!("{from}:{t}")
            }
        }
        _ => from.to_string(),
    }
}

/// A reference's repository and tag (or digest; `latest` when it has none).
fn split_tag(reference: &str) -> (&str, &str) {
    if let Some((repo, digest)) = reference.split_once('@') {
        return (repo, digest);
    }
    match reference.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (reference, "latest"),
    }
}

/// `POST /images/create?fromImage=...`: a pull, with docker's progress
/// stream (JSON lines; an error is the last line, as docker's).
pub fn create(api: Arc<Api>, query: &Query) -> ApiResult {
    let Some(from) = query.get("fromImage").filter(|f| !f.is_empty()) else {
        return Err(ApiError::not_implemented(
            "images/create without fromImage (import)",
        ));
    };
    let reference = pull_reference(from, query.get("tag"));
    let (response, tx) = streaming("application/json");
    tokio::task::spawn_blocking(move || {
        let (repo, tag) = split_tag(&reference);
        let _ = tx.blocking_send(json_line(&json!({
            "status": format!("Pulling from {}", short_name(repo)),
            "id": tag,
        })));
        let line = match api.store.pull(
            &reference,
            &::images::PullOptions {
                insecure: false,
                progress: false,
            },
        ) {
            Ok(image) => {
                let _ = tx.blocking_send(json_line(
                    &json!({ "status": format!("Digest: {}", image.manifest_digest) }),
                ));
                json!({ "status": format!("Status: Downloaded newer image for {}", short_name(&reference)) })
            }
            Err(e) => {
                let m = crate::error_chain(&e);
                json!({ "errorDetail": { "message": m }, "error": m })
            }
        };
        let _ = tx.blocking_send(json_line(&line));
    });
    Ok(response)
}

pub async fn remove(api: Arc<Api>, name: &str, query: &Query) -> ApiResult {
    let force = query.flag("force");
    let name = name.to_string();
    let removed = blocking(move || {
        let image = find(&api, &name)?;
        if !force {
            let users: Vec<String> = api
                .containers()
                .list()
                .map_err(ApiError::container)?
                .into_iter()
                .filter(|c| c.config.image_id == image.id)
                .map(|c| c.short_id().to_string())
                .collect();
            if let Some(user) = users.first() {
                return Err(ApiError::conflict(format!(
                    "conflict: unable to remove repository reference \"{name}\" (must force) - container {user} is using its referenced image {}",
                    image.short_id()
                )));
            }
        }
        api.store.remove(&name).map_err(|e| ApiError::hull(&e))
    })
    .await?;
    let mut out: Vec<Value> = removed
        .untagged
        .iter()
        .map(|n| json!({ "Untagged": short_name(n) }))
        .collect();
    if let Some(id) = removed.deleted {
        out.push(json!({ "Deleted": id }));
    }
    ok_json(&Value::Array(out))
}

pub async fn prune(api: Arc<Api>) -> ApiResult {
    let report = blocking(move || api.store.prune().map_err(|e| ApiError::internal(&e))).await?;
    ok_json(&json!({
        "ImagesDeleted": report.images_removed.iter().map(|id| json!({ "Deleted": id })).collect::<Vec<_>>(),
        "SpaceReclaimed": report.bytes_freed,
    }))
}

/// A spooled upload's file, removed when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `POST /images/load`: the archive is spooled to the store's tmp (bounded)
/// and loaded as `hull load` does.
pub async fn load(api: Arc<Api>, _query: &Query, mut body: Incoming) -> ApiResult {
    let dir = api.store.root().join("tmp");
    let path = dir.join(format!(
        "api-load-{}",
        crate::container::new_id().map_err(|e| ApiError::internal(e.as_ref()))?
    ));
    let mut file = std::fs::File::create(&path).map_err(|e| ApiError::internal(&e))?;
    // Removed however this ends, also when the client goes away mid-upload
    // (hyper then drops this future).
    let _spool = RemoveOnDrop(path.clone());
    let mut total: u64 = 0;
    let result: Result<(), ApiError> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| ApiError::bad_request(format!("cannot read the archive: {e}")))?;
            if let Ok(data) = frame.into_data() {
                total += data.len() as u64;
                if total > MAX_LOAD {
                    return Err(ApiError::bad_request(
                        "the archive is larger than hull loads (64 GiB)",
                    ));
                }
                // Small writes to a local file: not worth a blocking task each.
                file.write_all(&data).map_err(|e| ApiError::internal(&e))?;
            }
        }
        Ok(())
    }
    .await;
    drop(file);
    result?;
    let loaded = {
        let path = path.clone();
        blocking(move || {
            api.store
                .load_archive(&path)
                .map_err(|e| ApiError::bad_request(crate::error_chain(&e)))
        })
        .await
    };
    let loaded = loaded?;
    let mut lines = Vec::new();
    for image in &loaded {
        let text = match image.names.first() {
            Some(n) => format!("Loaded image: {}\n", short_name(n)),
            None => format!("Loaded image ID: {}\n", image.id),
        };
        // Quiet or not (it only hides progress), docker says what it loaded.
        lines.extend_from_slice(&json_line(&json!({ "stream": text })));
    }
    let mut r = hyper::Response::new(super::full(Bytes::from(lines)));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_references_take_the_tag_parameter() {
        assert_eq!(pull_reference("busybox", Some("1.36")), "busybox:1.36");
        assert_eq!(pull_reference("busybox", None), "busybox");
        assert_eq!(
            pull_reference("127.0.0.1:5000/bb", Some("latest")),
            "127.0.0.1:5000/bb:latest"
        );
        assert_eq!(
            pull_reference("127.0.0.1:5000/bb:v1", Some("latest")),
            "127.0.0.1:5000/bb:v1"
        );
        assert_eq!(pull_reference("bb", Some("sha256:abc")), "bb@sha256:abc");
    }

    #[test]
    fn tags_split_off_after_a_registry_port() {
        assert_eq!(
            split_tag("127.0.0.1:5000/bb:v1"),
            ("127.0.0.1:5000/bb", "v1")
        );
        assert_eq!(
            split_tag("127.0.0.1:5000/bb"),
            ("127.0.0.1:5000/bb", "latest")
        );
        assert_eq!(split_tag("bb@sha256:ab"), ("bb", "sha256:ab"));
    }

    #[test]
    fn names_read_as_dockers() {
        assert_eq!(
            short_name("docker.io/library/alpine:latest"),
            "alpine:latest"
        );
        assert_eq!(short_name("docker.io/me/app:1"), "me/app:1");
        assert_eq!(
            short_name("127.0.0.1:5000/bb:latest"),
            "127.0.0.1:5000/bb:latest"
        );
    }
}
