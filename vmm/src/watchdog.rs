//! The guest watchdog (`--watchdog SECS`, off by default): notices a guest that stopped
//! making progress and logs every vCPU's registers once, while they still say something.
//!
//! Every period it asks each vCPU thread for a sample (the thread is kicked out of KVM_RUN
//! and answers from its own loop: only the thread that runs a vCPU may read its state):
//! RIP, RFLAGS, whether KVM holds it halted, and how many exits it made to the VMM. The
//! guest is *stuck* when
//! - a vCPU is halted with interrupts off in two samples in a row (only an NMI wakes it:
//!   the `cli; hlt` of a kernel that gave up, or a lost wake-up), or
//! - no vCPU exited to the VMM during the whole period while at least one was running or
//!   halted with interrupts off (a guest that does I/O exits all the time; one that only
//!   computes for that long is reported too, which is why the watchdog is opt-in).
//!
//! "Exited" counts what KVM saw the guest do, from each vCPU's binary statistics
//! (KVM_GET_STATS_FD, Linux 5.14+): all its VM exits but those for host interrupts
//! (`exits - irq_exits`), so that doorbells KVM completes itself (ioeventfds), EOIs and
//! halts count as progress, and a host timer tick does not. Without the statistics, the
//! exits to the VMM are counted instead.
//!
//! The report is one line saying why, then one line per vCPU with its full state (see
//! [`crate::vcpu`]); once per stall: it is logged again only after the guest made progress.
//! A vCPU thread that does not answer within a second is stuck in the VMM itself (a device
//! access that blocks): that is logged once too, with the vCPU's number.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What a vCPU thread is asked for.
const NOTHING: u8 = 0;
const SAMPLE: u8 = 1;
const REPORT: u8 = 2;

/// How long a vCPU thread may take to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// One vCPU's state as its thread saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub rip: u64,
    pub rflags: u64,
    /// KVM_MP_STATE_HALTED: waiting for an interrupt in the kernel.
    pub halted: bool,
    /// Exits to the VMM so far.
    pub exits: u64,
}

impl Sample {
    fn interrupts_on(&self) -> bool {
        self.rflags & (1 << 9) != 0
    }
}

/// A vCPU's KVM statistics: the two counters the watchdog reads.
pub struct KvmStats {
    fd: std::fs::File,
    exits: u64,
    irq_exits: u64,
}

impl KvmStats {
    /// Opens the statistics of the vCPU behind `vcpu_fd`; None when the kernel has none or
    /// lacks the two counters.
    pub fn open(vcpu_fd: std::os::fd::RawFd) -> Option<KvmStats> {
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::FileExt;
        // KVM_GET_STATS_FD: _IO(KVMIO, 0xce).
        const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;
        // SAFETY: an ioctl without argument on a vCPU fd the caller holds; it returns a new
        // fd or -1 (checked).
        let raw = unsafe { libc::ioctl(vcpu_fd, KVM_GET_STATS_FD as _) };
        if raw < 0 {
            return None;
        }
        // SAFETY: `raw` is a new fd nothing else owns.
        let fd = unsafe { std::fs::File::from_raw_fd(raw) };
        let mut header = [0u8; 24];
        fd.read_exact_at(&mut header, 0).ok()?;
        let word = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let (name_size, num_desc) = (word(&header, 4) as usize, word(&header, 8) as usize);
        let (desc_offset, data_offset) =
            (u64::from(word(&header, 16)), u64::from(word(&header, 20)));
        // struct kvm_stats_desc: flags u32, exponent s16, size u16, offset u32,
        // bucket_size u32, then the NUL-terminated name in `name_size` bytes.
        let desc_size = 16 + name_size;
        if name_size == 0 || name_size > 4096 || num_desc > 4096 {
            return None;
        }
        let mut descs = vec![0u8; desc_size * num_desc];
        fd.read_exact_at(&mut descs, desc_offset).ok()?;
        let (mut exits, mut irq_exits) = (None, None);
        for d in descs.chunks_exact(desc_size) {
            let name = &d[16..];
            let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
            let at = data_offset + u64::from(word(d, 8));
            match name {
                b"exits" => exits = Some(at),
                b"irq_exits" => irq_exits = Some(at),
                _ => {}
            }
        }
        Some(KvmStats {
            fd,
            exits: exits?,
            irq_exits: irq_exits?,
        })
    }

    /// The guest's own exits so far (all but host interrupts); None if unreadable.
    fn progress(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let read = |at: u64| {
            let mut b = [0u8; 8];
            self.fd
                .read_exact_at(&mut b, at)
                .ok()
                .map(|()| u64::from_le_bytes(b))
        };
        Some(read(self.exits)?.saturating_sub(read(self.irq_exits)?))
    }
}

#[derive(Default)]
struct Slot {
    exits: AtomicU64,
    ask: AtomicU8,
    answer: Mutex<Option<Sample>>,
}

/// Shared between the watchdog and the vCPU threads.
pub struct Probes {
    slots: Vec<Slot>,
    /// Each vCPU's KVM statistics, when the kernel has them (all or none are used).
    stats: Option<Vec<KvmStats>>,
}

impl Probes {
    /// For the vCPUs `vcpu_fds` (in order).
    pub fn new(vcpu_fds: &[std::os::fd::RawFd]) -> Arc<Probes> {
        let stats: Option<Vec<KvmStats>> = vcpu_fds.iter().map(|&fd| KvmStats::open(fd)).collect();
        if stats.is_none() {
            log::info!("watchdog: no KVM statistics for the vCPUs (Linux 5.14+): counting the exits to the VMM only");
        }
        Arc::new(Probes {
            slots: (0..vcpu_fds.len()).map(|_| Slot::default()).collect(),
            stats,
        })
    }

    #[cfg(test)]
    fn without_stats(vcpus: usize) -> Arc<Probes> {
        Arc::new(Probes {
            slots: (0..vcpus).map(|_| Slot::default()).collect(),
            stats: None,
        })
    }

    /// vCPU `id` made an exit to the VMM (its thread calls this; one relaxed add).
    pub fn exited(&self, id: usize) {
        if let Some(s) = self.slots.get(id) {
            s.exits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the watchdog asked vCPU `id` for something (its thread checks this at the
    /// top of its loop: one relaxed load).
    pub fn asked(&self, id: usize) -> bool {
        self.slots
            .get(id)
            .is_some_and(|s| s.ask.load(Ordering::Relaxed) != NOTHING)
    }

    /// Answers what the watchdog asked vCPU `id`: `read` samples the vCPU (its registers and
    /// state line), called on the vCPU's own thread.
    pub fn answer(&self, id: usize, read: impl FnOnce() -> (Sample, String)) {
        let Some(s) = self.slots.get(id) else {
            return;
        };
        let ask = s.ask.load(Ordering::Acquire);
        if ask == NOTHING {
            return;
        }
        let (mut sample, state) = read();
        sample.exits = match self.stats.as_ref().and_then(|v| v.get(id)) {
            Some(st) => st.progress().unwrap_or(0),
            None => s.exits.load(Ordering::Relaxed),
        };
        if ask == REPORT {
            log::error!(
                "watchdog: vcpu {id}: {} {state}",
                if sample.halted { "halted" } else { "running" }
            );
        }
        *s.answer.lock().unwrap_or_else(|p| p.into_inner()) = Some(sample);
        s.ask.store(NOTHING, Ordering::Release);
    }

    /// Asks every vCPU for `what` and waits (kicking them) until each answered or
    /// [`ANSWER_WITHIN`] passed: the samples, None for a vCPU that did not answer.
    fn collect(&self, what: u8, kick: &dyn Fn(usize)) -> Vec<Option<Sample>> {
        for s in &self.slots {
            *s.answer.lock().unwrap_or_else(|p| p.into_inner()) = None;
            s.ask.store(what, Ordering::Release);
        }
        let until = Instant::now() + ANSWER_WITHIN;
        loop {
            let waiting: Vec<usize> = (0..self.slots.len())
                .filter(|&i| self.slots[i].ask.load(Ordering::Acquire) != NOTHING)
                .collect();
            if waiting.is_empty() || Instant::now() >= until {
                break;
            }
            for &i in &waiting {
                kick(i);
            }
            thread::sleep(Duration::from_millis(2));
        }
        self.slots
            .iter()
            .map(|s| {
                s.ask.store(NOTHING, Ordering::Release);
                s.answer.lock().unwrap_or_else(|p| p.into_inner()).take()
            })
            .collect()
    }
}

/// Why the guest counts as stuck, given this period's samples and the last period's.
fn stuck(now: &[Option<Sample>], before: &[Option<Sample>]) -> Option<String> {
    let halted_off = |s: &Option<Sample>| s.is_some_and(|s| s.halted && !s.interrupts_on());
    let off: Vec<usize> = (0..now.len())
        .filter(|&i| halted_off(&now[i]) && before.get(i).is_some_and(halted_off))
        .collect();
    if !off.is_empty() {
        return Some(format!(
            "vcpu {} halted with interrupts off",
            off.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let known: Vec<(Sample, Sample)> = now
        .iter()
        .zip(before)
        .filter_map(|(n, b)| Some(((*n)?, (*b)?)))
        .collect();
    if known.len() != now.len() || known.is_empty() {
        return None;
    }
    let no_exits = known.iter().all(|(n, b)| n.exits == b.exits);
    let busy = known.iter().any(|(n, _)| !n.halted || !n.interrupts_on());
    (no_exits && busy).then(|| "no vCPU exited to the VMM while the guest ran".to_string())
}

/// The watchdog thread: sleeps a period, reads the vCPUs' KVM stats fds, kicks each vCPU
/// (the kick signal through pthread_kill) to make it answer a sample, logs.
pub const WATCHDOG: backends::sandbox::ThreadKind = backends::sandbox::ThreadKind {
    name: "watchdog",
    syscalls: &[
        &[
            backends::sandbox::allow(libc::SYS_pread64),
            backends::sandbox::allow(libc::SYS_read),
            backends::sandbox::allow(libc::SYS_lseek),
            // The kick signal is SIGRTMIN, which glibc sets at run time: not pinned.
            backends::sandbox::allow(libc::SYS_tgkill),
            backends::sandbox::allow(libc::SYS_getpid),
            // The stats fds, closed as the thread ends.
            backends::sandbox::allow(libc::SYS_close),
        ],
        crate::sandbox::COMMON_SYSCALLS,
    ],
};

/// Runs the watchdog until `stop`: every `period`, samples the vCPUs (`kick(i)` interrupts
/// vCPU `i`'s KVM_RUN) and reports a stuck guest once per stall.
pub fn run(
    probes: Arc<Probes>,
    period: Duration,
    stop: Arc<AtomicBool>,
    kick: impl Fn(usize),
    paused: impl Fn() -> bool,
) {
    let mut before: Vec<Option<Sample>> = vec![None; probes.slots.len()];
    let mut reported = false;
    let mut silent: Vec<bool> = vec![false; probes.slots.len()];
    loop {
        let until = Instant::now() + period;
        while Instant::now() < until {
            if stop.load(Ordering::Acquire) {
                return;
            }
            thread::sleep(Duration::from_millis(50).min(period));
        }
        if paused() {
            // A paused guest makes no progress on purpose, and its vCPU threads are parked
            // (they answer no sample): start over once it runs again.
            before = vec![None; probes.slots.len()];
            reported = false;
            continue;
        }
        let now = probes.collect(SAMPLE, &kick);
        for (i, s) in now.iter().enumerate() {
            if s.is_none() && !silent[i] && !stop.load(Ordering::Acquire) {
                log::error!(
                    "watchdog: vcpu {i} did not come back to its loop within {} ms: it is blocked in the VMM (a device access that waits)",
                    ANSWER_WITHIN.as_millis()
                );
            }
            silent[i] = s.is_none();
        }
        match stuck(&now, &before) {
            Some(why) if !reported => {
                log::error!(
                    "watchdog: the guest made no progress for {} s ({why}); every vCPU's state follows",
                    period.as_secs_f64()
                );
                probes.collect(REPORT, &kick);
                reported = true;
            }
            Some(_) => {}
            None => reported = false,
        }
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(rip: u64, if_on: bool, halted: bool, exits: u64) -> Option<Sample> {
        Some(Sample {
            rip,
            rflags: if if_on { 0x202 } else { 0x2 },
            halted,
            exits,
        })
    }

    #[test]
    fn an_idle_guest_is_not_stuck() {
        // Both vCPUs halted with interrupts on, no exits: a tickless idle guest.
        let before = [s(1, true, true, 5), s(2, true, true, 9)];
        let now = [s(1, true, true, 5), s(2, true, true, 9)];
        assert_eq!(stuck(&now, &before), None);
    }

    #[test]
    fn a_guest_doing_io_is_not_stuck() {
        let before = [s(1, true, false, 5), s(2, false, false, 9)];
        let now = [s(7, true, false, 5), s(3, false, false, 10)];
        assert_eq!(stuck(&now, &before), None);
    }

    #[test]
    fn a_running_guest_without_exits_is_stuck() {
        let before = [s(1, true, false, 5), s(2, true, true, 9)];
        let now = [s(1, true, false, 5), s(2, true, true, 9)];
        assert!(stuck(&now, &before).unwrap().contains("no vCPU exited"));
    }

    #[test]
    fn halted_with_interrupts_off_twice_is_stuck_whatever_the_others_do() {
        let before = [s(1, true, false, 5), s(2, false, true, 9)];
        let now = [s(9, true, false, 50), s(2, false, true, 9)];
        assert_eq!(
            stuck(&now, &before).as_deref(),
            Some("vcpu 1 halted with interrupts off")
        );
        // Once is not enough (a `cli; hlt` about to be woken by an NMI).
        let before = [s(1, true, false, 5), s(2, true, false, 9)];
        assert_eq!(stuck(&now, &before), None);
    }

    #[test]
    fn a_vcpu_that_did_not_answer_decides_nothing() {
        let before = [s(1, true, false, 5), None];
        let now = [s(1, true, false, 5), s(2, true, false, 9)];
        assert_eq!(stuck(&now, &before), None);
    }

    #[test]
    fn collect_kicks_until_answered_and_gives_up_on_a_silent_vcpu() {
        let probes = Probes::without_stats(2);
        let p = probes.clone();
        let kicks = AtomicU64::new(0);
        let started = Instant::now();
        let got = probes.collect(SAMPLE, &|i| {
            kicks.fetch_add(1, Ordering::Relaxed);
            // vCPU 0 answers when kicked; vCPU 1 never does (blocked in the VMM).
            if i == 0 {
                p.exited(0);
                p.answer(0, || {
                    (
                        Sample {
                            rip: 0x1000,
                            ..Sample::default()
                        },
                        String::new(),
                    )
                });
            }
        });
        assert_eq!(got[0].map(|s| (s.rip, s.exits)), Some((0x1000, 1)));
        assert_eq!(got[1], None);
        assert!(started.elapsed() >= ANSWER_WITHIN);
        assert!(kicks.load(Ordering::Relaxed) > 2);
        // Nothing stays asked: the vCPU threads' check stays a load of zero.
        assert!(!probes.asked(0) && !probes.asked(1));
    }
}
