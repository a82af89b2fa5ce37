//! `hull system service`: the Docker Engine API on a UNIX socket (and on
//! TCP when asked), so that the docker CLI, compose and the SDKs drive hull.
//!
//! A thin front-end: every request turns into what the hull CLI itself
//! does (a create body becomes the `hull run` flags, parsed by the same
//! parser; starts, stops, logs, attach and exec go to the container's own
//! monitor), so containers made through the API and through the CLI are the
//! same containers. The server keeps nothing `hull ps` cannot see, except
//! what is only meaningful while a client is connected (exec instances,
//! attach sessions waiting for their container to start); it can be
//! restarted while containers run.
//!
//! HTTP is hyper's (HTTP/1.1 with upgrades: `attach` and `exec start`
//! hijack the connection, as docker's daemon does).

mod containers;
mod events;
mod exec;
mod images;
mod networks;
mod stream;
mod volumes;

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use ::images::Store;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::cli::ServiceArgs;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The newest Engine API version served.
pub const API_VERSION: &str = "1.43";
/// The oldest Engine API version accepted.
pub const MIN_API_VERSION: &str = "1.24";
/// The largest JSON request body read.
const MAX_JSON_BODY: usize = 4 << 20;
/// The socket's name in the store root.
pub const SOCKET_NAME: &str = "docker.sock";

/// A response body: whole, or streamed from a channel.
pub type ApiBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// An error as the Engine API reports it: a status and `{"message": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    fn internal(e: &(dyn std::error::Error + 'static)) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, crate::error_chain(e))
    }
    fn not_implemented(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("{what} is not implemented by hull"),
        )
    }
    /// A container lookup's error: no such container is 404, an ambiguous
    /// prefix 400.
    fn container(e: crate::container::ContainerError) -> Self {
        use crate::container::ContainerError as E;
        match e {
            E::NotFound(key) => Self::not_found(format!("No such container: {key}")),
            E::Ambiguous(_) => Self::bad_request(e.to_string()),
            E::NameInUse { .. } => Self::conflict(e.to_string()),
            other => Self::internal(&other),
        }
    }
    /// One of hull's own errors: bad flags are the client's (400), the
    /// rest 500.
    fn hull(e: &(dyn std::error::Error + 'static)) -> Self {
        if let Some(c) = e.downcast_ref::<crate::container::ContainerError>() {
            use crate::container::ContainerError as E;
            return match c {
                E::NotFound(key) => Self::not_found(format!("No such container: {key}")),
                E::NameInUse { .. } => Self::conflict(c.to_string()),
                _ => Self::internal(e),
            };
        }
        if let Some(::images::StoreError::NotFound(r)) = e.downcast_ref::<::images::StoreError>() {
            return Self::not_found(format!("No such image: {r}"));
        }
        let client_side = e.downcast_ref::<crate::flags::UsageError>().is_some()
            || e.downcast_ref::<crate::logfile::LogOptError>().is_some()
            || e.downcast_ref::<crate::network::NetworkError>().is_some()
            || e.downcast_ref::<::images::StoreError>().is_some_and(|s| {
                matches!(
                    s,
                    ::images::StoreError::Reference(_) | ::images::StoreError::AmbiguousId { .. }
                )
            });
        if client_side {
            Self::bad_request(crate::error_chain(e))
        } else {
            Self::internal(e)
        }
    }
}

type ApiResult = std::result::Result<Response<ApiBody>, ApiError>;

fn full(bytes: impl Into<Bytes>) -> ApiBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// A JSON response.
fn json_response(status: StatusCode, value: &Value) -> Response<ApiBody> {
    let mut r = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn ok_json(value: &Value) -> ApiResult {
    Ok(json_response(StatusCode::OK, value))
}

fn empty(status: StatusCode) -> ApiResult {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = status;
    Ok(r)
}

impl ApiError {
    fn response(&self) -> Response<ApiBody> {
        json_response(self.status, &json!({ "message": self.message }))
    }
}

/// A body fed from a channel (streams: logs, events, pull progress).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A streamed response and the sender that feeds it (closed: the end).
fn streaming(content_type: &'static str) -> (Response<ApiBody>, mpsc::Sender<Bytes>) {
    let (tx, rx) = mpsc::channel(64);
    let mut r = Response::new(ChannelBody(rx).boxed_unsync());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    (r, tx)
}

/// One JSON line of a progress or event stream.
fn json_line(value: &Value) -> Bytes {
    let mut v = serde_json::to_vec(value).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// The query string's parameters (later ones win).
#[derive(Debug, Default)]
struct Query(HashMap<String, String>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Self(
            form_urlencoded::parse(q.unwrap_or_default().as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    /// Docker's booleans: `1`, `true`, `True` (and present-but-empty is false).
    fn flag(&self, key: &str) -> bool {
        self.get(key)
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
    }
    fn number<T: std::str::FromStr>(&self, key: &str) -> std::result::Result<Option<T>, ApiError> {
        match self.get(key).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("invalid {key} {v:?}: not a number"))),
        }
    }
}

/// Docker's filter parameter: `{"key": ["v", ...]}` or `{"key": {"v": true}}`.
fn parse_filters(text: Option<&str>) -> std::result::Result<Vec<(String, String)>, ApiError> {
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return Ok(Vec::new());
    };
    let bad = || ApiError::bad_request(format!("invalid filters {text:?}"));
    let value: Value = serde_json::from_str(text).map_err(|_| bad())?;
    let Value::Object(map) = value else {
        return Err(bad());
    };
    let mut out = Vec::new();
    for (key, values) in map {
        match values {
            Value::Array(list) => {
                for v in list {
                    out.push((key.clone(), v.as_str().ok_or_else(bad)?.to_string()));
                }
            }
            Value::Object(set) => {
                for (v, on) in set {
                    if on.as_bool() != Some(false) {
                        out.push((key.clone(), v));
                    }
                }
            }
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

/// Refuses filters other than `known`.
fn check_filters(
    filters: &[(String, String)],
    known: &[&str],
) -> std::result::Result<(), ApiError> {
    match filters.iter().find(|(k, _)| !known.contains(&k.as_str())) {
        Some((k, _)) => Err(ApiError::bad_request(format!("invalid filter '{k}'"))),
        None => Ok(()),
    }
}

/// Reads a JSON body (at most [`MAX_JSON_BODY`]); an empty one is `{}`.
async fn read_json<T: serde::de::DeserializeOwned>(
    body: Incoming,
) -> std::result::Result<T, ApiError> {
    let bytes = Limited::new(body, MAX_JSON_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?
        .to_bytes();
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON in the request body: {e}")))
}

/// Runs blocking hull code (file locks, VMs being built, registries) off
/// the reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, ApiError> + Send + 'static,
) -> std::result::Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// Sends a terminal size (rows, columns) to a live session.
type Resizer = mpsc::UnboundedSender<(u16, u16)>;

/// What the server shares between requests: nothing a restart would lose
/// but live sessions.
#[derive(Debug)]
struct Api {
    store: Store,
    debug: bool,
    /// Exec instances (docker's are gone with the daemon too).
    execs: Mutex<exec::Execs>,
    /// Attach sessions waiting for their container to start, by id: its
    /// start then holds the command until they are connected.
    pending_attach: Mutex<HashMap<String, usize>>,
    /// Terminal size senders of the live attach sessions, by container id.
    resizers: Mutex<HashMap<String, Vec<Resizer>>>,
    /// Terminal sizes set while an attach session waited to connect.
    pending_sizes: Mutex<HashMap<String, (u16, u16)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Api {
    fn containers(&self) -> crate::container::Containers {
        crate::container::Containers::new(self.store.root())
    }

    fn find(&self, key: &str) -> std::result::Result<crate::container::Container, ApiError> {
        self.containers().find(key).map_err(ApiError::container)
    }
}

/// The path without its `/v1.NN` prefix, or the version's error.
fn strip_version(path: &str) -> std::result::Result<&str, ApiError> {
    let Some(rest) = path.strip_prefix("/v") else {
        return Ok(path);
    };
    let (version, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let Some(v) = parse_version(version) else {
        return Ok(path);
    };
    let max = parse_version(API_VERSION).unwrap_or((1, 43));
    let min = parse_version(MIN_API_VERSION).unwrap_or((1, 24));
    if v > max {
        return Err(ApiError::bad_request(format!(
            "client version {version} is too new. Maximum supported API version is {API_VERSION}"
        )));
    }
    if v < min {
        return Err(ApiError::bad_request(format!(
            "client version {version} is too old. Minimum supported API version is {MIN_API_VERSION}, please upgrade your client to a newer version"
        )));
    }
    Ok(if tail.is_empty() { "/" } else { tail })
}

fn parse_version(v: &str) -> Option<(u32, u32)> {
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

async fn handle(api: Arc<Api>, req: Request<Incoming>) -> Response<ApiBody> {
    let method = req.method().clone();
    let uri_path = req.uri().path().to_string();
    let mut response = match route(api, req).await {
        Ok(r) => r,
        Err(e) => {
            if e.status == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::warn!("api: {method} {uri_path}: {}", e.message);
            }
            e.response()
        }
    };
    let headers = response.headers_mut();
    headers.insert("Api-Version", HeaderValue::from_static(API_VERSION));
    headers.insert("Ostype", HeaderValue::from_static("linux"));
    headers.insert("Docker-Experimental", HeaderValue::from_static("false"));
    if let Ok(v) = HeaderValue::from_str(&format!("hull/{}", env!("CARGO_PKG_VERSION"))) {
        headers.insert("Server", v);
    }
    response
}

async fn route(api: Arc<Api>, req: Request<Incoming>) -> ApiResult {
    let path = strip_version(req.uri().path())?.to_string();
    let query = Query::parse(req.uri().query());
    let method = req.method().clone();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let m = &method;
    match (segs.as_slice(), m) {
        (["_ping"], &Method::GET | &Method::HEAD) => {
            let mut r = Response::new(full(if m == Method::GET { "OK" } else { "" }));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r.headers_mut().insert(
                "Cache-Control",
                HeaderValue::from_static("no-cache, no-store, must-revalidate"),
            );
            r.headers_mut()
                .insert("Pragma", HeaderValue::from_static("no-cache"));
            r.headers_mut()
                .insert("Builder-Version", HeaderValue::from_static("1"));
            Ok(r)
        }
        (["version"], &Method::GET) => ok_json(&version()),
        (["info"], &Method::GET) => info(&api).await,
        (["events"], &Method::GET) => events::events(&api, &query),

        (["containers", "create"], &Method::POST) => {
            containers::create(api, &query, req.into_body()).await
        }
        (["containers", "json"], &Method::GET) => containers::list(api, &query).await,
        (["containers", "prune"], &Method::POST) => containers::prune(api).await,
        (["containers", id, "json"], &Method::GET) => containers::inspect(api, id).await,
        (["containers", id, "start"], &Method::POST) => containers::start(api, id).await,
        (["containers", id, "stop"], &Method::POST) => containers::stop(api, id, &query).await,
        (["containers", id, "kill"], &Method::POST) => containers::kill(api, id, &query).await,
        (["containers", id, "wait"], &Method::POST) => containers::wait(api, id, &query).await,
        (["containers", id, "logs"], &Method::GET) => containers::logs(api, id, &query).await,
        (["containers", id, "resize"], &Method::POST) => containers::resize(api, id, &query).await,
        (["containers", id, "attach"], &Method::POST) => {
            let id = (*id).to_string();
            stream::attach(api, &id, &query, req).await
        }
        (["containers", id, "exec"], &Method::POST) => {
            let id = (*id).to_string();
            exec::create(api, &id, req.into_body()).await
        }
        (["containers", id], &Method::DELETE) => containers::remove(api, id, &query).await,
        (["exec", id, "start"], &Method::POST) => {
            let id = (*id).to_string();
            exec::start(api, &id, req).await
        }
        (["exec", id, "json"], &Method::GET) => exec::inspect(&api, id),
        (["exec", id, "resize"], &Method::POST) => exec::resize(&api, id, &query),

        (["images", "json"], &Method::GET) => images::list(api, &query).await,
        (["images", "create"], &Method::POST) => images::create(api, &query),
        (["images", "load"], &Method::POST) => images::load(api, &query, req.into_body()).await,
        (["images", "prune"], &Method::POST) => images::prune(api).await,
        (["images", ..], &Method::GET) if segs.len() > 2 && segs.last() == Some(&"json") => {
            let name = segs[1..segs.len() - 1].join("/");
            images::inspect(api, &name).await
        }
        (["images", ..], &Method::DELETE) if segs.len() > 1 => {
            let name = segs[1..].join("/");
            images::remove(api, &name, &query).await
        }

        (["volumes"], &Method::GET) => volumes::list(api, &query).await,
        (["volumes", "create"], &Method::POST) => volumes::create(api, req.into_body()).await,
        (["volumes", "prune"], &Method::POST) => volumes::prune(api).await,
        (["volumes", name], &Method::GET) => volumes::inspect(api, name).await,
        (["volumes", name], &Method::DELETE) => volumes::remove(api, name).await,

        (["networks"], &Method::GET) => networks::list(&api, &query),
        (["networks", "create"], &Method::POST) => networks::create(api, req.into_body()).await,
        (["networks", "prune"], &Method::POST) => ok_json(&json!({ "NetworksDeleted": [] })),
        (["networks", name], &Method::GET) => networks::inspect(&api, name),
        (["networks", name], &Method::DELETE) => networks::remove(&api, name),
        (["networks", _, "connect" | "disconnect"], &Method::POST) => empty(StatusCode::OK),

        (
            ["build" | "commit" | "swarm" | "services" | "nodes" | "tasks" | "secrets" | "configs"
            | "plugins" | "session" | "distribution" | "auth" | "grpc", ..],
            _,
        ) => Err(ApiError::not_implemented(&format!("{m} /{}", segs[0]))),
        (["containers", _, what], _) | (["images", .., what], _) => {
            Err(ApiError::not_implemented(&format!("{m} {path} ({what})")))
        }
        (["system", ..], _) => Err(ApiError::not_implemented(&format!("{m} {path}"))),
        _ => Err(ApiError::not_found(format!("page not found: {m} {path}"))),
    }
}

fn uname() -> (String, String) {
    // SAFETY: utsname is plain data, filled by uname(2).
    let mut u = unsafe { std::mem::zeroed::<libc::utsname>() };
    // SAFETY: `u` is a valid utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return (String::new(), String::new());
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c.to_ne_bytes()[0])
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (field(&u.release), field(&u.nodename))
}

fn version() -> Value {
    let (kernel, _) = uname();
    let v = env!("CARGO_PKG_VERSION");
    json!({
        "Platform": { "Name": "hull" },
        "Components": [{
            "Name": "Engine",
            "Version": v,
            "Details": { "ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION, "Os": "linux", "Arch": "amd64" },
        }],
        "Version": v,
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "GitCommit": "",
        "GoVersion": "",
        "Os": "linux",
        "Arch": "amd64",
        "KernelVersion": kernel,
        "BuildTime": "",
    })
}

async fn info(api: &Arc<Api>) -> ApiResult {
    let api = api.clone();
    let (total, running, stopped, images) = blocking(move || {
        let list = api.containers().list().map_err(ApiError::container)?;
        let running = list
            .iter()
            .filter(|c| {
                c.state()
                    .is_ok_and(|s| s.status == crate::container::Status::Running)
            })
            .count();
        let images = api.store.list().map_err(|e| ApiError::internal(&e))?.len();
        Ok((list.len(), running, list.len() - running, images))
    })
    .await?;
    let (kernel, host) = uname();
    // SAFETY: sysconf has no memory effects.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1);
    // SAFETY: as above.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) }.max(0);
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0);
    ok_json(&json!({
        "ID": "hull",
        "Containers": total,
        "ContainersRunning": running,
        "ContainersPaused": 0,
        "ContainersStopped": stopped,
        "Images": images,
        "Driver": "hull",
        "DriverStatus": [],
        "DockerRootDir": "",
        "Plugins": { "Volume": ["local"], "Network": ["bridge", "null"], "Log": ["json-file"] },
        "MemoryLimit": true,
        "SwapLimit": false,
        "OomKillDisable": false,
        "NCPU": cpus,
        "MemTotal": pages.saturating_mul(page),
        "Name": host,
        "ServerVersion": env!("CARGO_PKG_VERSION"),
        "KernelVersion": kernel,
        "OperatingSystem": "hull (a KVM microVM per container)",
        "OSType": "linux",
        "Architecture": "x86_64",
        "IndexServerAddress": "https://index.docker.io/v1/",
        "RegistryConfig": { "IndexConfigs": {}, "InsecureRegistryCIDRs": ["127.0.0.0/8"] },
        "Runtimes": { "hull": { "path": "hull" } },
        "DefaultRuntime": "hull",
        "Swarm": { "LocalNodeState": "inactive", "NodeID": "", "NodeAddr": "" },
        "LoggingDriver": "json-file",
        "CgroupDriver": "none",
        "CgroupVersion": "2",
        "SecurityOptions": [],
        "Labels": [],
        "ExperimentalBuild": false,
        "HttpProxy": "",
        "HttpsProxy": "",
        "NoProxy": "",
        "Warnings": [],
    }))
}

/// Where the API listens by default: `docker.sock` in the store root.
#[must_use]
pub fn default_socket(store_root: &Path) -> PathBuf {
    store_root.join(SOCKET_NAME)
}

/// Binds the UNIX socket (mode 0660), replacing a stale one but never a
/// live server's.
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!(
            "{} is already served (another `hull system service`?): stop it or give --socket",
            path.display()
        )
        .into());
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot replace {}: {e}", path.display()).into())
        }
        _ => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Whoever can connect controls hull: the socket is created 0660 (the
    // umask covers the window before the chmod; the server starts nothing
    // else that creates files until it is bound).
    // SAFETY: plain call; it changes only this process's file mode mask.
    let old_mask = unsafe { libc::umask(0o117) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the mask read there.
    unsafe { libc::umask(old_mask) };
    let listener = bound.map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

fn serve_connection<IO>(api: &Arc<Api>, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let api = api.clone();
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(handle(api, req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(io), service)
            .with_upgrades();
        if let Err(e) = conn.await {
            tracing::debug!("api: connection ended: {e}");
        }
    });
}

/// `hull system service`: serves the Engine API until SIGINT or SIGTERM.
///
/// # Errors
/// The socket cannot be bound.
pub fn serve(args: &ServiceArgs, debug: bool) -> Result<()> {
    let store = Store::open(None)?;
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| default_socket(store.root()));
    let tcp = match &args.listen {
        None => None,
        Some(addr) => Some(
            addr.strip_prefix("tcp://")
                .unwrap_or(addr)
                .parse::<std::net::SocketAddr>()
                .map_err(|_| {
                    crate::flags::UsageError(format!(
                        "invalid --listen {addr:?}: use tcp://IP:PORT"
                    ))
                })?,
        ),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let api = Arc::new(Api {
        store,
        debug,
        execs: Mutex::new(exec::Execs::default()),
        pending_attach: Mutex::new(HashMap::new()),
        resizers: Mutex::new(HashMap::new()),
        pending_sizes: Mutex::new(HashMap::new()),
    });
    runtime.block_on(async move {
        let unix = bind_unix(&socket)?;
        let tcp = match tcp {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
            ),
            None => None,
        };
        eprintln!("hull: Docker Engine API on unix://{}", socket.display());
        if let Some(t) = &tcp {
            let addr = t.local_addr()?;
            eprintln!("hull: and on tcp://{addr}");
            if !addr.ip().is_loopback() {
                eprintln!(
                    "hull: warning: tcp://{addr} has no authentication and no encryption: \
                     whoever reaches it controls hull and its containers"
                );
            }
        }
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                accepted = unix.accept() => match accepted {
                    Ok((s, _)) => serve_connection(&api, s),
                    Err(e) => tracing::warn!("api: accept: {e}"),
                },
                accepted = async { match &tcp { Some(t) => t.accept().await, None => std::future::pending().await } } => match accepted {
                    Ok((s, _)) => { let _ = s.set_nodelay(true); serve_connection(&api, s) }
                    Err(e) => tracing::warn!("api: accept: {e}"),
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        let _ = std::fs::remove_file(&socket);
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    // Sessions still open end with the process; containers go on running.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(())
}

/// Seconds since the epoch as RFC 3339 (UTC), as docker writes times.
#[must_use]
pub fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.000000000Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The seconds since the epoch of an RFC 3339 time (fractions and offsets
/// ignored beyond the seconds); 0 if it is not one.
#[must_use]
pub fn parse_rfc3339(text: &str) -> u64 {
    let num = |a: usize, b: usize| text.get(a..b).and_then(|s| s.parse::<i64>().ok());
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(s)) = (
        num(0, 4),
        num(5, 7),
        num(8, 10),
        num(11, 13),
        num(14, 16),
        num(17, 19),
    ) else {
        return 0;
    };
    // days_from_civil.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + s).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_prefixes_are_stripped_and_checked() {
        assert_eq!(
            strip_version("/v1.41/containers/json").unwrap(),
            "/containers/json"
        );
        assert_eq!(
            strip_version("/containers/json").unwrap(),
            "/containers/json"
        );
        assert_eq!(strip_version("/v1.43/_ping").unwrap(), "/_ping");
        assert_eq!(strip_version("/volumes").unwrap(), "/volumes");
        let e = strip_version("/v1.99/info").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("too new"), "{}", e.message);
        assert!(strip_version("/v1.12/info")
            .unwrap_err()
            .message
            .contains("too old"));
    }

    #[test]
    fn filters_take_both_of_dockers_shapes() {
        let f = parse_filters(Some(r#"{"label":["a=b","c"],"status":{"running":true}}"#)).unwrap();
        assert!(f.contains(&("label".into(), "a=b".into())));
        assert!(f.contains(&("label".into(), "c".into())));
        assert!(f.contains(&("status".into(), "running".into())));
        assert!(parse_filters(Some("[1]")).is_err());
        assert!(parse_filters(Some("{\"a\":[1]}")).is_err());
        assert!(parse_filters(Some("not json")).is_err());
        assert!(parse_filters(None).unwrap().is_empty());
        assert!(check_filters(&f, &["label"]).is_err());
        assert!(check_filters(&f, &["label", "status"]).is_ok());
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_795_010_782), "2026-11-18T14:06:22.000000000Z");
        assert_eq!(parse_rfc3339("2026-11-18T14:06:22.5Z"), 1_795_010_782);
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), 0);
        assert_eq!(parse_rfc3339("garbage"), 0);
        for t in [0, 951_782_400, 1_700_000_000, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), t);
        }
    }

    #[test]
    fn query_flags_read_like_dockers() {
        let q = Query::parse(Some("a=1&b=true&c=0&d=&e=False&name=%2Fweb"));
        assert!(q.flag("a") && q.flag("b"));
        assert!(!q.flag("c") && !q.flag("d") && !q.flag("e") && !q.flag("zz"));
        assert_eq!(q.get("name"), Some("/web"));
        assert_eq!(q.number::<u64>("a").unwrap(), Some(1));
        assert!(q.number::<u64>("b").is_err());
    }
}
