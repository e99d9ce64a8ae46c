//! kvm-smoke: proves /dev/kvm runs a guest. Creates a VM with 64 KiB of memory and one vCPU
//! in real mode that runs
//!
//! ```text
//! 0x1000: mov ax, 0x1234
//!         add ax, 0x0101
//!         out 0x80, al
//!         mov bx, ax
//!         hlt
//! ```
//!
//! and checks the exits (an I/O write of 0x35 to port 0x80, then HLT) and the registers
//! (ax = bx = 0x1335). Prints `KVM-SMOKE OK ...` and exits 0, or `KVM-SMOKE FAIL <why>` and
//! exits 1. Used by the lab self-test (tests/tests/lab_selftest.rs) inside L1.

use std::process::ExitCode;
use std::ptr::null_mut;
use std::time::Instant;

use kvm_bindings::{kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};

const MEM_SIZE: usize = 0x10000;
const CODE_ADDR: u64 = 0x1000;
const CODE: [u8; 11] = [
    0xb8, 0x34, 0x12, // mov ax, 0x1234
    0x05, 0x01, 0x01, // add ax, 0x0101
    0xe6, 0x80, // out 0x80, al
    0x89, 0xc3, // mov bx, ax
    0xf4, // hlt
];

/// Anonymous guest memory, unmapped on drop.
struct GuestMem {
    addr: *mut libc::c_void,
    len: usize,
}

impl GuestMem {
    fn new(len: usize) -> Result<Self, String> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!(
                "mmap of guest memory: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(GuestMem { addr, len })
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        // SAFETY: the range is inside our mapping (checked above) and nothing else aliases it.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.addr.cast::<u8>(), self.len) };
        dst[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in new(); the VM using it is gone.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

fn smoke() -> Result<String, String> {
    // Declared before the VM, so that it is unmapped after the VM is gone on every path.
    let mut mem = GuestMem::new(MEM_SIZE)?;
    mem.write(CODE_ADDR as usize, &CODE);
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.addr as u64,
    };
    // SAFETY: the region is our live mapping of MEM_SIZE bytes, and `mem` outlives `vm`
    // (declared before it; dropped after it below).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let regs = kvm_regs {
        rip: CODE_ADDR,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;

    let start = Instant::now();
    let mut io = None;
    let mut exits = 0;
    loop {
        exits += 1;
        if exits > 16 {
            return Err("no HLT after 16 exits".into());
        }
        match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::IoOut(port, data) => io = Some((port, data.to_vec())),
            VcpuExit::Hlt => break,
            other => return Err(format!("unexpected exit {other:?}")),
        }
    }
    let took = start.elapsed();
    let regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    if io != Some((0x80, vec![0x35])) {
        return Err(format!("expected out 0x80 <- 0x35, got {io:?}"));
    }
    if regs.rax & 0xffff != 0x1335 || regs.rbx & 0xffff != 0x1335 {
        return Err(format!(
            "expected ax = bx = 0x1335, got rax={:#x} rbx={:#x}",
            regs.rax, regs.rbx
        ));
    }
    drop(vcpu);
    drop(vm);
    drop(kvm);
    drop(mem);
    Ok(format!(
        "exits={exits} io=0x80:0x35 ax=0x1335 rip={:#x} run_us={}",
        regs.rip,
        took.as_micros()
    ))
}

fn main() -> ExitCode {
    match smoke() {
        Ok(summary) => {
            println!("KVM-SMOKE OK {summary}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("KVM-SMOKE FAIL {why}");
            ExitCode::FAILURE
        }
    }
}
