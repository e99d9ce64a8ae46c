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
//!   with no exit code of the guest's choosing).

/// What the command line asks for.
#[derive(Debug, Default)]
pub struct Args<'a> {
    pub exit: u32,
    pub msg: Option<&'a [u8]>,
    pub fault: Option<Failure>,
}

/// A failure to cause on purpose (`fault=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Panic,
    InvalidOpcode,
    PageFault,
    Breakpoint,
    GeneralProtection,
    TripleFault,
}

/// A command line word the guest cannot use.
#[derive(Debug)]
pub enum Error<'a> {
    BadNumber { key: &'a str, value: &'a [u8] },
    UnknownFault(&'a [u8]),
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
                write!(f, ": expected panic, ud, pf, bp, gp or triple")
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

fn parse_u32(value: &[u8]) -> Option<u32> {
    let (digits, radix) = match value {
        [b'0', b'x' | b'X', hex @ ..] => (hex, 16),
        _ => (value, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u32 = 0;
    for &d in digits {
        let digit = (d as char).to_digit(radix)?;
        n = n.checked_mul(radix)?.checked_add(digit)?;
    }
    Some(n)
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
            b"fault" => {
                args.fault = Some(match value {
                    b"panic" => Failure::Panic,
                    b"ud" => Failure::InvalidOpcode,
                    b"pf" => Failure::PageFault,
                    b"bp" => Failure::Breakpoint,
                    b"gp" => Failure::GeneralProtection,
                    b"triple" => Failure::TripleFault,
                    _ => return Err(Error::UnknownFault(value)),
                });
            }
            _ => {}
        }
    }
    Ok(args)
}
