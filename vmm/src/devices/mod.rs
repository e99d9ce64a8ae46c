//! Platform devices: COM1, the CMOS RTC, i8042 (reset only), the debug-exit port and ACPI power control.

pub mod cmos;
pub mod legacy;
pub mod serial;
