//! What every command shares about its input and its own failures: docker's
//! exit status for them, the one-line usage error, docker's size, memory and
//! CPU notations. A leaf module (it imports nothing of hull's).

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Exit status for hull's own failures (docker's).
pub const EXIT_RUNTIME_ERROR: i32 = 125;

/// A user error in the flags, reported as one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn usage(msg: impl Into<String>) -> Box<dyn std::error::Error> {
    Box::new(UsageError(msg.into()))
}

/// Why [`parse_size`] refused a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with an optional b/k/m/g suffix.
    Invalid,
    /// More bytes than a u64 holds.
    TooLarge,
}

/// Parses docker's size notation: a number with an optional b/k/m/g suffix
/// (binary units, also as kb/kib; bytes when bare); returns bytes.
///
/// # Errors
/// Not a size, or too large.
pub fn parse_size(text: &str) -> std::result::Result<u64, SizeError> {
    let t = text.trim().to_ascii_lowercase();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t.as_str(), ""),
    };
    let shift = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" if unit.is_empty() || unit == "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        _ => return Err(SizeError::Invalid),
    };
    let n: u64 = num.parse().map_err(|_| SizeError::Invalid)?;
    n.checked_mul(1 << shift).ok_or(SizeError::TooLarge)
}

/// Parses docker's memory notation ([`parse_size`]); returns MiB, rounded up.
///
/// # Errors
/// Not a size, or below 64 MiB.
pub fn parse_memory(text: &str) -> Result<u64> {
    let bytes = parse_size(text).map_err(|e| match e {
        SizeError::Invalid => usage(format!("invalid --memory {text:?}: use e.g. 512m or 2g")),
        SizeError::TooLarge => usage(format!("--memory {text:?} is too large")),
    })?;
    let mib = bytes.div_ceil(1 << 20);
    if mib < 64 {
        return Err(usage(format!(
            "--memory {text:?} is below the 64 MiB a container VM needs"
        )));
    }
    Ok(mib)
}

/// Parses `--cpus` (docker allows fractions; a VM has whole vCPUs: rounded up).
///
/// # Errors
/// Not a number in (0, 32].
pub fn parse_cpus(text: &str) -> Result<u8> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| usage(format!("invalid --cpus {text:?}")))?;
    if !(v > 0.0 && v <= 32.0) {
        return Err(usage(format!(
            "--cpus {text:?} must be more than 0 and at most 32"
        )));
    }
    // In (0, 32]: the cast cannot truncate.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = v.ceil() as u8;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_follows_docker_notation() {
        assert_eq!(parse_memory("512m").unwrap(), 512);
        assert_eq!(parse_memory("1g").unwrap(), 1024);
        assert_eq!(parse_memory("1G").unwrap(), 1024);
        assert_eq!(parse_memory("268435456").unwrap(), 256);
        assert_eq!(parse_memory("100000k").unwrap(), 98);
        assert!(parse_memory("12m").is_err());
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("5x").is_err());
    }

    #[test]
    fn cpus_round_up() {
        assert_eq!(parse_cpus("1").unwrap(), 1);
        assert_eq!(parse_cpus("1.5").unwrap(), 2);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("33").is_err());
        assert!(parse_cpus("x").is_err());
    }

    #[test]
    fn sizes_follow_docker_notation() {
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("10"), Ok(10));
        assert_eq!(parse_size("2x"), Err(SizeError::Invalid));
        assert_eq!(parse_size("99999999999g"), Err(SizeError::TooLarge));
    }
}
