//! The container's network, guest side: `eth0` (the virtio-net interface)
//! up with the address, route and MTU of the run spec, and the
//! `/etc/hosts` and `/etc/resolv.conf` that go with it.
//!
//! Interfaces are set with the classic `SIOCSIF*` / `SIOCADDRT` ioctls on
//! an `AF_INET` socket: the init is a static binary with no `ip` tool, and
//! these few calls are all an IPv4 interface with a default route needs
//! (netlink would be more code for the same).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::command::StartError;
use crate::spec::{InterfaceSpec, NetworkSpec};
use crate::sys;

use super::mounts;

/// The interface the VMM's virtio-net device becomes.
pub const INTERFACE: &str = "eth0";

// The libc crate types these `c_ulong` while musl's `ioctl` takes an `int`.
const SIOCGIFFLAGS: libc::Ioctl = 0x8913;
const SIOCSIFFLAGS: libc::Ioctl = 0x8914;
const SIOCSIFADDR: libc::Ioctl = 0x8916;
const SIOCSIFNETMASK: libc::Ioctl = 0x891c;
const SIOCSIFMTU: libc::Ioctl = 0x8922;
const SIOCADDRT: libc::Ioctl = 0x890b;

fn fail(what: &str, e: &impl std::fmt::Display) -> StartError {
    StartError::new(125, format!("network: {what}: {e}"))
}

/// Parses `A.B.C.D/N`.
///
/// # Errors
/// Not an IPv4 address with a prefix length of at most 32.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not ADDRESS/PREFIX"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("{prefix:?} is not a prefix length"))?;
    Ok((addr, prefix))
}

/// The netmask of a prefix length.
#[must_use]
pub fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    Ipv4Addr::from(bits)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr_in is plain data; all-zero is valid.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2);
    sin.sin_addr.s_addr = u32::from_ne_bytes(addr.octets());
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // sockaddr is plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in req
        .ifr_name
        .iter_mut()
        .zip(name.as_bytes().iter().take(libc::IFNAMSIZ - 1))
    {
        *d = libc::c_char::from_ne_bytes([*b]);
    }
    req
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket call.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let s = sys::check(s)?;
    // SAFETY: `s` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

/// One interface ioctl taking an `ifreq`.
fn if_ioctl(s: &OwnedFd, request: libc::Ioctl, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `s` is an open socket and `req` a valid ifreq for every
    // SIOC[GS]IF* request used here, which read or write only the ifreq.
    sys::check(unsafe { libc::ioctl(s.as_raw_fd(), request, std::ptr::from_mut(req)) })?;
    Ok(())
}

/// Brings `eth0` up as `iface` says.
///
/// # Errors
/// The interface is missing or refused a setting.
pub fn configure(iface: &InterfaceSpec) -> Result<(), StartError> {
    let s = inet_socket().map_err(|e| fail("socket", &e))?;
    let mut req = ifreq(INTERFACE);
    if_ioctl(&s, SIOCGIFFLAGS, &mut req).map_err(|e| {
        fail(
            &format!("no {INTERFACE} (is virtio-net in the guest kernel?)"),
            &e,
        )
    })?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if iface.mtu > 0 {
        let mut m = ifreq(INTERFACE);
        m.ifr_ifru.ifru_mtu = libc::c_int::try_from(iface.mtu).unwrap_or(1500);
        if_ioctl(&s, SIOCSIFMTU, &mut m).map_err(|e| fail("set the MTU", &e))?;
    }
    let mut up = ifreq(INTERFACE);
    up.ifr_ifru.ifru_flags =
        flags | libc::c_short::try_from(libc::IFF_UP | libc::IFF_RUNNING).unwrap_or(1);
    let Some(address) = &iface.address else {
        if_ioctl(&s, SIOCSIFFLAGS, &mut up).map_err(|e| fail("bring eth0 up", &e))?;
        return Ok(());
    };
    let (addr, prefix) = parse_cidr(address).map_err(|e| fail("address", &e))?;
    let mut a = ifreq(INTERFACE);
    a.ifr_ifru.ifru_addr = sockaddr(addr);
    if_ioctl(&s, SIOCSIFADDR, &mut a).map_err(|e| fail("set the address", &e))?;
    let mut n = ifreq(INTERFACE);
    n.ifr_ifru.ifru_netmask = sockaddr(netmask(prefix));
    if_ioctl(&s, SIOCSIFNETMASK, &mut n).map_err(|e| fail("set the netmask", &e))?;
    if_ioctl(&s, SIOCSIFFLAGS, &mut up).map_err(|e| fail("bring eth0 up", &e))?;
    if let Some(gateway) = &iface.gateway {
        let gw: Ipv4Addr = gateway
            .parse()
            .map_err(|_| fail("gateway", &format!("{gateway:?} is not an IPv4 address")))?;
        default_route(&s, gw).map_err(|e| fail("add the default route", &e))?;
    }
    Ok(())
}

fn default_route(s: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    let mut dev = *b"eth0\0";
    // SAFETY: rtentry is plain data (and a null rt_dev); all-zero is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = dev.as_mut_ptr().cast();
    // SAFETY: a valid rtentry whose rt_dev points at a NUL-terminated name
    // that outlives the call; SIOCADDRT only reads it.
    sys::check(unsafe { libc::ioctl(s.as_raw_fd(), SIOCADDRT, std::ptr::from_mut(&mut rt)) })?;
    Ok(())
}

/// The content of `/etc/hosts`: the standard lines, the container's own
/// address under its hostname, then the spec's entries.
#[must_use]
pub fn hosts(spec: &NetworkSpec, hostname: &str) -> String {
    let mut out = mounts::hosts(hostname);
    let own = spec
        .interface
        .as_ref()
        .and_then(|i| i.address.as_deref())
        .and_then(|a| parse_cidr(a).ok());
    if let (Some((addr, _)), false) = (own, hostname.is_empty()) {
        out.push_str(&format!("{addr}\t{hostname}\n"));
    }
    for entry in &spec.hosts {
        let names: Vec<&str> = entry
            .names
            .iter()
            .map(String::as_str)
            .filter(|n| is_clean(n))
            .collect();
        if !names.is_empty() && is_clean(&entry.address) {
            out.push_str(&format!("{}\t{}\n", entry.address, names.join(" ")));
        }
    }
    out
}

/// The content of `/etc/resolv.conf`, or `None` when the spec names no server.
#[must_use]
pub fn resolv_conf(spec: &NetworkSpec) -> Option<String> {
    if spec.dns.is_empty() {
        return None;
    }
    let mut out = String::from("# written by hull\n");
    for server in spec.dns.iter().filter(|s| is_clean(s)) {
        out.push_str(&format!("nameserver {server}\n"));
    }
    let search: Vec<&str> = spec
        .dns_search
        .iter()
        .map(String::as_str)
        .filter(|s| is_clean(s))
        .collect();
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    Some(out)
}

/// One word, no line breaks: nothing in the spec can add lines of its own.
fn is_clean(word: &str) -> bool {
    !word.is_empty() && !word.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Sets up the container's network (after the switch to its root: the
/// files are the container's). Returns notes for the files it could not write.
///
/// # Errors
/// `eth0` could not be configured.
pub fn setup(spec: &NetworkSpec, hostname: &str) -> Result<Vec<String>, StartError> {
    if let Some(iface) = &spec.interface {
        configure(iface)?;
    }
    let mut notes = Vec::new();
    if let Err(e) = mounts::replace_file("/etc/hosts", &hosts(spec, hostname)) {
        notes.push(format!("/etc/hosts not written: {e}"));
    }
    if let Some(resolv) = resolv_conf(spec) {
        if let Err(e) = mounts::replace_file("/etc/resolv.conf", &resolv) {
            notes.push(format!("/etc/resolv.conf not written: {e}"));
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::HostEntry;

    #[test]
    fn cidr_and_netmask() {
        assert_eq!(
            parse_cidr("10.0.2.15/24").unwrap(),
            (Ipv4Addr::new(10, 0, 2, 15), 24)
        );
        assert!(parse_cidr("10.0.2.15").is_err());
        assert!(parse_cidr("10.0.2.15/33").is_err());
        assert!(parse_cidr("host/24").is_err());
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn hosts_and_resolv_conf_follow_the_spec() {
        let spec = NetworkSpec {
            interface: Some(InterfaceSpec {
                address: Some("10.0.2.15/24".into()),
                gateway: Some("10.0.2.2".into()),
                mtu: 65520,
            }),
            dns: vec!["10.0.2.3".into(), "bad server".into()],
            dns_search: vec!["example.com".into()],
            hosts: vec![
                HostEntry {
                    address: "10.0.2.2".into(),
                    names: vec!["host.hull.internal".into(), "host.docker.internal".into()],
                },
                HostEntry {
                    address: "1.2.3.4\n5.6.7.8".into(),
                    names: vec!["evil".into()],
                },
            ],
        };
        let h = hosts(&spec, "web");
        assert!(h.starts_with("127.0.0.1\tlocalhost web\n"), "{h}");
        assert!(h.contains("10.0.2.15\tweb\n"), "{h}");
        assert!(
            h.contains("10.0.2.2\thost.hull.internal host.docker.internal\n"),
            "{h}"
        );
        assert!(!h.contains("evil"), "{h}");
        let r = resolv_conf(&spec).unwrap();
        assert!(r.contains("nameserver 10.0.2.3\n"), "{r}");
        assert!(!r.contains("bad"), "{r}");
        assert!(r.contains("search example.com\n"), "{r}");
        assert!(resolv_conf(&NetworkSpec::default()).is_none());
    }
}
