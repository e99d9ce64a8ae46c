//! Reads of pre-existing data behind QEMU (issue 19, "Must show 0"): QEMU (TCG, directly on
//! this host, guest RAM in a shared memfd) is the frontend of our `vhost-user-blk` for a
//! Linux guest, on a 64 MiB image whose first 8 MiB and last 1 MiB are random, written
//! before the daemon starts (a fresh random image every boot). The guest reads them back
//! through several request sizes (4 KiB to 1 MiB), cold and warm in its page cache and with
//! O_DIRECT, and copies every read onto a second disk (QEMU's own virtio-blk on a scratch
//! file); after QEMU exits the test compares every byte of every read with its copy of the
//! image and names each wrong 4 KiB block: zeros, another block of the disk, or neither.
//!
//! 6 boots per QEMU version: 7.2 (Debian's) and 10.0 (bookworm-backports, fetched by
//! `scripts/lab/qemu10` into target/), each with its own firmware: mostly qboot (the
//! quickest boot and reproduction), every third boot SeaBIOS. The defect below showed in
//! every boot (its O_DIRECT reads), so six catch it; CI time is better spent elsewhere
//! (`VU_READS_BOOTS=20` for the longer run the fix was first proven with). QEMU's vhost-user-blk-pci
//! keeps its defaults (`queue-size=128`), as users start it.
//!
//! What it caught (December 2026, 40 of 40 boots wrong): the daemon (`--queue-size 256`)
//! offered `seg_max` 254; Linux's virtio_blk trusts it and, with indirect descriptors,
//! builds chains of up to 256 descriptors for a 1 MiB request made of scattered pages; the
//! daemon refused chains longer than the queue QEMU set up (128) and wrote the IOERR status
//! into the last byte of the last writable descriptor it had walked, a data page, so the
//! guest saw its stale status (OK) and a buffer never filled: zeros, one 0x01 byte. Buffered
//! cold reads hit it when readahead's pages are scattered (8 boots in 10), O_DIRECT
//! reads after the guest scatters its free memory ([`Before::Fragment`]) every time.
//!
//! Knobs (environment): `VU_READS_BOOTS` (boots per version, default 6),
//! `VU_READS_DAEMON_ARGS` (extra daemon arguments, e.g. `--queue-size 128`),
//! `VU_READS_DEVICE_OPTS` (appended to QEMU's `-device vhost-user-blk-pci,chardev=c0`, e.g.
//! `,queue-size=256`), `RUST_LOG` (passed to the daemon). No networking: QEMU runs with
//! `-nodefaults` and no `-netdev`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::host::{Daemon, ScratchDir};
use tests::lab::{profile_dir, repo_root, DirectGuest};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4 * KIB;
/// The image the daemon serves.
const DISK: u64 = 64 * MIB;
/// The random parts of the image; the rest is zeros.
const RANDOM: [(u64, u64); 2] = [(0, 8 * MIB), (DISK - MIB, MIB)];
/// Filler of the read-out disk: a byte no read wrote stays this.
const UNWRITTEN: u8 = 0x5a;
/// One boot's limit (a boot takes well under a minute).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Found in each QEMU's own data directory (`-L`, else the system's /usr/share/qemu).
const QBOOT: &str = "qboot.rom";

/// One read in the guest: `len` bytes at `off` of the disk, `bs` per read(2).
struct Read {
    name: &'static str,
    off: u64,
    len: u64,
    bs: u64,
    direct: bool,
    /// What the guest does first.
    before: Before,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Before {
    Nothing,
    /// `echo 3 > /proc/sys/vm/drop_caches`.
    DropCaches,
    /// Free every other page of [`FRAG_FILES`] one-page files of the initramfs: from then
    /// on the page cache and dd's buffers are made of scattered pages, one descriptor
    /// each, so every 1 MiB request has as many segments as the driver allows.
    Fragment,
}

/// One-page files in the guest's initramfs (`/frag/N`), freed every other by
/// [`Before::Fragment`] (4 MiB of scattered free pages: dd's 1 MiB buffer fits, again and
/// again).
const FRAG_FILES: usize = 2048;

const fn rd(name: &'static str, off: u64, len: u64, bs: u64, direct: bool) -> Read {
    Read {
        name,
        off,
        len,
        bs,
        direct,
        before: Before::Nothing,
    }
}

/// In this order. The guest keeps the disk open throughout (fd 3), so its page cache
/// survives from one `dd` to the next (Linux drops a block device's cache at its last
/// close): "cold" reads are of ranges not read through the cache before, "warm" ones of
/// ranges read before. The first one is the issue's `dd if=/dev/vda bs=1M count=1`; the
/// first four read as a freshly booted guest does (its free memory mostly contiguous), the
/// rest after the guest's free memory was scattered ([`Before::Fragment`]).
const READS: &[Read] = &[
    rd("cold-1M", 0, MIB, MIB, false),
    rd("cold-256K", MIB, MIB, 256 * KIB, false),
    rd("cold-64K", 2 * MIB, MIB, 64 * KIB, false),
    rd("cold-4K", 3 * MIB, MIB, 4 * KIB, false),
    Read {
        before: Before::Fragment,
        ..rd("direct-1M", 4 * MIB, MIB, MIB, true)
    },
    rd("direct-256K", 5 * MIB, MIB, 256 * KIB, true),
    rd("direct-64K", 6 * MIB, MIB, 64 * KIB, true),
    rd("direct-4K", 7 * MIB, MIB, 4 * KIB, true),
    rd("direct-1M-all", 0, 8 * MIB, MIB, true),
    rd("cold-1M-rest", 4 * MIB, 4 * MIB, MIB, false),
    rd("warm-1M-all", 0, 8 * MIB, MIB, false),
    rd("warm-4K-all", 0, 8 * MIB, 4 * KIB, false),
    Read {
        before: Before::DropCaches,
        ..rd("recold-1M-all", 0, 8 * MIB, MIB, false)
    },
    rd("end-direct-1M", DISK - MIB, MIB, MIB, true),
    rd("end-cold-1M", DISK - MIB, MIB, MIB, false),
    rd("end-warm-64K", DISK - MIB, MIB, 64 * KIB, false),
];

/// Where each read's copy starts on the read-out disk, and that disk's size.
fn out_layout() -> (Vec<u64>, u64) {
    let mut at = 0;
    let offs = READS
        .iter()
        .map(|r| {
            let o = at;
            at += r.len;
            o
        })
        .collect();
    // Never the size of the disk under test: the guest tells them apart by size.
    (offs, at + MIB)
}

fn guest_script() -> String {
    let (outs, out_size) = out_layout();
    let mut s = String::new();
    let _ = write!(
        s,
        r#"in=; out=
for d in /sys/block/vd*; do
    case "$(cat $d/size)" in
    {in_sectors}) in=/dev/${{d##*/}} ;;
    {out_sectors}) out=/dev/${{d##*/}} ;;
    esac
done
if [ -z "$in" ] || [ -z "$out" ]; then echo "RD-ERR no disks: $(ls /sys/block)"; exit 1; fi
q=/sys/block/${{in#/dev/}}/queue
echo "RD-QUEUE max_segments=$(cat $q/max_segments) max_sectors_kb=$(cat $q/max_sectors_kb)"
exec 3<"$in"
rd() {{
    dd if="$in" of="$out" bs=$2 skip=$3 count=$4 seek=$5 conv=notrunc $6 2>/tmp/dd.err
    rc=$?
    echo "RD $1 rc=$rc up=$(cut -d' ' -f1 /proc/uptime)"
    [ $rc = 0 ] || sed 's/^/RD-ERR /' /tmp/dd.err
}}
"#,
        in_sectors = DISK / 512,
        out_sectors = out_size / 512,
    );
    for (r, out) in READS.iter().zip(outs) {
        match r.before {
            Before::Nothing => {}
            Before::DropCaches => s.push_str("sync; echo 3 >/proc/sys/vm/drop_caches\n"),
            Before::Fragment => s.push_str("rm /frag/*[02468]\n"),
        }
        let _ = writeln!(
            s,
            "rd {} {} {} {} {} {}",
            r.name,
            r.bs,
            r.off / r.bs,
            r.len / r.bs,
            out / r.bs,
            if r.direct { "iflag=direct" } else { "" }
        );
    }
    s.push_str(
        "exec 3<&-\n\
         echo \"RD-DMESG $(dmesg | grep -c -i -e 'I/O error' -e 'not a head' -e 'hung task')\"\n\
         dmesg | grep -i -e 'I/O error' -e 'not a head' -e 'hung task' | sed 's/^/RD-DMESG-LINE /'\n\
         echo RD-DONE\n",
    );
    s
}

/// A QEMU to test with.
struct Qemu {
    label: &'static str,
    bin: PathBuf,
    /// `-L` (its own firmware directory), if not the system's.
    data_dir: Option<PathBuf>,
}

fn qemu72() -> Qemu {
    Qemu {
        label: "QEMU 7.2",
        bin: PathBuf::from("qemu-system-x86_64"),
        data_dir: None,
    }
}

/// QEMU 10.0 from bookworm-backports, fetched (once, cached under target/) by
/// `scripts/lab/qemu10`.
fn qemu10() -> Qemu {
    let script = repo_root().join("scripts/lab/qemu10");
    let mut cmd = Command::new(&script);
    if let Some(target) = profile_dir().parent() {
        cmd.env("QEMU10_DIR", target.join("qemu10"));
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}): {}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let data_dir = bin
        .parent()
        .and_then(Path::parent)
        .map(|usr| usr.join("share/qemu"));
    Qemu {
        label: "QEMU 10.0",
        bin,
        data_dir,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Firmware {
    Qboot,
    SeaBios,
}

impl Firmware {
    fn name(self) -> &'static str {
        match self {
            Firmware::Qboot => "qboot",
            Firmware::SeaBios => "SeaBIOS",
        }
    }
}

/// xorshift64*: a different random image every boot, no crate needed.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(t ^ u64::from(std::process::id()).rotate_left(32) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn block_key(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// What one wrong 4 KiB block holds instead.
fn classify(got: &[u8], disk_blocks: &HashMap<u64, u64>) -> String {
    let nonzero: Vec<usize> = (0..got.len()).filter(|&i| got[i] != 0).collect();
    if nonzero.is_empty() {
        return "zeros".into();
    }
    if got.iter().all(|&b| b == UNWRITTEN) {
        return "never written (the read did not deliver it)".into();
    }
    if nonzero.len() <= 4 {
        let bytes: Vec<String> = nonzero
            .iter()
            .map(|&i| format!("[{i}]={:#04x}", got[i]))
            .collect();
        return format!("zeros but {}", bytes.join(" "));
    }
    match disk_blocks.get(&block_key(got)) {
        Some(off) => format!("the disk's block at {off:#x}"),
        None => "neither zeros nor any block of the disk".into(),
    }
}

/// Compares one read's copy with the image; `None` when right, else a compact report of the
/// wrong blocks (consecutive blocks of the same kind as one run).
fn check_read(
    r: &Read,
    got: &[u8],
    image: &[u8],
    disk_blocks: &HashMap<u64, u64>,
) -> Option<String> {
    let want = &image[r.off as usize..(r.off + r.len) as usize];
    if got == want {
        return None;
    }
    let blocks = (r.len / BLOCK) as usize;
    let mut runs: Vec<(usize, usize, String)> = Vec::new();
    let mut wrong = 0;
    for i in 0..blocks {
        let span = i * BLOCK as usize..(i + 1) * BLOCK as usize;
        if got[span.clone()] == want[span.clone()] {
            continue;
        }
        wrong += 1;
        let what = classify(&got[span], disk_blocks);
        match runs.last_mut() {
            Some((_, end, w)) if *end + 1 == i && *w == what => *end = i,
            _ => runs.push((i, i, what)),
        }
    }
    let mut s = format!(
        "{} (disk {:#x}+{}K, bs={}K{}): {wrong} of {blocks} blocks wrong:",
        r.name,
        r.off,
        r.len / KIB,
        r.bs / KIB,
        if r.direct { ", O_DIRECT" } else { "" }
    );
    for (a, b, what) in runs.iter().take(12) {
        let at = r.off + *a as u64 * BLOCK;
        let _ = write!(s, " [{at:#x}: {} x 4K {what}]", b - a + 1);
    }
    if runs.len() > 12 {
        let _ = write!(s, " ... ({} runs)", runs.len());
    }
    Some(s)
}

struct Boot {
    /// One line per wrong read, or the reason the boot itself failed.
    problems: Vec<String>,
    /// Reads that came back wrong (names).
    wrong: Vec<&'static str>,
    secs: f64,
    /// The daemon's refusals ("request ... refused") in its log.
    refusals: Vec<String>,
    /// The guest's view of the disk's queue (`max_segments` is the daemon's `seg_max`).
    queue: String,
}

fn bin(n: &str) -> PathBuf {
    let p = profile_dir().join(n);
    assert!(
        p.is_file(),
        "{} missing: cargo build --workspace --bins",
        p.display()
    );
    p
}

fn boot_once(qemu: &Qemu, fw: Firmware, guest: &DirectGuest, rng: &mut Rng) -> Boot {
    let started = Instant::now();
    let dir = ScratchDir::new("vurd").expect("scratch dir");
    let mut boot = Boot {
        problems: Vec::new(),
        wrong: Vec::new(),
        secs: 0.0,
        refusals: Vec::new(),
        queue: String::new(),
    };

    // The image, random where the guest reads, written before the daemon starts.
    let mut image = vec![0u8; DISK as usize];
    for (off, len) in RANDOM {
        rng.fill(&mut image[off as usize..(off + len) as usize]);
    }
    let img = dir.join("disk.img");
    std::fs::write(&img, &image).expect("write the image");
    let (outs, out_size) = out_layout();
    let out_img = dir.join("out.img");
    std::fs::write(&out_img, vec![UNWRITTEN; out_size as usize]).expect("write out.img");

    let sock = dir.join("blk.sock");
    let mut daemon_cmd = Command::new(bin("vhost-user-blk"));
    daemon_cmd
        .arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(&img);
    if let Ok(extra) = std::env::var("VU_READS_DAEMON_ARGS") {
        daemon_cmd.args(extra.split_whitespace());
    }
    let mut daemon =
        Daemon::spawn("vhost-user-blk", &mut daemon_cmd).expect("start vhost-user-blk");
    if let Err(e) = daemon.wait_for_path(&sock, Duration::from_secs(10)) {
        panic!("vhost-user-blk did not create its socket: {e}");
    }

    let mut cmd = Command::new(&qemu.bin);
    if let Some(d) = &qemu.data_dir {
        cmd.arg("-L").arg(d);
    }
    if fw == Firmware::Qboot {
        cmd.args(["-bios", QBOOT]);
    }
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "512M", "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio"])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", sock.display()))
        // QEMU's defaults (queue-size 128, one queue), as users start it.
        .arg("-device")
        .arg(format!(
            "vhost-user-blk-pci,chardev=c0{}",
            std::env::var("VU_READS_DEVICE_OPTS").unwrap_or_default()
        ))
        .arg("-drive")
        .arg(format!(
            "if=none,id=out,format=raw,cache=unsafe,file={}",
            out_img.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=out"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"]);
    // Daemon: its own process group, output to a log file, SIGTERM then SIGKILL on drop
    // (panics included).
    let mut vm = Daemon::spawn("qemu-reads", &mut cmd).expect("start QEMU");
    vm.set_grace(Duration::from_secs(2));
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while vm.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let timed_out = vm.is_running();
    let status = vm.stop();
    let console = vm.log();
    boot.secs = started.elapsed().as_secs_f64();
    boot.refusals = daemon
        .log()
        .lines()
        .filter(|l| l.contains("refused"))
        .map(str::to_string)
        .collect();

    let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
    let tail = || lines[lines.len().saturating_sub(30)..].join("\n");
    boot.queue = lines
        .iter()
        .find_map(|l| l.strip_prefix("RD-QUEUE "))
        .unwrap_or("?")
        .to_string();
    if timed_out {
        boot.problems.push(format!(
            "QEMU did not finish in {BOOT_TIMEOUT:?}; console tail:\n{}",
            tail()
        ));
        return boot;
    }
    if !lines.contains(&"RD-DONE") || !lines.contains(&"L2-EXIT 0") {
        boot.problems.push(format!(
            "the guest did not finish its reads (QEMU {status:?}); console tail:\n{}",
            tail()
        ));
        return boot;
    }
    for l in &lines {
        if l.starts_with("RD-ERR") || (l.starts_with("RD ") && !l.contains(" rc=0 ")) {
            boot.problems.push(format!("guest: {l}"));
        }
        if let Some(n) = l.strip_prefix("RD-DMESG ") {
            if n.trim() != "0" {
                let dmesg: Vec<&str> = lines
                    .iter()
                    .filter_map(|l| l.strip_prefix("RD-DMESG-LINE "))
                    .collect();
                boot.problems
                    .push(format!("guest dmesg: {}", dmesg.join(" | ")));
            }
        }
    }

    let out = std::fs::read(&out_img).expect("read out.img");
    let mut disk_blocks = HashMap::new();
    for (i, b) in image.chunks(BLOCK as usize).enumerate().rev() {
        disk_blocks.insert(block_key(b), i as u64 * BLOCK);
    }
    for (r, o) in READS.iter().zip(outs) {
        let got = &out[o as usize..(o + r.len) as usize];
        if let Some(report) = check_read(r, got, &image, &disk_blocks) {
            boot.wrong.push(r.name);
            boot.problems.push(report);
        }
    }
    drop(daemon);
    boot
}

/// Boots per QEMU version.
fn boots() -> usize {
    std::env::var("VU_READS_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

fn run_boots(qemu: Qemu) {
    let gdir = ScratchDir::new("vurg").expect("scratch dir");
    let frag: Vec<(String, Vec<u8>)> = (0..FRAG_FILES)
        .map(|i| (format!("frag/{i}"), b"x".to_vec()))
        .collect();
    let guest = DirectGuest::with_files(gdir.path(), &guest_script(), &frag)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::seeded();
    let n = boots();
    let start = Instant::now();
    let mut failed = Vec::new();
    let mut summary = String::new();
    for i in 0..n {
        // Mostly qboot (fastest, and the quickest reproduction), every third SeaBIOS.
        let fw = if i % 3 == 2 {
            Firmware::SeaBios
        } else {
            Firmware::Qboot
        };
        let b = boot_once(&qemu, fw, &guest, &mut rng);
        let line = format!(
            "{} boot {}/{n} ({}, {:.1} s, {}): {}{}",
            qemu.label,
            i + 1,
            fw.name(),
            b.secs,
            b.queue,
            if b.problems.is_empty() {
                "all reads right".to_string()
            } else if b.wrong.is_empty() {
                "FAILED".to_string()
            } else {
                format!("WRONG: {}", b.wrong.join(", "))
            },
            if b.refusals.is_empty() {
                String::new()
            } else {
                format!(
                    "; the daemon logged {} refusals (it logs the first 10), first: {}",
                    b.refusals.len(),
                    b.refusals[0]
                )
            }
        );
        eprintln!("{line}");
        let _ = writeln!(summary, "{line}");
        if !b.problems.is_empty() {
            for p in &b.problems {
                eprintln!("    {p}");
            }
            failed.push((i + 1, fw, b.problems));
        }
    }
    eprintln!(
        "{}: {n} boots in {:.0} s",
        qemu.label,
        start.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        let mut msg = format!(
            "{}: {} of {n} boots read pre-existing data wrong or failed\n{summary}\nfirst failing boot ({}, boot {}):\n",
            qemu.label,
            failed.len(),
            failed[0].1.name(),
            failed[0].0
        );
        for p in &failed[0].2 {
            let _ = writeln!(msg, "  {p}");
        }
        panic!("{msg}");
    }
}

#[test]
fn qemu_7_2_reads_preexisting_data_right() {
    run_boots(qemu72());
}

#[test]
fn qemu_10_0_reads_preexisting_data_right() {
    run_boots(qemu10());
}

#[test]
fn the_guest_script_reads_every_range_into_its_own_slot() {
    let (outs, size) = out_layout();
    assert_ne!(size, DISK, "the guest tells the disks apart by size");
    for (r, o) in READS.iter().zip(outs) {
        assert!(
            r.off % r.bs == 0 && r.len % r.bs == 0 && o % r.bs == 0,
            "{}",
            r.name
        );
        assert!(r.off + r.len <= DISK);
        assert!(
            RANDOM
                .iter()
                .any(|&(a, l)| r.off >= a && r.off + r.len <= a + l),
            "{} reads outside the random data",
            r.name
        );
    }
    let s = guest_script();
    assert!(s.contains("rd cold-1M 1048576 0 1 0 \n"), "{s}");
    assert!(s.contains("iflag=direct"));
}
