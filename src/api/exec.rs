//! `/containers/{id}/exec` and `/exec/{id}/...`: exec instances. They live
//! in the server only as long as it does (docker's die with its daemon too);
//! the process itself runs through the container's monitor as `hull exec`'s.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::containers::StringOrList;
use super::stream::{relay, Ended, Session};
use super::{empty, json_response, lock, ok_json, read_json, Api, ApiError, ApiResult, Query};
use crate::container::Status;
use crate::monitor::Request as MonitorRequest;

/// Most exec instances kept; the oldest finished ones go first.
const MAX_EXECS: usize = 1024;

/// One exec instance.
#[derive(Debug, Clone)]
pub struct Exec {
    container: String,
    spec: guest_init::spec::ExecSpec,
    stdout: bool,
    stderr: bool,
    started: bool,
    running: bool,
    exit_code: Option<i32>,
    resize: Option<mpsc::UnboundedSender<(u16, u16)>>,
}

/// The server's exec instances.
#[derive(Debug, Default)]
pub struct Execs {
    by_id: HashMap<String, Exec>,
    order: VecDeque<String>,
}

impl Execs {
    fn insert(&mut self, id: String, exec: Exec) {
        while self.by_id.len() >= MAX_EXECS {
            let Some(pos) = self
                .order
                .iter()
                .position(|i| self.by_id.get(i).is_none_or(|e| !e.running))
            else {
                break;
            };
            if let Some(old) = self.order.remove(pos) {
                self.by_id.remove(&old);
            }
        }
        self.order.push_back(id.clone());
        self.by_id.insert(id, exec);
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct CreateBody {
    attach_stdin: bool,
    attach_stdout: bool,
    attach_stderr: bool,
    tty: bool,
    cmd: Option<StringOrList>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct StartBody {
    detach: bool,
}

pub async fn create(api: Arc<Api>, key: &str, body: Incoming) -> ApiResult {
    let body: CreateBody = read_json(body).await?;
    let args = match body.cmd {
        Some(StringOrList::List(l)) => l,
        Some(StringOrList::One(s)) => s.split_whitespace().map(str::to_string).collect(),
        None => Vec::new(),
    };
    if args.is_empty() {
        return Err(ApiError::bad_request("no exec command specified"));
    }
    let key = key.to_string();
    let api2 = api.clone();
    let c = super::blocking(move || api2.find(&key)).await?;
    if c.state().map_err(ApiError::container)?.status != Status::Running {
        return Err(ApiError::conflict(format!(
            "Container {} is not running",
            c.config.id
        )));
    }
    let id = crate::container::new_id().map_err(|e| ApiError::internal(e.as_ref()))?;
    let exec = Exec {
        container: c.config.id,
        spec: guest_init::spec::ExecSpec {
            args,
            env: body.env.unwrap_or_default(),
            cwd: body.working_dir.filter(|w| !w.is_empty()),
            user: body.user.filter(|u| !u.is_empty()),
            tty: body.tty,
            stdin: body.attach_stdin,
        },
        stdout: body.attach_stdout,
        stderr: body.attach_stderr,
        started: false,
        running: false,
        exit_code: None,
        resize: None,
    };
    lock(&api.execs).insert(id.clone(), exec);
    Ok(json_response(StatusCode::CREATED, &json!({ "Id": id })))
}

fn finish(api: &Api, id: &str, ended: &Ended) {
    if let Some(e) = lock(&api.execs).by_id.get_mut(id) {
        e.running = false;
        e.resize = None;
        e.exit_code = Some(match ended {
            Ended::Exited(code) => *code,
            // The client went away: the monitor killed the process.
            Ended::ClientGone => 137,
            Ended::Vanished => 126,
        });
    }
}

pub async fn start(api: Arc<Api>, id: &str, mut req: Request<Incoming>) -> ApiResult {
    let upgrade = hyper::upgrade::on(&mut req);
    let body: StartBody = read_json(req.into_body()).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let exec = {
        let mut execs = lock(&api.execs);
        let e = execs
            .by_id
            .get_mut(id)
            .ok_or_else(|| ApiError::not_found(format!("No such exec instance: {id}")))?;
        if e.started {
            return Err(ApiError::conflict(format!(
                "exec {id} has already been started"
            )));
        }
        e.started = true;
        e.running = true;
        e.resize = Some(tx);
        e.clone()
    };
    let c = {
        let api = api.clone();
        let key = exec.container.clone();
        super::blocking(move || api.find(&key)).await?
    };
    let Some(monitor) = crate::client::connect(&api.store, &c)
        .ok()
        .and_then(|s| s.set_nonblocking(true).ok().map(|()| s))
        .and_then(|s| tokio::net::UnixStream::from_std(s).ok())
    else {
        finish(&api, id, &Ended::Vanished);
        return Err(ApiError::conflict(format!(
            "Container {} is not running",
            c.config.id
        )));
    };
    let mut spec = exec.spec.clone();
    let session = Session {
        stdin: spec.stdin && !body.detach,
        stdout: exec.stdout,
        stderr: exec.stderr,
        tty: spec.tty,
    };
    let id = id.to_string();
    if body.detach {
        // The process lives as long as its session: this server holds it.
        spec.stdin = false;
        tokio::spawn(async move {
            let (client, _far) = tokio::io::duplex(64);
            let quiet = Session {
                stdin: false,
                stdout: false,
                stderr: false,
                tty: session.tty,
            };
            let ended = relay(
                client,
                monitor,
                &MonitorRequest::Exec(spec),
                &quiet,
                rx,
                |_| {},
            )
            .await;
            finish(&api, &id, &ended);
        });
        return empty(StatusCode::OK);
    }
    let tty = session.tty;
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            finish(&api, &id, &Ended::ClientGone);
            return;
        };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        let ended = relay(
            io,
            monitor,
            &MonitorRequest::Exec(spec),
            &session,
            rx,
            |code| {
                finish(&api, &id, &Ended::Exited(code));
            },
        )
        .await;
        if !matches!(ended, Ended::Exited(_)) {
            finish(&api, &id, &ended);
        }
    });
    Ok(super::stream::upgraded_response(tty))
}

pub fn inspect(api: &Api, id: &str) -> ApiResult {
    let execs = lock(&api.execs);
    let e = execs
        .by_id
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("No such exec instance: {id}")))?;
    ok_json(&json!({
        "ID": id,
        "Running": e.running,
        "ExitCode": e.exit_code,
        "ProcessConfig": {
            "tty": e.spec.tty,
            "entrypoint": e.spec.args.first(),
            "arguments": e.spec.args.iter().skip(1).collect::<Vec<_>>(),
            "privileged": false,
            "user": e.spec.user.clone().unwrap_or_default(),
        },
        "OpenStdin": e.spec.stdin,
        "OpenStdout": e.stdout,
        "OpenStderr": e.stderr,
        "CanRemove": !e.running && e.started,
        "ContainerID": e.container,
        "DetachKeys": "",
        "Pid": 0,
    }))
}

pub fn resize(api: &Api, id: &str, query: &Query) -> ApiResult {
    let h: u16 = query.number("h")?.unwrap_or(0);
    let w: u16 = query.number("w")?.unwrap_or(0);
    let execs = lock(&api.execs);
    let e = execs
        .by_id
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("No such exec instance: {id}")))?;
    if let Some(tx) = &e.resize {
        if h > 0 && w > 0 {
            let _ = tx.send((h, w));
        }
    }
    empty(StatusCode::CREATED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(running: bool) -> Exec {
        Exec {
            container: "c".into(),
            spec: guest_init::spec::ExecSpec {
                args: vec!["true".into()],
                env: Vec::new(),
                cwd: None,
                user: None,
                tty: false,
                stdin: false,
            },
            stdout: true,
            stderr: true,
            started: true,
            running,
            exit_code: None,
            resize: None,
        }
    }

    #[test]
    fn exec_instances_are_bounded_and_running_ones_kept() {
        let mut execs = Execs::default();
        execs.insert("running".into(), exec(true));
        for i in 0..MAX_EXECS + 10 {
            execs.insert(format!("e{i}"), exec(false));
        }
        assert_eq!(execs.by_id.len(), MAX_EXECS);
        assert!(execs.by_id.contains_key("running"));
        assert!(!execs.by_id.contains_key("e0"));
        assert!(execs.by_id.contains_key(&format!("e{}", MAX_EXECS + 9)));
    }
}
