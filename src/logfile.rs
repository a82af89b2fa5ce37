//! Bounded files for what a container writes on the host.
//!
//! The container's log (`container.log`, docker json-file lines) rotates at
//! a size as docker's json-file driver does: `container.log` becomes
//! `container.log.1`, `.1` becomes `.2` and so on, the oldest is dropped, so
//! at most `max-file` files of about `max-size` each are kept. [`LogReader`]
//! reads them back oldest first and follows the current file across a
//! rotation. The guest's console and the monitor's own messages, which a
//! hostile guest can also make arbitrarily long, go through a
//! [`CappedWriter`] that keeps their first bytes and a note that the rest
//! was dropped.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `max-size` when none is given: 10 MiB.
pub const DEFAULT_MAX_SIZE: u64 = 10 << 20;
/// `max-file` when none is given.
pub const DEFAULT_MAX_FILE: u32 = 2;
/// The most files a log may rotate through.
pub const MAX_MAX_FILE: u32 = 100;
/// How much of the guest kernel's console is kept.
pub const CONSOLE_CAP: u64 = 1 << 20;
/// How much of the monitor's own messages is kept.
pub const MONITOR_LOG_CAP: u64 = 1 << 20;

/// Where a container's output is logged (`--log-driver`, as docker's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogDriver {
    /// docker json-file lines in `container.log` (docker's `local` is taken
    /// as this too).
    #[default]
    #[serde(rename = "json-file")]
    JsonFile,
    /// Not logged: `hull logs` has nothing to read, and the output costs
    /// the host no log writes (a JSON record of binary output is up to six
    /// times its size).
    #[serde(rename = "none")]
    None,
}

impl LogDriver {
    /// The driver docker calls `name`: `json-file` (also `local`, and the
    /// empty name: the default) or `none`; `None` for a driver hull lacks.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "" | "json-file" | "local" => Some(Self::JsonFile),
            "none" => Some(Self::None),
            _ => None,
        }
    }

    /// Docker's name for it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::JsonFile => "json-file",
            Self::None => "none",
        }
    }
}

/// How a container's log is kept (`--log-driver`, and `--log-opt` as
/// docker's json-file driver takes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogOptions {
    /// Rotate before a file grows past this many bytes.
    pub max_size: u64,
    /// Files kept, the current one included (at least 1).
    pub max_file: u32,
    /// Where the output goes.
    pub driver: LogDriver,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            max_size: DEFAULT_MAX_SIZE,
            max_file: DEFAULT_MAX_FILE,
            driver: LogDriver::JsonFile,
        }
    }
}

/// A `--log-opt` hull does not take.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LogOptError(String);

impl LogOptions {
    /// docker's `HostConfig.LogConfig` of these options, as `inspect` shows
    /// it (the `none` driver has no options).
    #[must_use]
    pub fn docker_log_config(&self) -> serde_json::Value {
        let config = match self.driver {
            LogDriver::JsonFile => serde_json::json!({
                "max-size": self.max_size.to_string(),
                "max-file": self.max_file.to_string(),
            }),
            LogDriver::None => serde_json::json!({}),
        };
        serde_json::json!({ "Type": self.driver.name(), "Config": config })
    }

    /// Parses `--log-driver` (`json-file`, `local`: the same, `none`) and
    /// `--log-opt KEY=VALUE` options: `max-size` (docker's size notation,
    /// e.g. `10m`) and `max-file` (a count from 1).
    ///
    /// # Errors
    /// An unknown driver, key or value, or options for `none`.
    pub fn parse(driver: Option<&str>, opts: &[String]) -> Result<Self, LogOptError> {
        let mut out = Self::default();
        let name = driver.unwrap_or_default();
        out.driver = LogDriver::from_name(name).ok_or_else(|| {
            LogOptError(format!(
                "logging driver {name:?} is not supported: use json-file (or local) or none"
            ))
        })?;
        if let (LogDriver::None, Some(opt)) = (out.driver, opts.first()) {
            return Err(LogOptError(format!(
                "--log-opt {opt:?} with --log-driver none: that driver takes no options"
            )));
        }
        for opt in opts {
            let Some((key, value)) = opt.split_once('=') else {
                return Err(LogOptError(format!(
                    "invalid --log-opt {opt:?}: use KEY=VALUE, e.g. max-size=10m"
                )));
            };
            match key {
                "max-size" => {
                    out.max_size = crate::flags::parse_size(value)
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| {
                            LogOptError(format!(
                                "invalid --log-opt max-size {value:?}: use a size such as 10m (k, m or g)"
                            ))
                        })?;
                }
                "max-file" => {
                    out.max_file = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_MAX_FILE).contains(n))
                        .ok_or_else(|| {
                            LogOptError(format!(
                                "invalid --log-opt max-file {value:?}: use a number from 1 to {MAX_MAX_FILE}"
                            ))
                        })?;
                }
                _ => {
                    return Err(LogOptError(format!(
                        "unknown --log-opt {key:?}: hull takes max-size and max-file"
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// The `n`th rotated file of the log at `path` (`container.log.1`...).
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path, truncate: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true);
    if truncate {
        options.write(true).truncate(true);
    } else {
        options.append(true);
    }
    options.open(path)
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// A log file written in whole records (lines) that rotates at a size.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    options: LogOptions,
    file: File,
    size: u64,
}

impl RotatingLog {
    /// Opens (or creates) the log at `path` to append to it.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: &Path, options: LogOptions) -> io::Result<Self> {
        let file = open_append(path, false)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            options,
            file,
            size,
        })
    }

    /// Appends one record; first rotates if the record would take the
    /// current file past `max-size` (a record larger than that gets a file
    /// of its own).
    ///
    /// # Errors
    /// The record cannot be written.
    pub fn write_record(&mut self, record: &[u8]) -> io::Result<()> {
        let len = u64::try_from(record.len()).unwrap_or(u64::MAX);
        if self.size > 0 && self.size.saturating_add(len) > self.options.max_size {
            if let Err(e) = self.rotate() {
                // Never unbounded: without a rotation, start the log over
                // (at its own name: a rotation may have got halfway).
                tracing::warn!("cannot rotate {}: {e}", self.path.display());
                self.file = open_append(&self.path, false)?;
                self.file.set_len(0)?;
                self.size = 0;
            }
        }
        self.file.write_all(record)?;
        self.size = self.size.saturating_add(len);
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let max_file = self.options.max_file;
        if max_file <= 1 {
            // Only one file: it starts over (docker does the same), as a new
            // file put in place by rename, so that a reader following the log
            // sees a new file rather than a truncation it might miss.
            let fresh = self.path.with_extension("log.new");
            let file = open_append(&fresh, true)?;
            fs::rename(&fresh, &self.path)?;
            self.file = file;
        } else {
            ignore_missing(fs::remove_file(rotated(&self.path, max_file - 1)))?;
            for n in (1..max_file - 1).rev() {
                ignore_missing(fs::rename(
                    rotated(&self.path, n),
                    rotated(&self.path, n + 1),
                ))?;
            }
            fs::rename(&self.path, rotated(&self.path, 1))?;
            self.file = open_append(&self.path, true)?;
        }
        self.size = 0;
        Ok(())
    }
}

/// One file of a log being read.
#[derive(Debug)]
struct Source {
    file: File,
    /// (device, inode): which file it is, whatever its name now.
    id: (u64, u64),
    pos: u64,
}

fn file_id(meta: &fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// Opens the log's files that exist, oldest first.
fn open_chain(path: &Path, max_file: u32) -> io::Result<Vec<Source>> {
    let mut out = Vec::new();
    let names = (1..max_file.max(1))
        .rev()
        .map(|n| rotated(path, n))
        .chain([path.to_path_buf()]);
    for name in names {
        match File::open(&name) {
            Ok(file) => {
                let id = file_id(&file.metadata()?);
                if !out.iter().any(|s: &Source| s.id == id) {
                    out.push(Source { file, id, pos: 0 });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Whether each file of `chain` still has the name it was opened by (no
/// rotation happened while the chain was opened).
fn chain_is_current(path: &Path, max_file: u32, chain: &[Source]) -> bool {
    let now: Vec<(u64, u64)> = (1..max_file.max(1))
        .rev()
        .map(|n| rotated(path, n))
        .chain([path.to_path_buf()])
        .filter_map(|name| fs::metadata(name).ok())
        .map(|m| file_id(&m))
        .collect();
    now == chain.iter().map(|s| s.id).collect::<Vec<_>>()
}

/// Reads a rotating log's records oldest first and, called again, what
/// was written since, across rotations.
#[derive(Debug)]
pub struct LogReader {
    path: PathBuf,
    max_file: u32,
    /// Files still to read, oldest first; the last is the current file.
    files: VecDeque<Source>,
    /// The start of a record not completely written yet.
    partial: Vec<u8>,
}

impl LogReader {
    /// Opens the log at `path` that keeps up to `max_file` files; a log
    /// not written yet reads as empty.
    ///
    /// # Errors
    /// A file of the log cannot be opened.
    pub fn open(path: &Path, max_file: u32) -> io::Result<Self> {
        let mut chain = open_chain(path, max_file)?;
        // A rotation while the files were opened may have shuffled them.
        for _ in 0..10 {
            if chain_is_current(path, max_file, &chain) {
                break;
            }
            chain = open_chain(path, max_file)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            max_file,
            files: chain.into(),
            partial: Vec::new(),
        })
    }

    /// Whether the current file's name now belongs to another file (or to none).
    fn rotated_away(&self, id: (u64, u64)) -> io::Result<bool> {
        match fs::metadata(&self.path) {
            Ok(m) => Ok(file_id(&m) != id),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Calls `record` with each complete record (without its newline) that
    /// is there now, oldest first.
    ///
    /// # Errors
    /// A file of the log cannot be read.
    pub fn read_available(&mut self, record: &mut impl FnMut(&[u8])) -> io::Result<()> {
        loop {
            let Some(front) = self.files.front() else {
                // Nothing was written yet: the log may have appeared since.
                self.files.extend(open_chain(&self.path, self.max_file)?);
                if self.files.is_empty() {
                    return Ok(());
                }
                continue;
            };
            let last = self.files.len() == 1;
            // Checked before reading: once renamed, a file gets no more writes,
            // so reading it to its end after this check reads it whole.
            let rotated = last && self.rotated_away(front.id)?;
            let id = front.id;
            if let Some(front) = self.files.front_mut() {
                read_source(front, &mut self.partial, record)?;
            }
            if !last {
                self.files.pop_front();
                self.partial.clear();
                continue;
            }
            if !rotated {
                return Ok(());
            }
            // What came after the current file, in order; every file of the
            // chain if it was dropped already.
            let chain = open_chain(&self.path, self.max_file)?;
            let newer: Vec<Source> = match chain.iter().position(|s| s.id == id) {
                Some(i) => chain.into_iter().skip(i + 1).collect(),
                None => chain,
            };
            if newer.is_empty() {
                // Renamed, and its successor is not there yet.
                return Ok(());
            }
            self.files.pop_front();
            self.partial.clear();
            self.files.extend(newer);
        }
    }
}

/// Reads `source` from where it was read to its end, passing on complete records.
fn read_source(
    source: &mut Source,
    partial: &mut Vec<u8>,
    record: &mut impl FnMut(&[u8]),
) -> io::Result<()> {
    if source.file.metadata()?.len() < source.pos {
        // Started over (a log of one file rotates so).
        source.pos = 0;
        partial.clear();
    }
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match source.file.read_at(&mut buf, source.pos) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        source.pos += u64::try_from(n).unwrap_or(u64::MAX);
        let chunk = &buf[..n];
        let Some(end) = chunk.iter().rposition(|&b| b == b'\n') else {
            partial.extend_from_slice(chunk);
            continue;
        };
        let mut lines = chunk[..end].split(|&b| b == b'\n');
        if let Some(first) = lines.next() {
            if partial.is_empty() {
                record(first);
            } else {
                partial.extend_from_slice(first);
                record(partial.as_slice());
                partial.clear();
            }
        }
        lines.for_each(&mut *record);
        partial.extend_from_slice(&chunk[end + 1..]);
    }
}

/// Writes through to `inner` up to `cap` bytes, then drops the rest after
/// a line saying so; never fails for being full (a guest must not be able
/// to stall or kill the writer by writing much).
#[derive(Debug)]
pub struct CappedWriter<W> {
    inner: W,
    cap: u64,
    written: u64,
    truncated: bool,
}

impl<W: Write> CappedWriter<W> {
    /// Keeps the first `cap` bytes written to `inner`.
    pub fn new(inner: W, cap: u64) -> Self {
        Self {
            inner,
            cap,
            written: 0,
            truncated: false,
        }
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.cap.saturating_sub(self.written);
        if room == 0 {
            if !self.truncated && !buf.is_empty() {
                self.truncated = true;
                let note = format!("\n[hull: truncated here: more than {} bytes]\n", self.cap);
                let _ = self.inner.write_all(note.as_bytes());
                let _ = self.inner.flush();
            }
            return Ok(buf.len());
        }
        let n = usize::try_from(room).unwrap_or(usize::MAX).min(buf.len());
        let written = self.inner.write(&buf[..n])?;
        self.written += u64::try_from(written).unwrap_or(u64::MAX);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Result<LogOptions, LogOptError> {
        LogOptions::parse(
            None,
            &list.iter().map(ToString::to_string).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn log_options_read_like_dockers() {
        assert_eq!(opts(&[]).unwrap(), LogOptions::default());
        assert_eq!(LogOptions::default().max_size, 10 << 20);
        assert_eq!(LogOptions::default().max_file, 2);
        let o = opts(&["max-size=1m", "max-file=3"]).unwrap();
        assert_eq!((o.max_size, o.max_file), (1 << 20, 3));
        assert_eq!(opts(&["max-size=100k"]).unwrap().max_size, 100 << 10);
        assert_eq!(opts(&["max-size=2g"]).unwrap().max_size, 2 << 30);
        assert_eq!(opts(&["max-size=4096"]).unwrap().max_size, 4096);
        for bad in [
            "max-size=lots",
            "max-size=0",
            "max-size=",
            "max-size=5x",
            "max-file=0",
            "max-file=-1",
            "max-file=two",
            "foo=1",
            "max-size",
        ] {
            let e = opts(&[bad]).unwrap_err().to_string();
            assert!(!e.contains('\n') && !e.ends_with('.'), "{e}");
            assert!(e.contains("--log-opt"), "{bad}: {e}");
        }
        assert!(opts(&["foo=1"]).unwrap_err().to_string().contains("foo"));
    }

    #[test]
    fn log_drivers_read_like_dockers() {
        let parse = |d: &str, o: &[&str]| {
            LogOptions::parse(
                Some(d),
                &o.iter().map(ToString::to_string).collect::<Vec<_>>(),
            )
        };
        for d in ["json-file", "local", ""] {
            assert_eq!(parse(d, &[]).unwrap().driver, LogDriver::JsonFile);
        }
        assert_eq!(parse("json-file", &["max-file=3"]).unwrap().max_file, 3);
        assert_eq!(parse("none", &[]).unwrap().driver, LogDriver::None);
        let e = parse("none", &["max-size=1m"]).unwrap_err().to_string();
        assert!(e.contains("none") && e.contains("max-size"), "{e}");
        let e = parse("syslog", &[]).unwrap_err().to_string();
        assert!(e.contains("syslog") && !e.ends_with('.'), "{e}");
        let o: LogOptions = serde_json::from_str(r#"{"driver":"none"}"#).unwrap();
        assert_eq!((o.driver, o.max_file), (LogDriver::None, DEFAULT_MAX_FILE));
        assert_eq!(LogDriver::None.name(), "none");
        assert_eq!(LogDriver::from_name("local"), Some(LogDriver::JsonFile));
        assert_eq!(LogDriver::from_name("journald"), None);
    }

    #[test]
    fn inspect_shows_dockers_log_config() {
        let o = LogOptions::default().docker_log_config();
        assert_eq!(o["Type"], "json-file");
        assert_eq!(o["Config"]["max-file"], DEFAULT_MAX_FILE.to_string());
        assert_eq!(o["Config"]["max-size"], DEFAULT_MAX_SIZE.to_string());
        let none = LogOptions::parse(Some("none"), &[])
            .unwrap()
            .docker_log_config();
        assert_eq!(none, serde_json::json!({ "Type": "none", "Config": {} }));
    }

    #[test]
    fn old_records_get_the_default_options() {
        let o: LogOptions = serde_json::from_str("{}").unwrap();
        assert_eq!(o, LogOptions::default());
        let o: LogOptions = serde_json::from_str(r#"{"max_file": 5}"#).unwrap();
        assert_eq!((o.max_size, o.max_file), (DEFAULT_MAX_SIZE, 5));
    }

    fn record(i: usize) -> Vec<u8> {
        format!("record {i:06} {}\n", "x".repeat(80)).into_bytes()
    }

    fn read_all(path: &Path, max_file: u32) -> Vec<String> {
        let mut out = Vec::new();
        LogReader::open(path, max_file)
            .unwrap()
            .read_available(&mut |r| out.push(String::from_utf8(r.to_vec()).unwrap()))
            .unwrap();
        out
    }

    fn on_disk(dir: &Path) -> (usize, u64) {
        let files: Vec<_> = fs::read_dir(dir).unwrap().flatten().collect();
        let size = files.iter().map(|e| e.metadata().unwrap().len()).sum();
        (files.len(), size)
    }

    #[test]
    fn the_log_rotates_at_its_size_and_keeps_the_newest_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let options = LogOptions {
            max_size: 10_000,
            max_file: 3,
            driver: LogDriver::JsonFile,
        };
        let mut log = RotatingLog::open(&path, options).unwrap();
        let len = record(0).len();
        for i in 0..2000 {
            log.write_record(&record(i)).unwrap();
        }
        // Three files at most, none past max-size.
        let (count, size) = on_disk(dir.path());
        assert_eq!(count, 3);
        assert!(size <= 30_000, "{size}");
        for name in ["container.log", "container.log.1", "container.log.2"] {
            let len = fs::metadata(dir.path().join(name)).unwrap().len();
            assert!(len <= 10_000, "{name}: {len}");
        }
        // Read back oldest first, in order, ending with the newest record.
        let lines = read_all(&path, 3);
        let per_file = 10_000 / len;
        assert!(lines.len() > 2 * per_file, "{}", lines.len());
        let first: usize = lines[0][7..13].parse().unwrap();
        for (k, line) in lines.iter().enumerate() {
            assert_eq!(format!("{line}\n").into_bytes(), record(first + k));
        }
        assert_eq!(first + lines.len(), 2000);
    }

    #[test]
    fn one_file_starts_over_and_a_huge_record_gets_a_file_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let mut log = RotatingLog::open(
            &path,
            LogOptions {
                max_size: 1000,
                max_file: 1,
                driver: LogDriver::JsonFile,
            },
        )
        .unwrap();
        for i in 0..100 {
            log.write_record(&record(i)).unwrap();
        }
        assert_eq!(on_disk(dir.path()).0, 1);
        assert!(fs::metadata(&path).unwrap().len() <= 1000);
        assert!(read_all(&path, 1)
            .last()
            .unwrap()
            .starts_with("record 000099"));

        let mut log = RotatingLog::open(
            &path,
            LogOptions {
                max_size: 1000,
                max_file: 2,
                driver: LogDriver::JsonFile,
            },
        )
        .unwrap();
        let huge = format!("{}\n", "y".repeat(5000));
        log.write_record(huge.as_bytes()).unwrap();
        log.write_record(&record(7)).unwrap();
        assert_eq!(fs::read(rotated(&path, 1)).unwrap(), huge.as_bytes());
        assert_eq!(fs::read(&path).unwrap(), record(7));
    }

    #[test]
    fn reopening_a_log_continues_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let options = LogOptions {
            max_size: 1000,
            max_file: 2,
            driver: LogDriver::JsonFile,
        };
        let mut log = RotatingLog::open(&path, options).unwrap();
        for i in 0..9 {
            log.write_record(&record(i)).unwrap();
        }
        drop(log);
        let mut log = RotatingLog::open(&path, options).unwrap();
        for i in 9..12 {
            log.write_record(&record(i)).unwrap();
        }
        assert!(fs::metadata(&path).unwrap().len() <= 1000);
        assert_eq!(read_all(&path, 2).len(), 12);
    }

    #[test]
    fn a_follower_of_a_one_file_log_sees_it_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let options = LogOptions {
            max_size: 2000,
            max_file: 1,
            driver: LogDriver::JsonFile,
        };
        let mut log = RotatingLog::open(&path, options).unwrap();
        let mut reader = LogReader::open(&path, 1).unwrap();
        let mut seen = Vec::new();
        // A longer first record, so that where the reader stops is no record
        // boundary of the file that follows.
        log.write_record(format!("record {:06} {}\n", 0, "y".repeat(130)).as_bytes())
            .unwrap();
        for n in 1..20 {
            log.write_record(&record(n)).unwrap();
        }
        reader
            .read_available(&mut |r| seen.push(r.to_vec()))
            .unwrap();
        // The log starts over and grows past where the reader was before it
        // looks again: it must read the new file from its start.
        for n in 20..41 {
            log.write_record(&record(n)).unwrap();
        }
        reader
            .read_available(&mut |r| seen.push(r.to_vec()))
            .unwrap();
        let last: usize = std::str::from_utf8(&seen.last().unwrap()[7..13])
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(last, 40);
        assert!(
            seen.iter().all(|r| r.starts_with(b"record ")),
            "a record was cut: {seen:?}"
        );
    }

    #[test]
    fn a_follower_reads_across_rotations_without_losing_or_repeating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let options = LogOptions {
            max_size: 2000,
            max_file: 2,
            driver: LogDriver::JsonFile,
        };
        // Following before the log exists.
        let mut reader = LogReader::open(&path, 2).unwrap();
        let mut seen = Vec::new();
        reader
            .read_available(&mut |r| seen.push(r.to_vec()))
            .unwrap();
        assert!(seen.is_empty());
        let mut log = RotatingLog::open(&path, options).unwrap();
        let mut next = 0;
        // Between reads: no rotation, one, two (the file being read is
        // dropped), a partly written record.
        for batch in [3, 10, 25, 100, 1, 40] {
            for _ in 0..batch {
                log.write_record(&record(next)).unwrap();
                next += 1;
            }
            reader
                .read_available(&mut |r| seen.push(r.to_vec()))
                .unwrap();
        }
        log.file.write_all(b"record 9999").unwrap();
        reader
            .read_available(&mut |r| seen.push(r.to_vec()))
            .unwrap();
        log.file.write_all(b"99 end\n").unwrap();
        reader
            .read_available(&mut |r| seen.push(r.to_vec()))
            .unwrap();
        assert_eq!(seen.last().unwrap(), b"record 999999 end");
        seen.pop();
        // Up to a rotation past the file being read, every record once, in order.
        let numbers: Vec<usize> = seen
            .iter()
            .map(|r| std::str::from_utf8(&r[7..13]).unwrap().parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
        assert_eq!(*numbers.last().unwrap(), next - 1);
        // The batches of 3, 10, 1 and 40 records came whole.
        assert!(
            numbers.starts_with(&(0..13).collect::<Vec<_>>()),
            "{numbers:?}"
        );
        assert!(
            numbers.ends_with(&(138..179).collect::<Vec<_>>()),
            "{numbers:?}"
        );
    }

    #[test]
    fn the_capped_writer_keeps_the_first_bytes_and_says_it_cut() {
        let mut w = CappedWriter::new(Vec::new(), 100);
        for _ in 0..50 {
            w.write_all(b"0123456789").unwrap();
        }
        w.flush().unwrap();
        let out = String::from_utf8(w.inner).unwrap();
        assert!(out.starts_with(&"0123456789".repeat(10)), "{out}");
        assert_eq!(out.matches("truncated").count(), 1, "{out}");
        assert!(out.len() < 200, "{out}");
        // Under the cap, nothing changes.
        let mut w = CappedWriter::new(Vec::new(), 100);
        w.write_all(b"hello\n").unwrap();
        assert_eq!(w.inner, b"hello\n");
    }
}
