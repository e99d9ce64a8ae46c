//! The SIGSYS handler: the one-line report of a syscall a thread's filter does not allow.
//!
//! The filters end in SECCOMP_RET_TRAP, so the kernel does not run such a syscall and
//! sends the thread SIGSYS with the syscall's number. The handler writes, with write(2) to
//! fd 2 from a stack buffer (no allocation, no lock: it may interrupt anything):
//!
//! `vhost-user-blk: seccomp: thread 'vring-worker' (tid 1234) made syscall getpgid (121),
//! not in its filter: process killed (run with --seccomp log to list what it needs)`
//!
//! - `on`: then SIGSYS goes back to its default action and is sent to the thread again:
//!   when the handler returns, the process dies of SIGSYS (as with SECCOMP_RET_KILL_PROCESS,
//!   but with the report first).
//! - `log`: the line says `allowed (--seccomp log)`, is printed once per thread kind and
//!   syscall, and the handler makes the syscall itself with the thread's arguments (from the
//!   saved registers) and puts the result in the saved RAX, so the thread goes on as if
//!   nothing was filtered. The handler's syscalls go through [`trampoline`], a six-instruction
//!   function whose `syscall` is the one place a `log` filter lets everything through: the
//!   filter starts with a check of `seccomp_data.instruction_pointer` (the address after that
//!   `syscall`) before seccompiler's program. In `on` mode the check is absent (it would let
//!   any code that can jump there past the filter), and the handler's own calls are in every
//!   filter instead ([`super::HANDLER_SYSCALLS`], with their arguments pinned).
//!
//! Why not SECCOMP_RET_LOG for `log`: the kernel logs to the audit log without naming the
//! thread's kind, and nothing reaches the daemon's stderr. Why not SECCOMP_RET_USER_NOTIF: a
//! supervisor thread, and the notification fd, for a debugging mode.
//!
//! Syscalls that cannot be made from a handler on the thread's behalf (they return twice, or
//! on another stack: clone, clone3, fork, vfork, execve, execveat, rt_sigreturn) are
//! reported and fail with ENOSYS in `log` mode. rt_sigprocmask is applied to the signal
//! mask saved in the handler's context (what rt_sigreturn restores), not to the handler's,
//! and never blocks SIGSYS (the kernel kills a thread whose filter traps while SIGSYS is
//! blocked).

use std::io;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use seccompiler::sock_filter;

use super::{thread_kind, MAX_KINDS, MODE, MODE_LOG};

std::arch::global_asm!(
    ".text",
    ".globl backends_sandbox_trampoline",
    ".type backends_sandbox_trampoline,@function",
    "backends_sandbox_trampoline:",
    "mov rax, rdi",
    "mov rdi, rsi",
    "mov rsi, rdx",
    "mov rdx, rcx",
    "mov r10, r8",
    "mov r8, r9",
    "mov r9, [rsp + 8]",
    "syscall",
    ".globl backends_sandbox_trampoline_ret",
    "backends_sandbox_trampoline_ret:",
    "ret",
    ".size backends_sandbox_trampoline, . - backends_sandbox_trampoline",
);

extern "C" {
    /// syscall(nr, a0..a5): the raw result (-errno on failure).
    fn backends_sandbox_trampoline(
        nr: i64,
        a0: u64,
        a1: u64,
        a2: u64,
        a3: u64,
        a4: u64,
        a5: u64,
    ) -> i64;
    /// The address right after the trampoline's `syscall` instruction.
    static backends_sandbox_trampoline_ret: u8;
}

/// A syscall through the trampoline (raw result, -errno on failure).
fn trampoline(nr: i64, a: [u64; 6]) -> i64 {
    // SAFETY: the trampoline only moves the arguments into the syscall registers and makes
    // the syscall; callers pass syscalls and arguments that are valid for them.
    unsafe { backends_sandbox_trampoline(nr, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

/// The instruction pointer seccomp sees for a syscall made by the trampoline.
fn trampoline_ip() -> u64 {
    std::ptr::addr_of!(backends_sandbox_trampoline_ret) as u64
}

const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

/// The `log` filter's first instructions: a syscall of this architecture made at the
/// trampoline's address is allowed; anything else goes on to the program that follows
/// (jumps are relative, so the block is self-contained).
pub(super) fn trampoline_prefix() -> Vec<sock_filter> {
    let ip = trampoline_ip();
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        ins(BPF_LD_W_ABS, 0, 0, 4),              // 0: arch
        ins(BPF_JEQ_K, 0, 5, AUDIT_ARCH_X86_64), // 1: else to 7
        ins(BPF_LD_W_ABS, 0, 0, 8),              // 2: instruction_pointer, low half
        ins(BPF_JEQ_K, 0, 3, ip as u32),         // 3: else to 7
        ins(BPF_LD_W_ABS, 0, 0, 12),             // 4: high half
        ins(BPF_JEQ_K, 0, 1, (ip >> 32) as u32), // 5: else to 7
        ins(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW), // 6
    ]
}

/// The program name the report starts with (a `&'static str` leaked once).
static PROGRAM: AtomicPtr<&'static str> = AtomicPtr::new(std::ptr::null_mut());

/// `log` mode: which (kind, syscall) pairs were reported, one bit each.
const NR_BITS: usize = 512;
static REPORTED: [AtomicU64; MAX_KINDS * NR_BITS / 64] =
    [const { AtomicU64::new(0) }; MAX_KINDS * NR_BITS / 64];

/// Reports issued (tests).
pub static REPORTS: AtomicUsize = AtomicUsize::new(0);

/// Installs the SIGSYS handler for the process.
pub(super) fn install(program: &'static str) -> io::Result<()> {
    PROGRAM.store(Box::into_raw(Box::new(program)), Ordering::Release);
    // SAFETY: a zeroed sigaction is valid plain data; the fields are filled below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa.sa_mask` is a valid sigset_t; sigemptyset initialises it.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: `sa` is initialised; the handler is async-signal-safe (see `handler`).
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SYS_SECCOMP: si_code of a SIGSYS sent by seccomp.
const SYS_SECCOMP: i32 = 1;

/// Syscalls the handler cannot make on the thread's behalf.
const NOT_REISSUED: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_rt_sigreturn,
];

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if sig != libc::SIGSYS || info.is_null() || ctx.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo_t; si_code is at offset 8 and, for SIGSYS
    // with SYS_SECCOMP, the syscall number (`_sigsys._syscall`) at offset 24.
    let (code, nr) = unsafe {
        let p = info.cast::<u8>();
        (
            p.add(8).cast::<i32>().read_unaligned(),
            p.add(24).cast::<i32>().read_unaligned(),
        )
    };
    if code != SYS_SECCOMP {
        return;
    }
    let log = MODE.load(Ordering::Acquire) == MODE_LOG;
    let (kind, slot) = thread_kind();
    let nr = i64::from(nr);
    let first = !log || first_report(slot, nr);
    let tid = trampoline(libc::SYS_gettid, [0; 6]);
    let reissue = log && !NOT_REISSUED.contains(&nr);
    if first {
        REPORTS.fetch_add(1, Ordering::Relaxed);
        let mut comm = [0u8; 17];
        let name: &[u8] = if kind.is_empty() {
            trampoline(
                libc::SYS_prctl,
                [
                    libc::PR_GET_NAME as u64,
                    comm.as_mut_ptr() as u64,
                    0,
                    0,
                    0,
                    0,
                ],
            );
            let n = comm.iter().position(|&b| b == 0).unwrap_or(16);
            &comm[..n]
        } else {
            kind.as_bytes()
        };
        let mut line = Line::new();
        let program = PROGRAM.load(Ordering::Acquire);
        if !program.is_null() {
            // SAFETY: set once in `install` from a leaked Box, never freed.
            line.push(unsafe { *program }.as_bytes());
            line.push(b": ");
        }
        line.push(b"seccomp: thread '");
        line.push(name);
        line.push(b"' (tid ");
        line.num(tid);
        line.push(b") made syscall ");
        match usize::try_from(nr).ok().and_then(syscalls::Sysno::new) {
            Some(s) => line.push(s.name().as_bytes()),
            None => line.push(b"?"),
        }
        line.push(b" (");
        line.num(nr);
        line.push(b"), not in its filter: ");
        if !log {
            line.push(b"process killed (run with --seccomp log to list what it needs)\n");
        } else if reissue {
            line.push(b"allowed (--seccomp log)\n");
        } else {
            line.push(b"failed with ENOSYS (--seccomp log cannot make it for the thread)\n");
        }
        let b = line.bytes();
        trampoline(
            libc::SYS_write,
            [2, b.as_ptr() as u64, b.len() as u64, 0, 0, 0],
        );
    }
    // SAFETY: for SA_SIGINFO handlers the third argument is the thread's saved ucontext_t,
    // writable: rt_sigreturn restores the registers from it.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    if !log {
        // Default action, then SIGSYS again: it is blocked while this handler runs and is
        // delivered, fatally, as the handler returns.
        let dfl = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        trampoline(
            libc::SYS_rt_sigaction,
            [libc::SIGSYS as u64, &dfl as *const _ as u64, 0, 8, 0, 0],
        );
        let pid = trampoline(libc::SYS_getpid, [0; 6]);
        trampoline(
            libc::SYS_tgkill,
            [pid as u64, tid as u64, libc::SIGSYS as u64, 0, 0, 0],
        );
        uc.uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::ENOSYS);
        return;
    }
    let r = if nr == libc::SYS_rt_sigprocmask {
        sigprocmask_in(uc)
    } else if reissue {
        let g = &uc.uc_mcontext.gregs;
        let a = [
            g[libc::REG_RDI as usize] as u64,
            g[libc::REG_RSI as usize] as u64,
            g[libc::REG_RDX as usize] as u64,
            g[libc::REG_R10 as usize] as u64,
            g[libc::REG_R8 as usize] as u64,
            g[libc::REG_R9 as usize] as u64,
        ];
        trampoline(nr, a)
    } else {
        -i64::from(libc::ENOSYS)
    };
    uc.uc_mcontext.gregs[libc::REG_RAX as usize] = r;
}

/// rt_sigprocmask(how, set, oldset, 8) on the mask the thread gets back when the handler
/// returns (the kernel's sigset is the first 8 bytes of glibc's).
fn sigprocmask_in(uc: &mut libc::ucontext_t) -> i64 {
    let g = &uc.uc_mcontext.gregs;
    let (how, set, old, size) = (
        g[libc::REG_RDI as usize] as i32,
        g[libc::REG_RSI as usize] as usize as *const u64,
        g[libc::REG_RDX as usize] as usize as *mut u64,
        g[libc::REG_R10 as usize] as u64,
    );
    if size != 8 {
        return -i64::from(libc::EINVAL);
    }
    let mask = std::ptr::addr_of_mut!(uc.uc_sigmask).cast::<u64>();
    // SAFETY: `mask` points into the saved context, at least 8 bytes (a glibc sigset_t is
    // 128); the thread passed `old` and `set` to rt_sigprocmask as 8-byte sigsets (size
    // checked), so they are its own memory, as the kernel would have used them.
    unsafe {
        let cur = mask.read_unaligned();
        if !old.is_null() {
            old.write_unaligned(cur);
        }
        if set.is_null() {
            return 0;
        }
        // SIGKILL and SIGSTOP cannot be blocked; SIGSYS stays deliverable, or the next
        // unlisted syscall would kill the process (the kernel forces a blocked SIGSYS).
        let s = set.read_unaligned()
            & !((1 << (libc::SIGKILL - 1))
                | (1 << (libc::SIGSTOP - 1))
                | (1 << (libc::SIGSYS - 1)));
        let new = match how {
            libc::SIG_BLOCK => cur | s,
            libc::SIG_UNBLOCK => cur & !s,
            libc::SIG_SETMASK => s,
            _ => return -i64::from(libc::EINVAL),
        };
        mask.write_unaligned(new);
    }
    0
}

/// The kernel's `struct sigaction` for rt_sigaction (not glibc's).
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Whether (slot, nr) is reported for the first time (and marks it).
fn first_report(slot: usize, nr: i64) -> bool {
    let Ok(n) = usize::try_from(nr) else {
        return true;
    };
    if n >= NR_BITS || slot >= MAX_KINDS {
        return true;
    }
    let bit = slot * NR_BITS + n;
    let old = REPORTED[bit / 64].fetch_or(1 << (bit % 64), Ordering::Relaxed);
    old & (1 << (bit % 64)) == 0
}

/// A line built on the stack.
struct Line {
    buf: [u8; 320],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; 320],
            len: 0,
        }
    }
    fn push(&mut self, s: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }
    fn num(&mut self, v: i64) {
        if v < 0 {
            self.push(b"-");
        }
        let mut v = v.unsigned_abs();
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}
