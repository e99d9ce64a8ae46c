//! Output on the 8250 UART at COM1, by polling (no interrupts, no FIFO set-up).
//!
//! The UART is used as the firmware or VMM left it: writing THR works on QEMU's and
//! vm-superio's 8250 without programming the divisor or line control.

use core::fmt;

use crate::pio;

const COM1: u16 = 0x3f8;
const THR: u16 = 0;
const LSR: u16 = 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// COM1 as a `fmt::Write` sink.
pub struct Serial;

impl Serial {
    pub fn write_byte(&mut self, byte: u8) {
        // SAFETY: COM1's LSR and THR: reading LSR and writing THR only affect the UART.
        unsafe {
            while pio::inb(COM1 + LSR) & LSR_THR_EMPTY == 0 {
                core::hint::spin_loop();
            }
            pio::outb(COM1 + THR, byte);
        }
    }

    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_byte(b);
        }
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// `print!` to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::serial::Serial, $($arg)*);
    }};
}

/// `println!` to COM1, each line prefixed with `test-guest: `.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::serial::Serial, "test-guest: {}", format_args!($($arg)*));
    }};
}
