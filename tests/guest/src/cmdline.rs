//! The command line: whitespace-separated `key=value` words; a value may be double-quoted
//! to hold spaces (`msg="hello world"`). Unknown words are ignored (a VMM may add its own).
//!
//! Keys:
//! - `exit=N`: the code written to the debug-exit port at the end (decimal or `0x` hex,
//!   default 0).
//! - `msg=TEXT`: a line to print.
//! - `fault=KIND`: fail on purpose after printing, to test the failure paths: `panic`, `ud`
//!   (invalid opcode), `pf` (page fault), `bp` (`int3`), `gp` (`hlt` in ring 3), `triple`
//!   (an exception whose handler faults with no usable IDT: a triple fault, which ends the VM
//!   with no exit code of the guest's choosing); or stop making progress without ending:
//!   `spin` (a ring-3 loop that never exits to the VMM) and `halt` (`cli; hlt` in ring 0, a
//!   vCPU that only an NMI could wake), for the VMM's watchdog.
//!
//! Probe keys (see [`crate::probe`]); without `probe=` the guest only does the above:
//! - `probe=blk|net`: run the virtio-blk or the virtio-net probe.
//! - `n=N`: measured operations per test (default 1000); `warmup=N`: unmeasured ones before
//!   (default 100).
//! - `seed=N`: the image seed and the random sequence's seed (default 1).
//! - `tests=LIST`: comma-separated blk tests: `read` (QD1 random 4 KiB reads), `write` (QD1
//!   random 4 KiB writes), `qd32` (random reads at queue depth `qd=`, 1 to 64, default 32).
//!   Default: all.
//! - `ip=A.B.C.D`, `peer=A.B.C.D`: the net probe's address and the echo target (defaults
//!   192.0.2.2 and 192.0.2.1); `size=N`: ICMP payload bytes (default 56).
//! - `phases=N`: the net probe runs N times (ARP, then `n` echoes; one `probe-result` line
//!   each, default 1), idle for `gap_ms=M` milliseconds between phases (default 0, no frame
//!   sent meanwhile): a host test can restart the back-end in the gap.
//!
//! `hostile_pci=LIST`: hostile BAR moves against the VMM's PCI root with two virtio-blk
//! disks (see [`crate::hostile_pci`]); `seed=` is the first disk's image seed.

/// What the command line asks for.
#[derive(Debug)]
pub struct Args<'a> {
    pub exit: u32,
    pub msg: Option<&'a [u8]>,
    pub fault: Option<Failure>,
    pub probe: Option<Probe>,
    pub n: u32,
    pub warmup: u32,
    pub seed: u64,
    /// Bit set of `TEST_*`.
    pub tests: u32,
    pub qd: u32,
    pub ip: [u8; 4],
    pub peer: [u8; 4],
    pub size: u32,
    pub phases: u32,
    pub gap_ms: u32,
    /// `hostile_pci=LIST`: the modes of [`crate::hostile_pci`].
    pub hostile_pci: Option<&'a [u8]>,
}

impl Default for Args<'_> {
    fn default() -> Self {
        Args {
            exit: 0,
            msg: None,
            fault: None,
            probe: None,
            n: 1000,
            warmup: 100,
            seed: 1,
            tests: TEST_READ | TEST_WRITE | TEST_QD,
            qd: 32,
            ip: [192, 0, 2, 2],
            peer: [192, 0, 2, 1],
            size: 56,
            phases: 1,
            gap_ms: 0,
            hostile_pci: None,
        }
    }
}

/// Which probe to run (`probe=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Blk,
    Net,
}

pub const TEST_READ: u32 = 1 << 0;
pub const TEST_WRITE: u32 = 1 << 1;
pub const TEST_QD: u32 = 1 << 2;

/// A failure to cause on purpose (`fault=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Panic,
    InvalidOpcode,
    PageFault,
    Breakpoint,
    GeneralProtection,
    TripleFault,
    Spin,
    HaltInterruptsOff,
}

/// A command line word the guest cannot use.
#[derive(Debug)]
pub enum Error<'a> {
    BadNumber { key: &'a str, value: &'a [u8] },
    UnknownFault(&'a [u8]),
    UnknownProbe(&'a [u8]),
    UnknownTest(&'a [u8]),
    BadAddress { key: &'a str, value: &'a [u8] },
}

impl core::fmt::Display for Error<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::BadNumber { key, value } => {
                write!(f, "{key}=")?;
                write_escaped(f, value)?;
                write!(f, ": not a number")
            }
            Error::UnknownFault(value) => {
                write!(f, "fault=")?;
                write_escaped(f, value)?;
                write!(f, ": expected panic, ud, pf, bp, gp, triple, spin or halt")
            }
            Error::UnknownProbe(value) => {
                write!(f, "probe=")?;
                write_escaped(f, value)?;
                write!(f, ": expected blk or net")
            }
            Error::UnknownTest(value) => {
                write!(f, "tests: ")?;
                write_escaped(f, value)?;
                write!(f, ": expected read, write or qd32")
            }
            Error::BadAddress { key, value } => {
                write!(f, "{key}=")?;
                write_escaped(f, value)?;
                write!(f, ": not an IPv4 address")
            }
        }
    }
}

/// Writes bytes as text, non-printable ones as `\xNN`.
pub fn write_escaped(w: &mut dyn core::fmt::Write, bytes: &[u8]) -> core::fmt::Result {
    for &b in bytes {
        if b == b' ' || b.is_ascii_graphic() {
            w.write_char(b as char)?;
        } else {
            write!(w, "\\x{b:02x}")?;
        }
    }
    Ok(())
}

/// Splits the command line into words: runs of non-whitespace, where double quotes group
/// (and are removed from the start and end of the value).
struct Words<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Words<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let start = self.rest.iter().position(|b| !b.is_ascii_whitespace())?;
        let s = &self.rest[start..];
        let mut quoted = false;
        let mut end = s.len();
        for (i, &b) in s.iter().enumerate() {
            if b == b'"' {
                quoted = !quoted;
            } else if b.is_ascii_whitespace() && !quoted {
                end = i;
                break;
            }
        }
        self.rest = &s[end..];
        Some(&s[..end])
    }
}

fn unquote(value: &[u8]) -> &[u8] {
    let value = value.strip_prefix(b"\"").unwrap_or(value);
    value.strip_suffix(b"\"").unwrap_or(value)
}

pub fn parse_u64(value: &[u8]) -> Option<u64> {
    let (digits, radix) = match value {
        [b'0', b'x' | b'X', hex @ ..] => (hex, 16),
        _ => (value, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &d in digits {
        let digit = (d as char).to_digit(radix)?;
        n = n
            .checked_mul(u64::from(radix))?
            .checked_add(u64::from(digit))?;
    }
    Some(n)
}

fn parse_u32(value: &[u8]) -> Option<u32> {
    parse_u64(value).and_then(|n| u32::try_from(n).ok())
}

fn parse_ipv4(value: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = value.split(|&b| b == b'.');
    for o in &mut out {
        let n = parse_u32(parts.next()?)?;
        *o = u8::try_from(n).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Parses `cmdline`.
pub fn parse(cmdline: &[u8]) -> Result<Args<'_>, Error<'_>> {
    let mut args = Args::default();
    for word in (Words { rest: cmdline }) {
        let Some(eq) = word.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&word[..eq], unquote(&word[eq + 1..]));
        match key {
            b"exit" => {
                args.exit = parse_u32(value).ok_or(Error::BadNumber { key: "exit", value })?;
            }
            b"msg" => args.msg = Some(value),
            b"hostile_pci" => args.hostile_pci = Some(value),
            b"probe" => {
                args.probe = Some(match value {
                    b"blk" => Probe::Blk,
                    b"net" => Probe::Net,
                    _ => return Err(Error::UnknownProbe(value)),
                });
            }
            b"n" => args.n = parse_u32(value).ok_or(Error::BadNumber { key: "n", value })?,
            b"warmup" => {
                args.warmup = parse_u32(value).ok_or(Error::BadNumber {
                    key: "warmup",
                    value,
                })?;
            }
            b"seed" => {
                args.seed = parse_u64(value).ok_or(Error::BadNumber { key: "seed", value })?
            }
            b"qd" => args.qd = parse_u32(value).ok_or(Error::BadNumber { key: "qd", value })?,
            b"size" => {
                args.size = parse_u32(value).ok_or(Error::BadNumber { key: "size", value })?
            }
            b"phases" => {
                args.phases = parse_u32(value).ok_or(Error::BadNumber {
                    key: "phases",
                    value,
                })?;
            }
            b"gap_ms" => {
                args.gap_ms = parse_u32(value).ok_or(Error::BadNumber {
                    key: "gap_ms",
                    value,
                })?;
            }
            b"ip" => args.ip = parse_ipv4(value).ok_or(Error::BadAddress { key: "ip", value })?,
            b"peer" => {
                args.peer = parse_ipv4(value).ok_or(Error::BadAddress { key: "peer", value })?;
            }
            b"tests" => {
                args.tests = 0;
                for t in value.split(|&b| b == b',').filter(|t| !t.is_empty()) {
                    args.tests |= match t {
                        b"read" => TEST_READ,
                        b"write" => TEST_WRITE,
                        b"qd32" | b"qd" => TEST_QD,
                        _ => return Err(Error::UnknownTest(t)),
                    };
                }
            }
            b"fault" => {
                args.fault = Some(match value {
                    b"panic" => Failure::Panic,
                    b"ud" => Failure::InvalidOpcode,
                    b"pf" => Failure::PageFault,
                    b"bp" => Failure::Breakpoint,
                    b"gp" => Failure::GeneralProtection,
                    b"triple" => Failure::TripleFault,
                    b"spin" => Failure::Spin,
                    b"halt" => Failure::HaltInterruptsOff,
                    _ => return Err(Error::UnknownFault(value)),
                });
            }
            _ => {}
        }
    }
    Ok(args)
}
