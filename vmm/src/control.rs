//! Commands to a running VM's vCPU threads (pause, resume, stop), and the
//! kick that brings a vCPU out of `KVM_RUN` to read them.
//!
//! Each vCPU thread owns the receiving end of its own channel. A command is
//! sent first, then the thread is kicked with a signal whose handler sets
//! `immediate_exit` in that vCPU's `kvm_run` (as Firecracker does): a kick
//! that lands just before the thread enters `KVM_RUN` is not lost, since
//! `KVM_RUN` then returns `EINTR` at once, and the thread reads its channel
//! each time `KVM_RUN` returns.

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{Killable, SIGRTMIN};

use crate::exit::{ExitSignal, VmExit};

/// How long [`VmmHandle::pause`] and [`VmmHandle::resume`] wait for every
/// vCPU to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// A command to one vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Leave `KVM_RUN` and wait for the next command.
    Pause,
    /// Run the guest again.
    Resume,
    /// End the thread.
    Stop,
    /// Say whether this vCPU is halted with interrupts masked (see
    /// [`VmExit::Halted`]); paused or not, it stays as it was.
    Probe,
}

/// What a vCPU thread answers to a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VcpuAnswer {
    /// vCPU `.0` is out of `KVM_RUN` and waits.
    Paused(u8),
    /// vCPU `.0` runs the guest again.
    Resumed(u8),
    /// Whether vCPU `.0` is halted with interrupts masked.
    Probed(u8, bool),
}

/// Errors controlling a VM.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The VM is not running: not started yet, or already stopped.
    #[error("the VM is not running")]
    NotRunning,
    /// A vCPU did not answer in time.
    #[error("{missing} of {count} vCPUs did not {what} within {ANSWER_TIMEOUT:?}")]
    Timeout {
        /// What it was asked (`pause`, `resume`...).
        what: &'static str,
        /// How many did not answer.
        missing: usize,
        /// How many there are.
        count: usize,
    },
}

/// The controlling end of every vCPU's channel, shared by the VMM and its
/// handles.
#[derive(Debug)]
struct Controls {
    /// One per vCPU, in index order.
    commands: Vec<Sender<VcpuCommand>>,
    /// The running vCPU threads (empty before `Vmm::run` starts them and
    /// after they are joined); kicked under this lock, and joined only after
    /// being taken out of it, so a kicked thread is never a joined one.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Answers from every vCPU; also serialises pause and resume.
    answers: Mutex<Receiver<VcpuAnswer>>,
}

/// The vCPU ends of the channels, handed to the vCPU threads by `Vmm::run`.
#[derive(Debug)]
pub(crate) struct VcpuChannel {
    /// This vCPU's commands.
    pub(crate) commands: Receiver<VcpuCommand>,
    /// Where it answers.
    pub(crate) answers: Sender<VcpuAnswer>,
}

/// Pauses, resumes and stops a VM from any thread (cheap to clone).
#[derive(Debug, Clone)]
pub struct VmmHandle {
    controls: Arc<Controls>,
    exit: ExitSignal,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl VmmHandle {
    /// Channels for `count` vCPUs: the handle, and each vCPU's end.
    pub(crate) fn new(count: u8, exit: ExitSignal) -> (Self, Vec<VcpuChannel>) {
        let (answer_tx, answer_rx) = mpsc::channel();
        let (commands, channels) = (0..count)
            .map(|_| {
                let (tx, rx) = mpsc::channel();
                (
                    tx,
                    VcpuChannel {
                        commands: rx,
                        answers: answer_tx.clone(),
                    },
                )
            })
            .unzip();
        let controls = Arc::new(Controls {
            commands,
            threads: Mutex::new(Vec::new()),
            answers: Mutex::new(answer_rx),
        });
        (Self { controls, exit }, channels)
    }

    /// Records the running vCPU threads (in index order).
    pub(crate) fn started(&self, threads: Vec<JoinHandle<()>>) {
        *lock(&self.controls.threads) = threads;
    }

    /// Takes the vCPU threads out, to be joined: tells each to stop.
    pub(crate) fn take_threads(&self) -> Vec<JoinHandle<()>> {
        let threads = std::mem::take(&mut *lock(&self.controls.threads));
        for tx in &self.controls.commands {
            // A thread that already ended has dropped its receiver.
            let _ = tx.send(VcpuCommand::Stop);
        }
        threads
    }

    /// Sends `command` to every vCPU and kicks each out of `KVM_RUN`.
    fn broadcast(&self, command: VcpuCommand) -> Result<usize, ControlError> {
        let threads = lock(&self.controls.threads);
        if threads.is_empty() || self.exit.stopping() {
            return Err(ControlError::NotRunning);
        }
        for tx in &self.controls.commands {
            tx.send(command).map_err(|_| ControlError::NotRunning)?;
        }
        for t in threads.iter() {
            kick(t);
        }
        Ok(threads.len())
    }

    fn command_all(&self, command: VcpuCommand, what: &'static str) -> Result<(), ControlError> {
        let answers = lock(&self.controls.answers);
        // Late answers to an earlier command that timed out are not this one's.
        while answers.try_recv().is_ok() {}
        let count = self.broadcast(command)?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut got = 0;
        while got < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match answers.recv_timeout(left) {
                Ok(VcpuAnswer::Paused(_)) if command == VcpuCommand::Pause => got += 1,
                Ok(VcpuAnswer::Resumed(_)) if command == VcpuCommand::Resume => got += 1,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(ControlError::Timeout {
                        what,
                        missing: count - got,
                        count,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(ControlError::NotRunning),
            }
            if self.exit.stopping() {
                return Err(ControlError::NotRunning);
            }
        }
        Ok(())
    }

    /// Whether every vCPU is halted with interrupts masked right now (each
    /// is kicked out of `KVM_RUN` to look, and goes back in).
    ///
    /// # Errors
    /// The VM is not running, or a vCPU did not answer in time.
    pub(crate) fn all_halted(&self) -> Result<bool, ControlError> {
        let answers = lock(&self.controls.answers);
        while answers.try_recv().is_ok() {}
        let count = self.broadcast(VcpuCommand::Probe)?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let (mut got, mut all) = (0, true);
        while got < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match answers.recv_timeout(left) {
                Ok(VcpuAnswer::Probed(_, halted)) => {
                    got += 1;
                    all &= halted;
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(ControlError::Timeout {
                        what: "say whether it halted",
                        missing: count - got,
                        count,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(ControlError::NotRunning),
            }
        }
        Ok(all)
    }

    /// Brings every vCPU out of the guest and keeps it out; returns once all
    /// of them are paused. Devices keep serving requests already made.
    ///
    /// # Errors
    /// The VM is not running, or a vCPU did not pause in time.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.command_all(VcpuCommand::Pause, "pause")
    }

    /// Lets every vCPU run the guest again; returns once all of them do.
    ///
    /// # Errors
    /// The VM is not running, or a vCPU did not answer in time.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.command_all(VcpuCommand::Resume, "resume")
    }

    /// Stops the VM (paused or not) with `reason` as its ending, unless it
    /// already ended; `Vmm::run` then returns.
    pub fn stop(&self, reason: VmExit) {
        self.exit.exit(reason);
    }
}

fn kick(thread: &JoinHandle<()>) {
    if !thread.is_finished() {
        // ESRCH only: the thread just ended, and it is not joined yet, so
        // its id is still its own.
        let _ = thread.kill(SIGRTMIN());
    }
}

thread_local! {
    /// This thread's vCPU `kvm_run` area, while it runs one.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal's handler: makes this thread's vCPU leave (or not enter)
/// `KVM_RUN`. Only touches a thread-local pointer (no allocation, no lock),
/// so it is async-signal-safe.
pub(crate) extern "C" fn kick_handler(
    _: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's vCPU `kvm_run` mapping, set by
            // `RunArea::enter` and cleared (by `RunArea`'s drop) before the
            // vCPU fd and its mapping go away. `immediate_exit` is a single
            // byte that the kernel reads on entry to KVM_RUN; a volatile
            // write from this thread cannot tear.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Registers this thread's vCPU `kvm_run` area with the kick handler for as
/// long as it lives.
#[derive(Debug)]
pub(crate) struct RunArea(());

impl RunArea {
    /// # Safety
    /// `run` must be this thread's vCPU `kvm_run` mapping, and stay mapped
    /// until the returned value is dropped (on this thread).
    pub(crate) unsafe fn enter(run: *mut kvm_run) -> Self {
        KVM_RUN.with(|p| p.set(run));
        Self(())
    }
}

impl Drop for RunArea {
    fn drop(&mut self) {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }
}
