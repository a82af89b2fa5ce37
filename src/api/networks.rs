//! `/networks/...`, the minimum compose needs: docker's default `bridge`
//! (hull's default network: each container its own user-mode network
//! through passt), `none`, and user-defined networks recorded by name in
//! `$HULL_ROOT/networks/` so that compose can create, find and remove its
//! project network. Containers on one run on hull's default network: they
//! reach each other through published ports, not by service name.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Digest;

use super::{empty, json_response, ok_json, read_json, Api, ApiError, ApiResult, Query};

/// A network's id: the digest of its name (stable across restarts).
#[must_use]
pub fn network_id(name: &str) -> String {
    hex::encode(sha2::Sha256::digest(name.as_bytes()))
}

const BUILTIN: [(&str, &str); 2] = [("bridge", "bridge"), ("none", "null")];

fn dir(api: &Api) -> std::path::PathBuf {
    api.store.root().join("networks")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with('.')
}

fn network_json(name: &str, driver: &str, labels: &Value, created: u64) -> Value {
    json!({
        "Name": name,
        "Id": network_id(name),
        "Created": super::rfc3339(created),
        "Scope": "local",
        "Driver": driver,
        "EnableIPv6": false,
        "IPAM": { "Driver": "default", "Options": {}, "Config": [] },
        "Internal": false,
        "Attachable": false,
        "Ingress": false,
        "Containers": {},
        "Options": {},
        "Labels": labels,
    })
}

fn user_networks(api: &Api) -> Vec<Value> {
    let Ok(entries) = std::fs::read_dir(dir(api)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Ok(bytes) = std::fs::read(e.path()) else {
            continue;
        };
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            out.push(v);
        }
    }
    out
}

fn all(api: &Api) -> Vec<Value> {
    BUILTIN
        .iter()
        .map(|(n, d)| network_json(n, d, &json!({}), 0))
        .chain(user_networks(api))
        .collect()
}

fn find(api: &Api, key: &str) -> Result<Value, ApiError> {
    all(api)
        .into_iter()
        .find(|n| {
            n["Name"] == key
                || n["Id"]
                    .as_str()
                    .is_some_and(|id| key.len() >= 12 && id.starts_with(key))
        })
        .ok_or_else(|| ApiError::not_found(format!("network {key} not found")))
}

pub fn list(api: &Api, query: &Query) -> ApiResult {
    let filters = super::parse_filters(query.get("filters"))?;
    let list: Vec<Value> = all(api)
        .into_iter()
        .filter(|n| {
            filters.iter().all(|(k, v)| match k.as_str() {
                "name" => n["Name"].as_str().is_some_and(|x| x.contains(v.as_str())),
                "id" => n["Id"].as_str().is_some_and(|x| x.starts_with(v.as_str())),
                "label" => match v.split_once('=') {
                    Some((lk, lv)) => n["Labels"][lk] == lv,
                    None => !n["Labels"][v.as_str()].is_null(),
                },
                "driver" => n["Driver"] == v.as_str(),
                _ => true,
            })
        })
        .collect();
    ok_json(&Value::Array(list))
}

pub fn inspect(api: &Api, key: &str) -> ApiResult {
    ok_json(&find(api, key)?)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct CreateBody {
    name: String,
    driver: String,
    labels: Option<serde_json::Map<String, Value>>,
}

pub async fn create(api: Arc<Api>, body: Incoming) -> ApiResult {
    let body: CreateBody = read_json(body).await?;
    if !valid_name(&body.name) {
        return Err(ApiError::bad_request(format!(
            "invalid network name {:?}: use letters, digits, '_', '-' and '.'",
            body.name
        )));
    }
    if find(&api, &body.name).is_ok() {
        return Err(ApiError::conflict(format!(
            "network with name {} already exists",
            body.name
        )));
    }
    let driver = if body.driver.is_empty() {
        "bridge"
    } else {
        &body.driver
    };
    if driver != "bridge" {
        return Err(ApiError::bad_request(format!(
            "network driver {driver:?} is not supported: hull has bridge-like networks only"
        )));
    }
    let v = network_json(
        &body.name,
        driver,
        &Value::Object(body.labels.unwrap_or_default()),
        crate::container::now(),
    );
    let d = dir(&api);
    std::fs::create_dir_all(&d).map_err(|e| ApiError::internal(&e))?;
    std::fs::write(
        d.join(format!("{}.json", body.name)),
        serde_json::to_vec(&v).unwrap_or_default(),
    )
    .map_err(|e| ApiError::internal(&e))?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({ "Id": v["Id"], "Warning": "" }),
    ))
}

pub fn remove(api: &Api, key: &str) -> ApiResult {
    let n = find(api, key)?;
    let name = n["Name"].as_str().unwrap_or_default();
    if BUILTIN.iter().any(|(b, _)| *b == name) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{name} is a pre-defined network and cannot be removed"),
        ));
    }
    std::fs::remove_file(dir(api).join(format!("{name}.json")))
        .map_err(|e| ApiError::internal(&e))?;
    empty(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_names_cannot_escape_the_directory() {
        assert!(valid_name("proj_default"));
        assert!(valid_name("a.b-c"));
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(200)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(network_id("bridge").len(), 64);
        assert_eq!(network_id("bridge"), network_id("bridge"));
    }
}
