//! Image references, parsed and normalized the way docker does.
//!
//! Grammar (from the distribution project's reference package):
//!
//! ```text
//! reference   := name [ ":" tag ] [ "@" digest ]
//! name        := [domain "/"] path-component ["/" path-component]*
//! domain      := host [":" port]          host: DNS name, IPv4, or [IPv6]
//! path-comp   := [a-z0-9]+ ( ( [._] | "__" | "-"+ ) [a-z0-9]+ )*
//! tag         := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! digest      := "sha256:" 64 lowercase hex digits
//! ```
//!
//! Normalization: the first `/`-separated component is a registry when it
//! contains `.` or `:`, is `localhost`, or has an upper-case letter; otherwise
//! the registry is `docker.io`, and a one-component name on docker.io gets the
//! `library/` prefix. `index.docker.io` is spelled `docker.io`. A reference
//! with neither tag nor digest gets the tag `latest`.
//!
//! Names that did not say which registry they mean ("short names", e.g.
//! `busybox` or `user/app:1`) are looked up locally as `localhost/NAME` first,
//! then `docker.io/...`, as podman does ([`Reference::local_candidates`]).

use std::fmt;

/// The registry that short names are pulled from.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The registry prefix of images that exist only on this machine.
pub const LOCAL_REGISTRY: &str = "localhost";
/// The tag used when a reference names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

const NAME_MAX: usize = 255;
const TAG_MAX: usize = 128;
const USAGE: &str = "expected [REGISTRY[:PORT]/]NAME[:TAG][@sha256:DIGEST], \
                     e.g. `alpine`, `alpine:3.19` or `registry.example.com:5000/team/app:v1`";

/// A reference that could not be parsed: what was given and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    /// The text that was given.
    pub input: String,
    /// What is wrong with it, and what would be accepted.
    pub reason: String,
}

/// A parsed, normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
    short: bool,
}

impl Reference {
    /// Parses `input` with docker's normalization rules. A reference with
    /// neither tag nor digest gets the tag `latest`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let err = |reason: String| ReferenceError {
            input: input.to_string(),
            reason,
        };
        if input.is_empty() {
            return Err(err(format!("it is empty; {USAGE}")));
        }
        if input.trim() != input || input.chars().any(char::is_whitespace) {
            return Err(err(format!("it contains white space; {USAGE}")));
        }
        if is_hex_id(input) {
            return Err(err(
                "a 64-digit hexadecimal string is an image ID, not a name; \
                 use it as an ID (or `sha256:ID`) instead"
                    .to_string(),
            ));
        }

        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (input, None),
        };
        if let Some(d) = digest {
            validate_digest(d).map_err(err)?;
        }

        // A tag is a ':' after the last '/'.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&name_tag[..at], Some(&name_tag[at + 1..]))
            }
            None => (name_tag, None),
        };
        if let Some(t) = tag {
            validate_tag(t).map_err(err)?;
        }
        if name.is_empty() {
            return Err(err(format!("the name is missing; {USAGE}")));
        }
        if name.len() > NAME_MAX {
            return Err(err(format!(
                "the name is {} characters long; at most {NAME_MAX} are allowed",
                name.len()
            )));
        }

        let (registry, path, short) = match name.split_once('/') {
            Some((first, rest)) if looks_like_registry(first) => (first, rest, false),
            _ => (DEFAULT_REGISTRY, name, true),
        };
        if !short {
            validate_registry(registry).map_err(err)?;
        }
        validate_path(path).map_err(err)?;

        let registry = if registry == "index.docker.io" {
            DEFAULT_REGISTRY
        } else {
            registry
        };
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let tag = match (tag, digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (t, _) => t.map(str::to_string),
        };
        Ok(Reference {
            registry: registry.to_string(),
            repository,
            tag,
            digest: digest.map(str::to_string),
            short,
        })
    }

    /// Parses a name given to an image made on this machine (import, build,
    /// the default image): a short name goes under `localhost/`, as podman
    /// does (`myimage` -> `localhost/myimage:latest`).
    pub fn parse_local(input: &str) -> Result<Self, ReferenceError> {
        let r = Self::parse(input)?;
        Ok(if r.short {
            r.in_registry(LOCAL_REGISTRY)
        } else {
            r
        })
    }

    /// The registry host (with port), e.g. `docker.io` or `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry, e.g. `library/alpine`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (`latest` was filled in when neither tag nor digest
    /// was given).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest (`sha256:...`), if the reference pins one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// Whether the reference did not name a registry (`busybox`, `user/app`).
    pub fn is_short(&self) -> bool {
        self.short
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same reference without its digest (keeps the tag, if any).
    pub fn without_digest(&self) -> Self {
        let mut r = self.clone();
        r.digest = None;
        if r.tag.is_none() {
            r.tag = Some(DEFAULT_TAG.to_string());
        }
        r
    }

    /// `registry/repository@digest` for the given digest.
    pub fn with_digest_only(&self, digest: &str) -> Self {
        let mut r = self.clone();
        r.tag = None;
        r.digest = Some(digest.to_string());
        r
    }

    /// The references a local lookup tries, in order: for a short name
    /// `localhost/NAME` then `docker.io/[library/]NAME`; otherwise just this one.
    pub fn local_candidates(&self) -> Vec<Reference> {
        if self.short {
            vec![self.in_registry(LOCAL_REGISTRY), self.clone()]
        } else {
            vec![self.clone()]
        }
    }

    /// Whether the registry is on this machine's loopback (127.0.0.0/8,
    /// `localhost`, `[::1]`), where plain HTTP is used.
    pub fn is_loopback_registry(&self) -> bool {
        is_loopback_host(&self.registry)
    }

    /// A short name moved to another registry (the path as the user wrote it,
    /// i.e. without docker.io's `library/`).
    fn in_registry(&self, registry: &str) -> Reference {
        let path = if self.registry == DEFAULT_REGISTRY {
            self.repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository)
        } else {
            &self.repository
        };
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        Reference {
            registry: registry.to_string(),
            repository,
            tag: self.tag.clone(),
            digest: self.digest.clone(),
            short: false,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Whether `host` (with optional port) is a loopback address or `localhost`.
pub fn is_loopback_host(host_port: &str) -> bool {
    let host = if let Some(rest) = host_port.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, _)) => h,
            None => return false,
        }
    } else {
        host_port.split(':').next().unwrap_or(host_port)
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => false,
    }
}

/// Whether `s` is a full image ID: 64 lowercase hexadecimal digits.
pub fn is_hex_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks that `d` is `sha256:` followed by 64 lowercase hex digits.
pub fn validate_digest(d: &str) -> Result<(), String> {
    let Some((algo, hex)) = d.split_once(':') else {
        return Err(format!(
            "the digest {d:?} has no algorithm; digests look like sha256:<64 hex digits>"
        ));
    };
    if algo != "sha256" {
        return Err(format!(
            "the digest algorithm {algo:?} is not supported; only sha256 digests are"
        ));
    }
    if !is_hex_id(hex) {
        return Err(format!(
            "the digest {d:?} is malformed; a sha256 digest is 64 lowercase hex digits"
        ));
    }
    Ok(())
}

fn validate_tag(t: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-';
    let first_ok = t
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if t.is_empty() || t.len() > TAG_MAX || !first_ok || !t.chars().all(ok_char) {
        return Err(format!(
            "the tag {t:?} is invalid: a tag is 1 to {TAG_MAX} letters, digits, '_', '.' \
             and '-', not starting with '.' or '-'"
        ));
    }
    Ok(())
}

fn looks_like_registry(first: &str) -> bool {
    first.contains('.')
        || first.contains(':')
        || first == LOCAL_REGISTRY
        || first.chars().any(|c| c.is_ascii_uppercase())
}

fn validate_registry(reg: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "the registry {reg:?} is invalid: expected a host name, IPv4 address or \
             [IPv6] address, optionally followed by :PORT"
        )
    };
    let (host, port) = if let Some(rest) = reg.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad());
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(bad)?),
        };
        (None, port)
    } else {
        match reg.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(reg), None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
    }
    if let Some(h) = host {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if h.is_empty() || !h.split('.').all(label_ok) {
            return Err(bad());
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), String> {
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!(
            "the repository name {path:?} has upper-case letters; repository names must be \
             lower case"
        ));
    }
    for comp in path.split('/') {
        if !path_component_ok(comp) {
            return Err(format!(
                "the name component {comp:?} (in {path:?}) is invalid: components are \
                 lower-case letters and digits, separated by '.', '_', '__' or dashes, \
                 and cannot be empty; {USAGE}"
            ));
        }
    }
    Ok(())
}

fn path_component_ok(comp: &str) -> bool {
    let b = comp.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator: '.', '_', '__' or one or more '-'.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn short_names_go_to_docker_hub() {
        assert_eq!(p("alpine").to_string(), "docker.io/library/alpine:latest");
        assert_eq!(
            p("alpine:3.19").to_string(),
            "docker.io/library/alpine:3.19"
        );
        assert_eq!(p("user/app").to_string(), "docker.io/user/app:latest");
        assert_eq!(p("a/b/c:v1").to_string(), "docker.io/a/b/c:v1");
        assert!(p("alpine").is_short());
        assert!(!p("docker.io/alpine").is_short());
        assert_eq!(
            p("docker.io/alpine").to_string(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(
            p("index.docker.io/library/alpine").to_string(),
            "docker.io/library/alpine:latest"
        );
    }

    #[test]
    fn registry_detection() {
        let r = p("localhost/busybox");
        assert_eq!((r.registry(), r.repository()), ("localhost", "busybox"));
        let r = p("127.0.0.1:5000/test/busybox:latest");
        assert_eq!(
            (r.registry(), r.repository()),
            ("127.0.0.1:5000", "test/busybox")
        );
        let r = p("quay.io/podman/hello");
        assert_eq!((r.registry(), r.repository()), ("quay.io", "podman/hello"));
        let r = p("myhost:5000/app");
        assert_eq!(r.registry(), "myhost:5000");
        let r = p("Registry/app");
        assert_eq!(r.registry(), "Registry");
        let r = p("[::1]:5000/app:v2");
        assert_eq!((r.registry(), r.tag()), ("[::1]:5000", Some("v2")));
        // Without a slash, "localhost:5000" is a name and a tag, as in docker.
        let r = p("localhost:5000");
        assert_eq!(r.to_string(), "docker.io/library/localhost:5000");
    }

    #[test]
    fn digests() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = p(&format!("alpine@{d}"));
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(d.as_str()));
        assert_eq!(r.to_string(), format!("docker.io/library/alpine@{d}"));
        let r = p(&format!("localhost:5000/x/y:v1@{d}"));
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.to_string(), format!("localhost:5000/x/y:v1@{d}"));
        assert_eq!(r.without_digest().to_string(), "localhost:5000/x/y:v1");
        assert_eq!(
            r.with_digest_only(&d).to_string(),
            format!("localhost:5000/x/y@{d}")
        );
    }

    #[test]
    fn local_candidates_for_short_names() {
        let c: Vec<String> = p("busybox:1.36")
            .local_candidates()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            c,
            ["localhost/busybox:1.36", "docker.io/library/busybox:1.36"]
        );
        let c: Vec<String> = p("user/app")
            .local_candidates()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            c,
            ["localhost/user/app:latest", "docker.io/user/app:latest"]
        );
        assert_eq!(p("quay.io/a/b").local_candidates().len(), 1);
        assert_eq!(
            Reference::parse_local("myimg").map(|r| r.to_string()),
            Ok("localhost/myimg:latest".to_string())
        );
        assert_eq!(
            Reference::parse_local("quay.io/x/y:1").map(|r| r.to_string()),
            Ok("quay.io/x/y:1".to_string())
        );
    }

    #[test]
    fn loopback() {
        for h in [
            "127.0.0.1:5000",
            "127.3.2.1",
            "localhost",
            "localhost:80",
            "[::1]:5000",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "docker.io",
            "10.0.0.1:5000",
            "[::2]:5000",
            "localhost.example.com",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn invalid_references_explain_themselves() {
        let cases = [
            ("", "empty"),
            ("Alpine", "upper-case"),
            ("docker.io/Alpine", "upper-case"),
            ("alpine:", "tag"),
            ("alpine:-x", "tag"),
            ("alpine:a/b", "registry"),
            ("a//b", "name component"),
            ("-a", "name component"),
            ("a-", "name component"),
            ("a..b", "name component"),
            ("a___b", "name component"),
            ("alpine@sha256:abc", "64 lowercase hex"),
            ("alpine@md5:abc", "not supported"),
            ("alpine@", "no algorithm"),
            ("bad_host:x/app", "registry"),
            ("-bad.com/app", "registry"),
            ("a b", "white space"),
            (&"a".repeat(300), "at most 255"),
            (&"a".repeat(64), "image ID"),
            (&format!("a:{}", "t".repeat(129)), "tag"),
        ];
        for (input, want) in cases {
            let e = Reference::parse(input).expect_err(input);
            let msg = e.to_string();
            assert!(msg.contains(want), "{input:?}: {msg}");
            assert!(msg.starts_with("invalid image reference"), "{msg}");
        }
    }

    #[test]
    fn separators_allowed() {
        for n in ["a.b", "a_b", "a__b", "a-b", "a---b", "a1/b2.c3", "0"] {
            p(n);
        }
    }
}
