//! PCI addresses: `0000:3b:00.0`, `3b:00.0`, or a sysfs path ending in one.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// A PCI address (domain, bus, device, function), printed as sysfs names it: `0000:3b:00.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// PCI segment (domain). Usually 0; VMD domains go above 0xffff.
    pub domain: u32,
    pub bus: u8,
    /// 0..=31.
    pub device: u8,
    /// 0..=7.
    pub function: u8,
}

/// Why a string is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BdfError {
    #[error("invalid PCI address '{0}': expected DOMAIN:BUS:DEVICE.FUNCTION like 0000:3b:00.0, BUS:DEVICE.FUNCTION like 3b:00.0, or a sysfs path like /sys/bus/pci/devices/0000:3b:00.0")]
    Syntax(String),
    #[error("invalid PCI address '{0}': the device number must be 00 to 1f")]
    DeviceOutOfRange(String),
    #[error("invalid PCI address '{0}': the function number must be 0 to 7")]
    FunctionOutOfRange(String),
    #[error(
        "invalid PCI device path '{0}': its last component is not a PCI address like 0000:3b:00.0"
    )]
    NotADevicePath(String),
}

impl Bdf {
    pub const fn new(domain: u32, bus: u8, device: u8, function: u8) -> Self {
        Self {
            domain,
            bus,
            device,
            function,
        }
    }

    /// Parses a BDF (`0000:3b:00.0`, `3b:00.0`) or a sysfs device path whose last component is
    /// one (`/sys/bus/pci/devices/0000:3b:00.0`, `/sys/devices/pci0000:00/0000:00:02.0/`).
    /// The path is not looked at on disk: whether the device exists is
    /// [`Host::inspect`](super::Host::inspect)'s business.
    pub fn parse(s: &str) -> Result<Self, BdfError> {
        let t = s.trim();
        if t.contains('/') {
            let name = Path::new(t)
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| BdfError::NotADevicePath(s.to_string()))?;
            // A sysfs name always carries the domain.
            if name.matches(':').count() != 2 {
                return Err(BdfError::NotADevicePath(s.to_string()));
            }
            return Self::parse_bdf(name, s).map_err(|e| match e {
                BdfError::Syntax(_) => BdfError::NotADevicePath(s.to_string()),
                other => other,
            });
        }
        Self::parse_bdf(t, s)
    }

    fn parse_bdf(t: &str, input: &str) -> Result<Self, BdfError> {
        let syntax = || BdfError::Syntax(input.to_string());
        let parts: Vec<&str> = t.split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [d, b, df] => (hex::<u32>(d, 8).ok_or_else(syntax)?, *b, *df),
            [b, df] => (0, *b, *df),
            _ => return Err(syntax()),
        };
        let bus = hex::<u8>(bus, 2).ok_or_else(syntax)?;
        let (dev, func) = devfn.split_once('.').ok_or_else(syntax)?;
        let device = hex::<u8>(dev, 2).ok_or_else(syntax)?;
        let function = hex::<u8>(func, 1).ok_or_else(syntax)?;
        if device > 0x1f {
            return Err(BdfError::DeviceOutOfRange(input.to_string()));
        }
        if function > 7 {
            return Err(BdfError::FunctionOutOfRange(input.to_string()));
        }
        Ok(Self::new(domain, bus, device, function))
    }
}

/// 1..=`max_digits` hex digits, nothing else (no sign, no `0x`).
fn hex<T: TryFrom<u32>>(s: &str, max_digits: usize) -> Option<T> {
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16)
        .ok()
        .and_then(|v| T::try_from(v).ok())
}

impl FromStr for Bdf {
    type Err = BdfError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_short_and_path_forms() {
        let want = Bdf::new(0, 0x3b, 0, 0);
        assert_eq!(Bdf::parse("0000:3b:00.0"), Ok(want));
        assert_eq!(Bdf::parse("3b:00.0"), Ok(want));
        assert_eq!(Bdf::parse("3B:00.0"), Ok(want));
        assert_eq!(Bdf::parse(" 0000:3b:00.0\n"), Ok(want));
        assert_eq!(Bdf::parse("/sys/bus/pci/devices/0000:3b:00.0"), Ok(want));
        assert_eq!(Bdf::parse("/sys/bus/pci/devices/0000:3b:00.0/"), Ok(want));
        assert_eq!(
            Bdf::parse("/sys/devices/pci0000:00/0000:00:1c.0/0000:3b:00.0"),
            Ok(want)
        );
        assert_eq!(
            Bdf::parse("10000:01:1f.7"),
            Ok(Bdf::new(0x10000, 1, 0x1f, 7))
        );
    }

    #[test]
    fn display_is_the_sysfs_name() {
        assert_eq!(Bdf::new(0, 0x3b, 2, 1).to_string(), "0000:3b:02.1");
        assert_eq!(Bdf::parse("0:1:2.3").unwrap().to_string(), "0000:01:02.3");
    }

    #[test]
    fn bad_input() {
        for s in [
            "",
            "3b",
            "3b:00",
            "3b.00.0",
            "0000:3b:00:0",
            "zz:00.0",
            "3b:00.",
            "3b:00.0x",
            "0x3b:00.0",
            "1:2:3:4.0",
            "123:00.0",
            "-1:00.0",
            "000000000:00:00.0",
        ] {
            assert_eq!(Bdf::parse(s), Err(BdfError::Syntax(s.to_string())), "{s:?}");
        }
        assert_eq!(
            Bdf::parse("3b:20.0"),
            Err(BdfError::DeviceOutOfRange("3b:20.0".into()))
        );
        assert_eq!(
            Bdf::parse("3b:00.8"),
            Err(BdfError::FunctionOutOfRange("3b:00.8".into()))
        );
        for s in [
            "/sys/bus/pci/devices",
            "/sys/bus/pci/devices/3b:00.0",
            "/sys/bus/pci/devices/eth0",
            "/",
        ] {
            assert_eq!(
                Bdf::parse(s),
                Err(BdfError::NotADevicePath(s.to_string())),
                "{s:?}"
            );
        }
        let msg = Bdf::parse("nope").unwrap_err().to_string();
        assert!(!msg.contains('\n'));
        assert!(
            msg.contains("'nope'") && msg.contains("0000:3b:00.0"),
            "{msg}"
        );
    }
}
