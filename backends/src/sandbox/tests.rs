use super::*;

#[test]
fn modes_parse_and_bad_ones_say_what_is_expected() {
    assert_eq!("on".parse::<SeccompMode>(), Ok(SeccompMode::On));
    assert_eq!("log".parse::<SeccompMode>(), Ok(SeccompMode::Log));
    assert_eq!("off".parse::<SeccompMode>(), Ok(SeccompMode::Off));
    let e = "yes".parse::<SeccompMode>().unwrap_err();
    assert!(
        e.contains("'yes'") && e.contains("on") && e.contains("log"),
        "{e}"
    );
    assert_eq!("off".parse::<Switch>(), Ok(Switch::Off));
    assert!("1".parse::<Switch>().is_err());
}

const A: &[Rule] = &[allow(libc::SYS_read), allow_if(libc::SYS_ioctl, &[(1, 5)])];
const B: &[Rule] = &[allow(libc::SYS_ioctl)];

#[test]
fn filters_compile_per_mode_and_log_starts_with_the_trampoline_check() {
    let k = ThreadKind {
        name: "a",
        syscalls: &[A],
    };
    assert!(compile(&k.into(), SeccompMode::Off).unwrap().is_none());
    let on = compile(&k.into(), SeccompMode::On).unwrap().unwrap();
    let log = compile(&k.into(), SeccompMode::Log).unwrap().unwrap();
    assert_eq!(log.len(), on.len() + 7);
    assert_eq!(&log[7..], &on[..]);
    // A conditional rule merged with an unconditional one for the same syscall is
    // unconditional: the program is shorter than with the condition alone.
    let both = ThreadKind {
        name: "b",
        syscalls: &[B],
    };
    let merged = compile(&k.with(&[both]), SeccompMode::On).unwrap().unwrap();
    assert!(merged.len() < on.len(), "{} vs {}", merged.len(), on.len());
}

#[test]
fn user_specs_resolve() {
    let root: user::User = "root".parse().unwrap();
    assert_eq!((root.uid, root.gid), (0, 0));
    let n: user::User = "1234:55".parse().unwrap();
    assert_eq!((n.uid, n.gid), (1234, 55));
    assert!(matches!(
        "no-such-user-here".parse::<user::User>(),
        Err(user::UserError::Unknown(_))
    ));
    assert!(matches!(
        "root:x".parse::<user::User>(),
        Err(user::UserError::Syntax(_))
    ));
}

/// The kernel has Landlock enabled (an ABI version >= 1), or not: the daemons' tests then
/// require enforcement.
#[test]
fn kernel_abi_is_a_version_or_zero() {
    assert!(landlock::kernel_abi() >= 0);
}

/// Runs test `name` of this module again in a new process of this test binary, as the
/// seccomp child ([`seccomp_child`]) in `mode`: a filter installed there stays for the
/// process, and `on` kills it.
#[cfg(target_arch = "x86_64")]
fn run_child(name: &str, mode: &str) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    std::process::Command::new(exe)
        .args([
            "--exact",
            &format!("sandbox::tests::{name}"),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_MODE, mode)
        .output()
        .unwrap()
}

/// Set in the child process: the test runs [`seccomp_child`] instead of its checks.
#[cfg(target_arch = "x86_64")]
const CHILD_MODE: &str = "SANDBOX_TEST_MODE";

/// The syscall the child makes: not in its list.
#[cfg(target_arch = "x86_64")]
fn forbidden() -> i64 {
    // SAFETY: getpgid(0) only returns the caller's process group.
    unsafe { libc::syscall(libc::SYS_getpgid, 0) }
}

/// The child's part: the clock syscalls allowed to every kind, then a syscall outside its
/// list, twice.
#[cfg(target_arch = "x86_64")]
fn seccomp_child(mode: &str) {
    let mode: SeccompMode = mode.parse().unwrap();
    init("sandbox-test", mode).unwrap();
    // SAFETY: getpgid(0) only returns the caller's process group.
    let want = unsafe { libc::getpgid(0) } as i64;
    const NONE: &[Rule] = &[allow(libc::SYS_futex), allow(libc::SYS_write)];
    enter(ThreadKind {
        name: "test-kind",
        syscalls: &[NONE],
    })
    .unwrap();
    // The clocks as real syscalls (what the vDSO falls back to on a clocksource it cannot
    // read, as in the lab's L1): allowed to every thread kind.
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    for nr in [libc::SYS_clock_gettime, libc::SYS_clock_getres] {
        // SAFETY: `ts` is a valid timespec for the kernel to fill.
        let r = unsafe { libc::syscall(nr, libc::CLOCK_MONOTONIC, &mut ts) };
        assert_eq!(r, 0, "clock syscall {nr}");
    }
    // SAFETY: a null timeval and timezone are allowed; time(NULL) writes nothing.
    unsafe {
        assert_eq!(
            libc::syscall(
                libc::SYS_gettimeofday,
                std::ptr::null_mut::<u8>(),
                std::ptr::null_mut::<u8>()
            ),
            0
        );
        assert!(libc::syscall(libc::SYS_time, std::ptr::null_mut::<u8>()) > 0);
    }
    let a = forbidden();
    let b = forbidden();
    // Only reached in log mode.
    assert_eq!((a, b), (want, want), "the syscall ran with its result");
    println!("CHILD-OK");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn seccomp_on_reports_the_thread_and_syscall_then_kills() {
    if let Ok(m) = std::env::var(CHILD_MODE) {
        return seccomp_child(&m);
    }
    use std::os::unix::process::ExitStatusExt;
    let out = run_child("seccomp_on_reports_the_thread_and_syscall_then_kills", "on");
    let err = String::from_utf8_lossy(&out.stderr);
    let want = "sandbox-test: seccomp: thread 'test-kind' (tid ";
    let line = err
        .lines()
        .find(|l| l.starts_with(want))
        .unwrap_or_else(|| panic!("no report in: {err}"));
    assert!(
        line.ends_with(
            ") made syscall getpgid (121), not in its filter: process killed (run with \
             --seccomp log to list what it needs)"
        ),
        "{line}"
    );
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("CHILD-OK"));
}

#[cfg(target_arch = "x86_64")]
#[test]
fn seccomp_log_reports_once_and_the_syscall_runs() {
    if let Ok(m) = std::env::var(CHILD_MODE) {
        return seccomp_child(&m);
    }
    let out = run_child("seccomp_log_reports_once_and_the_syscall_runs", "log");
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("made syscall getpgid (121)"))
        .collect();
    assert_eq!(lines.len(), 1, "one report for two calls: {err}");
    assert!(
        lines[0].starts_with("sandbox-test: seccomp: thread 'test-kind' (tid ")
            && lines[0].ends_with("not in its filter: allowed (--seccomp log)"),
        "{}",
        lines[0]
    );
    assert!(stdout.contains("CHILD-OK"), "{stdout}\n{err}");
    assert!(out.status.success(), "{err}");
}
