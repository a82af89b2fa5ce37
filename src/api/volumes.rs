//! `/volumes/...`: hull's named volumes (list, create, inspect, remove, prune).

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, empty, json_response, ok_json, read_json, Api, ApiError, ApiResult, Query};
use crate::volume::{Volume, Volumes};

fn volume_json(v: &Volume) -> Value {
    json!({
        "Name": v.info.name,
        "Driver": "local",
        "Mountpoint": v.disk(),
        "CreatedAt": super::rfc3339(v.info.created),
        // What compose compares with its driver_opts: hull keeps none of
        // them but the size, which goes in Status.
        "Options": null,
        "Labels": {},
        "Scope": "local",
        "Status": { "Size": v.info.size.to_string(), "Anonymous": v.info.anonymous },
    })
}

fn volumes(api: &Api) -> Volumes {
    Volumes::new(api.store.root())
}

fn find(api: &Api, name: &str) -> Result<Volume, ApiError> {
    volumes(api)
        .get(name)
        .map_err(|e| ApiError::internal(e.as_ref()))?
        .ok_or_else(|| ApiError::not_found(format!("get {name}: no such volume")))
}

pub async fn list(api: Arc<Api>, query: &Query) -> ApiResult {
    let filters = super::parse_filters(query.get("filters"))?;
    super::check_filters(&filters, &["name", "dangling", "driver", "label"])?;
    let list = blocking(move || {
        let list = volumes(&api)
            .list()
            .map_err(|e| ApiError::internal(e.as_ref()))?;
        Ok(list
            .iter()
            .filter(|v| {
                filters.iter().all(|(k, f)| match k.as_str() {
                    "name" => v.info.name.contains(f.as_str()),
                    "driver" => f == "local",
                    "dangling" => (f == "true" || f == "1") != v.in_use().unwrap_or(true),
                    _ => true,
                })
            })
            .map(volume_json)
            .collect::<Vec<_>>())
    })
    .await?;
    ok_json(&json!({ "Volumes": list, "Warnings": [] }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct CreateBody {
    name: String,
    driver: String,
    driver_opts: Option<BTreeMap<String, String>>,
}

pub async fn create(api: Arc<Api>, body: Incoming) -> ApiResult {
    let body: CreateBody = read_json(body).await?;
    if !matches!(body.driver.as_str(), "" | "local") {
        return Err(ApiError::bad_request(format!(
            "volume driver {:?} is not supported: hull's volumes are local",
            body.driver
        )));
    }
    let opts: Vec<String> = body
        .driver_opts
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let size = crate::volume::parse_volume_opts(&opts)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let v = blocking(move || {
        let name = if body.name.is_empty() {
            crate::container::new_id().map_err(|e| ApiError::internal(e.as_ref()))?
        } else {
            body.name
        };
        let vols = volumes(&api);
        // docker: creating an existing volume returns it.
        if let Some(v) = vols
            .get(&name)
            .map_err(|e| ApiError::bad_request(e.to_string()))?
        {
            return Ok(v);
        }
        vols.create(&name, size, false)
            .map_err(|e| ApiError::hull(e.as_ref()))
    })
    .await?;
    Ok(json_response(StatusCode::CREATED, &volume_json(&v)))
}

pub async fn inspect(api: Arc<Api>, name: &str) -> ApiResult {
    let name = name.to_string();
    let v = blocking(move || find(&api, &name)).await?;
    ok_json(&volume_json(&v))
}

pub async fn remove(api: Arc<Api>, name: &str) -> ApiResult {
    let name = name.to_string();
    blocking(move || {
        find(&api, &name)?;
        volumes(&api)
            .remove(&name, &api.containers())
            .map_err(|e| ApiError::conflict(crate::error_chain(e.as_ref())))
    })
    .await?;
    empty(StatusCode::NO_CONTENT)
}

pub async fn prune(api: Arc<Api>) -> ApiResult {
    let (deleted, freed) = blocking(move || {
        let vols = volumes(&api);
        let mut deleted = Vec::new();
        let mut freed = 0;
        for v in vols.list().map_err(|e| ApiError::internal(e.as_ref()))? {
            // docker prunes anonymous volumes only (since API 1.42).
            if v.info.anonymous {
                if let Ok(n) = vols.remove(&v.info.name, &api.containers()) {
                    freed += n;
                    deleted.push(v.info.name);
                }
            }
        }
        Ok((deleted, freed))
    })
    .await?;
    ok_json(&json!({ "VolumesDeleted": deleted, "SpaceReclaimed": freed }))
}
