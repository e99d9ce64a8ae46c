//! Rate-limited logging of guest-caused problems.
//!
//! A guest can trigger the same fault millions of times a second; the host must neither fill
//! its log nor hide the fault. [`GuestErrorLog`] counts every occurrence per kind and logs the
//! first [`LOG_FIRST`] of each kind, then every [`LOG_EVERY`]th. The counters double as
//! statistics, so nothing is dropped without a counter.

use std::fmt;

/// Occurrences of each kind that are always logged.
pub const LOG_FIRST: u64 = 10;
/// After [`LOG_FIRST`], one occurrence in this many is logged.
pub const LOG_EVERY: u64 = 1000;

/// Counts and rate-limits log lines for a fixed set of error kinds (`K` indexes the counters).
#[derive(Debug, Clone)]
pub struct GuestErrorLog<const N: usize> {
    device: String,
    counts: [u64; N],
}

impl<const N: usize> GuestErrorLog<N> {
    /// A log for `device` (used as the prefix of every line, e.g. "virtio-blk q0").
    pub fn new(device: impl Into<String>) -> Self {
        GuestErrorLog {
            device: device.into(),
            counts: [0; N],
        }
    }

    /// Counts one occurrence of kind `kind` and logs it (at warn level) if the rate limit
    /// allows. Returns the total count for this kind.
    pub fn record(&mut self, kind: usize, what: fmt::Arguments<'_>) -> u64 {
        let Some(count) = self.counts.get_mut(kind) else {
            log::warn!("{}: {}", self.device, what);
            return 0;
        };
        *count += 1;
        let n = *count;
        if should_log(n) {
            if n > LOG_FIRST {
                log::warn!("{}: {} (seen {} times)", self.device, what, n);
            } else {
                log::warn!("{}: {}", self.device, what);
            }
        }
        n
    }

    /// How many times `kind` was recorded.
    pub fn count(&self, kind: usize) -> u64 {
        self.counts.get(kind).copied().unwrap_or(0)
    }

    /// Sum over all kinds.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Whether the `n`th occurrence (1-based) is logged.
pub fn should_log(n: u64) -> bool {
    n <= LOG_FIRST || n % LOG_EVERY == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_first_then_every_thousandth() {
        let logged: Vec<u64> = (1..=3000).filter(|&n| should_log(n)).collect();
        assert_eq!(
            logged,
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1000, 2000, 3000]
        );
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
        assert_eq!(log.total(), 6);
    }
}
