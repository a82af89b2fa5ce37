//! Helpers shared by the integration tests: `mod common;` from `tests/*.rs`
//! (from a `tests/<dir>/main.rs`: `#[path = "../common/mod.rs"] mod common;`).
//!
//! [`EmulatedHost`] runs a shell script inside the emulated KVM host of
//! `tests/emulated-host/run`: QEMU TCG with `-cpu max` booting Debian's cloud
//! kernel, which loads the KVM modules and so has a real `/dev/kvm`. hull runs in
//! there and boots its own guest. Each run costs about 3-5 s of boot.
//!
//! ```ignore
//! mod common;
//! use common::{EmulatedHost, HULL_IN_HOST, KERNEL_IN_HOST};
//!
//! #[test]
//! fn boots() {
//!     let run = EmulatedHost::new()
//!         .with_hull()
//!         .with_test_kernel()
//!         .run(&format!("{HULL_IN_HOST} boot --kernel {KERNEL_IN_HOST}"));
//!     run.assert_success().assert_stdout_contains("hello from the guest");
//! }
//! ```
//!
//! The emulated host's output is echoed through `print!`/`eprint!` as it
//! arrives, so the test harness shows it for failing tests (and live with
//! `cargo test -- --nocapture`). Runs are throttled so that the emulated hosts of
//! tests running in parallel use at most `HULL_EH_PARALLEL` (default: the number
//! of CPUs) host CPUs together.

#![allow(dead_code)]
// Helpers panic on failure, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Where [`EmulatedHost::with_hull`] puts the hull binary in the emulated host.
pub const HULL_IN_HOST: &str = "/usr/local/bin/hull";
/// Where [`EmulatedHost::with_hull_runtime`] puts hull's guest init in the
/// emulated host: next to hull, where hull looks for it.
pub const HULL_INIT_IN_HOST: &str = "/usr/local/bin/hull-init";
/// Where [`EmulatedHost::with_test_kernel`] puts the guest kernel in the emulated host.
pub const KERNEL_IN_HOST: &str = "/opt/hull/vmlinux";

/// Exit status of `tests/emulated-host/run` when the emulated host timed out.
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status of `tests/emulated-host/run` when the script could not run
/// (QEMU died, a prerequisite is missing, bad usage).
pub const EXIT_HOST_FAILED: i32 = 125;

/// What a script printed after `key` (e.g. `rc=`) on a line of `out`,
/// trimmed; the first such line counts.
pub fn value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
}

/// Asserts that a script printed each `(key, value)` of `expected` (see
/// [`value`]), showing all of `out` when one is missing or differs.
#[track_caller]
pub fn assert_values(out: &str, expected: &[(&str, &str)]) {
    for (key, want) in expected {
        assert_eq!(value(out, key), Some(*want), "{key}: {out}");
    }
}

/// The hull binary cargo built for these tests (a static musl binary).
pub fn hull_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hull"))
}

/// A stripped copy of `binary` under cargo's temporary directory for tests
/// (made again when `binary` is newer), or `binary` itself when `strip` fails.
/// Smaller files boot faster in the emulated host (the debug hull shrinks from
/// about 17 MB to 5 MB), at the price of backtraces without line numbers.
pub fn stripped(binary: &Path) -> PathBuf {
    let name = binary.file_name().map_or_else(
        || String::from("binary"),
        |n| n.to_string_lossy().into_owned(),
    );
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.stripped"));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(src), Some(dst)) = (modified(binary), modified(&out)) {
        if dst >= src {
            return out;
        }
    }
    // Unique per call: tests of one process may strip the same binary at once.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let tmp = out.with_extension(format!("tmp{}-{call}", std::process::id()));
    let ok = Command::new("strip")
        .arg("-o")
        .arg(&tmp)
        .arg(binary)
        .status()
        .is_ok_and(|s| s.success())
        && std::fs::rename(&tmp, &out).is_ok();
    if ok {
        out
    } else {
        let _ = std::fs::remove_file(&tmp);
        eprintln!(
            "emulated-host: could not strip {}; using it as is",
            binary.display()
        );
        binary.to_path_buf()
    }
}

/// hull's guest init, `hull-init`, built next to [`hull_bin`] (a binary of
/// the same package, so cargo builds it for these tests).
pub fn hull_init_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hull-init"))
}

/// What `mkfs.ext4` needs in the emulated host, as (file here, path there):
/// e2fsprogs' `mke2fs` as `/sbin/mkfs.ext4`, `/etc/mke2fs.conf`, and the shared
/// libraries `ldd` lists for it (with the dynamic loader) at their own paths.
/// hull formats its disks with `mkfs.ext4`.
///
/// # Panics
/// When `mke2fs` or `ldd` is missing.
pub fn mkfs_ext4_files() -> Vec<(PathBuf, String)> {
    let mke2fs = ["/sbin/mke2fs", "/usr/sbin/mke2fs"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("mke2fs is missing: apt-get install e2fsprogs");
    let mut files = vec![(mke2fs.clone(), String::from("/sbin/mkfs.ext4"))];
    if Path::new("/etc/mke2fs.conf").is_file() {
        files.push((PathBuf::from("/etc/mke2fs.conf"), "/etc/mke2fs.conf".into()));
    }
    let out = Command::new("ldd")
        .arg(&mke2fs)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ldd {}: {e}", mke2fs.display()));
    assert!(
        out.status.success(),
        "ldd {} failed: {}",
        mke2fs.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `libx.so.1 => /lib/.../libx.so.1 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`;
        // the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            files.push((PathBuf::from(path), path.to_owned()));
        }
    }
    assert!(
        files.iter().any(|(_, d)| d.contains("libext2fs")),
        "ldd {} listed no libext2fs:\n{}",
        mke2fs.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    files
}

/// A host binary for the emulated host, as (file here, path there): `src`
/// at `dest`, and the shared libraries (with the dynamic loader) `ldd`
/// lists for it at their own paths.
///
/// # Panics
/// When `src` is missing or `ldd` fails on it.
pub fn tool_files(src: &Path, dest: &str) -> Vec<(PathBuf, String)> {
    assert!(
        src.is_file(),
        "{} is missing (./dev setup installs it)",
        src.display()
    );
    let mut files = vec![(src.to_path_buf(), dest.to_owned())];
    let out = Command::new("ldd")
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ldd {}: {e}", src.display()));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `libx.so.1 => /lib/.../libx.so.1 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`;
        // the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            files.push((PathBuf::from(path), path.to_owned()));
        }
    }
    files
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/emulated-host/run`.
pub fn emulated_host_script() -> PathBuf {
    repo_root().join("tests").join("emulated-host").join("run")
}

/// The guest kernel (`vmlinux`) the tests boot, from `HULL_TEST_KERNEL`, if set.
pub fn test_kernel_opt() -> Option<PathBuf> {
    std::env::var_os("HULL_TEST_KERNEL")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The guest kernel (`vmlinux`) the tests boot, from `HULL_TEST_KERNEL`.
///
/// # Panics
/// When `HULL_TEST_KERNEL` is not set or names no file.
pub fn test_kernel() -> PathBuf {
    let Some(kernel) = test_kernel_opt() else {
        panic!(
            "HULL_TEST_KERNEL is not set: run the tests with `./dev test`, or set it to the \
             path printed by `target/x86_64-unknown-linux-musl/debug/hull kernel build`"
        );
    };
    assert!(
        kernel.is_file(),
        "HULL_TEST_KERNEL={} is not a file (rebuild it with `hull kernel build`)",
        kernel.display()
    );
    kernel
}

/// Builder for one run of a script in the emulated KVM host.
#[derive(Debug, Clone, Default)]
pub struct EmulatedHost {
    mem_mib: Option<u32>,
    cpus: Option<u32>,
    timeout_secs: Option<u64>,
    no_kvm: bool,
    verbose: bool,
    files: Vec<(PathBuf, String)>,
    dirs: Vec<(PathBuf, String)>,
    modules: Vec<String>,
    append: Vec<String>,
    envs: Vec<(String, String)>,
    /// Exported at the top of the script, inside the emulated host.
    script_env: Vec<(String, String)>,
}

impl EmulatedHost {
    /// Defaults: 1 vCPU, 2048 MiB, 300 s timeout (boot included), KVM loaded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Copies file `src` (symlinks followed) to the absolute path `dest` in the
    /// emulated host; a `dest` ending in `/` keeps the file's name. Not under
    /// `/tmp`, `/run`, `/proc`, `/sys` or `/dev`. Pass stripped binaries: big files
    /// cost boot time (about 0.5 s per 50 MB).
    pub fn file(mut self, src: impl AsRef<Path>, dest: &str) -> Self {
        self.files
            .push((src.as_ref().to_path_buf(), dest.to_owned()));
        self
    }

    /// Copies the contents of directory `src` (symlinks kept) into `dest`.
    pub fn dir(mut self, src: impl AsRef<Path>, dest: &str) -> Self {
        self.dirs
            .push((src.as_ref().to_path_buf(), dest.to_owned()));
        self
    }

    /// The hull binary of this build at [`HULL_IN_HOST`], as built (with line
    /// tables, so backtraces name lines; about 0.2 s more boot than stripped).
    pub fn with_hull(self) -> Self {
        self.file(hull_bin(), HULL_IN_HOST)
    }

    /// A stripped copy of the hull binary of this build at [`HULL_IN_HOST`].
    pub fn with_stripped_hull(self) -> Self {
        self.file(stripped(&hull_bin()), HULL_IN_HOST)
    }

    /// The test guest kernel (`HULL_TEST_KERNEL`) at [`KERNEL_IN_HOST`].
    pub fn with_test_kernel(self) -> Self {
        self.file(test_kernel(), KERNEL_IN_HOST)
    }

    /// All that `hull run` needs: stripped hull and hull-init at
    /// [`HULL_IN_HOST`] and [`HULL_INIT_IN_HOST`], the test kernel at
    /// [`KERNEL_IN_HOST`] (give it with `HULL_KERNEL`), and `mkfs.ext4` with its
    /// libraries ([`mkfs_ext4_files`]; on `PATH` with `/sbin`).
    ///
    /// Containers get no network there (`HULL_NETWORK=none`): passt is not in
    /// the emulated host unless a test puts it there and asks for it with
    /// [`host_env`](Self::host_env)`("HULL_NETWORK", "passt")`.
    pub fn with_hull_runtime(self) -> Self {
        let mut host = self.host_env("HULL_NETWORK", "none");
        host = host
            .with_stripped_hull()
            .file(stripped(&hull_init_bin()), HULL_INIT_IN_HOST)
            .with_test_kernel();
        for (src, dest) in mkfs_ext4_files() {
            host = host.file(src, &dest);
        }
        host
    }

    /// A host binary at `dest`, with its shared libraries ([`tool_files`]).
    pub fn tool(mut self, src: impl AsRef<Path>, dest: &str) -> Self {
        self.files.extend(tool_files(src.as_ref(), dest));
        self
    }

    /// Number of vCPUs of the emulated host.
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = Some(n);
        self
    }

    /// Memory of the emulated host in MiB.
    pub fn mem(mut self, mib: u32) -> Self {
        self.mem_mib = Some(mib);
        self
    }

    /// Kills the emulated host after `secs` seconds (boot included); the run then
    /// has code [`EXIT_TIMEOUT`].
    pub fn timeout(mut self, secs: u64) -> Self {
        self.timeout_secs = Some(secs);
        self
    }

    /// Does not load the KVM modules: no `/dev/kvm` in the emulated host.
    pub fn no_kvm(mut self) -> Self {
        self.no_kvm = true;
        self
    }

    /// Also loads kernel module `name` (with its dependencies), e.g. `tun`.
    pub fn module(mut self, name: &str) -> Self {
        self.modules.push(name.to_owned());
        self
    }

    /// Extra kernel command line arguments for the emulated host.
    pub fn append(mut self, args: &str) -> Self {
        self.append.push(args.to_owned());
        self
    }

    /// Also shows the emulated host's boot console (on stderr).
    pub fn verbose(mut self) -> Self {
        self.verbose = true;
        self
    }

    /// Sets an environment variable for `tests/emulated-host/run` (for example
    /// `HULL_EH_MACHINE`); it does not reach the script.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Exports `key=value` at the top of the script in the emulated host
    /// (replacing an earlier value of `key`).
    pub fn host_env(mut self, key: &str, value: &str) -> Self {
        self.script_env.retain(|(k, _)| k != key);
        self.script_env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The command line `run` would execute (the script goes to its stdin).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(emulated_host_script());
        if let Some(mem) = self.mem_mib {
            cmd.arg("--mem").arg(mem.to_string());
        }
        if let Some(cpus) = self.cpus {
            cmd.arg("--cpus").arg(cpus.to_string());
        }
        if let Some(secs) = self.timeout_secs {
            cmd.arg("--timeout").arg(secs.to_string());
        }
        if self.no_kvm {
            cmd.arg("--no-kvm");
        }
        if self.verbose {
            cmd.arg("--verbose");
        }
        for (src, dest) in &self.files {
            let mut spec = src.clone().into_os_string();
            spec.push(":");
            spec.push(dest);
            cmd.arg("--file").arg(spec);
        }
        for (src, dest) in &self.dirs {
            let mut spec = src.clone().into_os_string();
            spec.push(":");
            spec.push(dest);
            cmd.arg("--dir").arg(spec);
        }
        for module in &self.modules {
            cmd.arg("--module").arg(module);
        }
        for args in &self.append {
            cmd.arg("--append").arg(args);
        }
        for (key, value) in &self.envs {
            cmd.env(key, value);
        }
        cmd.arg("-");
        cmd
    }

    /// Runs `script` with `sh` in the emulated host and waits for it. Panics only
    /// when `tests/emulated-host/run` cannot be started at all; check the result
    /// with [`HostRun::assert_success`] and friends.
    pub fn run(&self, script: &str) -> HostRun {
        let weight = self.cpus.unwrap_or(1).max(1);
        let _slot = CpuSlots::acquire(weight);
        let started = Instant::now();
        let mut cmd = self.command();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (is the repository complete? is bash installed?)",
                emulated_host_script().display()
            )
        });
        // The script is small; write it all, then close stdin.
        if let Some(mut stdin) = child.stdin.take() {
            let exports: String = self
                .script_env
                .iter()
                .map(|(k, v)| format!("export {k}='{v}'\n"))
                .collect();
            if let Err(e) = stdin.write_all(format!("{exports}{script}").as_bytes()) {
                eprintln!("emulated-host: writing the script to {cmd:?} failed: {e}");
            }
        }
        let out = child.stdout.take().map(|s| echo_lines(s, false));
        let err = child.stderr.take().map(|s| echo_lines(s, true));

        // `run` enforces the timeout itself; this is only a last resort.
        let guard = Duration::from_secs(self.timeout_secs.unwrap_or(300) + 120);
        let status = wait_with_guard(&mut child, guard);
        let stdout = join_output(out);
        let stderr = join_output(err);
        let code = match status {
            Some(status) => exit_code(status),
            None => {
                eprintln!("emulated-host: {cmd:?} did not end within {guard:?}; killed it");
                EXIT_TIMEOUT
            }
        };
        HostRun {
            boot_secs: parse_secs(&stderr, "booted in "),
            script_secs: parse_secs(&stderr, "script ran "),
            stdout,
            stderr,
            code,
            elapsed: started.elapsed(),
            script: script.to_owned(),
        }
    }
}

/// The result of [`EmulatedHost::run`].
#[derive(Debug, Clone)]
pub struct HostRun {
    /// What the script wrote (stdout and stderr, in order: both go to the
    /// emulated host's console), trailing CRs removed.
    pub stdout: String,
    /// Messages of `tests/emulated-host/run` itself (timing, errors), QEMU's stderr.
    pub stderr: String,
    /// The script's exit status; [`EXIT_TIMEOUT`] on timeout, [`EXIT_HOST_FAILED`]
    /// when the emulated host failed.
    pub code: i32,
    /// QEMU start to the script's start (boot and module loading), if it started.
    pub boot_secs: Option<f64>,
    /// How long the script ran, if it ended.
    pub script_secs: Option<f64>,
    /// Wall time of the whole run, as seen from the test.
    pub elapsed: Duration,
    /// The script that ran.
    pub script: String,
}

impl HostRun {
    /// Whether the script exited with status 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// Whether the emulated host was killed for taking too long.
    pub fn timed_out(&self) -> bool {
        self.code == EXIT_TIMEOUT
    }

    /// Panics, with the whole output, unless the script exited with status 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        self.assert_code(0)
    }

    /// Panics, with the whole output, unless the script exited with `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        if self.code != code {
            self.fail(&format!(
                "expected exit status {code}, got {}",
                self.describe_code()
            ));
        }
        self
    }

    /// Panics, with the whole output, unless the output contains `needle`.
    #[track_caller]
    pub fn assert_stdout_contains(&self, needle: &str) -> &Self {
        if !self.stdout.contains(needle) {
            self.fail(&format!("the output does not contain {needle:?}"));
        }
        self
    }

    /// Panics, with the whole output, if the output contains `needle`.
    #[track_caller]
    pub fn assert_stdout_lacks(&self, needle: &str) -> &Self {
        if self.stdout.contains(needle) {
            self.fail(&format!("the output contains {needle:?}"));
        }
        self
    }

    /// Panics with `msg` followed by the whole report.
    #[track_caller]
    pub fn fail(&self, msg: &str) -> ! {
        panic!("emulated host: {msg}\n{self}")
    }

    fn describe_code(&self) -> String {
        match self.code {
            EXIT_TIMEOUT => format!("{EXIT_TIMEOUT} (timed out)"),
            EXIT_HOST_FAILED => format!("{EXIT_HOST_FAILED} (the emulated host failed)"),
            c => c.to_string(),
        }
    }
}

impl fmt::Display for HostRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "--- script ---")?;
        writeln!(f, "{}", self.script.trim_end())?;
        writeln!(f, "--- output (exit status {}) ---", self.describe_code())?;
        writeln!(f, "{}", self.stdout.trim_end())?;
        writeln!(f, "--- tests/emulated-host/run stderr ---")?;
        writeln!(f, "{}", self.stderr.trim_end())?;
        write!(f, "--- end (run took {:.1?}) ---", self.elapsed)
    }
}

/// Reads `stream` in a thread, echoing each line through `print!`/`eprint!`
/// (so the test harness captures it) and collecting it all.
fn echo_lines(stream: impl Read + Send + 'static, to_stderr: bool) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut all = String::new();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    if to_stderr {
                        eprint!("{text}");
                    } else {
                        print!("{text}");
                    }
                    all.push_str(&text);
                }
                Err(e) => {
                    eprintln!("emulated-host: reading its output failed: {e}");
                    break;
                }
            }
        }
        all
    })
}

fn join_output(handle: Option<thread::JoinHandle<String>>) -> String {
    handle
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| String::from("<output reader panicked>"))
        })
        .unwrap_or_default()
}

fn wait_with_guard(child: &mut std::process::Child, guard: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + guard;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Ok(None) => break,
            Err(e) => panic!("waiting for tests/emulated-host/run failed: {e}"),
        }
    }
    // SIGTERM first so that `run` kills its QEMU and cleans up.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    thread::sleep(Duration::from_secs(2));
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Parses `... {key}12.34 s ...` from the timing line of `run`.
fn parse_secs(stderr: &str, key: &str) -> Option<f64> {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("emulated-host: ") && l.contains(key))?;
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Throttles concurrent emulated hosts: each run holds as many slots as it has
/// vCPUs; there are `HULL_EH_PARALLEL` (default: the number of CPUs) slots.
struct CpuSlots {
    weight: u32,
}

static SLOTS_USED: Mutex<u32> = Mutex::new(0);
static SLOTS_FREED: Condvar = Condvar::new();

impl CpuSlots {
    fn capacity() -> u32 {
        std::env::var("HULL_EH_PARALLEL")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                thread::available_parallelism()
                    .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            })
    }

    fn acquire(weight: u32) -> Self {
        let weight = weight.min(Self::capacity());
        let mut used = SLOTS_USED.lock().unwrap_or_else(PoisonError::into_inner);
        while *used > 0 && *used + weight > Self::capacity() {
            used = SLOTS_FREED
                .wait(used)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *used += weight;
        Self { weight }
    }
}

impl Drop for CpuSlots {
    fn drop(&mut self) {
        let mut used = SLOTS_USED.lock().unwrap_or_else(PoisonError::into_inner);
        *used = used.saturating_sub(self.weight);
        SLOTS_FREED.notify_all();
    }
}

// ------------------------------------------------------- images and registry --

/// Panics, saying what to install, unless every `(tool, version flag, package)` runs.
pub fn require_tools(tools: &[(&str, &str, &str)]) {
    for &(tool, arg, package) in tools {
        match Command::new(tool).arg(arg).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "`{tool} {arg}` failed ({}): {}; reinstall it with `apt-get install {package}`",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!(
                "{tool} is required by this test but cannot be run ({e}); install it with \
                 `apt-get install {package}`"
            ),
        }
    }
}

/// docker-registry, skopeo and umoci (for [`Registry`] and [`OciImage`]).
pub fn require_image_tools() {
    require_tools(&[
        ("docker-registry", "--version", "docker-registry"),
        ("skopeo", "--version", "skopeo"),
        ("umoci", "--version", "umoci"),
    ]);
}

/// Runs `cmd`; panics with its output unless it succeeds.
#[track_caller]
pub fn run_checked(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A real registry (Debian's `docker-registry`, the CNCF distribution
/// registry) on a free loopback port, storing under `dir`; killed when dropped.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
    data: PathBuf,
}

impl Registry {
    /// Starts one and waits until it answers `GET /v2/`.
    pub fn start(dir: &Path) -> Registry {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
            l.local_addr().expect("local addr").port()
        };
        let data = dir.join("data");
        let cfg = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            data.display()
        );
        let cfg_path = dir.join("registry.yml");
        std::fs::write(&cfg_path, cfg).expect("write registry config");
        let log = dir.join("registry.log");
        let logf = std::fs::File::create(&log).expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .expect("start docker-registry (apt-get install docker-registry)");
        let reg = Registry {
            child,
            port,
            log,
            data,
        };
        reg.wait_ready();
        reg
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where the registry keeps the blob `sha256:<hex>` on disk.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.data
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let req = format!(
                    "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                    self.port
                );
                if s.write_all(req.as_bytes()).is_ok() {
                    let mut resp = String::new();
                    let _ = s.read_to_string(&mut resp);
                    if resp.starts_with("HTTP/1.1 200") {
                        return;
                    }
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "docker-registry did not answer on port {} within 15 s; its log:\n{}",
            self.port,
            self.log()
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OCI image layout with one image (tag `latest`), built with `umoci`.
#[derive(Debug, Clone)]
pub struct OciImage {
    /// The layout directory.
    pub layout: PathBuf,
    bundle: PathBuf,
}

impl OciImage {
    /// An empty image (no layers, empty config) in `dir/layout`.
    pub fn new(dir: &Path) -> Self {
        let img = Self {
            layout: dir.join("layout"),
            bundle: dir.join("bundle"),
        };
        run_checked(
            Command::new("umoci")
                .args(["init", "--layout"])
                .arg(&img.layout),
        );
        run_checked(Command::new("umoci").args(["new", "--image", &img.image_ref()]));
        img
    }

    /// `LAYOUT:latest`, as umoci names the image.
    pub fn image_ref(&self) -> String {
        format!("{}:latest", self.layout.display())
    }

    /// Adds a layer: the image is unpacked, `edit` changes its root file
    /// system (the directory it is given), and umoci stores the difference
    /// (deleted files become `.wh.` whiteouts).
    pub fn layer(&self, edit: impl FnOnce(&Path)) -> &Self {
        let rootless: &[&str] = if is_root() { &[] } else { &["--rootless"] };
        let _ = std::fs::remove_dir_all(&self.bundle);
        run_checked(
            Command::new("umoci")
                .arg("unpack")
                .args(rootless)
                .args(["--image", &self.image_ref()])
                .arg(&self.bundle),
        );
        edit(&self.bundle.join("rootfs"));
        run_checked(
            Command::new("umoci")
                .args(["repack", "--image", &self.image_ref()])
                .arg(&self.bundle),
        );
        std::fs::remove_dir_all(&self.bundle).expect("remove the umoci bundle");
        self
    }

    /// Adds the uncompressed tar file `tar` as a layer, verbatim.
    pub fn raw_layer(&self, tar: &Path) -> &Self {
        run_checked(
            Command::new("umoci")
                .args(["raw", "add-layer", "--image", &self.image_ref()])
                .arg(tar),
        );
        self
    }

    /// `umoci config` with `args` (e.g. `--config.env`, `FOO=bar`).
    pub fn config(&self, args: &[&str]) -> &Self {
        run_checked(
            Command::new("umoci")
                .args(["config", "--image", &self.image_ref()])
                .args(args),
        );
        self
    }

    /// Drops unreferenced blobs and pushes the image to `registry` as
    /// `NAME:latest` with skopeo; returns the reference
    /// `127.0.0.1:PORT/NAME:latest`.
    pub fn push(&self, registry: &Registry, name: &str) -> String {
        run_checked(
            Command::new("umoci")
                .args(["gc", "--layout"])
                .arg(&self.layout),
        );
        let reference = format!("{}/{name}:latest", registry.host());
        run_checked(
            Command::new("skopeo")
                .args([
                    "--insecure-policy",
                    "copy",
                    "--quiet",
                    "--dest-tls-verify=false",
                ])
                .arg(format!("oci:{}", self.image_ref()))
                .arg(format!("docker://{reference}")),
        );
        reference
    }

    /// The digest (`sha256:<hex>`) of the image's manifest, from `index.json`.
    pub fn manifest_digest(&self) -> String {
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.layout.join("index.json")).expect("read index.json"),
        )
        .expect("index.json is JSON");
        index["manifests"][0]["digest"]
            .as_str()
            .expect("a manifest digest in index.json")
            .to_owned()
    }

    /// The manifest, parsed.
    pub fn manifest(&self) -> serde_json::Value {
        let bytes = std::fs::read(self.blob_file(&self.manifest_digest())).expect("read manifest");
        serde_json::from_slice(&bytes).expect("the manifest is JSON")
    }

    /// The file of blob `sha256:<hex>` in the layout.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.layout.join("blobs/sha256").join(hex)
    }
}

/// Fills `rootfs` with busybox-static (`/bin/busybox` of this host) as
/// `/bin/busybox` and a `/bin/NAME` symlink for each of its applets.
pub fn install_busybox(rootfs: &Path) {
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("busybox-static must be installed (apt-get install busybox-static)");
    let out = run_checked(Command::new("/bin/busybox").arg("--list"));
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet symlink");
        }
    }
}

/// Runs the rest of the script (`/newroot/inner.sh`) with a tmpfs as the
/// root of its own mount namespace: passt sandboxes itself with
/// `pivot_root` and a user namespace, which the emulated host's initramfs
/// root (rootfs) refuses. The tmpfs is moved onto `/` as `switch_root`
/// does, so the process is not "chrooted" in the kernel's eyes.
pub const NEW_ROOT: &str = r#"
mkdir /newroot && mount -t tmpfs -o size=1200m none /newroot
for d in bin sbin usr lib lib64 etc opt var root; do [ -e /$d ] && cp -a /$d /newroot/; done
mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/tmp /newroot/run
"#;

/// The command that runs `/newroot/inner.sh` in the new root.
pub const ENTER_NEW_ROOT: &str = "unshare -m sh -c 'mount --make-rprivate /; \
mount --rbind /proc /newroot/proc; mount --rbind /sys /newroot/sys; mount --rbind /dev /newroot/dev; \
mount -t tmpfs none /newroot/tmp; mount -t tmpfs none /newroot/run; \
cd /newroot && mount --move . / && exec chroot . sh /inner.sh'\n";
