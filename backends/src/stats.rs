//! Live counters of a queue, for the hosts (the vmm's device threads, the vhost-user
//! daemons) to publish while the guest runs.
//!
//! An engine counts in plain fields on its queue thread and publishes them, with its latency
//! histogram, into a [`Published`] at the end of every call (one relaxed store per counter
//! per batch, no lock, no atomic read-modify-write on the data path); any thread reads a
//! consistent-enough [`Published::load`] at any time, exact once the engine is idle. The host
//! adds what only it sees: guest notifications taken ([`Published::kick`]) and interrupts
//! sent ([`Published::interrupt`]). The same type serves the in-VMM devices and the daemons,
//! so both report the same fields.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Buckets of a [`Latency`] histogram.
pub const LATENCY_BUCKETS: usize = 32;

/// A log2 histogram of request latencies (from the engine taking a request off the
/// available ring to it posting the used entry), in microseconds: bucket 0 counts those
/// under 1 µs, bucket `i` (1..31) those in `[2^(i-1), 2^i)` µs, and the last one also
/// everything longer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latency {
    /// Requests per bucket.
    pub buckets: [u64; LATENCY_BUCKETS],
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            buckets: [0; LATENCY_BUCKETS],
        }
    }
}

impl Latency {
    /// The bucket of a latency of `us` microseconds.
    pub fn bucket_of(us: u64) -> usize {
        ((64 - us.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
    }

    /// The microseconds bucket `i` covers: `[lo, hi)`, `hi` `None` for the last one.
    pub fn bounds(i: usize) -> (u64, Option<u64>) {
        let lo = if i == 0 { 0 } else { 1u64 << (i - 1) };
        let hi = (i + 1 < LATENCY_BUCKETS).then(|| 1u64 << i);
        (lo, hi)
    }

    /// Counts one request that took `d`.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::bucket_of(us)] += 1;
    }

    /// Requests counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The bucket holding the request at quantile `q` (0.0..=1.0) in latency order; `None`
    /// with no request counted.
    pub fn quantile_bucket(&self, q: f64) -> Option<usize> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        // The rank of the request at q, 1-based: the median of 4 is the 2nd.
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b;
            if seen >= rank {
                return Some(i);
            }
        }
        Some(LATENCY_BUCKETS - 1)
    }

    /// The JSON form: count, median and p99 buckets, the non-empty buckets.
    pub fn summary(&self) -> LatencySummary {
        let range = |i: usize| {
            let (lo, hi) = Self::bounds(i);
            BucketRange { lo, hi }
        };
        LatencySummary {
            count: self.count(),
            median: self.quantile_bucket(0.5).map(range),
            p99: self.quantile_bucket(0.99).map(range),
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &count)| {
                    let (lo, hi) = Self::bounds(i);
                    Bucket { lo, hi, count }
                })
                .collect(),
        }
    }
}

/// `[lo, hi)` microseconds (`hi` null: no upper bound).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BucketRange {
    /// Lower bound, included.
    pub lo: u64,
    /// Upper bound, excluded.
    pub hi: Option<u64>,
}

/// A non-empty bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Lower bound (µs), included.
    pub lo: u64,
    /// Upper bound (µs), excluded; null for the last bucket.
    pub hi: Option<u64>,
    /// Requests in it.
    pub count: u64,
}

/// [`Latency::summary`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LatencySummary {
    /// Requests counted.
    pub count: u64,
    /// The bucket of the median request.
    pub median: Option<BucketRange>,
    /// The bucket of the 99th percentile.
    pub p99: Option<BucketRange>,
    /// The non-empty buckets, fastest first.
    pub buckets: Vec<Bucket>,
}

/// One queue's counters as published: `N` engine counters (the engine says what they are),
/// its latency histogram, and the host's notification and interrupt counts.
#[derive(Debug)]
pub struct Published<const N: usize> {
    values: [AtomicU64; N],
    latency: [AtomicU64; LATENCY_BUCKETS],
    kicks: AtomicU64,
    interrupts: AtomicU64,
}

impl<const N: usize> Default for Published<N> {
    fn default() -> Self {
        Published {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            kicks: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Published<N> {
    /// The engine's counters and histogram as of its last call.
    pub fn load(&self) -> ([u64; N], Latency) {
        let values = std::array::from_fn(|i| self.values[i].load(Relaxed));
        let buckets = std::array::from_fn(|i| self.latency[i].load(Relaxed));
        (values, Latency { buckets })
    }

    /// Publishes the engine's counters (the engine's queue thread only: one writer).
    pub fn store(&self, values: &[u64; N], latency: &Latency) {
        for (a, v) in self.values.iter().zip(values) {
            a.store(*v, Relaxed);
        }
        for (a, v) in self.latency.iter().zip(&latency.buckets) {
            a.store(*v, Relaxed);
        }
    }

    /// The host took a guest notification (a kick) for this queue.
    pub fn kick(&self) {
        self.kicks.fetch_add(1, Relaxed);
    }

    /// The host signalled the guest (used-buffer notification) for this queue.
    pub fn interrupt(&self) {
        self.interrupts.fetch_add(1, Relaxed);
    }

    /// Guest notifications taken.
    pub fn kicks(&self) -> u64 {
        self.kicks.load(Relaxed)
    }

    /// Interrupts sent.
    pub fn interrupts(&self) -> u64 {
        self.interrupts.load(Relaxed)
    }
}

/// What a host counts for a queue: guest notifications it took and interrupts it sent.
pub trait HostCounts: Send + Sync {
    /// A guest notification (kick) taken.
    fn kick(&self);
    /// An interrupt sent.
    fn interrupt(&self);
}

impl<const N: usize> HostCounts for Published<N> {
    fn kick(&self) {
        Published::kick(self);
    }
    fn interrupt(&self) {
        Published::interrupt(self);
    }
}

/// One queue's counters in JSON form (the vmm's `vm.counters`, the daemons' stats): the
/// engine's fields (`E`, flattened), the host's, the latency summary.
#[derive(Clone, Debug, Serialize)]
pub struct QueueReport<E: Serialize> {
    /// The queue's index in the device.
    pub queue: usize,
    /// Guest notifications (kicks) taken.
    pub notifications: u64,
    /// Interrupts (used-buffer notifications) sent to the guest.
    pub interrupts: u64,
    /// The engine's counters.
    #[serde(flatten)]
    pub engine: E,
    /// Request latency (µs), from taking a request to posting its completion.
    pub latency_us: LatencySummary,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_microseconds() {
        assert_eq!(Latency::bucket_of(0), 0);
        assert_eq!(Latency::bucket_of(1), 1);
        assert_eq!(Latency::bucket_of(2), 2);
        assert_eq!(Latency::bucket_of(3), 2);
        assert_eq!(Latency::bucket_of(4), 3);
        assert_eq!(Latency::bucket_of(1023), 10);
        assert_eq!(Latency::bucket_of(1024), 11);
        assert_eq!(Latency::bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
        for i in 0..LATENCY_BUCKETS - 1 {
            let (lo, hi) = Latency::bounds(i);
            assert_eq!(Latency::bucket_of(lo), i);
            assert_eq!(Latency::bucket_of(hi.unwrap() - 1), i);
            assert_eq!(Latency::bucket_of(hi.unwrap()), i + 1);
        }
        assert_eq!(Latency::bounds(LATENCY_BUCKETS - 1).1, None);
    }

    #[test]
    fn median_and_p99_are_the_buckets_of_those_ranks() {
        let mut l = Latency::default();
        assert_eq!(l.quantile_bucket(0.5), None);
        // 3 fast (5 µs), 2 slow (100 µs): the median (3rd of 5) is fast.
        for us in [5, 5, 5, 100, 100] {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.quantile_bucket(0.5), Some(Latency::bucket_of(5)));
        assert_eq!(l.quantile_bucket(0.99), Some(Latency::bucket_of(100)));
        l.record(Duration::from_micros(100));
        // 3 and 3: the median is the 3rd, still fast.
        assert_eq!(l.quantile_bucket(0.5), Some(Latency::bucket_of(5)));
        let s = l.summary();
        assert_eq!(s.count, 6);
        assert_eq!(s.median, Some(BucketRange { lo: 4, hi: Some(8) }));
        assert_eq!(
            s.p99,
            Some(BucketRange {
                lo: 64,
                hi: Some(128)
            })
        );
        assert_eq!(s.buckets.len(), 2);
        assert_eq!(
            serde_json::to_value(&s).unwrap()["buckets"][1],
            serde_json::json!({"lo": 64, "hi": 128, "count": 3})
        );
    }

    #[test]
    fn published_counters_round_trip_and_hosts_add_theirs() {
        let p = Published::<3>::default();
        let mut l = Latency::default();
        l.record(Duration::from_micros(10));
        p.store(&[1, 2, 3], &l);
        p.kick();
        p.kick();
        p.interrupt();
        let (v, got) = p.load();
        assert_eq!(v, [1, 2, 3]);
        assert_eq!(got, l);
        assert_eq!((p.kicks(), p.interrupts()), (2, 1));
    }
}
