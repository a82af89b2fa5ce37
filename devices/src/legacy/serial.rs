use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{BusDevice, EventFdTrigger};

/// Console lines the Linux kernel prints at `KERN_EMERG` (so `quiet` does not
/// hide them) when it panics or powers off.
const PANIC_MARKER: &str = "Kernel panic - not syncing";
const POWER_OFF_MARKER: &str = "reboot: Power down";
const HALT_MARKER: &str = "reboot: System halted";
/// The longest console line kept for detection; the guest controls the
/// console, so the buffer is bounded.
const MAX_LINE: usize = 512;

/// What the guest kernel announced on its console about its own end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestConsoleEvent {
    /// The kernel panicked; the line it printed.
    Panic(String),
    /// The kernel powered off or halted: without ACPI its CPUs then just stop,
    /// so this line is the only sign that the guest is done.
    PowerOff,
}

/// Watches the guest's console for the lines that tell how the guest ended.
///
/// A guest that panics with `panic=N` reboots through the same i8042 reset as
/// a clean `reboot`, and one that powers off without ACPI halts silently: short
/// of an ACPI or pvpanic device, these console lines are the reliable signs.
/// The guest can print them from user space too; that only lets it end its
/// own VM, which it may do anyway.
#[derive(Debug, Clone)]
pub struct ConsoleWatch {
    event: Arc<Mutex<Option<GuestConsoleEvent>>>,
    wake: Arc<EventFd>,
}

impl ConsoleWatch {
    /// A watcher that writes to its [`wake`](Self::wake) event on the first event.
    ///
    /// # Errors
    /// Creating the eventfd failed.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            event: Arc::default(),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// The first event seen, if any.
    #[must_use]
    pub fn event(&self) -> Option<GuestConsoleEvent> {
        self.event
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Readable once an event was seen.
    #[must_use]
    pub fn wake(&self) -> &EventFd {
        &self.wake
    }

    fn check_line(&self, line: &str) {
        let seen = if line.contains(PANIC_MARKER) {
            GuestConsoleEvent::Panic(line.trim().to_string())
        } else if line.contains(POWER_OFF_MARKER) || line.contains(HALT_MARKER) {
            GuestConsoleEvent::PowerOff
        } else {
            return;
        };
        let mut slot = self.event.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(seen);
            let _ = self.wake.write(1);
        }
    }
}

/// Where the guest's console output goes: a writer (hull's stdout), with every
/// line checked for a kernel panic on the way.
pub struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    watch: ConsoleWatch,
}

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOutput")
            .field("watch", &self.watch)
            .finish_non_exhaustive()
    }
}

impl ConsoleOutput {
    /// Console output to `out`, reporting what it sees to `watch`.
    #[must_use]
    pub fn new(out: Box<dyn Write + Send>, watch: ConsoleWatch) -> Self {
        Self {
            out,
            line: Vec::with_capacity(MAX_LINE),
            watch,
        }
    }

    fn scan(&mut self, byte: u8) {
        if byte == b'\n' {
            self.watch.check_line(&String::from_utf8_lossy(&self.line));
            self.line.clear();
        } else if self.line.len() < MAX_LINE {
            self.line.push(byte);
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.scan(b);
        }
        // The guest's output is best effort: a closed or full stdout must not
        // stop the guest, so write errors are swallowed here.
        let _ = self.out.write_all(buf);
        if buf.contains(&b'\n') {
            let _ = self.out.flush();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// Tells the stdin forwarder when the guest has drained the UART's input FIFO.
#[derive(Debug)]
pub struct InputDrained(EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // Failing to wake the forwarder only delays input until the next wake.
        let _ = self.0.write(1);
    }
}

type Uart = Serial<EventFdTrigger, InputDrained, ConsoleOutput>;

/// The 8250 UART on COM1: the guest's console.
#[derive(Debug)]
pub struct SerialConsole {
    uart: Uart,
}

impl SerialConsole {
    /// A UART that raises `irq` when it wants the guest's attention and writes
    /// what the guest sends to `out`. Also returns the event that fires when
    /// the guest drained its input (for [`SerialInput`]).
    ///
    /// # Errors
    /// Creating an eventfd failed.
    pub fn new(irq: EventFdTrigger, out: ConsoleOutput) -> io::Result<(Self, EventFd)> {
        let drained = EventFd::new(EFD_NONBLOCK)?;
        let uart = Serial::with_events(irq, InputDrained(drained.try_clone()?), out);
        Ok((Self { uart }, drained))
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0, |o| self.uart.read(o));
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, value) {
            crate::rate_limited!(warn, "serial: {e}");
        }
    }
}

/// Forwards a host file descriptor (hull's stdin) into the UART's input FIFO.
///
/// Reads only what fits in the FIFO; when it is full, stops watching the input
/// until the guest drains it, so a guest that never reads cannot make the event
/// loop spin or hull buffer without bound.
pub struct SerialInput {
    console: Arc<Mutex<SerialConsole>>,
    input: RawFd,
    drained: EventFd,
    watching_input: bool,
    input_closed: bool,
}

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialInput")
            .field("input", &self.input)
            .finish_non_exhaustive()
    }
}

impl SerialInput {
    /// Forwards `input` (which must stay open as long as the event loop runs)
    /// into `console`; `drained` is the event returned by [`SerialConsole::new`].
    #[must_use]
    pub fn new(console: Arc<Mutex<SerialConsole>>, input: RawFd, drained: EventFd) -> Self {
        Self {
            console,
            input,
            drained,
            watching_input: false,
            input_closed: false,
        }
    }

    fn watch_input(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.watching_input || (on && self.input_closed) {
            return;
        }
        let events = Events::empty_raw(self.input);
        let result = if on {
            ops.add(Events::new_raw(self.input, EventSet::IN))
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.watching_input = on,
            // stdin may be a regular file or /dev/null, which epoll refuses:
            // then the guest simply gets no console input.
            Err(e) => {
                crate::rate_limited!(debug, "serial input: not forwarding fd {}: {e}", self.input);
            }
        }
    }

    fn forward(&mut self, ops: &mut EventOps) {
        let console = Arc::clone(&self.console);
        let mut console = console.lock().unwrap_or_else(PoisonError::into_inner);
        let room = console.uart.fifo_capacity();
        if room == 0 {
            self.watch_input(ops, false);
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        // SAFETY: `buf` is valid for `want` bytes and `input` is an open fd
        // owned by the caller for the life of the event loop.
        let n = unsafe { libc::read(self.input, buf.as_mut_ptr().cast(), want) };
        match usize::try_from(n) {
            Ok(0) | Err(_) => {
                // EOF or a broken input: stop forwarding for good.
                self.watch_input(ops, false);
                self.input_closed = true;
            }
            Ok(n) => {
                if let Err(e) = console.uart.enqueue_raw_bytes(&buf[..n]) {
                    crate::rate_limited!(warn, "serial input: {e}");
                }
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            self.watch_input(ops, true);
        } else if events.fd() == self.input {
            if events
                .event_set()
                .intersects(EventSet::HANG_UP | EventSet::ERROR)
                && !events.event_set().contains(EventSet::IN)
            {
                self.watch_input(ops, false);
                self.input_closed = true;
            } else {
                self.forward(ops);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            crate::rate_limited!(warn, "serial input: {e}");
        }
        self.watch_input(ops, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn console() -> (SerialConsole, Sink, ConsoleWatch, EventFd) {
        let sink = Sink::default();
        let panic = ConsoleWatch::new().unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let (dev, _) = SerialConsole::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            ConsoleOutput::new(Box::new(sink.clone()), panic.clone()),
        )
        .unwrap();
        (dev, sink, panic, irq)
    }

    #[test]
    fn guest_bytes_reach_the_output_and_panics_are_noticed() {
        let (mut dev, sink, panic, _irq) = console();
        for b in b"hello\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n" {
            dev.write(0, &[*b]);
        }
        assert!(String::from_utf8_lossy(&sink.0.lock().unwrap()).starts_with("hello\n"));
        let Some(GuestConsoleEvent::Panic(msg)) = panic.event() else {
            panic!("no panic seen")
        };
        assert!(msg.contains("Attempted to kill init"), "{msg}");
        assert_eq!(panic.wake().read().unwrap(), 1);
    }

    #[test]
    fn an_endless_line_is_bounded() {
        let (mut dev, _sink, panic, _irq) = console();
        for _ in 0..100_000 {
            dev.write(0, b"x");
        }
        assert!(dev.uart.writer().line.len() <= MAX_LINE);
        assert!(panic.event().is_none());
    }

    #[test]
    fn power_off_is_noticed_once() {
        let (mut dev, _sink, watch, _irq) = console();
        for b in b"[    2.5] reboot: Power down\nKernel panic - not syncing: later\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(watch.event(), Some(GuestConsoleEvent::PowerOff));
    }
}
