//! CMOS RTC and NVRAM at ports 0x70/0x71: the time of day from the host clock (UTC, BCD,
//! 24-hour), update never in progress, so Linux reads the clock in a few exits instead of
//! spinning on the UIP bit.

use crate::bus::BusDevice;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const STATUS_A: usize = 0x0a;
const STATUS_B: usize = 0x0b;
const STATUS_C: usize = 0x0c;
const STATUS_D: usize = 0x0d;
const CENTURY: usize = 0x32;

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tm {
    pub sec: u8,
    pub min: u8,
    pub hour: u8,
    pub wday: u8,
    pub mday: u8,
    pub mon: u8,
    pub year: u16,
}

/// Converts seconds since the epoch to UTC (civil-from-days, valid for any date after 1970).
pub fn utc(epoch: u64) -> Tm {
    let days = epoch / 86400;
    let rem = epoch % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    Tm {
        sec: (rem % 60) as u8,
        min: ((rem / 60) % 60) as u8,
        hour: (rem / 3600) as u8,
        // 1970-01-01 was a Thursday; RTC weekdays run 1 (Sunday) to 7.
        wday: ((days + 4) % 7) as u8 + 1,
        mday: d as u8,
        mon: m as u8,
        year: y as u16,
    }
}

fn bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    now: Box<dyn Fn() -> u64 + Send>,
}

impl Cmos {
    /// `mem_below_4g` and `mem_above_4g` fill the NVRAM size bytes firmware conventionally
    /// keeps there (0x34/0x35: RAM above 16 MiB in 64 KiB units, 0x5b..0x5d: above 4 GiB).
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        Self::with_clock(mem_below_4g, mem_above_4g, || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        })
    }

    pub fn with_clock(
        mem_below_4g: u64,
        mem_above_4g: u64,
        now: impl Fn() -> u64 + Send + 'static,
    ) -> Self {
        let mut nvram = [0u8; 128];
        let above_16m = (mem_below_4g.saturating_sub(16 << 20) >> 16).min(0xffff);
        nvram[0x34] = above_16m as u8;
        nvram[0x35] = (above_16m >> 8) as u8;
        let high = mem_above_4g >> 16;
        nvram[0x5b] = high as u8;
        nvram[0x5c] = (high >> 8) as u8;
        nvram[0x5d] = (high >> 16) as u8;
        Cmos {
            index: 0,
            nvram,
            now: Box::new(now),
        }
    }

    fn reg(&self, index: usize) -> u8 {
        let t = utc((self.now)());
        match index {
            SECONDS => bcd(t.sec),
            MINUTES => bcd(t.min),
            HOURS => bcd(t.hour),
            WEEKDAY => bcd(t.wday),
            DAY => bcd(t.mday),
            MONTH => bcd(t.mon),
            YEAR => bcd((t.year % 100) as u8),
            CENTURY => bcd((t.year / 100) as u8),
            // Divider on, 1024 Hz, update not in progress.
            STATUS_A => 0x26,
            // 24-hour, BCD.
            STATUS_B => 0x02,
            STATUS_C => 0,
            // Valid RAM and time.
            STATUS_D => 0x80,
            i => self.nvram[i & 0x7f],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.index,
            _ => self.reg(usize::from(self.index & 0x7f)),
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            // Bit 7 is the NMI mask on real hardware; keep only the index.
            0 => self.index = v & 0x7f,
            _ => {
                let i = usize::from(self.index & 0x7f);
                // Time and status registers follow the host clock; the rest is NVRAM.
                if i > STATUS_D && i != CENTURY {
                    self.nvram[i] = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(
            utc(0),
            Tm {
                sec: 0,
                min: 0,
                hour: 0,
                wday: 5,
                mday: 1,
                mon: 1,
                year: 1970
            }
        );
        // 2026-11-24 10:05:07 UTC, a Tuesday.
        let t = utc(1_795_514_707);
        assert_eq!((t.year, t.mon, t.mday), (2026, 11, 24));
        assert_eq!((t.hour, t.min, t.sec), (10, 5, 7));
        assert_eq!(t.wday, 3);
        // Leap day.
        let t = utc(951_782_400);
        assert_eq!((t.year, t.mon, t.mday), (2000, 2, 29));
    }

    fn read(c: &mut Cmos, i: u8) -> u8 {
        c.write(0, &[i]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn registers() {
        let mut c = Cmos::with_clock(512 << 20, 0, || 1_795_514_707);
        assert_eq!(read(&mut c, 0x00), 0x07);
        assert_eq!(read(&mut c, 0x02), 0x05);
        assert_eq!(read(&mut c, 0x04), 0x10);
        assert_eq!(read(&mut c, 0x07), 0x24);
        assert_eq!(read(&mut c, 0x08), 0x11);
        assert_eq!(read(&mut c, 0x09), 0x26);
        assert_eq!(read(&mut c, 0x32), 0x20);
        assert_eq!(read(&mut c, 0x0a) & 0x80, 0, "no update in progress");
        assert_eq!(read(&mut c, 0x0d), 0x80);
        // NMI-disable bit is ignored for the index.
        assert_eq!(read(&mut c, 0x80), 0x07);
        // NVRAM keeps what is written; time registers do not.
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        c.write(0, &[0x00]);
        c.write(1, &[0x59]);
        assert_eq!(read(&mut c, 0x00), 0x07);
        // 512 MiB: 496 MiB above 16 MiB = 0x1f00 x 64 KiB.
        assert_eq!(read(&mut c, 0x34), 0x00);
        assert_eq!(read(&mut c, 0x35), 0x1f);
    }
}
