//! Bounded busy-polling after work, shared by the in-VMM devices and the daemons.
//!
//! A queue thread that sleeps on its eventfd pays, per request, a doorbell (a vCPU exit to
//! the kernel's ioeventfd) and a thread wake-up. After handling work the host may instead
//! keep polling the queue for a bounded window: the engine leaves guest notifications
//! disabled meanwhile (`set_polling(true)` on [`crate::block::BlockQueue`] and
//! [`crate::net::NetQueuePair`]: VRING_USED_F_NO_NOTIFY, or a stale avail_event with
//! EVENT_IDX), so the driver skips the doorbell. When the window ends the host re-enables
//! notifications and checks the ring once more (`rearm`) before it sleeps, so no request is
//! ever left behind.

use std::time::{Duration, Instant};

/// The largest polling window a host accepts (1 s): longer only burns a core.
pub const MAX_POLL_US: u64 = 1_000_000;

/// How often a polling loop looks at its stop condition, whether or not it finds work.
pub const STOP_CHECK_INTERVAL: Duration = Duration::from_micros(50);

/// Why [`busy_poll`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollEnd {
    /// No work for a whole window: re-arm notifications and sleep.
    Idle,
    /// The stop condition fired.
    Stopped,
}

/// Calls `round` until it has found no work for `window`, or until `stopped` returns true
/// (asked at least every [`STOP_CHECK_INTERVAL`], so a guest that keeps the queue busy cannot
/// keep the thread from stopping). `round` returns `Ok(true)` when it found work, which
/// restarts the window; an error ends the loop and is returned.
pub fn busy_poll<E>(
    window: Duration,
    mut stopped: impl FnMut() -> bool,
    mut round: impl FnMut() -> Result<bool, E>,
) -> Result<PollEnd, E> {
    let mut last_work = Instant::now();
    let mut last_stop_check = last_work;
    loop {
        let work = round()?;
        let now = Instant::now();
        if work {
            last_work = now;
        }
        if now.duration_since(last_stop_check) >= STOP_CHECK_INTERVAL {
            last_stop_check = now;
            if stopped() {
                return Ok(PollEnd::Stopped);
            }
        }
        if now.duration_since(last_work) >= window {
            return Ok(PollEnd::Idle);
        }
        std::hint::spin_loop();
    }
}

/// How long a shrunk window stays shrunk before [`Poller`] tries the full window again.
pub const REPROBE_INTERVAL: Duration = Duration::from_millis(50);

/// The polling window of one queue thread, shrunk while polling does not pay.
///
/// Polling pays when the guest's next request comes while the thread polls. When requests
/// come further apart than two windows, time after time ([`MISSES`] in a row: a ping every
/// 10 ms, reads from a guest whose own path takes longer than the window, as in the nested
/// lab), every window is spent for nothing: the poller stops polling ("sparse", a window of
/// a single round) until a wake-up comes within one window of the thread going to sleep,
/// which a window would have caught (QEMU's adaptive `aio-poll` grows its window on the same
/// evidence). When the
/// window ends idle and the guest's doorbell comes soon after the thread went to sleep
/// (within two configured windows), polling was in the guest's way: typically the vCPU
/// shares a CPU with the polling thread (another busy process on a 2-core host), cannot run
/// while the thread spins, and every request then costs a whole window. The window halves
/// each time that happens a few times in a row, down to a single round, and goes back to the configured one
/// every [`REPROBE_INTERVAL`] to see whether the CPU is free again.
#[derive(Debug)]
pub struct Poller {
    max: Duration,
    window: Duration,
    idle_since: Option<Instant>,
    reprobe_at: Instant,
    /// Doorbells soon after idle windows, each within [`STRIKE_GAP`] of the previous one.
    strikes: u32,
    last_strike: Option<Instant>,
    /// Wake-ups in a row that came more than two windows after the thread slept.
    misses: u32,
    /// Not polling: requests come further apart than the window.
    sparse: bool,
}

impl Poller {
    /// A poller with the configured window `max` (zero: off).
    pub fn new(max: Duration) -> Self {
        Poller {
            max,
            window: max,
            idle_since: None,
            reprobe_at: Instant::now() + REPROBE_INTERVAL,
            strikes: 0,
            last_strike: None,
            misses: 0,
            sparse: false,
        }
    }

    /// Whether polling is configured at all.
    pub fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// The window for the next polling run.
    pub fn window(&mut self) -> Duration {
        if self.sparse {
            return Duration::ZERO;
        }
        if self.window < self.max {
            let now = Instant::now();
            if now >= self.reprobe_at {
                self.window = self.max;
                self.reprobe_at = now + REPROBE_INTERVAL;
            }
        }
        self.window
    }

    /// The thread goes to sleep after a window without work.
    pub fn went_idle(&mut self) {
        self.idle_since = Some(Instant::now());
    }

    /// Whether the poller stopped polling because work comes further apart than the window.
    pub fn sparse(&self) -> bool {
        self.sparse
    }

    /// Something other than a guest doorbell woke the thread (a frame from the tap): counts
    /// for the sparse mode only.
    pub fn woken(&mut self) {
        if let Some(t) = self.idle_since.take() {
            self.spacing(t.elapsed());
        }
    }

    /// Sparse-mode bookkeeping for a wake-up `gap` after the thread went to sleep; true when
    /// the wake-up says nothing about the guest being kept off its CPU.
    fn spacing(&mut self, gap: Duration) -> bool {
        if gap >= 2 * self.max {
            // No window would have caught this one.
            self.misses = self.misses.saturating_add(1);
            if self.misses >= MISSES {
                self.sparse = true;
            }
            return true;
        }
        self.misses = 0;
        if self.sparse {
            // Not polling, so nothing was in the guest's way; a window would have caught a
            // wake-up this close: poll again.
            if gap < self.max {
                self.sparse = false;
                self.window = self.max;
                self.reprobe_at = Instant::now() + REPROBE_INTERVAL;
            }
            return true;
        }
        false
    }

    /// A guest doorbell woke the thread.
    pub fn kicked(&mut self) {
        let Some(t) = self.idle_since.take() else {
            return;
        };
        // Two configured windows or more: polling longer would not have caught this request,
        // and a vCPU kept off the CPU by the polling takes a while to get back to it.
        if self.spacing(t.elapsed()) {
            return;
        }
        // One late request is the guest's own business (it was descheduled, it computed);
        // a run of them is polling in its way.
        let now = Instant::now();
        self.strikes = match self.last_strike {
            Some(l) if now.duration_since(l) < STRIKE_GAP => self.strikes + 1,
            _ => 1,
        };
        self.last_strike = Some(now);
        if self.strikes >= STRIKES {
            self.strikes = 0;
            if self.window == self.max {
                // The configured window comes back REPROBE_INTERVAL from its first cut,
                // however the guest keeps striking meanwhile.
                self.reprobe_at = now + REPROBE_INTERVAL;
            }
            self.window /= 2;
            if self.window < MIN_WINDOW {
                self.window = Duration::ZERO;
            }
        }
    }
}

impl Default for Poller {
    /// Polling off.
    fn default() -> Self {
        Poller::new(Duration::ZERO)
    }
}

/// Doorbells soon after idle windows, in a row, that halve the window.
const STRIKES: u32 = 4;
/// Wake-ups in a row, each more than two windows after the thread slept, that stop polling.
const MISSES: u32 = 8;
/// Strikes further apart than this do not make a row.
const STRIKE_GAP: Duration = Duration::from_millis(1);

/// Below this a window is not worth a run: [`Poller`] drops to a single round.
const MIN_WINDOW: Duration = Duration::from_micros(2);

/// Checks a polling window given in microseconds (`poll_us=`, `--poll-us`).
pub fn check_poll_us(us: u64) -> Result<Duration, String> {
    if us > MAX_POLL_US {
        return Err(format!("{us} µs: expected 0 (off) to {MAX_POLL_US}"));
    }
    Ok(Duration::from_micros(us))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_after_the_window() {
        let mut rounds = 0u32;
        let start = Instant::now();
        let end = busy_poll(
            Duration::from_micros(200),
            || false,
            || -> Result<bool, ()> {
                rounds += 1;
                // Work in the first 10 rounds only.
                Ok(rounds <= 10)
            },
        );
        assert_eq!(end, Ok(PollEnd::Idle));
        assert!(rounds > 10);
        assert!(start.elapsed() >= Duration::from_micros(200));
    }

    #[test]
    fn endless_work_still_stops() {
        let start = Instant::now();
        let mut checks = 0;
        let end = busy_poll(
            Duration::from_secs(3600),
            || {
                checks += 1;
                start.elapsed() > Duration::from_millis(5)
            },
            || -> Result<bool, ()> { Ok(true) },
        );
        assert_eq!(end, Ok(PollEnd::Stopped));
        assert!(checks >= 1);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn errors_end_the_loop() {
        let end = busy_poll(Duration::from_secs(3600), || false, || Err::<bool, _>(7));
        assert_eq!(end, Err(7));
    }

    #[test]
    fn poller_shrinks_when_doorbells_follow_idle_windows_and_reprobes() {
        let max = Duration::from_millis(400);
        let mut p = Poller::new(max);
        assert!(p.enabled() && !Poller::new(Duration::ZERO).enabled());
        assert_eq!(p.window(), max);
        // A doorbell with no idle window before it (woken from the start): no change.
        p.kicked();
        assert_eq!(p.window(), max);
        // One doorbell right after an idle window: no change; a run of them: halve, down to
        // a single round.
        p.went_idle();
        p.kicked();
        assert_eq!(p.window(), max);
        for _ in 1..STRIKES {
            p.went_idle();
            p.kicked();
        }
        assert_eq!(p.window(), max / 2);
        for _ in 0..40 * STRIKES {
            p.went_idle();
            p.kicked();
        }
        assert_eq!(p.window(), Duration::ZERO);
        // Back to the configured window REPROBE_INTERVAL after the first cut, even while
        // the strikes go on.
        let start = Instant::now();
        while start.elapsed() < REPROBE_INTERVAL + Duration::from_millis(5) {
            p.went_idle();
            p.kicked();
            std::thread::sleep(Duration::from_micros(100));
        }
        assert_eq!(p.window(), max);
        // A doorbell long after the thread went idle (the guest was idle): no change.
        let mut p = Poller::new(Duration::from_micros(50));
        for _ in 0..STRIKES {
            p.went_idle();
            std::thread::sleep(Duration::from_millis(2));
            p.kicked();
        }
        assert_eq!(p.window(), Duration::from_micros(50));
    }

    #[test]
    fn poller_stops_polling_while_work_comes_further_apart_than_the_window() {
        let max = Duration::from_micros(200);
        let mut p = Poller::new(max);
        // Wake-ups long after each idle window: after MISSES in a row, no more polling.
        for i in 0..MISSES {
            assert_eq!(p.window(), max, "after {i} misses");
            p.went_idle();
            std::thread::sleep(Duration::from_millis(1));
            if i % 2 == 0 {
                p.kicked();
            } else {
                // A frame from the host counts the same.
                p.woken();
            }
        }
        assert!(p.sparse());
        assert_eq!(p.window(), Duration::ZERO);
        // The reprobe timer does not bring polling back while work stays sparse.
        std::thread::sleep(REPROBE_INTERVAL + Duration::from_millis(5));
        assert_eq!(p.window(), Duration::ZERO);
        // A near miss (between one and two windows) is not enough ...
        p.went_idle();
        std::thread::sleep(Duration::from_micros(300));
        p.kicked();
        assert!(p.sparse());
        // ... a wake-up a window would have caught is: poll again, the full window.
        p.went_idle();
        p.kicked();
        assert!(!p.sparse());
        assert_eq!(p.window(), max);
        // A miss between hits starts the count again.
        for _ in 0..MISSES - 1 {
            p.went_idle();
            std::thread::sleep(Duration::from_millis(1));
            p.kicked();
        }
        p.went_idle();
        p.woken();
        for _ in 0..MISSES - 1 {
            p.went_idle();
            std::thread::sleep(Duration::from_millis(1));
            p.kicked();
        }
        assert!(!p.sparse());
        assert_eq!(p.window(), max);
    }

    #[test]
    fn poll_us_range() {
        assert_eq!(check_poll_us(0), Ok(Duration::ZERO));
        assert_eq!(check_poll_us(MAX_POLL_US), Ok(Duration::from_secs(1)));
        assert!(check_poll_us(MAX_POLL_US + 1).is_err());
    }
}
