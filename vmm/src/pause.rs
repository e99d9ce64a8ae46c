//! Pausing the guest (`vm.pause` / `vm.resume` on the control API): every vCPU thread out of
//! KVM_RUN and parked until resumed.
//!
//! A vCPU thread calls [`PauseGate::checkpoint`] before each KVM_RUN: without a pause that
//! is one atomic load. [`PauseGate::pause`] raises the flag and kicks the vCPU threads (the
//! kick signal interrupts KVM_RUN; a kick that lands just before a thread enters it is lost,
//! so it repeats) until every one has parked, within a deadline. A parked thread also wakes
//! for the VM's stop flag, so SIGTERM and a guest-independent shutdown end a paused VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often a parked vCPU thread looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// The pause flag and the vCPU threads parked on it.
#[derive(Default)]
pub struct PauseGate {
    paused: AtomicBool,
    parked: Mutex<usize>,
    cv: Condvar,
}

impl PauseGate {
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A vCPU thread before KVM_RUN: parks while the VM is paused and `stop` is not set.
    pub fn checkpoint(&self, stop: &AtomicBool) {
        if !self.is_paused() {
            return;
        }
        let mut parked = self.lock();
        *parked += 1;
        self.cv.notify_all();
        while self.is_paused() && !stop.load(Ordering::Acquire) {
            parked = self
                .cv
                .wait_timeout(parked, STOP_CHECK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *parked -= 1;
        self.cv.notify_all();
    }

    /// Pauses: raises the flag, then kicks (`kick`) until all `vcpus` threads parked. Past
    /// `deadline` the pause is taken back and the error says how many had parked.
    pub fn pause(&self, vcpus: usize, kick: &dyn Fn(), deadline: Duration) -> Result<(), String> {
        if self.paused.swap(true, Ordering::AcqRel) {
            return Err("the VM is already paused".into());
        }
        let start = Instant::now();
        let mut parked = self.lock();
        while *parked < vcpus {
            if start.elapsed() > deadline {
                let n = *parked;
                drop(parked);
                self.resume();
                return Err(format!(
                    "{n} of {vcpus} vCPUs stopped within {} ms (one is busy in the vmm): \
                     the VM keeps running",
                    deadline.as_millis()
                ));
            }
            drop(parked);
            kick();
            parked = self.lock();
            parked = self
                .cv
                .wait_timeout(parked, Duration::from_millis(2))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Resumes: the parked vCPU threads go back into KVM_RUN.
    pub fn resume(&self) {
        let _parked = self.lock();
        self.paused.store(false, Ordering::Release);
        self.cv.notify_all();
    }

    /// vCPU threads parked now.
    pub fn parked(&self) -> usize {
        *self.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    /// Threads that "run the guest" (count rounds) and pass the checkpoint each round.
    fn spin(
        gate: &Arc<PauseGate>,
        stop: &Arc<AtomicBool>,
        n: usize,
    ) -> Vec<(thread::JoinHandle<()>, Arc<std::sync::atomic::AtomicU64>)> {
        (0..n)
            .map(|_| {
                let (g, s) = (gate.clone(), stop.clone());
                let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let r = rounds.clone();
                let t = thread::spawn(move || {
                    while !s.load(Ordering::Acquire) {
                        g.checkpoint(&s);
                        r.fetch_add(1, Ordering::Relaxed);
                        thread::sleep(Duration::from_micros(200));
                    }
                });
                (t, rounds)
            })
            .collect()
    }

    #[test]
    fn pause_parks_every_thread_resume_releases_them_stop_ends_them() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = spin(&gate, &stop, 3);
        gate.pause(3, &|| {}, Duration::from_secs(5)).unwrap();
        assert!(gate.is_paused());
        assert_eq!(gate.parked(), 3);
        let before: Vec<u64> = threads
            .iter()
            .map(|(_, r)| r.load(Ordering::Relaxed))
            .collect();
        thread::sleep(Duration::from_millis(50));
        let after: Vec<u64> = threads
            .iter()
            .map(|(_, r)| r.load(Ordering::Relaxed))
            .collect();
        assert_eq!(before, after, "no thread ran while paused");
        assert_eq!(
            gate.pause(3, &|| {}, Duration::from_secs(1)),
            Err("the VM is already paused".into())
        );
        gate.resume();
        thread::sleep(Duration::from_millis(50));
        let resumed: Vec<u64> = threads
            .iter()
            .map(|(_, r)| r.load(Ordering::Relaxed))
            .collect();
        assert!(
            resumed.iter().zip(&after).all(|(r, a)| r > a),
            "{resumed:?} {after:?}"
        );
        // Paused again, then stopped: the parked threads end.
        gate.pause(3, &|| {}, Duration::from_secs(5)).unwrap();
        stop.store(true, Ordering::Release);
        for (t, _) in threads {
            t.join().unwrap();
        }
        assert_eq!(gate.parked(), 0);
    }

    #[test]
    fn a_thread_that_never_comes_back_fails_the_pause_within_the_deadline() {
        let gate = PauseGate::default();
        let t = Instant::now();
        let e = gate
            .pause(1, &|| {}, Duration::from_millis(100))
            .unwrap_err();
        assert!(e.contains("0 of 1 vCPUs stopped"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(!gate.is_paused(), "a failed pause is taken back");
    }
}
