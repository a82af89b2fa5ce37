//! seccomp filters for the VMM's threads: one per kind of thread, each the
//! smallest set of system calls that kind makes once the guest runs, with
//! the arguments checked where a call could otherwise do much more (the
//! ioctl requests a vCPU may make: `KVM_RUN` and the halt probe's two
//! reads; fcntl commands, no executable mappings,
//! the signals a thread may send). None of them allows opening a file,
//! creating a socket, connecting, starting a process or a thread.
//!
//! The filters are compiled when the VM is built and installed by each
//! thread just before the guest runs ([`crate::Vmm::run`]): a vCPU thread
//! before its first `KVM_RUN`, the vCPU stopper when it starts, and the
//! thread that calls `run` (the device event loop) once the others are
//! started. The calling thread keeps its filter after `run` returns. A
//! thread of the caller that serves the VM (hull's `__vmm` reads the
//! monitor's commands in one) installs [`ThreadKind::Control`] itself.
//!
//! The sets were found by running containers (boot; virtio-blk, -net,
//! -console, -rng and -fs traffic; `exec`; `stop`; reboot; a vCPU pause)
//! with [`SeccompMode::Log`] in the emulated KVM host and reading the
//! kernel's audit records.
//!
//! In [`SeccompMode::Enforce`] a call outside the filter traps (SIGSYS); the
//! handler writes one line naming the call and the thread's kind to stderr
//! and ends the whole process with [`EXIT_SECCOMP`]: the VMM is then its own
//! process, and its parent records why it ended instead of waiting on a VM
//! that hangs.

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::signal::register_signal_handler;

/// The exit status of a VMM process that made a system call its filter
/// forbids (in [`SeccompMode::Enforce`]): 128 + SIGSYS, as a shell reports
/// a process killed by SIGSYS, but a normal exit (the handler's line is
/// already on stderr).
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

/// What the filters do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// No filter (the VMM shares its process with the caller).
    #[default]
    Off,
    /// A forbidden call ends the process with [`EXIT_SECCOMP`].
    Enforce,
    /// A forbidden call is allowed and logged by the kernel (audit, or
    /// dmesg without an audit daemon): for developers finding what a change
    /// needs.
    Log,
}

/// The kinds of thread the VMM runs, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU: `KVM_RUN`, and the port and MMIO devices it reaches.
    Vcpu,
    /// The device event loop (the thread that calls `Vmm::run`).
    EventLoop,
    /// The thread that stops the vCPUs when the VM ends.
    Stopper,
    /// A thread of the VMM's owner that reads its commands from a pipe it
    /// already holds and stops the VM (`Vmm::filters`).
    Control,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [Self; 4] = [Self::Vcpu, Self::EventLoop, Self::Stopper, Self::Control];

    /// The name the SIGSYS handler prints.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::EventLoop => "device event loop",
            Self::Stopper => "vcpu stopper",
            Self::Control => "control",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Vcpu => 1,
            Self::EventLoop => 2,
            Self::Stopper => 3,
            Self::Control => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules do not compile (a bug in this module).
    #[error("cannot compile the {kind} seccomp filter: {detail}")]
    Compile {
        /// Which filter.
        kind: &'static str,
        /// What seccompiler said.
        detail: String,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the seccomp SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The kernel refused the filter.
    #[error("cannot install the {kind} seccomp filter")]
    Install {
        /// Which filter.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
}

/// `KVMIO`, the KVM ioctls' type.
const KVMIO: u64 = 0xae;
/// `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = KVMIO << 8 | 0x80;
/// `_IOR(KVMIO, 0x81, struct kvm_regs)`: the halt probe reads RFLAGS.
const KVM_GET_REGS: u64 = ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
/// `_IOR(KVMIO, 0x98, struct kvm_mp_state)`: the halt probe.
const KVM_GET_MP_STATE: u64 = ior(0x98, std::mem::size_of::<kvm_bindings::kvm_mp_state>());

/// `_IOR(KVMIO, nr, size bytes)`, as the kernel's `ioctl.h` builds it.
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

fn cond(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// Rules allowing `arg` to be any of `values`.
fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    values
        .iter()
        .map(|v| SeccompRule::new(vec![cond(arg, SeccompCmpOp::Eq, *v)?]))
        .collect()
}

/// Rules allowing calls whose `arg` has none of `bits` set.
fn none_of(arg: u8, bits: u64) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    Ok(vec![SeccompRule::new(vec![cond(
        arg,
        SeccompCmpOp::MaskedEq(bits),
        0,
    )?])?])
}

fn signal(n: libc::c_int) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// What every VMM thread needs: memory (never executable), locks (and the
/// yield of a spinning channel), signals and their return, time, sleeping,
/// stderr, the end of the thread (and a panic's abort), and the SIGSYS
/// handler's own calls. `getrandom` seeds a `HashMap` a thread creates
/// (logging may).
fn common(rules: &mut Rules) -> Result<(), seccompiler::BackendError> {
    let no_exec = u64::try_from(libc::PROT_EXEC).unwrap_or(u64::MAX);
    for (nr, chain) in [
        (libc::SYS_brk, Vec::new()),
        (libc::SYS_mmap, none_of(2, no_exec)?),
        (libc::SYS_mprotect, none_of(2, no_exec)?),
        (libc::SYS_mremap, Vec::new()),
        (libc::SYS_munmap, Vec::new()),
        (libc::SYS_madvise, Vec::new()),
        (libc::SYS_futex, Vec::new()),
        (libc::SYS_sched_yield, Vec::new()),
        (libc::SYS_rt_sigreturn, Vec::new()),
        (libc::SYS_rt_sigprocmask, Vec::new()),
        (libc::SYS_sigaltstack, Vec::new()),
        (libc::SYS_clock_gettime, Vec::new()),
        (libc::SYS_clock_nanosleep, Vec::new()),
        (libc::SYS_getrandom, Vec::new()),
        (libc::SYS_write, Vec::new()),
        (libc::SYS_exit, Vec::new()),
        (libc::SYS_exit_group, Vec::new()),
        // abort() after a panic raises SIGABRT at this thread.
        (libc::SYS_tkill, any_of(1, &[signal(libc::SIGABRT)])?),
        (libc::SYS_tgkill, any_of(2, &[signal(libc::SIGABRT)])?),
    ] {
        rules.insert(nr, chain);
    }
    Ok(())
}

/// fcntl commands `cmds` only. (`F_GETFD` is also how Rust's debug builds
/// check that a descriptor they close is open.)
fn fcntl_rules(cmds: &[libc::c_int]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let cmds: Vec<u64> = cmds.iter().copied().map(signal).collect();
    any_of(1, &cmds)
}

fn rules(kind: ThreadKind) -> Result<Rules, seccompiler::BackendError> {
    let mut rules = Rules::new();
    common(&mut rules)?;
    match kind {
        ThreadKind::Vcpu => {
            for (nr, chain) in [
                (
                    libc::SYS_ioctl,
                    any_of(1, &[KVM_RUN, KVM_GET_MP_STATE, KVM_GET_REGS])?,
                ),
                // A queue event duplicated at a device's activation (and
                // closed at its reset, and the vCPU's own at the end); musl
                // sets FD_CLOEXEC again after F_DUPFD_CLOEXEC.
                (
                    libc::SYS_fcntl,
                    fcntl_rules(&[libc::F_DUPFD_CLOEXEC, libc::F_SETFD, libc::F_GETFD])?,
                ),
                (libc::SYS_close, Vec::new()),
            ] {
                rules.insert(nr, chain);
            }
        }
        ThreadKind::EventLoop => {
            let fionbio = u64::try_from(libc::FIONBIO).unwrap_or(u64::MAX);
            for (nr, chain) in [
                (libc::SYS_epoll_wait, Vec::new()),
                (libc::SYS_epoll_pwait, Vec::new()),
                (libc::SYS_epoll_ctl, Vec::new()),
                (libc::SYS_read, Vec::new()),
                // virtio-blk: seek, read, write, flush.
                (libc::SYS_lseek, Vec::new()),
                (libc::SYS_fdatasync, Vec::new()),
                (
                    libc::SYS_fcntl,
                    fcntl_rules(&[
                        libc::F_DUPFD_CLOEXEC,
                        libc::F_GETFD,
                        libc::F_SETFD,
                        libc::F_GETFL,
                        libc::F_SETFL,
                    ])?,
                ),
                // Unix streams: the control channel, passt, vhost-user.
                (libc::SYS_sendmsg, Vec::new()),
                (libc::SYS_recvmsg, Vec::new()),
                (libc::SYS_sendto, Vec::new()),
                (libc::SYS_recvfrom, Vec::new()),
                // The control channel's last words: blocking, with a timeout.
                (libc::SYS_ioctl, any_of(1, &[fionbio])?),
                (
                    libc::SYS_setsockopt,
                    vec![SeccompRule::new(vec![
                        cond(1, SeccompCmpOp::Eq, signal(libc::SOL_SOCKET))?,
                        cond(2, SeccompCmpOp::Eq, signal(libc::SO_SNDTIMEO))?,
                    ])?],
                ),
                (libc::SYS_close, Vec::new()),
            ] {
                rules.insert(nr, chain);
            }
        }
        ThreadKind::Stopper => {
            // Kicks (pthread_kill) and the abort of a panic.
            let kick = signal(vmm_sys_util::signal::SIGRTMIN());
            let abort = signal(libc::SIGABRT);
            rules.insert(libc::SYS_tkill, any_of(1, &[kick, abort])?);
            rules.insert(libc::SYS_tgkill, any_of(2, &[kick, abort])?);
        }
        ThreadKind::Control => {
            rules.insert(libc::SYS_read, Vec::new());
            rules.insert(libc::SYS_close, Vec::new());
            rules.insert(libc::SYS_fcntl, fcntl_rules(&[libc::F_GETFD])?);
        }
    }
    Ok(rules)
}

/// How many system calls `kind`'s filter allows (some only with the
/// arguments it checks).
///
/// # Errors
/// The rules do not compile (a bug).
pub fn syscall_count(kind: ThreadKind) -> Result<usize, SeccompError> {
    rules(kind)
        .map(|r| r.len())
        .map_err(|e| SeccompError::Compile {
            kind: kind.name(),
            detail: e.to_string(),
        })
}

/// Compiles `kind`'s filter for `mode` (`None` for [`SeccompMode::Off`]).
///
/// # Errors
/// The rules do not compile (a bug).
pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let err = |detail: String| SeccompError::Compile {
        kind: kind.name(),
        detail,
    };
    let rules = rules(kind).map_err(|e| err(e.to_string()))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| err(e.to_string()))?;
    BpfProgram::try_from(filter)
        .map(Some)
        .map_err(|e| err(e.to_string()))
}

/// Every thread kind's filter, compiled when the VM is built.
#[derive(Debug, Clone)]
pub struct Filters {
    mode: SeccompMode,
    vcpu: Option<BpfProgram>,
    event_loop: Option<BpfProgram>,
    stopper: Option<BpfProgram>,
    control: Option<BpfProgram>,
}

impl Filters {
    /// Compiles the filters for `mode`; in [`SeccompMode::Enforce`], also
    /// installs the process's SIGSYS handler.
    ///
    /// # Errors
    /// A filter does not compile, or the handler cannot be installed.
    pub fn new(mode: SeccompMode) -> Result<Self, SeccompError> {
        if mode == SeccompMode::Enforce {
            register_signal_handler(libc::SIGSYS, sigsys_handler)
                .map_err(|e| SeccompError::Handler(std::io::Error::from_raw_os_error(e.errno())))?;
        }
        Ok(Self {
            mode,
            vcpu: compile(ThreadKind::Vcpu, mode)?,
            event_loop: compile(ThreadKind::EventLoop, mode)?,
            stopper: compile(ThreadKind::Stopper, mode)?,
            control: compile(ThreadKind::Control, mode)?,
        })
    }

    /// The mode the filters were compiled for.
    #[must_use]
    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Installs `kind`'s filter on the calling thread (and `no_new_privs`,
    /// which seccomp needs); nothing in [`SeccompMode::Off`]. Threads the
    /// caller starts afterwards inherit it.
    ///
    /// # Errors
    /// The kernel refused the filter.
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let program = match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::EventLoop => &self.event_loop,
            ThreadKind::Stopper => &self.stopper,
            ThreadKind::Control => &self.control,
        };
        let Some(program) = program else {
            return Ok(());
        };
        THREAD_KIND.with(|k| k.set(kind.code()));
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            kind: kind.name(),
            source,
        })
    }
}

thread_local! {
    /// This thread's filter kind (0: none), for the SIGSYS handler.
    static THREAD_KIND: Cell<u8> = const { Cell::new(0) };
}

/// Appends `n` in decimal to `buf` at `*len` (no allocation).
fn push_decimal(buf: &mut [u8], len: &mut usize, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push(buf, len, &digits[i..]);
}

fn push(buf: &mut [u8], len: &mut usize, bytes: &[u8]) {
    let end = (*len + bytes.len()).min(buf.len());
    let take = end - *len;
    buf[*len..end].copy_from_slice(&bytes[..take]);
    *len = end;
}

/// The line the SIGSYS handler writes.
fn denial_line(buf: &mut [u8], kind: Option<ThreadKind>, syscall: i32) -> usize {
    let mut len = 0;
    push(buf, &mut len, b"hull: the VMM's ");
    push(
        buf,
        &mut len,
        kind.map_or("unfiltered", ThreadKind::name).as_bytes(),
    );
    push(buf, &mut len, b" thread made system call ");
    if syscall < 0 {
        push(buf, &mut len, b"-");
    }
    push_decimal(buf, &mut len, u64::from(syscall.unsigned_abs()));
    push(
        buf,
        &mut len,
        b", which its seccomp filter forbids: the VM was stopped\n",
    );
    len
}

/// SIGSYS (a call the filter traps): one line to stderr, then the process
/// ends with [`EXIT_SECCOMP`]. Only stack memory, a thread-local read,
/// write(2) and exit_group(2): async-signal-safe, and allowed by every filter.
extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The kernel's siginfo for SIGSYS (`_sigsys` in its union): after
    // si_signo, si_errno and si_code (padded to 16 bytes on 64-bit), the
    // faulting address (8 bytes), then the system call number (an int).
    let syscall = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a full siginfo_t (128 bytes) to an
        // SA_SIGINFO handler; offset 24 lies inside it and is int-aligned.
        unsafe { info.cast::<u8>().add(24).cast::<i32>().read() }
    };
    let kind = THREAD_KIND
        .try_with(Cell::get)
        .ok()
        .and_then(ThreadKind::from_code);
    let mut buf = [0u8; 160];
    let len = denial_line(&mut buf, kind, syscall);
    // SAFETY: writes `len` initialised bytes of `buf` to stderr, then ends
    // the process; both are plain system calls.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::syscall(libc::SYS_exit_group, EXIT_SECCOMP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn kvm_ioctl_numbers_are_the_kernels() {
        // From <linux/kvm.h> on x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
    }

    #[test]
    fn every_filter_compiles_for_x86_64_in_both_modes() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                let program = compile(kind, mode).unwrap().unwrap();
                assert!(!program.is_empty());
            }
            assert!(compile(kind, SeccompMode::Off).unwrap().is_none());
            // Noted on the issue: the size of each filter.
            println!(
                "seccomp: {} filter allows {} system calls",
                kind.name(),
                syscall_count(kind).unwrap()
            );
        }
    }

    #[test]
    fn no_filter_allows_opening_files_sockets_or_new_processes() {
        for kind in ThreadKind::ALL {
            let r = rules(kind).unwrap();
            for nr in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_execve,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
            ] {
                assert!(!r.contains_key(&nr), "{} allows {nr}", kind.name());
            }
        }
    }

    #[test]
    fn the_denial_line_names_the_call_and_the_thread() {
        let mut buf = [0u8; 160];
        let len = denial_line(&mut buf, Some(ThreadKind::Vcpu), 257);
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            "hull: the VMM's vcpu thread made system call 257, which its seccomp filter \
             forbids: the VM was stopped\n"
        );
        let mut small = [0u8; 10];
        assert_eq!(denial_line(&mut small, None, -1), 10);
    }

    /// The child side of the tests below, run in a fresh process (this test
    /// binary again, see `child`): a thread of `HULL_SECCOMP_CHILD_KIND`
    /// installs its filter in `HULL_SECCOMP_CHILD_MODE`, makes allowed
    /// calls, then (if `HULL_SECCOMP_CHILD_FORBIDDEN` is set) creates a socket.
    #[test]
    fn seccomp_child() {
        let Ok(kind) = std::env::var("HULL_SECCOMP_CHILD_KIND") else {
            return;
        };
        let kind = ThreadKind::ALL
            .into_iter()
            .find(|k| k.name() == kind)
            .unwrap();
        let mode = match std::env::var("HULL_SECCOMP_CHILD_MODE").as_deref() {
            Ok("log") => SeccompMode::Log,
            _ => SeccompMode::Enforce,
        };
        let forbidden = std::env::var_os("HULL_SECCOMP_CHILD_FORBIDDEN").is_some();
        let filters = Filters::new(mode).unwrap();
        let thread = std::thread::spawn(move || {
            filters.install(kind).unwrap();
            // Allowed everywhere: memory, a lock, time, a sleep, stderr.
            let v: Vec<u8> = vec![7; 1 << 20];
            let m = std::sync::Mutex::new(v.len());
            std::thread::sleep(std::time::Duration::from_millis(1));
            eprintln!("allowed calls work: {}", *m.lock().unwrap());
            if forbidden {
                // SAFETY: socket(2) with constant arguments; the descriptor
                // (if any) is closed below.
                let fd =
                    unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                eprintln!("socket returned: {}", fd >= 0);
                if let Ok(fd) = i32::try_from(fd) {
                    // SAFETY: `fd` is the descriptor socket(2) just returned.
                    unsafe { libc::close(fd) };
                }
            }
        });
        thread.join().unwrap();
        eprintln!("the thread ended");
    }

    /// Runs `seccomp_child` in a new process; returns its status and stderr.
    fn child(kind: ThreadKind, mode: &str, forbidden: bool) -> (Option<i32>, String) {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "seccomp::tests::seccomp_child", "--nocapture"])
            .env("HULL_SECCOMP_CHILD_KIND", kind.name())
            .env("HULL_SECCOMP_CHILD_MODE", mode);
        if forbidden {
            cmd.env("HULL_SECCOMP_CHILD_FORBIDDEN", "1");
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn a_forbidden_call_ends_the_process_with_the_seccomp_status_and_names_the_thread() {
        for kind in ThreadKind::ALL {
            let (code, err) = child(kind, "enforce", true);
            assert_eq!(code, Some(EXIT_SECCOMP), "{}: {err}", kind.name());
            assert!(err.contains("allowed calls work"), "{err}");
            let line = format!(
                "hull: the VMM's {} thread made system call {}, which its seccomp filter forbids",
                kind.name(),
                libc::SYS_socket
            );
            assert!(err.contains(&line), "{err}");
            assert!(!err.contains("socket returned"), "{err}");
        }
    }

    #[test]
    fn allowed_calls_and_the_end_of_a_filtered_thread_work() {
        for kind in ThreadKind::ALL {
            let (code, err) = child(kind, "enforce", false);
            assert_eq!(code, Some(0), "{}: {err}", kind.name());
            assert!(err.contains("the thread ended"), "{err}");
        }
    }

    #[test]
    fn log_mode_lets_a_forbidden_call_through() {
        let (code, err) = child(ThreadKind::Vcpu, "log", true);
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("socket returned: true"), "{err}");
    }
}
