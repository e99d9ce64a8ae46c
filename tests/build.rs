//! Builds the ring-3 PVH test guest (`guest/`) into OUT_DIR and exports its path to the
//! package's code as the compile-time variable `TEST_GUEST_ELF`.
//!
//! The guest is compiled by invoking rustc directly for the host target as a freestanding
//! static ELF: it uses only `core`, so no extra rustup target is needed. A failed guest
//! build fails this build, with the compiler's output.

use std::env;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());

    let guest_dir = manifest_dir.join("guest");
    let main_rs = guest_dir.join("src").join("main.rs");
    let linker_script = guest_dir.join("link.ld");
    let elf = out_dir.join("test-guest.elf");

    println!("cargo:rerun-if-changed={}", guest_dir.join("src").display());
    println!("cargo:rerun-if-changed={}", linker_script.display());
    println!(
        "cargo:rerun-if-changed={}",
        guest_dir.join("Cargo.toml").display()
    );

    let mut args: Vec<OsString> = [
        "--edition=2021",
        "--crate-name=test_guest",
        "--crate-type=bin",
        "-Cpanic=abort",
        "-Copt-level=2",
        // Absolute addresses below 2 GiB: no PIE, no GOT.
        "-Crelocation-model=static",
        "-Cforce-unwind-tables=no",
        "-Cstrip=debuginfo",
        "-Clink-arg=-nostdlib",
        "-Clink-arg=-static",
        "-Clink-arg=-no-pie",
        "-Clink-arg=-Wl,--build-id=none",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    let mut script_arg = OsString::from("-Clink-arg=-Wl,-T,");
    script_arg.push(&linker_script);
    args.push(script_arg);
    // Panic messages name `tests/guest/src/...`, not this checkout's absolute path.
    let mut remap = OsString::from("--remap-path-prefix=");
    remap.push(&guest_dir);
    remap.push("=tests/guest");
    args.push(remap);
    args.push("-o".into());
    args.push(elf.clone().into());
    args.push(main_rs.into());

    let mut cmd = Command::new(&rustc);
    cmd.args(&args)
        // Flags meant for the main build (e.g. `-C target-cpu=native`) must not reach the guest.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS");
    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} to build the test guest: {e}",
            rustc.to_string_lossy()
        )
    });
    if !output.status.success() {
        panic!(
            "building the test guest failed ({}):\n{cmd:?}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    println!("cargo:rustc-env=TEST_GUEST_ELF={}", elf.display());
}
