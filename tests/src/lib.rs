//! Test fixtures: the ring-3 test guest, the lab (Linux guests inside QEMU TCG), and
//! host-level helpers (namespaces, taps, daemons) that clean up after themselves, and the
//! latency bench.

pub mod bench;
pub mod guest;
pub mod host;
pub mod lab;
pub mod probe;
pub mod soak;
