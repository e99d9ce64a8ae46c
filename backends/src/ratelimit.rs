//! Rate-limited logging of guest-caused problems.
//!
//! A guest can trigger the same fault millions of times a second; the host must neither fill
//! its log nor hide the fault. [`GuestErrorLog`] counts every occurrence per kind and logs
//! the first [`LOG_FIRST`] of each kind, then at most one line per kind every
//! [`LOG_INTERVAL`] (with the count so far), and when it is dropped (the queue reset, the
//! device removed, the process exiting) one last line per kind whose latest occurrences were
//! not logged. The counters double as statistics, so nothing is dropped without a counter,
//! and a guest's fault costs the log a bounded number of lines per minute however often it
//! repeats it.

use std::fmt;
use std::time::{Duration, Instant};

/// Occurrences of each kind that are always logged.
pub const LOG_FIRST: u64 = 10;
/// After [`LOG_FIRST`], at most one line per kind in this time.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

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
}

impl<const N: usize> GuestErrorLog<N> {
    /// A log for `device` (used as the prefix of every line, e.g. "virtio-blk q0").
    pub fn new(device: impl Into<String>) -> Self {
        GuestErrorLog {
            device: device.into(),
            kinds: std::array::from_fn(|_| Kind::default()),
        }
    }

    /// Counts one occurrence of kind `kind` and logs it (at warn level) if the rate limit
    /// allows. Returns the total count for this kind.
    pub fn record(&mut self, kind: usize, what: fmt::Arguments<'_>) -> u64 {
        let Some(k) = self.kinds.get_mut(kind) else {
            log::warn!("{}: {}", self.device, what);
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
        if n > LOG_FIRST {
            log::warn!(
                "{}: {} (seen {} times, {} since the last line)",
                self.device,
                text,
                n,
                n - k.logged
            );
        } else {
            log::warn!("{}: {}", self.device, text);
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
            log::warn!(
                "{}: {} (seen {} times in all; the last {} not logged)",
                self.device,
                k.text,
                k.count,
                k.count - k.logged
            );
            k.logged = k.count;
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
        let mut log = GuestErrorLog::<2>::new("test");
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
        let mut log = GuestErrorLog::<3>::new("test");
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
}
