//! Rate-limited logging for conditions a guest can trigger at will.
//!
//! A guest that can make the VMM log (a bad descriptor, an odd register
//! write, a failing request) can make it log in a loop. Every such message
//! goes through [`rate_limited!`](crate::rate_limited), which lets each call
//! site log at most [`BURST`] messages per [`INTERVAL`]; the first message
//! after a quiet spell says how many were suppressed. Messages carry what
//! happened (registers, indices, error kinds), never guest payload bytes.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Messages one call site may log per [`INTERVAL`].
pub const BURST: u32 = 10;
/// The window [`BURST`] applies to.
pub const INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// At most `burst` events per `interval`, counting the ones refused.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    interval: Duration,
    window: Mutex<Window>,
}

impl RateLimit {
    /// A limit of `burst` events per `interval` (a `static` per call site).
    #[must_use]
    pub const fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst,
            interval,
            window: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether an event may be logged now: `Some(n)` with the number of
    /// events suppressed since the last one logged, `None` to drop it.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// [`check`](Self::check) at time `now`.
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let expired = match w.start {
            None => true,
            Some(s) => now.saturating_duration_since(s) >= self.interval,
        };
        if expired {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged >= self.burst {
            w.suppressed = w.suppressed.saturating_add(1);
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

/// Logs like `tracing::warn!` (or `error!`, `info!`, `debug!`: the first
/// argument names the level), at most [`BURST`] times per [`INTERVAL`] for
/// this call site. For anything a guest can trigger.
///
/// ```
/// devices::rate_limited!(warn, "virtio-mmio: bad queue size {}", 3);
/// ```
#[macro_export]
macro_rules! rate_limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit =
            $crate::ratelimit::RateLimit::new($crate::ratelimit::BURST, $crate::ratelimit::INTERVAL);
        if let Some(suppressed) = LIMIT.check() {
            if suppressed > 0 {
                $crate::ratelimit::__tracing::$level!(
                    "suppressed {suppressed} similar messages (at {}:{})",
                    file!(),
                    line!()
                );
            }
            $crate::ratelimit::__tracing::$level!($($arg)+);
        }
    }};
}

#[doc(hidden)]
pub use tracing as __tracing;

/// Runs `f` and counts the events it logs (in this thread).
#[cfg(test)]
pub(crate) fn count_events(f: impl FnOnce()) -> usize {
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tracing::subscriber::with_default(Counter(count.clone()), f);
    count.load(std::sync::atomic::Ordering::SeqCst)
}

/// Counts the events logged while it is the default subscriber.
#[cfg(test)]
struct Counter(std::sync::Arc<std::sync::atomic::AtomicUsize>);

#[cfg(test)]
impl tracing::Subscriber for Counter {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_are_capped_and_suppressed_messages_counted() {
        let limit = RateLimit::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        let got: Vec<_> = (0..10).map(|_| limit.check_at(t0)).collect();
        assert_eq!(got[..3], [Some(0), Some(0), Some(0)]);
        assert!(got[3..].iter().all(Option::is_none));
        // Still inside the window.
        assert_eq!(limit.check_at(t0 + Duration::from_millis(999)), None);
        // A new window: the first message reports the 8 dropped ones.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limit.check_at(t1), Some(8));
        assert_eq!(limit.check_at(t1), Some(0));
        assert_eq!(limit.check_at(t1), Some(0));
        assert_eq!(limit.check_at(t1), None);
    }

    #[test]
    fn each_call_site_has_its_own_limit() {
        // Many messages from one site do not silence another.
        let a = count_events(|| {
            for i in 0..1000 {
                crate::rate_limited!(warn, "test site a {i}");
            }
        });
        let b = count_events(|| crate::rate_limited!(warn, "test site b"));
        assert_eq!((a, b), (BURST as usize, 1));
    }

    #[test]
    fn a_flood_from_one_site_logs_a_burst() {
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tracing::subscriber::with_default(Counter(count.clone()), || {
            for i in 0..10_000 {
                crate::rate_limited!(warn, "flood {i}");
            }
        });
        assert_eq!(
            count.load(std::sync::atomic::Ordering::SeqCst),
            BURST as usize
        );
    }
}
