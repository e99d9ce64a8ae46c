//! x86_64 specifics: CPUID, boot-time registers, kernel loading.

pub mod boot;
pub mod cpuid;
pub mod regs;
