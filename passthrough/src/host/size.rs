//! Sizes as people write them (`512M`, `2G`) and read them (`8 MiB`, `1 GiB`).

/// A size that is not `N`, `NK`, `NM`, `NG` or `NT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size '{0}': expected a number of bytes with an optional K, M, G or T suffix, like 512M or 2G")]
pub struct SizeError(pub String);

/// Parses `512M`, `2G`, `64K`, `1T` or a plain number of bytes (binary units; `MiB`-style
/// and `MB`-style suffixes are accepted and mean the same).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let bad = || SizeError(s.to_string());
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (num, suffix) = lower.split_at(digits_end);
    let shift = match suffix.trim_start() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Formats a byte count for people: `8 MiB`, `1 GiB`, `1088 MiB`, `1.5 KiB`, `512 B`.
/// Exact when a unit divides the count (using the largest such unit while the number stays
/// below 10000), otherwise one decimal in the largest unit that fits.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in UNITS {
        let unit = 1u64 << shift;
        if bytes >= unit && bytes % unit == 0 && bytes / unit < 10_000 {
            return format!("{} {name}", bytes / unit);
        }
    }
    for (name, shift) in UNITS {
        let unit = 1u64 << shift;
        if bytes >= unit {
            return format!("{:.1} {name}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in [
            "",
            "M",
            "12Q",
            "-1G",
            "1.5G",
            "99999999999999999999",
            "20000000T",
        ] {
            assert_eq!(parse_size(bad), Err(SizeError(bad.to_string())), "{bad:?}");
        }
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(8 << 20), "8 MiB");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size((1 << 30) + (64 << 20)), "1088 MiB");
        assert_eq!(format_size(3 << 40), "3 TiB");
        assert_eq!(format_size(1536), "1.5 KiB");
    }
}
