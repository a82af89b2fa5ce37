use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{BusDevice, EventFdTrigger};

/// The line the Linux kernel prints at `KERN_EMERG` (so `quiet` does not hide
/// it) when it panics.
const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// The longest console line kept for detection; the guest controls the
/// console, so the buffer is bounded.
const MAX_LINE: usize = 512;

/// Keeps the last kernel-panic line of the guest's console, as the message
/// to show once the VM is known to have panicked. It decides nothing:
/// anything in the guest can print such a line, so the VMM learns of a panic
/// from the guest's reset (`vmm`'s `power` module) and of a halt from its
/// vCPUs.
#[derive(Debug, Clone, Default)]
pub struct ConsoleWatch {
    panic_line: Arc<Mutex<Option<String>>>,
}

impl ConsoleWatch {
    /// A watcher that saw nothing yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The last kernel-panic line the console showed, if any.
    #[must_use]
    pub fn panic_line(&self) -> Option<String> {
        self.panic_line
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn check_line(&self, line: &str) {
        if line.contains(PANIC_MARKER) {
            *self
                .panic_line
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(line.trim().to_string());
        }
    }
}

/// Where the guest's console output goes: a writer (hull's stdout), with every
/// line checked on the way (see [`ConsoleWatch`]).
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
        let watch = ConsoleWatch::new();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let (dev, _) = SerialConsole::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            ConsoleOutput::new(Box::new(sink.clone()), watch.clone()),
        )
        .unwrap();
        (dev, sink, watch, irq)
    }

    #[test]
    fn guest_bytes_reach_the_output_and_the_last_panic_line_is_kept() {
        let (mut dev, sink, watch, _irq) = console();
        for b in b"hello\nKernel panic - not syncing: fake\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n" {
            dev.write(0, &[*b]);
        }
        assert!(String::from_utf8_lossy(&sink.0.lock().unwrap()).starts_with("hello\n"));
        let msg = watch.panic_line().expect("no panic line kept");
        assert!(msg.contains("Attempted to kill init"), "{msg}");
    }

    #[test]
    fn an_endless_line_is_bounded() {
        let (mut dev, _sink, watch, _irq) = console();
        for _ in 0..100_000 {
            dev.write(0, b"x");
        }
        assert!(dev.uart.writer().line.len() <= MAX_LINE);
        assert!(watch.panic_line().is_none());
    }
}
