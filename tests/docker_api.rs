//! The Docker Engine API (`hull system service`) driven by real clients in
//! the emulated KVM host: the docker CLI 28 (a static binary, as these
//! machines and CI have at /usr/local/bin/docker) with `DOCKER_HOST` at
//! hull's socket runs, publishes, lists, logs, execs, stops, removes,
//! pulls from a loopback docker-registry and mounts a named volume; a
//! client killed mid-attach leaves the container running and the server
//! answering; the server restarts while a container runs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    install_busybox, stripped, tool_files, value, EmulatedHost, OciImage, Registry, ENTER_NEW_ROOT,
    NEW_ROOT,
};

const DOCKER: &str = "/usr/local/bin/docker";

const PRELUDE: &str =
    "export PATH=/usr/local/bin:/sbin:/usr/sbin:/bin:/usr/bin HULL_KERNEL=/opt/hull/vmlinux\n";

/// The emulated host's addressing for passt (as tests/network.rs).
const HOST_NETWORK: &str = r#"
ip link set lo up
ip link set dummy0 up
ip addr add 192.0.2.10/24 dev dummy0
ip route add default via 192.0.2.1 dev dummy0
"#;

/// Starts `hull system service` and waits for its socket.
const START_SERVICE: &str = r#"
export DOCKER_HOST=unix:///var/lib/hull/docker.sock
start_service() {
	hull system service >>/tmp/api.log 2>&1 &
	API_PID=$!
	for i in $(seq 100); do docker version >/dev/null 2>&1 && break; sleep 0.2; done
}
start_service
"#;

/// A registry's storage holding `bbpull:latest` (busybox and /marker),
/// made here with umoci and skopeo; the emulated host serves a copy of it.
fn registry_storage(dir: &Path) -> PathBuf {
    let registry = Registry::start(dir);
    let image = OciImage::new(&dir.join("img"));
    image.layer(|root| {
        install_busybox(root);
        std::fs::write(root.join("marker"), "pulled-through-the-api\n").unwrap();
    });
    image.config(&["--config.cmd", "/bin/sh", "--config.env", "PATH=/bin"]);
    image.push(&registry, "bbpull");
    drop(registry);
    dir.join("data")
}

#[test]
fn the_docker_cli_drives_hull() {
    assert!(
        Path::new(DOCKER).is_file(),
        "the docker CLI is missing at {DOCKER} (a static docker CLI 28)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let storage = registry_storage(tmp.path());
    let mut host = EmulatedHost::new()
        .with_hull_runtime()
        .host_env("HULL_NETWORK", "passt")
        .module("dummy")
        .timeout(1200)
        .cpus(2)
        .mem(3072)
        .file(stripped(Path::new(DOCKER)), DOCKER)
        .dir(&storage, "/opt/registry")
        // hull's registry client (rustls) wants the host's CA bundle, even
        // for a plain-HTTP registry on loopback.
        .file(
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/ssl/certs/ca-certificates.crt",
        );
    for tool in ["/usr/bin/passt", "/usr/bin/docker-registry"] {
        host = host.tool(tool, tool);
    }
    let inner = format!(
        "{PRELUDE}{HOST_NETWORK}{START_SERVICE}{}",
        r#"
echo "api-version=$(docker version --format '{{.Server.APIVersion}}')"
ls -l /var/lib/hull/docker.sock | cut -c1-10 | sed 's/^/socket-mode=/'
# 1. docker run --rm: output and exit codes (through wait).
echo "run-out=$(docker run --rm busybox echo hi)"
docker run --rm busybox sh -c 'echo to-stderr >&2; exit 3' 2>/tmp/err3; echo run-exit3=$?
echo "run-stderr=$(cat /tmp/err3)"
docker run --rm busybox true; echo run-exit0=$?
echo "rm-left=$(docker ps -aq | wc -l)"
# Events, streamed while the rest runs.
docker events --since "$(date +%s)" --filter type=container --format '{{.Action}} {{.Actor.Attributes.name}}' >/tmp/events 2>&1 &
EVENTS=$!
# 2. docker run -d -p, ps (and hull ps: the same container), exec -i, logs -f, stop, rm -f.
docker run -d --name web -p 8080:80 busybox sh -c 'mkdir -p /www && echo api-page > /www/index.html && echo web-started && exec httpd -f -p 80 -h /www' >/tmp/web.id; echo run-d=$?
for i in $(seq 90); do timeout 5 wget -q -O /tmp/page http://127.0.0.1:8080/ 2>/dev/null && break; sleep 1; done
echo "page=$(cat /tmp/page 2>/dev/null)"
docker ps --format '{{.Names}} {{.Ports}} {{.State}}' | grep web | sed 's/^/ps=/'
echo "hull-ps=$(hull ps | grep -c ' web$')"
echo "exec=$(echo piped | docker exec -i web sh -c 'cat; echo from-exec' | tr '\n' ' ')"
docker exec web sh -c 'exit 7'; echo exec-exit=$?
docker run -d --name talker busybox sh -c 'for i in 1 2 3; do echo line$i; sleep 1; done; echo err-line >&2' >/dev/null
timeout 60 docker logs -f talker >/tmp/logs.out 2>/tmp/logs.err; echo logs-f=$?
echo "logs=$(tr '\n' ' ' </tmp/logs.out)"
echo "logs-err=$(cat /tmp/logs.err)"
echo "logs-tail=$(docker logs --tail 1 talker 2>&1)"
docker stop -t 2 web >/dev/null; echo stop=$?
echo "stopped=$(docker ps -a --filter name=web --format '{{.State}}')"
docker rm -f web talker >/dev/null; echo rm=$?
echo "left=$(docker ps -aq | wc -l)"
# 3. docker pull from a loopback registry, docker images, a pulled image runs.
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: /opt/registry\nhttp:\n  addr: 127.0.0.1:5000\n' >/tmp/reg.yml
docker-registry serve /tmp/reg.yml >/tmp/reg.log 2>&1 &
for i in $(seq 50); do wget -q -O /dev/null http://127.0.0.1:5000/v2/ 2>/dev/null && break; sleep 0.2; done
docker pull 127.0.0.1:5000/bbpull:latest >/tmp/pull.out 2>&1; echo pull=$?
docker images --format '{{.Repository}}:{{.Tag}}' | grep bbpull | sed 's/^/image=/'
echo "pulled-run=$(docker run --rm 127.0.0.1:5000/bbpull cat /marker)"
docker pull 127.0.0.1:5000/nosuch:latest >/dev/null 2>&1; echo pull-missing=$?
# 4. A named volume.
docker volume create data >/dev/null; echo volume-create=$?
docker run --rm -v data:/data busybox sh -c 'echo persisted > /data/f'
echo "volume=$(docker run --rm -v data:/data busybox cat /data/f)"
echo "volume-ls=$(docker volume ls -q | grep -c '^data$')"
# 5. A client killed mid-attach: the container runs on, the server answers.
docker run --name chatty busybox sh -c 'while true; do echo tick; sleep 0.2; done' >/tmp/chatty.out 2>&1 &
CLIENT=$!
for i in $(seq 120); do grep -q tick /tmp/chatty.out 2>/dev/null && break; sleep 0.5; done
kill -9 $CLIENT
sleep 2
echo "after-kill=$(docker inspect -f '{{.State.Running}}' chatty)"
echo "attached-ticks=$(grep -c tick /tmp/chatty.out)"
docker version >/dev/null 2>&1; echo healthy=$?
# 6. The server restarts while the container runs: nothing is lost.
kill $API_PID; wait $API_PID 2>/dev/null
start_service
echo "after-restart=$(docker ps --format '{{.Names}}' | grep -c chatty)"
docker rm -f chatty >/dev/null; echo rm-chatty=$?
sleep 1
kill $EVENTS
echo "events=$(grep -E '^(start|die|destroy) (web|talker)$' /tmp/events | sort -u | tr '\n' ',')"
# Unknown endpoints: docker's JSON error, at once.
echo "unknown=$(docker system df 2>&1 | head -1)"
echo "--- api log"; cat /tmp/api.log; echo "--- pull"; cat /tmp/pull.out
"#
    );
    let script = format!(
        "{PRELUDE}{NEW_ROOT}cat > /newroot/inner.sh <<'HULL_INNER_EOF'\n{inner}\nHULL_INNER_EOF\n{ENTER_NEW_ROOT}"
    );
    let run = host.run(&script);
    println!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    run.assert_success();
    let out = &run.stdout;
    let expect = |key: &str, want: &str| {
        assert_eq!(value(out, key), Some(want), "{key}\n{out}");
    };
    expect("api-version=", "1.43");
    expect("socket-mode=", "srw-rw----");
    expect("run-out=", "hi");
    expect("run-exit3=", "3");
    expect("run-stderr=", "to-stderr");
    expect("run-exit0=", "0");
    expect("rm-left=", "0");
    expect("run-d=", "0");
    expect("page=", "api-page");
    expect("ps=", "web 0.0.0.0:8080->80/tcp running");
    expect("hull-ps=", "1");
    expect("exec=", "piped from-exec");
    expect("exec-exit=", "7");
    expect("logs-f=", "0");
    expect("logs=", "line1 line2 line3");
    expect("logs-err=", "err-line");
    expect("logs-tail=", "err-line");
    expect("stop=", "0");
    expect("stopped=", "exited");
    expect("rm=", "0");
    expect("left=", "0");
    expect("pull=", "0");
    expect("image=", "127.0.0.1:5000/bbpull:latest");
    expect("pulled-run=", "pulled-through-the-api");
    assert!(
        value(out, "pull-missing=").is_some_and(|c| c != "0"),
        "{out}"
    );
    expect("volume-create=", "0");
    expect("volume=", "persisted");
    expect("volume-ls=", "1");
    expect("after-kill=", "true");
    assert!(
        value(out, "attached-ticks=").is_some_and(|n| n.parse::<u32>().unwrap_or(0) > 0),
        "{out}"
    );
    expect("healthy=", "0");
    expect("after-restart=", "1");
    expect("rm-chatty=", "0");
    expect(
        "events=",
        "destroy talker,destroy web,die talker,die web,start talker,start web,",
    );
    assert!(
        value(out, "unknown=").is_some_and(|l| l.contains("not implemented by hull")),
        "{out}"
    );
}

/// Python 3 with its standard library (less its tests and GUI parts) and
/// the Python packages `docker-compose` needs (the closure of its Debian
/// dependencies), staged under `dir/root` as the paths they have here;
/// returns the interpreter's, the script's and the libraries' files.
fn stage_compose(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut packages = vec!["docker-compose".to_string()];
    let mut i = 0;
    while i < packages.len() {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Depends}", &packages[i]])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} is not installed: ./dev setup installs docker-compose",
            packages[i]
        );
        for alt in String::from_utf8_lossy(&out.stdout).split(',') {
            let name = alt.split('|').next().unwrap_or_default().trim();
            let name = name
                .split([' ', ':'])
                .next()
                .unwrap_or_default()
                .to_string();
            if name.starts_with("python3-") && !packages.contains(&name) {
                packages.push(name);
            }
        }
        i += 1;
    }
    let mut list = String::new();
    for p in &packages {
        let out = Command::new("dpkg").args(["-L", p]).output().unwrap();
        for f in String::from_utf8_lossy(&out.stdout).lines() {
            if f.starts_with("/usr/lib/python3/dist-packages/") && Path::new(f).is_file() {
                list.push_str(f.trim_start_matches('/'));
                list.push('\n');
            }
        }
    }
    std::fs::write(dir.join("files"), list).unwrap();
    let stage = dir.join("root");
    std::fs::create_dir_all(&stage).unwrap();
    let tar = |args: &str| {
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "tar -C / -cf - {args} | tar -C {} -xf -",
                stage.display()
            ))
            .status()
            .unwrap();
        assert!(st.success(), "staging {args} failed");
    };
    tar(&format!("-T {}", dir.join("files").display()));
    let lib = "usr/lib/python3.11";
    tar(&format!(
        "--exclude=__pycache__ --exclude={lib}/test --exclude={lib}/idlelib \
         --exclude={lib}/tkinter --exclude={lib}/turtledemo --exclude={lib}/ensurepip \
         --exclude={lib}/pydoc_data --exclude={lib}/config-3.11-x86_64-linux-gnu {lib}"
    ));
    // The interpreter, the script, and the libraries of the interpreter and
    // of the extension modules.
    let mut files = tool_files(Path::new("/usr/bin/python3.11"), "/usr/bin/python3.11");
    files.push((
        PathBuf::from("/usr/bin/docker-compose"),
        "/usr/bin/docker-compose".into(),
    ));
    let found = Command::new("find")
        .arg(&stage)
        .args(["-name", "*.so"])
        .output()
        .unwrap();
    for so in String::from_utf8_lossy(&found.stdout).lines() {
        for (src, dest) in tool_files(Path::new(so), so).into_iter().skip(1) {
            if !files.iter().any(|(_, d)| *d == dest) {
                files.push((src, dest));
            }
        }
    }
    files
}

/// The compose project: two services, a published port, a named volume.
const COMPOSE_FILE: &str = r#"version: "3"
services:
  web:
    image: busybox
    command: sh -c 'cat /data/msg 2>/dev/null || echo from-compose > /data/msg; mkdir -p /www; cp /data/msg /www/index.html; exec httpd -f -p 80 -h /www'
    ports:
      - "8081:80"
    volumes:
      - content:/data
  worker:
    image: busybox
    command: sleep 600
    environment:
      ROLE: worker
volumes:
  content:
"#;

/// Debian's docker-compose 1.29 (Python, speaking the Engine API) on hull's
/// socket: `up -d` of a two-service project with a published port and a
/// named volume, a request to the published port, `down -v`. Python runs in
/// the emulated host (copied in), so nothing needs a network into it.
#[test]
fn compose_brings_a_project_up_and_down() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = stage_compose(tmp.path());
    let mut host = EmulatedHost::new()
        .with_hull_runtime()
        .host_env("HULL_NETWORK", "passt")
        .module("dummy")
        .timeout(900)
        .cpus(2)
        .mem(3072)
        .dir(tmp.path().join("root/usr"), "/usr");
    for (src, dest) in tool_files(Path::new("/usr/bin/passt"), "/usr/bin/passt")
        .into_iter()
        .chain(extra)
    {
        host = host.file(src, &dest);
    }
    let inner = format!(
        "{PRELUDE}{HOST_NETWORK}ln -sf python3.11 /usr/bin/python3\n{START_SERVICE}\
         mkdir -p /tmp/proj && cd /tmp/proj\n\
         cat > docker-compose.yml <<'COMPOSE_EOF'\n{COMPOSE_FILE}COMPOSE_EOF\n{}",
        r#"
docker-compose --version | sed 's/^/compose-version=/'
docker-compose -p proj up -d >/tmp/up.out 2>&1; echo up=$?
for i in $(seq 90); do timeout 5 wget -q -O /tmp/page http://127.0.0.1:8081/ 2>/dev/null && break; sleep 1; done
echo "page=$(cat /tmp/page 2>/dev/null)"
echo "ps=$(docker-compose -p proj ps --services 2>/dev/null | sort | tr '\n' ' ')"
# hull's CLI sees the project's containers and volume.
echo "running=$(hull ps | awk 'NR > 1 { print $NF }' | sort | tr '\n' ' ')"
echo "worker-env=$(hull exec proj_worker_1 sh -c 'echo $ROLE')"
echo "volume-up=$(hull volume ls -q | grep -c '^proj_content$')"
echo "network-up=$(ls /var/lib/hull/networks | grep -c '^proj_default.json$')"
docker-compose -p proj down -v >/tmp/down.out 2>&1; echo down=$?
echo "left=$(hull ps -aq | wc -l)"
echo "volume-down=$(hull volume ls -q | grep -c '^proj_content$')"
echo "network-down=$(ls /var/lib/hull/networks | grep -c '^proj_default.json$')"
echo "--- up"; cat /tmp/up.out; echo "--- down"; cat /tmp/down.out; echo "--- api log"; cat /tmp/api.log
"#
    );
    let script = format!(
        "{PRELUDE}{NEW_ROOT}cat > /newroot/inner.sh <<'HULL_INNER_EOF'\n{inner}\nHULL_INNER_EOF\n{ENTER_NEW_ROOT}"
    );
    let run = host.run(&script);
    println!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    run.assert_success();
    let out = &run.stdout;
    let expect = |key: &str, want: &str| {
        assert_eq!(value(out, key), Some(want), "{key}\n{out}");
    };
    assert!(
        value(out, "compose-version=").is_some_and(|v| v.contains("1.29")),
        "{out}"
    );
    expect("up=", "0");
    expect("page=", "from-compose");
    expect("ps=", "web worker");
    expect("running=", "proj_web_1 proj_worker_1");
    expect("worker-env=", "worker");
    expect("volume-up=", "1");
    expect("network-up=", "1");
    expect("down=", "0");
    expect("left=", "0");
    expect("volume-down=", "0");
    expect("network-down=", "0");
}

/// One HTTP/1.1 request on the UNIX socket `sock`; the status and body.
fn http(sock: &Path, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: hull\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // A body past the server's cap may be cut off: the answer still comes.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// What needs no VM, natively: the socket and its mode, version
/// negotiation, docker's JSON errors and status codes for unknown
/// endpoints, missing containers and images, hostile bodies; one server per
/// socket; bad flags are exit 125.
#[test]
fn the_service_answers_with_dockers_shapes_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("docker.sock");
    let mut server = Command::new(common::hull_bin())
        .env("HULL_ROOT", tmp.path())
        .args(["system", "service"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the socket never came"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let (code, body) = http(&sock, "GET", "/_ping", b"");
    assert_eq!((code, body.as_str()), (200, "OK"));
    let (code, body) = http(&sock, "GET", "/v1.41/version", b"");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ApiVersion"], "1.43");
    assert_eq!(v["MinAPIVersion"], "1.24");
    let (code, body) = http(&sock, "GET", "/v1.99/version", b"");
    assert_eq!(code, 400, "{body}");
    for (method, path, body, want, needle) in [
        ("GET", "/nope", &b""[..], 404, "page not found"),
        ("POST", "/build", b"", 501, "not implemented by hull"),
        (
            "POST",
            "/containers/abc/pause",
            b"",
            501,
            "not implemented by hull",
        ),
        (
            "GET",
            "/containers/nosuch/json",
            b"",
            404,
            "No such container: nosuch",
        ),
        (
            "DELETE",
            "/containers/nosuch",
            b"",
            404,
            "No such container",
        ),
        (
            "GET",
            "/images/nosuch/json",
            b"",
            404,
            "No such image: nosuch",
        ),
        (
            "POST",
            "/containers/create",
            b"{\"Image\": 5}",
            400,
            "invalid JSON",
        ),
        ("POST", "/containers/create", b"[[[[", 400, "invalid JSON"),
        (
            "POST",
            "/containers/create",
            b"{\"Image\":\"nosuch\"}",
            404,
            "No such image: nosuch",
        ),
        (
            "POST",
            "/containers/create",
            b"{\"Image\":\"i\",\"HostConfig\":{\"NetworkMode\":\"host\"}}",
            400,
            "not supported",
        ),
        (
            "GET",
            "/containers/json?filters=%7Bbad",
            b"",
            400,
            "invalid filters",
        ),
        ("GET", "/volumes/nosuch", b"", 404, "no such volume"),
        (
            "POST",
            "/exec/nosuch/start",
            b"{}",
            404,
            "No such exec instance",
        ),
    ] {
        let (code, text) = http(&sock, method, path, body);
        assert_eq!(code, want, "{method} {path}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        let message = v["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{method} {path}: {message}");
    }
    // The docker CLI on what needs no VM: load, list, inspect and remove an
    // image; create, inspect and remove a volume and a network.
    let img = OciImage::new(&tmp.path().join("img"));
    img.layer(|root| std::fs::write(root.join("f"), "x").unwrap());
    common::run_checked(
        Command::new("umoci")
            .args(["gc", "--layout"])
            .arg(&img.layout),
    );
    let archive = tmp.path().join("img.tar");
    common::run_checked(
        Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--quiet"])
            .arg(format!("oci:{}", img.image_ref()))
            .arg(format!(
                "docker-archive:{}:loaded/app:v1",
                archive.display()
            )),
    );
    let docker = |args: &[&str]| {
        let out = Command::new(DOCKER)
            .env("DOCKER_HOST", format!("unix://{}", sock.display()))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    let archive_arg = archive.display().to_string();
    assert_eq!(
        docker(&["load", "-i", &archive_arg]),
        (0, "Loaded image: loaded/app:v1".into())
    );
    assert_eq!(
        docker(&["images", "--format", "{{.Repository}}:{{.Tag}}"]),
        (0, "loaded/app:v1".into())
    );
    let (code, layers) = docker(&[
        "image",
        "inspect",
        "-f",
        "{{len .RootFS.Layers}}",
        "loaded/app:v1",
    ]);
    assert_eq!((code, layers.as_str()), (0, "1"));
    assert_eq!(docker(&["rmi", "loaded/app:v1"]).0, 0);
    assert_eq!(docker(&["images", "-q"]), (0, String::new()));
    assert_eq!(docker(&["volume", "create", "vol1"]), (0, "vol1".into()));
    assert_eq!(
        docker(&["volume", "inspect", "-f", "{{.Driver}}", "vol1"]),
        (0, "local".into())
    );
    assert_eq!(docker(&["volume", "rm", "vol1"]), (0, "vol1".into()));
    assert_ne!(docker(&["volume", "inspect", "vol1"]).0, 0);
    assert_eq!(docker(&["network", "create", "net1"]).0, 0);
    assert_eq!(
        docker(&["network", "inspect", "-f", "{{.Driver}}", "net1"]),
        (0, "bridge".into())
    );
    assert_eq!(docker(&["network", "rm", "net1"]), (0, "net1".into()));
    assert_ne!(docker(&["network", "rm", "bridge"]).0, 0);
    // A body past the cap is refused, and the server goes on.
    let (code, _) = http(&sock, "POST", "/containers/create", &vec![b' '; 5 << 20]);
    assert_eq!(code, 400);
    assert_eq!(http(&sock, "GET", "/_ping", b"").0, 200);
    // One server per socket; a bad --listen is a usage error.
    let second = Command::new(common::hull_bin())
        .env("HULL_ROOT", tmp.path())
        .args(["system", "service"])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&second.stderr).contains("already served"));
    let bad = Command::new(common::hull_bin())
        .env("HULL_ROOT", tmp.path())
        .args(["system", "service", "--socket"])
        .arg(tmp.path().join("other.sock"))
        .args(["--listen", "bogus"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid --listen"));
    // SIGTERM: it ends and takes its socket with it.
    // SAFETY: kill(2) on the server this test started.
    unsafe { libc::kill(i32::try_from(server.id()).unwrap(), libc::SIGTERM) };
    assert!(server.wait().unwrap().success());
    assert!(!sock.exists());
}
