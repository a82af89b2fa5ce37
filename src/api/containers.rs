//! `/containers/...`: create (a docker create body turned into `hull run`
//! flags and parsed by the CLI's own parser), list, inspect, start, stop,
//! kill, wait, logs, resize, remove, prune.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    blocking, check_filters, empty, json_response, lock, ok_json, parse_filters, read_json,
    rfc3339, streaming, Api, ApiError, ApiResult, Query,
};
use crate::cli::RunArgs;
use crate::container::{files, Container, State, Status};

/// A string or a list of strings (docker-py sends either for Cmd/Entrypoint).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// One string (split on whitespace, as docker's CLI would).
    One(String),
    /// The list.
    List(Vec<String>),
}

impl StringOrList {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => s.split_whitespace().map(str::to_string).collect(),
            Self::List(l) => l,
        }
    }
}

/// `POST /containers/create`'s body: the fields hull uses.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateBody {
    pub image: String,
    pub cmd: Option<StringOrList>,
    pub entrypoint: Option<StringOrList>,
    pub env: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub hostname: Option<String>,
    pub tty: bool,
    pub open_stdin: bool,
    pub labels: Option<BTreeMap<String, String>>,
    pub stop_signal: Option<String>,
    pub host_config: Option<HostConfig>,
}

/// The create body's `HostConfig`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HostConfig {
    pub binds: Option<Vec<String>>,
    pub port_bindings: Option<BTreeMap<String, Option<Vec<PortBinding>>>>,
    pub publish_all_ports: bool,
    pub mounts: Option<Vec<MountBody>>,
    pub tmpfs: Option<BTreeMap<String, String>>,
    pub memory: i64,
    pub nano_cpus: i64,
    pub auto_remove: bool,
    pub network_mode: Option<String>,
    pub extra_hosts: Option<Vec<String>>,
    pub readonly_rootfs: bool,
    pub log_config: Option<LogConfig>,
    pub cap_add: Option<Vec<String>>,
    pub cap_drop: Option<Vec<String>>,
    pub privileged: bool,
    pub init: Option<bool>,
    pub dns: Option<Vec<String>>,
    pub dns_search: Option<Vec<String>>,
    pub sysctls: Option<BTreeMap<String, String>>,
    pub shm_size: i64,
    pub ulimits: Option<Vec<Ulimit>>,
}

/// One host binding of a container port.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PortBinding {
    pub host_ip: String,
    pub host_port: String,
}

/// One of `HostConfig.Mounts`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MountBody {
    #[serde(rename = "Type")]
    pub kind: String,
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

/// `HostConfig.LogConfig`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct LogConfig {
    #[serde(rename = "Type")]
    pub kind: String,
    pub config: Option<BTreeMap<String, String>>,
}

/// One of `HostConfig.Ulimits`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Ulimit {
    pub name: String,
    pub soft: i64,
    pub hard: i64,
}

/// The label that keeps the network a container was created on (compose's
/// project network); hull runs it on its default network. Not shown as a label.
pub const NETWORK_LABEL: &str = "io.hull.api.network";

/// The `hull run` arguments (after `hull run`) for a create body.
///
/// # Errors
/// What hull cannot do (host networking, another logging driver...).
pub fn run_argv(body: CreateBody, name: Option<&str>) -> Result<Vec<String>, ApiError> {
    let mut a: Vec<String> = Vec::new();
    let mut flag = |f: &str, v: &str| {
        a.push(format!("{f}={v}"));
    };
    if body.image.is_empty() {
        return Err(ApiError::bad_request("no image given (Image is empty)"));
    }
    if let Some(n) = name
        .map(|n| n.trim_start_matches('/'))
        .filter(|n| !n.is_empty())
    {
        flag("--name", n);
    }
    for e in body.env.unwrap_or_default() {
        flag("--env", &e);
    }
    if let Some(w) = body.working_dir.filter(|w| !w.is_empty()) {
        flag("--workdir", &w);
    }
    if let Some(u) = body.user.filter(|u| !u.is_empty()) {
        flag("--user", &u);
    }
    if let Some(h) = body.hostname.filter(|h| !h.is_empty()) {
        flag("--hostname", &h);
    }
    if let Some(s) = body.stop_signal.filter(|s| !s.is_empty()) {
        flag("--stop-signal", &s);
    }
    let mut labels = body.labels.unwrap_or_default();
    let hc = body.host_config.unwrap_or_default();
    match hc.network_mode.as_deref().unwrap_or_default() {
        "" | "default" | "bridge" | "hull" => {}
        "none" => flag("--network", "none"),
        "host" => {
            return Err(ApiError::bad_request(
                "network mode host is not supported: each hull container is its own VM",
            ))
        }
        m if m.starts_with("container:") => {
            return Err(ApiError::bad_request(format!(
                "network mode {m} is not supported: each hull container is its own VM"
            )))
        }
        // A user-defined network (compose's project network): hull's default one.
        m => {
            labels.insert(NETWORK_LABEL.into(), m.into());
        }
    }
    for (k, v) in &labels {
        flag("--label", &format!("{k}={v}"));
    }
    if hc.memory > 0 {
        flag("--memory", &hc.memory.to_string());
    } else if hc.memory < 0 {
        return Err(ApiError::bad_request("invalid Memory: below 0"));
    }
    if hc.nano_cpus > 0 {
        #[allow(clippy::cast_precision_loss)] // a CPU count
        let cpus = hc.nano_cpus as f64 / 1e9;
        flag("--cpus", &cpus.to_string());
    }
    if hc.auto_remove {
        a.push("--rm".into());
    }
    if hc.readonly_rootfs {
        a.push("--read-only".into());
    }
    if hc.privileged {
        a.push("--privileged".into());
    }
    if hc.init == Some(true) {
        a.push("--init".into());
    }
    if hc.publish_all_ports {
        a.push("--publish-all".into());
    }
    if body.open_stdin {
        a.push("--interactive".into());
    }
    if body.tty {
        a.push("--tty".into());
    }
    let mut flag = |f: &str, v: &str| {
        a.push(format!("{f}={v}"));
    };
    for h in hc.extra_hosts.unwrap_or_default() {
        flag("--add-host", &h);
    }
    for d in hc.dns.unwrap_or_default() {
        flag("--dns", &d);
    }
    for d in hc.dns_search.unwrap_or_default() {
        flag("--dns-search", &d);
    }
    for c in hc.cap_add.unwrap_or_default() {
        flag("--cap-add", &c);
    }
    for c in hc.cap_drop.unwrap_or_default() {
        flag("--cap-drop", &c);
    }
    for (k, v) in hc.sysctls.unwrap_or_default() {
        flag("--sysctl", &format!("{k}={v}"));
    }
    for u in hc.ulimits.unwrap_or_default() {
        flag("--ulimit", &format!("{}={}:{}", u.name, u.soft, u.hard));
    }
    if hc.shm_size > 0 {
        flag("--shm-size", &hc.shm_size.to_string());
    }
    if let Some(log) = hc.log_config {
        if crate::logfile::LogDriver::from_name(&log.kind).is_none() {
            return Err(ApiError::bad_request(format!(
                "logging driver {:?} is not supported: hull keeps json-file logs or none",
                log.kind
            )));
        }
        if !log.kind.is_empty() {
            flag("--log-driver", &log.kind);
        }
        for (k, v) in log.config.unwrap_or_default() {
            flag("--log-opt", &format!("{k}={v}"));
        }
    }
    for b in hc.binds.unwrap_or_default() {
        flag("--volume", &b);
    }
    for m in hc.mounts.unwrap_or_default() {
        let mut spec = format!("type={}", m.kind);
        if !m.source.is_empty() {
            spec.push_str(&format!(",source={}", m.source));
        }
        spec.push_str(&format!(",target={}", m.target));
        if m.read_only {
            spec.push_str(",readonly");
        }
        flag("--mount", &spec);
    }
    for (path, opts) in hc.tmpfs.unwrap_or_default() {
        if opts.is_empty() {
            flag("--tmpfs", &path);
        } else {
            flag("--tmpfs", &format!("{path}:{opts}"));
        }
    }
    for (port, bindings) in hc.port_bindings.unwrap_or_default() {
        for b in bindings.unwrap_or_default() {
            let spec = match (b.host_ip.as_str(), b.host_port.as_str()) {
                ("", "") => port.clone(),
                ("", hp) => format!("{hp}:{port}"),
                (ip, hp) => format!("{ip}:{hp}:{port}"),
            };
            flag("--publish", &spec);
        }
    }
    // docker: an Entrypoint replaces the image's, and the image's Cmd with it.
    let mut command = Vec::new();
    match body.entrypoint.map(StringOrList::into_vec) {
        None => {}
        Some(e) if e.is_empty() || (e.len() == 1 && e[0].is_empty()) => {
            a.push("--entrypoint=".into());
        }
        Some(e) => {
            a.push(format!("--entrypoint={}", e[0]));
            command.extend(e.into_iter().skip(1));
        }
    }
    command.extend(body.cmd.map(StringOrList::into_vec).unwrap_or_default());
    a.push("--".into());
    a.push(body.image);
    a.extend(command);
    Ok(a)
}

/// Parses `hull run` arguments with the CLI's parser.
///
/// # Errors
/// A flag hull refuses (its message, 400).
pub fn parse_run_args(argv: &[String]) -> Result<RunArgs, ApiError> {
    use clap::Parser;
    let cli = crate::cli::Cli::try_parse_from(
        ["hull", "run"]
            .iter()
            .map(|s| (*s).to_string())
            .chain(argv.iter().cloned()),
    )
    .map_err(|e| {
        let text = e.to_string();
        let line = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("invalid container configuration");
        ApiError::bad_request(line.trim_start_matches("error: ").to_string())
    })?;
    match cli.command {
        crate::cli::Command::Run(args) => Ok(args),
        _ => Err(ApiError::bad_request("invalid container configuration")),
    }
}

pub async fn create(api: Arc<Api>, query: &Query, body: Incoming) -> ApiResult {
    let body: CreateBody = read_json(body).await?;
    let image = body.image.clone();
    let argv = run_argv(body, query.get("name"))?;
    let args = parse_run_args(&argv)?;
    let id = blocking(move || {
        // docker's create does not pull: the client pulls on a 404 and retries.
        let found = api.store.find(&image).map_err(|e| ApiError::hull(&e))?;
        if found.is_none() && !crate::run::is_builtin_image(&image) {
            return Err(ApiError::not_found(format!("No such image: {image}")));
        }
        let c = crate::run::create(&args, &api.store, api.debug)
            .map_err(|e| ApiError::hull(e.as_ref()))?;
        Ok(c.config.id)
    })
    .await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({ "Id": id, "Warnings": [] }),
    ))
}

fn state_name(s: Status) -> &'static str {
    match s {
        Status::Created => "created",
        Status::Running => "running",
        Status::Exited => "exited",
    }
}

/// docker's Status column ("Up 5 seconds", "Exited (0) 3 minutes ago").
fn status_text(c: &Container, st: &State) -> String {
    match st.status {
        Status::Created => "Created".into(),
        Status::Running => format!(
            "Up {}",
            crate::container::since(st.started.unwrap_or(c.config.created))
        ),
        Status::Exited => format!(
            "Exited ({}) {} ago",
            st.exit_code.unwrap_or(-1),
            crate::container::since(st.finished.unwrap_or(c.config.created))
        ),
    }
}

fn labels(c: &Container) -> Value {
    let mut l = serde_json::Map::new();
    for (k, v) in &c.config.labels {
        if k != NETWORK_LABEL {
            l.insert(k.clone(), Value::String(v.clone()));
        }
    }
    Value::Object(l)
}

/// The network a container reports being on: its compose network, else
/// docker's default `bridge` (`none` with no network).
fn network_name(c: &Container) -> String {
    if let Some(n) = c.config.labels.get(NETWORK_LABEL) {
        return n.clone();
    }
    match &c.config.network {
        Some(n) if n.mode != crate::network::Mode::None => "bridge".into(),
        _ => "none".into(),
    }
}

fn ports_list(c: &Container, st: &State) -> Vec<Value> {
    match (&c.config.network, st.status) {
        (Some(n), Status::Running) => n
            .ports
            .iter()
            .map(|m| {
                json!({
                    "IP": m.host_ip.to_string(),
                    "PrivatePort": m.container_port,
                    "PublicPort": m.host_port,
                    "Type": m.proto.name(),
                })
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether `c` passes every filter (same key: any value; keys: all).
fn matches(c: &Container, st: &State, filters: &[(String, String)]) -> bool {
    let mut keys: HashMap<&str, bool> = HashMap::new();
    for (k, v) in filters {
        let hit = match k.as_str() {
            "id" => c.config.id.starts_with(v.as_str()),
            "name" => c.config.name.contains(v.trim_start_matches('/')),
            "label" => match v.split_once('=') {
                Some((lk, lv)) => c.config.labels.get(lk).is_some_and(|x| x == lv),
                None => c.config.labels.contains_key(v.as_str()),
            },
            "status" => state_name(st.status) == v,
            "ancestor" => c.config.image == *v || c.config.image_id.contains(v.as_str()),
            "exited" => {
                st.status == Status::Exited
                    && st.exit_code.map(|x| x.to_string()) == Some(v.clone())
            }
            _ => false,
        };
        *keys.entry(k).or_insert(false) |= hit;
    }
    keys.values().all(|&hit| hit)
}

fn summary(c: &Container, st: &State) -> Value {
    json!({
        "Id": c.config.id,
        "Names": [format!("/{}", c.config.name)],
        "Image": c.config.image,
        "ImageID": c.config.image_id,
        "Command": c.config.spec.args.join(" "),
        "Created": c.config.created,
        "Ports": ports_list(c, st),
        "Labels": labels(c),
        "State": state_name(st.status),
        "Status": status_text(c, st),
        "HostConfig": { "NetworkMode": network_name(c) },
        "NetworkSettings": { "Networks": networks(c, st) },
        "Mounts": mounts(c),
    })
}

fn mounts(c: &Container) -> Vec<Value> {
    c.config
        .mounts
        .iter()
        .map(crate::volume::inspect_mount)
        .collect()
}

fn networks(c: &Container, st: &State) -> Value {
    let name = network_name(c);
    if name == "none" {
        return json!({});
    }
    let n = c.config.network.as_ref();
    let running = st.status == Status::Running;
    let ip = n
        .and_then(crate::network::NetworkConfig::ip)
        .filter(|_| running)
        .map(|a| a.to_string())
        .unwrap_or_default();
    let gw = n
        .and_then(crate::network::NetworkConfig::gateway)
        .filter(|_| running)
        .map(|a| a.to_string())
        .unwrap_or_default();
    json!({ name.clone(): {
        "NetworkID": super::networks::network_id(&name),
        "EndpointID": if running { c.short_id() } else { "" },
        "Aliases": [c.short_id(), c.config.name],
        "IPAddress": ip,
        "IPPrefixLen": if ip.is_empty() { 0 } else { crate::network::PREFIX },
        "Gateway": gw,
        "MacAddress": n.map(|n| n.mac.clone()).unwrap_or_default(),
    }})
}

pub async fn list(api: Arc<Api>, query: &Query) -> ApiResult {
    let all = query.flag("all");
    let limit: Option<i64> = query.number("limit")?;
    let filters = parse_filters(query.get("filters"))?;
    check_filters(
        &filters,
        &["id", "name", "label", "status", "ancestor", "exited"],
    )?;
    let out = blocking(move || {
        let mut list: Vec<(Container, State)> = api
            .containers()
            .list()
            .map_err(ApiError::container)?
            .into_iter()
            .filter_map(|c| c.state().ok().map(|s| (c, s)))
            .collect();
        list.sort_by_key(|c| std::cmp::Reverse(c.0.config.created));
        let status_filtered = filters.iter().any(|(k, _)| k == "status");
        Ok(list
            .iter()
            .filter(|(_, s)| all || status_filtered || s.status == Status::Running)
            .filter(|(c, s)| matches(c, s, &filters))
            .take(
                limit
                    .and_then(|l| usize::try_from(l).ok())
                    .filter(|&l| l > 0)
                    .unwrap_or(usize::MAX),
            )
            .map(|(c, s)| summary(c, s))
            .collect::<Vec<_>>())
    })
    .await?;
    ok_json(&Value::Array(out))
}

pub async fn inspect(api: Arc<Api>, key: &str) -> ApiResult {
    let key = key.to_string();
    let v = blocking(move || {
        let c = api.find(&key)?;
        let st = c.state().map_err(ApiError::container)?;
        Ok(inspect_value(&c, &st))
    })
    .await?;
    ok_json(&v)
}

fn inspect_value(c: &Container, st: &State) -> Value {
    let spec = &c.config.spec;
    let mut port_bindings = serde_json::Map::new();
    let mut ports = serde_json::Map::new();
    if let Some(n) = &c.config.network {
        for m in &n.ports {
            let binding =
                json!({ "HostIp": m.host_ip.to_string(), "HostPort": m.host_port.to_string() });
            for map in [&mut port_bindings, &mut ports] {
                if let Value::Array(l) = map.entry(m.key()).or_insert_with(|| json!([])) {
                    l.push(binding.clone());
                }
            }
        }
    }
    let running = st.status == Status::Running;
    let net = network_name(c);
    let ip = c
        .config
        .network
        .as_ref()
        .and_then(crate::network::NetworkConfig::ip)
        .filter(|_| running)
        .map(|a| a.to_string())
        .unwrap_or_default();
    json!({
        "Id": c.config.id,
        "Created": rfc3339(c.config.created),
        "Path": spec.args.first().cloned().unwrap_or_default(),
        "Args": spec.args.iter().skip(1).collect::<Vec<_>>(),
        "State": {
            "Status": state_name(st.status),
            "Running": running,
            "Paused": false,
            "Restarting": false,
            "OOMKilled": false,
            "Dead": false,
            "Pid": st.pid.unwrap_or(0),
            "ExitCode": st.exit_code.unwrap_or(0),
            "Error": st.error.clone().unwrap_or_default(),
            "StartedAt": st.started.map_or_else(|| "0001-01-01T00:00:00Z".to_string(), rfc3339),
            "FinishedAt": st.finished.map_or_else(|| "0001-01-01T00:00:00Z".to_string(), rfc3339),
        },
        "Image": c.config.image_id,
        "Name": format!("/{}", c.config.name),
        "RestartCount": 0,
        "Driver": "hull",
        "Platform": "linux",
        "LogPath": c.path(files::LOG),
        "Config": {
            "Hostname": spec.hostname,
            "User": spec.user,
            "Tty": spec.tty,
            "OpenStdin": spec.stdin,
            "StdinOnce": false,
            "AttachStdin": false,
            "AttachStdout": false,
            "AttachStderr": false,
            "Env": spec.env,
            "Cmd": spec.args,
            "Entrypoint": null,
            "Image": c.config.image,
            "WorkingDir": spec.cwd,
            "Labels": labels(c),
            "ExposedPorts": ports.keys().map(|k| (k.clone(), json!({}))).collect::<serde_json::Map<_, _>>(),
            "Volumes": null,
        },
        "HostConfig": {
            "NetworkMode": net,
            "PortBindings": port_bindings,
            "AutoRemove": c.config.auto_remove,
            "Memory": c.config.memory_mib << 20,
            "NanoCpus": u64::from(c.config.cpus) * 1_000_000_000,
            "ReadonlyRootfs": spec.read_only,
            "RestartPolicy": { "Name": "no", "MaximumRetryCount": 0 },
            "LogConfig": c.config.log.docker_log_config(),
            "Binds": null,
            "Runtime": "hull",
        },
        "Mounts": mounts(c),
        "NetworkSettings": {
            "IPAddress": ip,
            "Ports": ports,
            "Networks": networks(c, st),
        },
    })
}

pub async fn start(api: Arc<Api>, key: &str) -> ApiResult {
    let key = key.to_string();
    let started = blocking(move || {
        let c = api.find(&key)?;
        match c.state().map_err(ApiError::container)?.status {
            Status::Running => return Ok(false),
            Status::Exited => {
                return Err(ApiError::conflict(format!(
                    "container {} has exited: hull cannot restart a container; remove it and run a new one",
                    c.config.name
                )))
            }
            Status::Created => {}
        }
        // An attach waiting for this start: the command waits for it, so the
        // attached client sees all of the output.
        let wait_attach = lock(&api.pending_attach)
            .get(&c.config.id)
            .is_some_and(|&n| n > 0);
        let mut child = crate::run::spawn_monitor(&api.store, &c, wait_attach, api.debug)
            .map_err(|e| ApiError::hull(e.as_ref()))?;
        // The monitor is this server's child: reaped when it ends (it runs
        // on if the server goes first).
        let _ = std::thread::Builder::new()
            .name("reap".into())
            .spawn(move || child.wait());
        Ok(true)
    })
    .await?;
    empty(if started {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_MODIFIED
    })
}

pub async fn stop(api: Arc<Api>, key: &str, query: &Query) -> ApiResult {
    let timeout: Option<i64> = query.number("t")?;
    let key = key.to_string();
    let stopped = blocking(move || {
        let c = api.find(&key)?;
        if c.state().map_err(ApiError::container)?.status != Status::Running {
            return Ok(false);
        }
        let secs = u64::try_from(timeout.unwrap_or(10)).unwrap_or(0);
        crate::client::stop(&api.store, &c, secs).map_err(|e| ApiError::hull(e.as_ref()))?;
        Ok(true)
    })
    .await?;
    empty(if stopped {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_MODIFIED
    })
}

pub async fn kill(api: Arc<Api>, key: &str, query: &Query) -> ApiResult {
    let signal = guest_init::security::parse_signal(
        query
            .get("signal")
            .filter(|s| !s.is_empty())
            .unwrap_or("KILL"),
    )
    .map_err(ApiError::bad_request)?;
    let key = key.to_string();
    blocking(move || {
        let c = api.find(&key)?;
        if c.state().map_err(ApiError::container)?.status != Status::Running {
            return Err(ApiError::conflict(format!(
                "Container {} is not running",
                c.config.id
            )));
        }
        crate::client::signal(&api.store, &c, signal).map_err(|e| ApiError::hull(e.as_ref()))
    })
    .await?;
    empty(StatusCode::NO_CONTENT)
}

/// The main process's exit code, from its monitor (which says so before it
/// removes an `--rm` container), or from the state once it has ended.
fn wait_exit(api: &Api, c: &Container) -> Option<i32> {
    loop {
        let st = c.state().ok()?;
        match st.status {
            Status::Exited => return st.exit_code,
            Status::Created => std::thread::sleep(Duration::from_millis(50)),
            Status::Running => {
                if let Some(code) = super::stream::wait_on_monitor(&api.store, c) {
                    return Some(code);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

pub async fn wait(api: Arc<Api>, key: &str, query: &Query) -> ApiResult {
    let condition = query.get("condition").unwrap_or("not-running").to_string();
    if !matches!(condition.as_str(), "not-running" | "next-exit" | "removed") {
        return Err(ApiError::bad_request(format!(
            "invalid condition {condition:?}: use not-running, next-exit or removed"
        )));
    }
    let c = {
        let api = api.clone();
        let key = key.to_string();
        blocking(move || api.find(&key)).await?
    };
    // Headers now, the status when it ends (as docker's daemon does).
    let (mut response, tx) = streaming("application/json");
    *response.status_mut() = StatusCode::OK;
    tokio::task::spawn_blocking(move || {
        let first = c.state().ok().map(|s| s.status);
        let code = if condition == "next-exit" && first == Some(Status::Exited) {
            // Exited already: the next exit is after a start hull does not do.
            loop {
                std::thread::sleep(Duration::from_millis(500));
                if tx.is_closed() {
                    return;
                }
            }
        } else {
            wait_exit(&api, &c)
        };
        if condition == "removed" {
            for _ in 0..600 {
                if !c.dir.exists() || tx.is_closed() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let body = match code {
            Some(code) => json!({ "StatusCode": code, "Error": null }),
            None => {
                json!({ "StatusCode": 0, "Error": { "Message": "the container's state is gone" } })
            }
        };
        let _ = tx.blocking_send(Bytes::from(serde_json::to_vec(&body).unwrap_or_default()));
    });
    Ok(response)
}

/// A log record (hull's json-file line) as `(stream, text, time)`.
fn parse_record(line: &[u8]) -> Option<(u8, String, u64)> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let stream = if v.get("stream").and_then(Value::as_str) == Some("stderr") {
        2
    } else {
        1
    };
    let log = v.get("log").and_then(Value::as_str)?.to_string();
    let time = v.get("time").and_then(Value::as_u64).unwrap_or(0);
    Some((stream, log, time))
}

pub async fn logs(api: Arc<Api>, key: &str, query: &Query) -> ApiResult {
    let follow = query.flag("follow");
    let timestamps = query.flag("timestamps");
    let (want_out, want_err) = (query.flag("stdout"), query.flag("stderr"));
    let tail: Option<usize> = match query.get("tail") {
        None | Some("all" | "") => None,
        Some(_) => query.number("tail")?,
    };
    let since: u64 = query.number::<f64>("since")?.map_or(0, |s| {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let s = s.max(0.0) as u64;
        s
    });
    let c = {
        let api = api.clone();
        let key = key.to_string();
        blocking(move || api.find(&key)).await?
    };
    if c.config.log.driver == crate::logfile::LogDriver::None {
        // Docker's status and words for a driver that keeps nothing.
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "configured logging driver does not support reading",
        ));
    }
    let tty = c.config.spec.tty;
    let (response, tx) = streaming(if tty {
        super::stream::RAW_STREAM
    } else {
        super::stream::MULTIPLEXED_STREAM
    });
    tokio::task::spawn_blocking(move || {
        let Ok(mut reader) =
            crate::logfile::LogReader::open(&c.path(files::LOG), c.config.log.max_file)
        else {
            return;
        };
        let encode = |line: &[u8]| -> Option<Bytes> {
            let (stream, mut text, time) = parse_record(line)?;
            if (stream == 1 && !want_out) || (stream == 2 && !want_err) || time < since {
                return None;
            }
            if timestamps {
                text = format!("{} {text}", rfc3339(time));
            }
            Some(if tty {
                Bytes::from(text.into_bytes())
            } else {
                super::stream::mux_frame(stream, text.as_bytes())
            })
        };
        let mut first: Vec<Bytes> = Vec::new();
        let _ = reader.read_available(&mut |r| {
            if let Some(b) = encode(r) {
                first.push(b);
                if let Some(n) = tail {
                    if first.len() > n {
                        first.remove(0);
                    }
                }
            }
        });
        for b in first {
            if tx.blocking_send(b).is_err() {
                return;
            }
        }
        if !follow {
            return;
        }
        let _ = api;
        loop {
            let running = c.state().is_ok_and(|s| s.status != Status::Exited);
            let mut batch = Vec::new();
            let _ = reader.read_available(&mut |r| batch.extend(encode(r)));
            for b in batch {
                if tx.blocking_send(b).is_err() {
                    return;
                }
            }
            if !running || tx.is_closed() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    Ok(response)
}

pub async fn resize(api: Arc<Api>, key: &str, query: &Query) -> ApiResult {
    let h: u16 = query.number("h")?.unwrap_or(0);
    let w: u16 = query.number("w")?.unwrap_or(0);
    let key = key.to_string();
    blocking(move || {
        let c = api.find(&key)?;
        if c.state().map_err(ApiError::container)?.status != Status::Running {
            return Err(ApiError::conflict(format!(
                "Container {} is not running",
                c.config.id
            )));
        }
        super::stream::resize_main(&api, &c, h, w);
        Ok(())
    })
    .await?;
    empty(StatusCode::OK)
}

pub async fn remove(api: Arc<Api>, key: &str, query: &Query) -> ApiResult {
    let force = query.flag("force");
    let volumes = query.flag("v");
    let key = key.to_string();
    blocking(move || {
        let c = api.find(&key)?;
        if c.state().map_err(ApiError::container)?.status == Status::Running {
            if !force {
                return Err(ApiError::conflict(format!(
                    "You cannot remove a running container {}. Stop the container before attempting removal or force remove",
                    c.config.id
                )));
            }
            crate::client::stop(&api.store, &c, 0).map_err(|e| ApiError::hull(e.as_ref()))?;
        }
        // An --rm container removes itself when it ends.
        if c.dir.exists() {
            api.containers()
                .remove(&c)
                .map_err(ApiError::container)?;
        }
        if volumes {
            crate::volume::remove_anonymous(api.store.root(), &c.config.mounts);
        }
        Ok(())
    })
    .await?;
    empty(StatusCode::NO_CONTENT)
}

pub async fn prune(api: Arc<Api>) -> ApiResult {
    let (deleted, freed) = blocking(move || {
        let containers = api.containers();
        let mut deleted = Vec::new();
        let mut freed = 0;
        for c in containers.list().map_err(ApiError::container)? {
            if c.state().is_ok_and(|s| s.status == Status::Exited) {
                if let Ok(n) = containers.remove(&c) {
                    freed += n;
                    deleted.push(c.config.id);
                }
            }
        }
        Ok((deleted, freed))
    })
    .await?;
    ok_json(&json!({ "ContainersDeleted": deleted, "SpaceReclaimed": freed }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(body: &str, name: Option<&str>) -> Vec<String> {
        run_argv(serde_json::from_str(body).unwrap(), name).unwrap()
    }

    #[test]
    fn a_docker_run_body_becomes_hull_run_flags() {
        // What `docker run --rm -p 8080:80 -e A=1 -w /w -u 1:2 -v v:/data
        // --tmpfs /t -m 256m --cpus 1.5 --read-only --add-host h:1.2.3.4
        // --log-opt max-size=1m -l k=v -it IMG sh -c 'x'` sends (trimmed).
        let a = argv(
            r#"{"Image":"busybox","Cmd":["sh","-c","x"],"Env":["A=1"],"WorkingDir":"/w",
                "User":"1:2","Tty":true,"OpenStdin":true,"Labels":{"k":"v"},"Entrypoint":null,
                "HostConfig":{"AutoRemove":true,"Binds":["v:/data"],"Tmpfs":{"/t":""},
                "Memory":268435456,"NanoCpus":1500000000,"ReadonlyRootfs":true,
                "ExtraHosts":["h:1.2.3.4"],"LogConfig":{"Type":"json-file","Config":{"max-size":"1m"}},
                "PortBindings":{"80/tcp":[{"HostIp":"","HostPort":"8080"}]},"NetworkMode":"default",
                "Mounts":[{"Type":"volume","Source":"data","Target":"/m","ReadOnly":true}]}}"#,
            Some("/web"),
        );
        let args = parse_run_args(&a).unwrap();
        assert_eq!(args.name.as_deref(), Some("web"));
        assert_eq!(args.image, "busybox");
        assert_eq!(args.command, ["sh", "-c", "x"]);
        assert_eq!(args.env, ["A=1"]);
        assert_eq!(args.workdir.as_deref(), Some("/w"));
        assert_eq!(args.user.as_deref(), Some("1:2"));
        assert!(args.tty && args.interactive && args.rm && args.read_only);
        assert_eq!(args.label, ["k=v"]);
        assert_eq!(args.volume, ["v:/data"]);
        assert_eq!(args.tmpfs, ["/t"]);
        assert_eq!(args.memory, "268435456");
        assert_eq!(args.cpus, "1.5");
        assert_eq!(args.add_host, ["h:1.2.3.4"]);
        assert_eq!(args.log_opt, ["max-size=1m"]);
        assert_eq!(args.publish, ["8080:80/tcp"]);
        assert_eq!(args.mount, ["type=volume,source=data,target=/m,readonly"]);
        assert_eq!(args.entrypoint, None);
    }

    #[test]
    fn entrypoints_follow_docker() {
        // An Entrypoint list: its first word is the entrypoint, the rest and
        // the Cmd its arguments.
        let args = parse_run_args(&argv(
            r#"{"Image":"i","Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"]}"#,
            None,
        ))
        .unwrap();
        assert_eq!(args.entrypoint.as_deref(), Some("/bin/sh"));
        assert_eq!(args.command, ["-c", "echo hi"]);
        // [""] clears it.
        let args = parse_run_args(&argv(r#"{"Image":"i","Entrypoint":[""]}"#, None)).unwrap();
        assert_eq!(args.entrypoint.as_deref(), Some(""));
        // A Cmd starting with a dash is the command's, not a flag.
        let args = parse_run_args(&argv(r#"{"Image":"i","Cmd":["--help"]}"#, None)).unwrap();
        assert_eq!(args.command, ["--help"]);
        assert!(args.name.is_none());
    }

    #[test]
    fn ports_networks_and_drivers() {
        let a = argv(
            r#"{"Image":"i","HostConfig":{"PortBindings":{"53/udp":[{"HostIp":"127.0.0.1","HostPort":""}],
                "80/tcp":null,"81/tcp":[{"HostIp":"","HostPort":""}]},"NetworkMode":"proj_default"}}"#,
            None,
        );
        let args = parse_run_args(&a).unwrap();
        assert_eq!(args.publish, ["127.0.0.1::53/udp", "81/tcp"]);
        assert_eq!(args.label, [format!("{NETWORK_LABEL}=proj_default")]);
        let none = parse_run_args(&argv(
            r#"{"Image":"i","HostConfig":{"NetworkMode":"none"}}"#,
            None,
        ))
        .unwrap();
        assert_eq!(none.network.as_deref(), Some("none"));
        let quiet = parse_run_args(&argv(
            r#"{"Image":"i","HostConfig":{"LogConfig":{"Type":"none"}}}"#,
            None,
        ))
        .unwrap();
        assert_eq!(quiet.log_driver.as_deref(), Some("none"));
        for bad in [
            r#"{"Image":"i","HostConfig":{"NetworkMode":"host"}}"#,
            r#"{"Image":"i","HostConfig":{"LogConfig":{"Type":"syslog"}}}"#,
            r#"{"Image":""}"#,
        ] {
            let e = run_argv(serde_json::from_str(bad).unwrap(), None).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        // Hostile JSON is a 400, not a panic.
        for bad in [
            r#"{"Image":5}"#,
            r#"{"HostConfig":{"Memory":"x"}}"#,
            "[",
            "{\"Cmd\":{}}",
        ] {
            assert!(serde_json::from_str::<CreateBody>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_flag_value_is_a_bad_request() {
        let e = parse_run_args(&["--bogus".into(), "--".into(), "i".into()]).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(!e.message.contains('\n'));
    }
}
