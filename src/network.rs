//! Container networking, host side: the `--network`, `-p`/`-P`, `--dns` and
//! `--add-host` flags, the addresses a container gets, and the passt process
//! that is its user-mode network.
//!
//! # Addressing
//!
//! With passt (the default) hull gives passt explicit addresses and the
//! guest the same static configuration in its run spec, rather than
//! running a DHCP client in the guest: the container's address, gateway and
//! resolver are known before the VM starts (`hull inspect` shows them), the
//! guest does not wait for a lease, and nothing depends on what the host's
//! own interface looks like. Every container sees the same small network,
//! like QEMU's user networking:
//!
//! - the container: `10.0.2.15/24` on `eth0`, MTU 65520 (passt's; one frame
//!   carries a 64 KiB segment, no TSO needed);
//! - the gateway `10.0.2.2`: passt maps it to the host's loopback, so it is
//!   `host.hull.internal` (and `host.docker.internal`) in `/etc/hosts`;
//! - the resolver `10.0.2.3`: passt forwards DNS sent there to the host's
//!   first name server (`/etc/resolv.conf`), unless `--dns` names others.
//!
//! Published ports are passt's `-t`/`-u` forwards: passt listens on the
//! host and connects to the container's port.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hull_protocol::spec::{HostEntry, InterfaceSpec, NetworkSpec};
use serde::{Deserialize, Serialize};

/// The container's address on its network.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The prefix length of that network.
pub const PREFIX: u8 = 24;
/// The gateway: passt maps it to the host's loopback.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The resolver address: passt forwards DNS sent there to the host's.
pub const DNS_FORWARD: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// passt's MTU for guests.
pub const MTU: u16 = 65520;
/// Names of the host (its loopback services) inside a container.
pub const HOST_NAMES: [&str; 2] = ["host.hull.internal", "host.docker.internal"];
/// The Debian package with passt.
const PASST_PACKAGE: &str = "passt";

/// A user error in the network flags (one line; exit status 125).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NetworkError(pub String);

fn err(msg: impl Into<String>) -> NetworkError {
    NetworkError(msg.into())
}

/// `--network`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Loopback only.
    None,
    /// User-mode networking through passt (no root needed).
    #[default]
    Passt,
    /// A TAP interface the user set up (root).
    Tap(String),
}

impl Mode {
    /// Parses `none`, `passt` (also docker's `bridge` and `default`) or `tap:NAME`.
    ///
    /// # Errors
    /// Anything else.
    pub fn parse(text: &str) -> Result<Self, NetworkError> {
        match text {
            "none" => Ok(Self::None),
            "passt" | "bridge" | "default" => Ok(Self::Passt),
            _ => match text.strip_prefix("tap:") {
                Some(name)
                    if !name.is_empty()
                        && name.len() < 16
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
                {
                    Ok(Self::Tap(name.to_string()))
                }
                _ => Err(err(format!(
                    "unknown network {text:?}: use --network none, passt or tap:NAME"
                ))),
            },
        }
    }

    /// As `--network` takes it.
    #[must_use]
    pub fn name(&self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Passt => "passt".into(),
            Self::Tap(name) => format!("tap:{name}"),
        }
    }
}

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One published port: host `host_ip:host_port` to the container's `container_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// The host address passt listens on (`0.0.0.0`: all).
    pub host_ip: Ipv4Addr,
    /// The host port.
    pub host_port: u16,
    /// The container's port.
    pub container_port: u16,
    /// TCP or UDP.
    pub proto: Proto,
}

impl PortMapping {
    /// `80/tcp -> 0.0.0.0:8080`, as `docker port` prints it.
    #[must_use]
    pub fn describe(&self) -> String {
        format!(
            "{}/{} -> {}:{}",
            self.container_port,
            self.proto.name(),
            self.host_ip,
            self.host_port
        )
    }

    /// `0.0.0.0:8080->80/tcp`, as `docker ps` prints it.
    #[must_use]
    pub fn short(&self) -> String {
        format!(
            "{}:{}->{}/{}",
            self.host_ip,
            self.host_port,
            self.container_port,
            self.proto.name()
        )
    }

    /// `CONTAINERPORT/PROTO`, docker's key.
    #[must_use]
    pub fn key(&self) -> String {
        format!("{}/{}", self.container_port, self.proto.name())
    }

    /// passt's forward spec (`-t`/`-u` argument).
    fn passt_spec(&self) -> String {
        if self.host_ip.is_unspecified() {
            format!("{}:{}", self.host_port, self.container_port)
        } else {
            format!(
                "{}/{}:{}",
                self.host_ip, self.host_port, self.container_port
            )
        }
    }
}

/// A container's network, as recorded in its config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkConfig {
    /// `--network`.
    pub mode: Mode,
    /// Published ports (host ports chosen already).
    pub ports: Vec<PortMapping>,
    /// The container's MAC address.
    pub mac: String,
}

impl NetworkConfig {
    /// The container's address (with passt).
    #[must_use]
    pub fn ip(&self) -> Option<Ipv4Addr> {
        (self.mode == Mode::Passt).then_some(GUEST_ADDR)
    }

    /// The container's gateway (with passt).
    #[must_use]
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        (self.mode == Mode::Passt).then_some(GATEWAY)
    }

    /// The MAC as bytes.
    #[must_use]
    pub fn mac_bytes(&self) -> [u8; 6] {
        let mut out = [0x02, 0, 0, 0, 0, 1];
        for (o, part) in out.iter_mut().zip(self.mac.split(':')) {
            if let Ok(b) = u8::from_str_radix(part, 16) {
                *o = b;
            }
        }
        out
    }
}

/// The MAC address of container `id`: locally administered, from its id.
#[must_use]
pub fn mac_for(id: &str) -> String {
    let digits: Vec<&str> = (0..5)
        .map(|i| id.get(2 * i..2 * i + 2).unwrap_or("00"))
        .collect();
    format!("02:{}", digits.join(":"))
}

fn parse_range(text: &str, what: &str, spec: &str) -> Result<(u16, u16), NetworkError> {
    let bad = || {
        err(format!(
            "invalid -p {spec:?}: {what} {text:?} is not a port (1-65535) or a range of them; \
             use [IP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]"
        ))
    };
    let (a, b) = match text.split_once('-') {
        Some((a, b)) => (a, b),
        None => (text, text),
    };
    let a: u16 = a.parse().map_err(|_| bad())?;
    let b: u16 = b.parse().map_err(|_| bad())?;
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

/// A free port on `ip` for `proto`, chosen by the kernel.
fn random_port(ip: Ipv4Addr, proto: Proto) -> Result<u16, NetworkError> {
    let port = match proto {
        Proto::Tcp => TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()),
        Proto::Udp => UdpSocket::bind((ip, 0)).and_then(|s| s.local_addr()),
    };
    port.map(|a| a.port())
        .map_err(|e| err(format!("cannot find a free host port on {ip}: {e}")))
}

/// Whether `ip:port` is free on the host for `proto`.
fn port_free(ip: Ipv4Addr, port: u16, proto: Proto) -> bool {
    match proto {
        // std sets SO_REUSEADDR, as passt does: a port whose last
        // connections linger in TIME_WAIT counts as free.
        Proto::Tcp => TcpListener::bind((ip, port)).is_ok(),
        Proto::Udp => UdpSocket::bind((ip, port)).is_ok(),
    }
}

/// Parses one `-p` value (docker's syntax) into mappings; an empty host port
/// gets a free one, a host range with a single container port the first
/// free port of the range.
///
/// # Errors
/// A malformed value (one line, saying what is wrong and the syntax).
pub fn parse_publish(spec: &str) -> Result<Vec<PortMapping>, NetworkError> {
    let (body, proto) = match spec.rsplit_once('/') {
        Some((body, "tcp")) => (body, Proto::Tcp),
        Some((body, "udp")) => (body, Proto::Udp),
        Some((_, other)) => {
            return Err(err(format!(
                "invalid -p {spec:?}: protocol {other:?} is not tcp or udp"
            )))
        }
        None => (spec, Proto::Tcp),
    };
    if body.starts_with('[') {
        return Err(err(format!(
            "invalid -p {spec:?}: IPv6 host addresses are not supported; give an IPv4 address"
        )));
    }
    let parts: Vec<&str> = body.split(':').collect();
    let (ip, host, container) = match parts.as_slice() {
        [c] => (None, "", *c),
        [h, c] => (None, *h, *c),
        [ip, h, c] => (Some(*ip), *h, *c),
        _ => {
            return Err(err(format!(
                "invalid -p {spec:?}: use [IP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]"
            )))
        }
    };
    let host_ip = match ip {
        None | Some("") => Ipv4Addr::UNSPECIFIED,
        Some(ip) => ip.parse().map_err(|_| {
            err(format!(
                "invalid -p {spec:?}: {ip:?} is not an IPv4 address"
            ))
        })?,
    };
    let (c0, c1) = parse_range(container, "container port", spec)?;
    let count = c1 - c0 + 1;
    let mut out = Vec::new();
    if host.is_empty() {
        for c in c0..=c1 {
            out.push(PortMapping {
                host_ip,
                host_port: random_port(host_ip, proto)?,
                container_port: c,
                proto,
            });
        }
        return Ok(out);
    }
    let (h0, h1) = parse_range(host, "host port", spec)?;
    if count == 1 && h1 > h0 {
        let port = (h0..=h1)
            .find(|p| port_free(host_ip, *p, proto))
            .ok_or_else(|| {
                err(format!(
                    "-p {spec:?}: every host port of {h0}-{h1}/{} is already in use",
                    proto.name()
                ))
            })?;
        out.push(PortMapping {
            host_ip,
            host_port: port,
            container_port: c0,
            proto,
        });
        return Ok(out);
    }
    if h1 - h0 + 1 != count {
        return Err(err(format!(
            "invalid -p {spec:?}: the host range has {} ports, the container range {count}",
            h1 - h0 + 1
        )));
    }
    for i in 0..count {
        out.push(PortMapping {
            host_ip,
            host_port: h0 + i,
            container_port: c0 + i,
            proto,
        });
    }
    Ok(out)
}

/// Parses an image's `ExposedPorts` key (`80/tcp`, `53/udp`, `8080`) for `-P`.
fn parse_exposed(key: &str) -> Option<(u16, u16, Proto)> {
    let (port, proto) = match key.split_once('/') {
        Some((p, "tcp")) => (p, Proto::Tcp),
        Some((p, "udp")) => (p, Proto::Udp),
        Some(_) => return None,
        None => (key, Proto::Tcp),
    };
    let (a, b) = parse_range(port, "port", key).ok()?;
    Some((a, b, proto))
}

/// The flags a container's network comes from.
#[derive(Debug, Clone, Default)]
pub struct Flags<'a> {
    /// `--network`.
    pub network: Option<&'a str>,
    /// `-p`.
    pub publish: &'a [String],
    /// `-P`.
    pub publish_all: bool,
    /// `--dns`.
    pub dns: &'a [String],
    /// `--dns-search`.
    pub dns_search: &'a [String],
    /// `--add-host`.
    pub add_host: &'a [String],
}

/// The network part of a new container: its config and the guest's spec.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Recorded in the container's config.
    pub config: NetworkConfig,
    /// What the guest init sets up.
    pub spec: NetworkSpec,
}

/// Checks the flags that need no image (run first, before anything is
/// pulled or built): the network, the `-p` syntax, `--dns`, `--add-host`,
/// and that passt is installed when it is needed.
///
/// # Errors
/// One line saying what is wrong.
pub fn check_flags(flags: &Flags<'_>) -> Result<Mode, NetworkError> {
    let mode = Mode::parse(flags.network.unwrap_or("passt"))?;
    for d in flags.dns {
        d.parse::<IpAddr>()
            .map_err(|_| err(format!("invalid --dns {d:?}: give an IP address")))?;
    }
    for h in flags.add_host {
        parse_add_host(h)?;
    }
    if mode == Mode::None && (!flags.publish.is_empty() || flags.publish_all) {
        return Err(err(
            "-p/--publish needs a network: --network none publishes nothing",
        ));
    }
    if matches!(mode, Mode::Tap(_)) && (!flags.publish.is_empty() || flags.publish_all) {
        return Err(err(
            "-p/--publish works with --network passt; with a TAP interface, forward ports on the host",
        ));
    }
    for p in flags.publish {
        parse_publish(p)?;
    }
    if mode == Mode::Passt {
        passt_binary()?;
    }
    Ok(mode)
}

/// The network flags of `hull run`.
#[must_use]
pub fn flags(args: &crate::cli::RunArgs) -> Flags<'_> {
    Flags {
        network: args.network.as_deref(),
        publish: &args.publish,
        publish_all: args.publish_all,
        dns: &args.dns,
        dns_search: &args.dns_search,
        add_host: &args.add_host,
    }
}

/// The VM's network interface for a container with `config`, and the
/// passt that serves it (started here, before the VM).
///
/// # Errors
/// passt could not start.
pub fn prepare(
    config: Option<&NetworkConfig>,
) -> Result<(Option<vmm::NetConfig>, Option<Passt>), NetworkError> {
    let Some(config) = config else {
        return Ok((None, None));
    };
    let mac = config.mac_bytes();
    match &config.mode {
        Mode::None => Ok((None, None)),
        Mode::Tap(name) => Ok((
            Some(vmm::NetConfig {
                backend: vmm::NetBackendConfig::Tap(name.clone()),
                mac,
                mtu: 1500,
            }),
            None,
        )),
        Mode::Passt => {
            let (vmm_end, passt_end) =
                UnixStream::pair().map_err(|e| err(format!("cannot make passt's socket: {e}")))?;
            let passt = Passt::start(config, &passt_end)?;
            drop(passt_end);
            Ok((
                Some(vmm::NetConfig {
                    backend: vmm::NetBackendConfig::Stream(vmm_end),
                    mac,
                    mtu: MTU,
                }),
                Some(passt),
            ))
        }
    }
}

/// `NAME:IP` (IP may be `host-gateway`: the host's address as the container sees it).
fn parse_add_host(text: &str) -> Result<HostEntry, NetworkError> {
    let bad = || err(format!("invalid --add-host {text:?}: use NAME:IP"));
    let (name, ip) = text
        .split_once(':')
        .or_else(|| text.split_once('='))
        .ok_or_else(bad)?;
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let address = if ip == "host-gateway" {
        GATEWAY.to_string()
    } else {
        ip.trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
            .map_err(|_| bad())?
            .to_string()
    };
    Ok(HostEntry {
        address,
        names: vec![name.to_string()],
    })
}

/// Plans a container's network from the flags (checked by
/// [`check_flags`]) and the image's exposed ports: host ports are chosen and
/// checked free now, so a port in use is an error before any VM starts.
///
/// # Errors
/// A malformed `-p`, or a host port in use (one line each).
pub fn plan(flags: &Flags<'_>, exposed: &[String]) -> Result<Planned, NetworkError> {
    let mode = check_flags(flags)?;
    let ports = plan_ports(flags, exposed)?;
    let mut hosts = Vec::new();
    let mut dns: Vec<String> = flags.dns.to_vec();
    let interface = match &mode {
        Mode::None => None,
        Mode::Passt => {
            hosts.push(HostEntry {
                address: GATEWAY.to_string(),
                names: HOST_NAMES.iter().map(|n| (*n).to_string()).collect(),
            });
            if dns.is_empty() {
                dns.push(DNS_FORWARD.to_string());
            }
            Some(InterfaceSpec {
                address: Some(format!("{GUEST_ADDR}/{PREFIX}")),
                gateway: Some(GATEWAY.to_string()),
                mtu: u32::from(MTU),
            })
        }
        Mode::Tap(_) => Some(InterfaceSpec {
            address: None,
            gateway: None,
            mtu: 0,
        }),
    };
    for h in flags.add_host {
        hosts.push(parse_add_host(h)?);
    }
    Ok(Planned {
        config: NetworkConfig {
            mode,
            ports,
            // Set once the container has its id (see [`mac_for`]).
            mac: String::new(),
        },
        spec: NetworkSpec {
            interface,
            dns,
            dns_search: flags.dns_search.to_vec(),
            hosts,
        },
    })
}

/// The published ports of `-p` and `-P` (with the image's `exposed` ports),
/// host ports chosen and checked free.
///
/// # Errors
/// A malformed `-p`, a port published twice, or a host port in use.
fn plan_ports(flags: &Flags<'_>, exposed: &[String]) -> Result<Vec<PortMapping>, NetworkError> {
    let mut ports = Vec::new();
    for p in flags.publish {
        ports.extend(parse_publish(p)?);
    }
    if flags.publish_all {
        for key in exposed {
            let Some((a, b, proto)) = parse_exposed(key) else {
                continue;
            };
            for c in a..=b {
                if ports
                    .iter()
                    .any(|m| m.container_port == c && m.proto == proto)
                {
                    continue;
                }
                ports.push(PortMapping {
                    host_ip: Ipv4Addr::UNSPECIFIED,
                    host_port: random_port(Ipv4Addr::UNSPECIFIED, proto)?,
                    container_port: c,
                    proto,
                });
            }
        }
    }
    let mut seen = HashSet::new();
    for m in &ports {
        if !seen.insert((m.host_port, m.proto)) {
            return Err(err(format!(
                "host port {}/{} is published twice",
                m.host_port,
                m.proto.name()
            )));
        }
        if !port_free(m.host_ip, m.host_port, m.proto) {
            return Err(err(format!(
                "host port {}:{}/{} is already in use: choose another with -p",
                m.host_ip,
                m.host_port,
                m.proto.name()
            )));
        }
    }
    Ok(ports)
}

/// Where passt is: `$HULL_PASST`, or `passt` on `PATH`.
///
/// # Errors
/// It is not installed (the message names the package).
pub fn passt_binary() -> Result<PathBuf, NetworkError> {
    if let Some(p) = std::env::var_os("HULL_PASST").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("passt"))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            err(format!(
                "passt is not installed: the default network needs it (apt-get install \
                 {PASST_PACKAGE}), or run with --network none"
            ))
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// How long passt may take to set up.
const PASST_START_TIMEOUT: Duration = Duration::from_secs(10);
/// passt's own messages kept for an error.
const PASST_MESSAGES: usize = 8;

/// A running passt, serving one container; killed (and reaped) when dropped,
/// which frees its ports at once. It also ends by itself when the VMM's end
/// of its socket closes.
#[derive(Debug)]
pub struct Passt {
    child: Child,
    messages: Arc<Mutex<Vec<String>>>,
}

impl Passt {
    /// Starts passt for `config` on `socket` (its end of a stream socket
    /// pair) and waits until its ports are bound.
    ///
    /// # Errors
    /// passt is missing, could not start, or exited (its message is given).
    pub fn start(config: &NetworkConfig, socket: &UnixStream) -> Result<Self, NetworkError> {
        let binary = passt_binary()?;
        let mut cmd = Command::new(&binary);
        // -f: stay in the foreground (our child); -e: messages on stderr;
        // -q: only warnings and errors; -F 3: the socket is fd 3 (passt then
        // ends when its other end closes); -4: IPv4 only.
        cmd.args(["-f", "-e", "-q", "-F", "3", "-4"]);
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // As root passt drops to "nobody"; by number, so that a host
            // without that user in /etc/passwd works too.
            cmd.args(["--runas", "65534:65534"]);
        }
        cmd.arg("-a").arg(GUEST_ADDR.to_string());
        cmd.arg("-n").arg(PREFIX.to_string());
        cmd.arg("-g").arg(GATEWAY.to_string());
        cmd.arg("-m").arg(MTU.to_string());
        cmd.arg("--dns-forward").arg(DNS_FORWARD.to_string());
        if let Some(pcap) = std::env::var_os("HULL_PASST_PCAP").filter(|p| !p.is_empty()) {
            // Debugging: passt records the frames it exchanges with the guest.
            cmd.arg("--pcap").arg(pcap);
        }
        for m in &config.ports {
            let flag = match m.proto {
                Proto::Tcp => "-t",
                Proto::Udp => "-u",
            };
            cmd.arg(flag).arg(m.passt_spec());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let fd: RawFd = socket.as_raw_fd();
        // SAFETY: only async-signal-safe calls (dup2, fcntl) on descriptors
        // this process owns; `fd` stays open until after the spawn.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if fd == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| err(format!("cannot start {}: {e}", binary.display())))?;
        let messages = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let messages = Arc::clone(&messages);
            let _ = std::thread::Builder::new()
                .name("passt-log".into())
                .spawn(move || relay_messages(stderr, &messages));
        }
        let mut passt = Self { child, messages };
        passt.wait_ready(&config.ports)?;
        Ok(passt)
    }

    /// Waits until every forwarded port is bound (passt binds them before it
    /// serves), or passt exits.
    fn wait_ready(&mut self, ports: &[PortMapping]) -> Result<(), NetworkError> {
        let deadline = Instant::now() + PASST_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the relay thread take its last words.
                std::thread::sleep(Duration::from_millis(20));
                return Err(err(format!(
                    "passt exited ({status}) before the container started{}",
                    self.last_message()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                )));
            }
            if ports.iter().all(listening) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(err("passt did not set up its ports in time"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn last_message(&self) -> Option<String> {
        self.messages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .last()
            .cloned()
    }

    /// Whether passt still runs; if not, its last message.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "passt exited ({status}){}",
                self.last_message()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )),
            _ => None,
        }
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies passt's messages to our stderr (the monitor's log), without the
/// syslog complaints it makes where there is no syslog; keeps the last few.
fn relay_messages(stderr: impl Read, messages: &Mutex<Vec<String>>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if line.starts_with("Failed to send") && line.ends_with("to syslog") {
            continue;
        }
        eprintln!("passt: {line}");
        let mut m = messages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= PASST_MESSAGES {
            m.remove(0);
        }
        m.push(line);
    }
}

/// Whether some socket on the host is bound to `m`'s host address and port
/// (read from `/proc/net/{tcp,udp}`: probing by binding could steal the
/// port from passt).
fn listening(m: &PortMapping) -> bool {
    let file = match m.proto {
        Proto::Tcp => "/proc/net/tcp",
        Proto::Udp => "/proc/net/udp",
    };
    let Ok(text) = std::fs::read_to_string(file) else {
        return true;
    };
    // /proc shows the address as the host-order u32 of the bytes in memory.
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(m.host_ip.octets()),
        m.host_port
    );
    text.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1);
        let state = f.nth(1);
        local == Some(want.as_str())
            && match m.proto {
                Proto::Tcp => state == Some("0A"),
                Proto::Udp => true,
            }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(spec: &str) -> PortMapping {
        let v = parse_publish(spec).unwrap();
        assert_eq!(v.len(), 1, "{spec}");
        v[0]
    }

    #[test]
    fn publish_follows_docker_syntax() {
        let m = one("8080:80");
        assert_eq!(
            (m.host_ip, m.host_port, m.container_port, m.proto),
            (Ipv4Addr::UNSPECIFIED, 8080, 80, Proto::Tcp)
        );
        let m = one("127.0.0.1:5353:53/udp");
        assert_eq!(
            (m.host_ip, m.host_port, m.container_port, m.proto),
            (Ipv4Addr::LOCALHOST, 5353, 53, Proto::Udp)
        );
        assert_eq!(
            one("127.0.0.1:5353:53/udp").describe(),
            "53/udp -> 127.0.0.1:5353"
        );
        assert_eq!(one("8080:80/tcp").short(), "0.0.0.0:8080->80/tcp");
        let r = parse_publish("9000-9002:90-92").unwrap();
        assert_eq!(
            r.iter()
                .map(|m| (m.host_port, m.container_port))
                .collect::<Vec<_>>(),
            vec![(9000, 90), (9001, 91), (9002, 92)]
        );
        // No host port: a free one.
        let m = one("80");
        assert!(m.host_port > 0);
        let m = one("127.0.0.1::80");
        assert_eq!(m.host_ip, Ipv4Addr::LOCALHOST);
        assert!(m.host_port > 0);
        assert_eq!(one("10.1.2.3:80:8080").passt_spec(), "10.1.2.3/80:8080");
        assert_eq!(one("80:8080").passt_spec(), "80:8080");
    }

    #[test]
    fn bad_publish_values_are_one_line_errors() {
        for bad in [
            "",
            "abc",
            "8080:",
            "0:80",
            "8080:0",
            "70000:80",
            "8080:80/sctp",
            "host:8080:80",
            "1:2:3:4",
            "9000-8000:80",
            "9000-9002:90-91",
            "[::1]:8080:80",
        ] {
            let e = parse_publish(bad).unwrap_err().to_string();
            assert!(!e.contains('\n') && e.contains("-p"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_host_port_in_use_is_refused_at_plan_time() {
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let publish = [format!("127.0.0.1:{port}:80")];
        let flags = Flags {
            publish: &publish,
            ..Flags::default()
        };
        let e = plan_ports(&flags, &[]).unwrap_err().to_string();
        assert!(e.contains("already in use"), "{e}");
        assert!(!e.contains('\n'));
        drop(busy);
        assert_eq!(plan_ports(&flags, &[]).unwrap()[0].host_port, port);
        let twice = ["127.0.0.1::80".to_string(), "127.0.0.1::81".to_string()];
        let flags = Flags {
            publish: &twice,
            publish_all: true,
            ..Flags::default()
        };
        let exposed = [
            "80/tcp".to_string(),
            "53/udp".to_string(),
            "x/sctp".to_string(),
        ];
        let all = plan_ports(&flags, &exposed).unwrap();
        assert_eq!(
            all.iter()
                .map(|m| (m.container_port, m.proto))
                .collect::<Vec<_>>(),
            vec![(80, Proto::Tcp), (81, Proto::Tcp), (53, Proto::Udp)]
        );
        // A range with one container port takes the first free one.
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = busy.local_addr().unwrap().port();
        if p < u16::MAX {
            let m = parse_publish(&format!("127.0.0.1:{p}-{}:80", p + 1)).unwrap();
            assert_eq!(m[0].host_port, p + 1);
        }
    }

    #[test]
    fn network_flags_are_checked() {
        assert_eq!(Mode::parse("none").unwrap(), Mode::None);
        assert_eq!(Mode::parse("tap:tap0").unwrap(), Mode::Tap("tap0".into()));
        assert!(Mode::parse("host").is_err());
        assert!(Mode::parse("tap:").is_err());
        assert!(Mode::parse("tap:a/b").is_err());
        assert_eq!(
            parse_add_host("db:10.1.2.3").unwrap(),
            HostEntry {
                address: "10.1.2.3".into(),
                names: vec!["db".into()]
            }
        );
        assert_eq!(
            parse_add_host("gw:host-gateway").unwrap().address,
            GATEWAY.to_string()
        );
        assert!(parse_add_host("db").is_err());
        assert!(parse_add_host("db:nowhere").is_err());
        let dns = ["nameserver".to_string()];
        let flags = Flags {
            network: Some("none"),
            dns: &dns,
            ..Flags::default()
        };
        assert!(check_flags(&flags).is_err());
        let publish = ["80".to_string()];
        let flags = Flags {
            network: Some("none"),
            publish: &publish,
            ..Flags::default()
        };
        assert!(check_flags(&flags).is_err());
    }

    #[test]
    fn mac_comes_from_the_id() {
        let mac = mac_for("0123456789abcdef");
        assert_eq!(mac, "02:01:23:45:67:89");
        let c = NetworkConfig {
            mac,
            ..NetworkConfig::default()
        };
        assert_eq!(c.mac_bytes(), [2, 1, 0x23, 0x45, 0x67, 0x89]);
    }

    #[test]
    fn passt_is_started_and_its_ports_are_bound() {
        passt_binary().expect("this test needs passt: apt-get install passt (./dev setup does)");
        let port = random_port(Ipv4Addr::LOCALHOST, Proto::Tcp).unwrap();
        let config = NetworkConfig {
            mode: Mode::Passt,
            ports: vec![PortMapping {
                host_ip: Ipv4Addr::LOCALHOST,
                host_port: port,
                container_port: 80,
                proto: Proto::Tcp,
            }],
            mac: mac_for("00"),
        };
        let (ours, theirs) = UnixStream::pair().unwrap();
        // (passt needs a host interface with a default route to copy.)
        let mut passt = Passt::start(&config, &theirs).unwrap();
        assert!(listening(&config.ports[0]));
        assert!(!port_free(Ipv4Addr::LOCALHOST, port, Proto::Tcp));
        assert!(passt.exited().is_none());
        drop(passt);
        assert!(
            port_free(Ipv4Addr::LOCALHOST, port, Proto::Tcp),
            "freed at once"
        );
        drop(ours);
    }
}
