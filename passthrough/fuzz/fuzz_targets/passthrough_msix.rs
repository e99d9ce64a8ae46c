//! `cargo fuzz` target: the MSI-X table and PBA emulation (`passthrough::msix::Msix`, shared
//! by assigned devices and the vmm's virtio devices) driven by an arbitrary sequence of
//! guest accesses and device raises, against the fake interrupt router.
//!
//! Input: the vector count (`1 + first byte % 40`, so the PBA spans more than one qword), then
//! operations `[op, a, b]` followed by the data bytes a write takes. `op & 7`:
//! - 0: Message Control: enable `a & 1`, function mask `a & 2`
//! - 1: table write of `[1, 2, 4, 8, 3][op >> 3 % 5]` bytes at `b:a` (16 bits: in range,
//!   misaligned, straddling entries and far beyond)
//! - 2: table read of the same sizes at `b:a`
//! - 3: PBA read of `1 + (op >> 3 & 7)` bytes at `a`
//! - 4: the device raises vector `a`
//! - 5..7: a whole entry written as a driver does (address, data, then control `b & 1`)
//!   for vector `a`
//!
//! After every operation: exactly the deliverable vectors (enabled, function unmasked,
//! entry unmasked) have their irqfd attached; each attached vector's route is the message
//! its table entry holds now; the table reads back what was written.
#![no_main]

use std::collections::BTreeSet;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use passthrough::interrupt::fake::FakeRouter;
use passthrough::msix::{Msix, MSIX_ENABLE, MSIX_FUNCTION_MASK};

fn check(m: &Msix, router: &FakeRouter) {
    let attached: BTreeSet<u32> = router
        .irqfds
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, &on)| on)
        .map(|(&g, _)| g)
        .collect();
    let live: BTreeSet<u32> = m.live_gsis().into_iter().collect();
    assert_eq!(attached, live, "attached irqfds vs deliverable vectors");
    let routes = router.routes.lock().unwrap();
    for v in 0..m.count() {
        let mut e = [0u8; 16];
        m.read_table(u64::from(v) * 16, &mut e);
        let gsi = m.gsi(v).expect("every vector has a GSI");
        if !live.contains(&gsi) {
            continue;
        }
        let route = routes.get(&gsi).expect("a live vector has a route");
        let word = |k: usize| u32::from_le_bytes([e[k], e[k + 1], e[k + 2], e[k + 3]]);
        assert_eq!(
            (route.addr_lo, route.addr_hi, route.data),
            (word(0), word(4), word(8)),
            "vector {v}: the route is not the entry's message"
        );
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&count, mut rest)) = input.split_first() else {
        return;
    };
    let router = Arc::new(FakeRouter::default());
    let mut m = Msix::new(1 + u16::from(count % 40), router.clone()).expect("eventfds");
    let mut ops = 0;
    while rest.len() >= 3 && ops < 1024 {
        let (op, a, b) = (rest[0], rest[1], rest[2]);
        rest = &rest[3..];
        ops += 1;
        let at = u64::from(b) << 8 | u64::from(a);
        match op & 7 {
            0 => {
                let mut c = 0;
                if a & 1 != 0 {
                    c |= MSIX_ENABLE;
                }
                if a & 2 != 0 {
                    c |= MSIX_FUNCTION_MASK;
                }
                m.set_control(c);
            }
            1 => {
                let len = [1usize, 2, 4, 8, 3][usize::from(op >> 3) % 5].min(rest.len());
                let (data, tail) = rest.split_at(len);
                let before = {
                    let mut e = vec![0u8; len];
                    m.read_table(at, &mut e);
                    e
                };
                m.write_table(at, data);
                let mut after = vec![0u8; len];
                m.read_table(at, &mut after);
                // An accepted write (dword or qword inside one entry) reads back, the
                // control word keeping only its mask bit; anything else changes nothing.
                let field = (at % 16) as usize;
                let accepted = (len == 4 || len == 8)
                    && field % 4 == 0
                    && field + len <= 16
                    && at / 16 < u64::from(m.count());
                if !accepted {
                    assert_eq!(
                        before, after,
                        "an ignored write changed the table at {at:#x}"
                    );
                } else if field + len <= 12 {
                    assert_eq!(after, data, "a table write did not read back at {at:#x}");
                }
                rest = tail;
            }
            2 => {
                let len = [1usize, 2, 4, 8, 3][usize::from(op >> 3) % 5];
                let mut e = vec![0u8; len];
                m.read_table(at, &mut e);
            }
            3 => {
                let mut p = vec![0u8; 1 + usize::from(op >> 3 & 7)];
                m.read_pba(u64::from(a), &mut p);
            }
            4 => {
                if let Some(fd) = m.irqfd(u16::from(a)) {
                    let _ = fd.expect("dup of an eventfd").write(1);
                }
            }
            _ => {
                let e = u64::from(a) * 16;
                m.write_table(e, &(0xfee0_0000u32 | u32::from(b) << 12).to_le_bytes());
                m.write_table(e + 4, &0u32.to_le_bytes());
                m.write_table(e + 8, &u32::from(op).to_le_bytes());
                m.write_table(e + 12, &u32::from(b & 1).to_le_bytes());
            }
        }
        check(&m, &router);
    }
});
