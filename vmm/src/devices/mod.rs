//! Platform devices: COM1, i8042 (reset only), the debug-exit port and ACPI power control.

pub mod legacy;
pub mod serial;
