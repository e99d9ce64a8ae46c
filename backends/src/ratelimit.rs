//! Rate-limited logging of guest-caused problems.
//!
//! A guest can trigger the same fault millions of times a second; the host must neither fill
//! its log nor hide the fault. [`GuestErrorLog`] counts every occurrence per kind and logs
//! the first [`LOG_FIRST`] of each kind, then at most one line per kind every
//! [`LOG_INTERVAL`] (with the count so far), and when it is dropped (the queue reset, the
//! device removed, the process exiting) one last line per kind whose latest occurrences were
//! not logged. The counters double as statistics, so nothing is dropped without a counter,
//! and a guest's fault costs the log a bounded number of lines per minute however often it
//! repeats it. A log lives as long as its engine, and a guest can reset its device (a new
//! engine, fresh counters) in a loop: every line also passes one process-wide bucket
//! ([`LINES_PER_SECOND`], bursts of [`LINES_BURST`]), and the next line logged says how many
//! the bucket held back.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Occurrences of each kind that are always logged.
pub const LOG_FIRST: u64 = 10;
/// After [`LOG_FIRST`], at most one line per kind in this time.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Guest-error lines per second the whole process logs at most, sustained.
pub const LINES_PER_SECOND: f64 = 20.0;
/// Guest-error lines the process may log at once.
pub const LINES_BURST: f64 = 200.0;

/// A bucket of log lines: tokens, when last refilled, lines held back since the last one
/// logged, lines logged in all.
#[derive(Debug, Default)]
pub struct Bucket(Mutex<Option<(f64, Instant, u64, u64)>>);

/// The process-wide bucket every [`GuestErrorLog`] uses.
static GLOBAL: Bucket = Bucket(Mutex::new(None));

impl Bucket {
    /// Takes a token: None when empty (the line is held back and counted), else how many
    /// lines were held back before this one.
    fn take(&self) -> Option<u64> {
        let mut b = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, last, held, logged) = b.get_or_insert((LINES_BURST, now, 0, 0));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * LINES_PER_SECOND).min(LINES_BURST);
        *last = now;
        if *tokens < 1.0 {
            *held += 1;
            return None;
        }
        *tokens -= 1.0;
        *logged += 1;
        Some(std::mem::take(held))
    }

    /// Lines this bucket let through.
    pub fn logged(&self) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(0, |b| b.3)
    }

    /// Logs `line` at warn level if a token is left; false when held back.
    fn emit(&self, line: fmt::Arguments<'_>) -> bool {
        match self.take() {
            None => false,
            Some(0) => {
                log::warn!("{line}");
                true
            }
            Some(held) => {
                log::warn!("{line} [{held} guest-error lines held back before this one]");
                true
            }
        }
    }
}

/// One kind's counter and the last line logged for it.
#[derive(Debug, Clone, Default)]
struct Kind {
    count: u64,
    /// `count` when the last line was logged.
    logged: u64,
    last_line: Option<Instant>,
    /// The message of the last line logged (for the summary when dropped).
    text: String,
}

/// Counts and rate-limits log lines for a fixed set of error kinds (`K` indexes the counters).
#[derive(Debug, Clone)]
pub struct GuestErrorLog<const N: usize> {
    device: String,
    kinds: [Kind; N],
    bucket: &'static Bucket,
}

impl<const N: usize> GuestErrorLog<N> {
    /// A log for `device` (used as the prefix of every line, e.g. "virtio-blk q0").
    pub fn new(device: impl Into<String>) -> Self {
        Self::with_bucket(device, &GLOBAL)
    }

    /// A log whose lines pass `bucket` instead of the process-wide one.
    pub fn with_bucket(device: impl Into<String>, bucket: &'static Bucket) -> Self {
        GuestErrorLog {
            device: device.into(),
            kinds: std::array::from_fn(|_| Kind::default()),
            bucket,
        }
    }

    /// Counts one occurrence of kind `kind` and logs it (at warn level) if the rate limit
    /// allows. Returns the total count for this kind.
    pub fn record(&mut self, kind: usize, what: fmt::Arguments<'_>) -> u64 {
        let Some(k) = self.kinds.get_mut(kind) else {
            self.bucket.emit(format_args!("{}: {}", self.device, what));
            return 0;
        };
        k.count += 1;
        let n = k.count;
        let now = if n <= LOG_FIRST {
            None
        } else {
            let now = Instant::now();
            if k.last_line
                .is_some_and(|t| now.duration_since(t) < LOG_INTERVAL)
            {
                return n;
            }
            Some(now)
        };
        let text = what.to_string();
        let logged = if n > LOG_FIRST {
            self.bucket.emit(format_args!(
                "{}: {} (seen {} times, {} since the last line)",
                self.device,
                text,
                n,
                n - k.logged
            ))
        } else {
            self.bucket.emit(format_args!("{}: {}", self.device, text))
        };
        if !logged {
            // Held back: counted as not logged, tried again after the interval.
            k.last_line = Some(now.unwrap_or_else(Instant::now));
            return n;
        }
        k.logged = n;
        k.last_line = Some(now.unwrap_or_else(Instant::now));
        k.text = text;
        n
    }

    /// How many times `kind` was recorded.
    pub fn count(&self, kind: usize) -> u64 {
        self.kinds.get(kind).map_or(0, |k| k.count)
    }

    /// Sum over all kinds.
    pub fn total(&self) -> u64 {
        self.kinds.iter().map(|k| k.count).sum()
    }

    /// Occurrences of `kind` since its last line (not logged yet).
    pub fn unlogged(&self, kind: usize) -> u64 {
        self.kinds.get(kind).map_or(0, |k| k.count - k.logged)
    }
}

impl<const N: usize> GuestErrorLog<N> {
    /// One line for every kind whose latest occurrences were not logged, with its count
    /// (called when the log is dropped; an owner that lives as long as the process calls it
    /// at exit).
    pub fn flush(&mut self) {
        for k in self.kinds.iter_mut().filter(|k| k.count > k.logged) {
            if self.bucket.emit(format_args!(
                "{}: {} (seen {} times in all; the last {} not logged)",
                self.device,
                k.text,
                k.count,
                k.count - k.logged
            )) {
                k.logged = k.count;
            }
        }
    }
}

impl<const N: usize> Drop for GuestErrorLog<N> {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_then_one_per_interval_then_a_summary() {
        let mut log = GuestErrorLog::<2>::with_bucket("test", Box::leak(Box::default()));
        for _ in 0..100_000 {
            log.record(0, format_args!("bad descriptor"));
        }
        // The first ten; the rest wait for the interval from the tenth to pass.
        assert_eq!(log.kinds[0].logged, LOG_FIRST);
        assert_eq!(log.unlogged(0), 100_000 - LOG_FIRST);
        assert_eq!(log.kinds[0].text, "bad descriptor");
        // Once the interval has passed, the next one is logged with the count.
        log.kinds[0].last_line = Instant::now().checked_sub(LOG_INTERVAL);
        log.record(0, format_args!("bad descriptor"));
        assert_eq!(log.unlogged(0), 0);
        assert_eq!(log.count(0), 100_001);
        // Another kind has its own first ten.
        log.record(1, format_args!("other"));
        assert_eq!(log.kinds[1].logged, 1);
        for _ in 0..20 {
            log.record(0, format_args!("bad descriptor"));
        }
        assert_eq!(log.unlogged(0), 20);
        // The summary logs what was not, once.
        log.flush();
        assert_eq!(log.unlogged(0), 0);
        assert_eq!(log.count(0), 100_021);
    }

    #[test]
    fn counts_per_kind() {
        let mut log = GuestErrorLog::<3>::with_bucket("test", Box::leak(Box::default()));
        for _ in 0..5 {
            log.record(1, format_args!("kind one"));
        }
        log.record(2, format_args!("kind two"));
        // Out-of-range kind: logged, not counted, no panic.
        log.record(7, format_args!("unknown kind"));
        assert_eq!(log.count(0), 0);
        assert_eq!(log.count(1), 5);
        assert_eq!(log.count(2), 1);
        assert_eq!(log.count(7), 0);
        assert_eq!(log.unlogged(7), 0);
        assert_eq!(log.total(), 6);
    }

    #[test]
    fn a_reset_loop_cannot_flood_the_log() {
        // Fresh logs (a guest resetting its device in a loop, a new engine each time) each
        // with ten errors: the bucket lets through a burst, then about LINES_PER_SECOND.
        let bucket: &'static Bucket = Box::leak(Box::default());
        let start = Instant::now();
        let mut recorded = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            let mut log = GuestErrorLog::<1>::with_bucket("loop", bucket);
            for _ in 0..LOG_FIRST + 1 {
                log.record(0, format_args!("bad"));
                recorded += 1;
            }
            // Dropped: its summary line passes the bucket too.
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert!(
            recorded > 10 * LINES_BURST as u64,
            "{recorded} errors recorded"
        );
        let bound = LINES_BURST as u64 + (LINES_PER_SECOND * elapsed) as u64 + 1;
        let logged = bucket.logged();
        assert!(
            logged <= bound && logged >= LINES_BURST as u64,
            "{logged} lines for {recorded} errors (bound {bound})"
        );
    }
}
