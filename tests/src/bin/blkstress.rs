//! blkstress: many block requests in flight on a disk, every block stamped, every completion
//! accounted for; for Linux guests in the lab (the back-end crash and stall scenarios,
//! `tests/tests/lab_vhost_user_crash.rs`), built and shipped into L2 the way `lat` is.
//!
//! ```text
//! blkstress run DEVICE [--blocks N] [--threads T] [--seconds S] [--seed X] [--state FILE] [--buffered]
//! blkstress verify-image IMAGE STATE
//! blkstress result STATE
//! blkstress mute-listener PATH
//! ```
//!
//! `run`: T threads (default 16), each with its own O_DIRECT descriptor and synchronous I/O,
//! so up to T requests are in flight at once. Thread t owns the blocks `b % T == t` of the
//! first N 4 KiB blocks (default 2048), so no two requests ever touch one block at a time and
//! "the last write that completed" of a block is well defined. Each thread mixes writes of
//! stamped blocks (about 55 %), reads of blocks it wrote earlier, checked as it goes (about
//! 40 %), and `fdatasync` flushes (about 5 %), for S seconds (default 20). Then a verify pass
//! reads every block back and checks it holds the generation of its last successful write; a
//! block whose write(s) since then failed may also hold one of those (counted apart: `old`
//! and `new`). It prints `BLKSTRESS-START` once the threads run, `BLKSTRESS-PROGRESS` every
//! 2 s, `BLKSTRESS-MISMATCH ...` for the first mismatches, `BLKSTRESS-STUCK ...` for a request
//! that has not returned for 30 s, and one result line `BLKSTRESS {json}`. With `--state`
//! the final per-block state is written to FILE (a second disk in the lab: L1 reads it from
//! the image file there), for `verify-image`.
//!
//! A stamp (4 KiB): magic `BLKSTRS1`, block number, generation, the run's seed (all u64 LE),
//! then a pseudo-random fill derived from the four, then an FNV-1a 64 checksum of the first
//! 4088 bytes. A torn block (bad checksum), a misplaced one (another block's stamp), one from
//! another run, a stale one (an older generation: a lost write) or a zeroed one are told
//! apart. Generations are unique across the run (one counter for all writes).
//!
//! `verify-image IMAGE STATE`: L1's check of the image file against the state the guest
//! wrote: every block of the state holds an allowed generation, every never-written block is
//! unstamped. Prints `BLKSTRESS-IMAGE {json}`.
//!
//! `result STATE`: the result line (`BLKSTRESS {json}`) the run kept in its state.
//!
//! `mute-listener PATH`: listens on the unix socket PATH, accepts every connection and never
//! reads or answers (a back-end that hangs), until killed.
//!
//! Exit status: 0 all checks passed, 1 a mismatch, 2 usage or setup error, 3 a request hung.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ::tests::probe::XorShift;
use serde::Serialize;

const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"BLKSTRS1";
const SUM_AT: usize = BLOCK - 8;
/// Mismatches reported one by one (and in the JSON), the rest only counted.
const REPORT_FIRST: usize = 8;
/// A request that has not returned after this long is reported as stuck.
const STUCK_AFTER: Duration = Duration::from_secs(30);
/// After the run time, how long the threads may take to finish their last request.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

const USAGE: &str =
    "usage: blkstress run DEVICE [--blocks N] [--threads T] [--seconds S] [--seed X] \
                     [--state FILE] [--buffered] | blkstress verify-image IMAGE STATE | blkstress result STATE | \
                     blkstress mute-listener PATH";

// ---------------------------------------------------------------------------------------------
// Stamps

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Fills `buf` (4 KiB) with the stamp of `block` at generation `gen` of the run `seed`.
fn stamp(buf: &mut [u8], block: u64, gen: u64, seed: u64) {
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    buf[16..24].copy_from_slice(&gen.to_le_bytes());
    buf[24..32].copy_from_slice(&seed.to_le_bytes());
    let mut rng = XorShift::new(
        seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ gen.wrapping_mul(0xc2b2_ae3d_27d4_eb4f),
    );
    for w in buf[32..SUM_AT].chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let sum = fnv1a(&buf[..SUM_AT]);
    buf[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
}

/// What a 4 KiB block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// All zeros (never written, or a write lost to zeros).
    Zero,
    /// Neither zeros nor a stamp.
    Garbage,
    /// A stamp whose checksum does not match: torn or corrupted.
    Torn,
    /// A valid stamp of another block.
    Misplaced { block: u64, gen: u64 },
    /// A valid stamp of another run.
    OtherRun { seed: u64 },
    /// A valid stamp of this block and run.
    Gen(u64),
}

fn classify(buf: &[u8], block: u64, seed: u64) -> Found {
    if &buf[..8] != MAGIC {
        return if buf.iter().all(|b| *b == 0) {
            Found::Zero
        } else {
            Found::Garbage
        };
    }
    if fnv1a(&buf[..SUM_AT]) != u64_at(buf, SUM_AT) {
        return Found::Torn;
    }
    let (b, gen, s) = (u64_at(buf, 8), u64_at(buf, 16), u64_at(buf, 24));
    if s != seed {
        Found::OtherRun { seed: s }
    } else if b != block {
        Found::Misplaced { block: b, gen }
    } else {
        Found::Gen(gen)
    }
}

/// What one block may hold: the generation of its last successful write (0: never written,
/// the block must be unstamped), or one of the writes that failed since.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct BlockState {
    committed: u64,
    failed: Vec<u64>,
}

/// How a block read back compares to its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The committed generation (or unstamped for a never-written block).
    Ok,
    /// The committed generation, though a later write failed.
    OldAfterError,
    /// The generation of a write that failed.
    NewAfterError,
    Bad(Found),
}

fn judge(found: Found, st: &BlockState) -> Verdict {
    let old = if st.failed.is_empty() {
        Verdict::Ok
    } else {
        Verdict::OldAfterError
    };
    match found {
        Found::Gen(g) if g == st.committed => old,
        Found::Gen(g) if st.failed.contains(&g) => Verdict::NewAfterError,
        // A never-written block holds whatever was there: zeros in the lab, not a stamp.
        Found::Zero | Found::Garbage if st.committed == 0 => old,
        f => Verdict::Bad(f),
    }
}

fn describe(block: u64, found: Found, st: &BlockState) -> String {
    let what = match found {
        Found::Zero => "zeroed".to_string(),
        Found::Garbage => "garbage (no stamp)".to_string(),
        Found::Torn => "torn (checksum mismatch)".to_string(),
        Found::Misplaced { block, gen } => format!("misplaced (stamp of block {block} gen {gen})"),
        Found::OtherRun { seed } => format!("stamp of another run (seed {seed})"),
        Found::Gen(g) if g < st.committed => format!("stale (gen {g})"),
        Found::Gen(g) => format!("unexpected gen {g}"),
    };
    format!(
        "block={block} {what} want gen {}{}",
        st.committed,
        if st.failed.is_empty() {
            String::new()
        } else {
            format!(" or failed {:?}", st.failed)
        }
    )
}

fn kind(found: Found, st: &BlockState) -> &'static str {
    match found {
        Found::Zero => "zeroed",
        Found::Garbage => "garbage",
        Found::Torn => "torn",
        Found::Misplaced { .. } => "misplaced",
        Found::OtherRun { .. } => "other-run",
        Found::Gen(g) if g < st.committed => "stale",
        Found::Gen(_) => "unexpected",
    }
}

// ---------------------------------------------------------------------------------------------
// State files

/// The state text; `result` (the JSON of the result line) goes on a `RESULT` line, so that
/// L1 has it even when the guest's console garbled it.
fn format_state(seed: u64, states: &[BlockState], result: Option<&str>) -> String {
    let mut s = format!("BLKSTRESS-STATE 1 seed={seed} blocks={}\n", states.len());
    for (b, st) in states.iter().enumerate() {
        if st.committed == 0 && st.failed.is_empty() {
            continue;
        }
        let _ = write!(s, "{b} {}", st.committed);
        for f in &st.failed {
            let _ = write!(s, " {f}");
        }
        s.push('\n');
    }
    if let Some(r) = result {
        let _ = writeln!(s, "RESULT {r}");
    }
    s.push_str("END\n");
    s
}

/// The `RESULT` line's JSON of a state, if it has one.
fn state_result(text: &[u8]) -> Option<String> {
    let end = text.windows(5).position(|w| w == b"\nEND\n")?;
    let text = std::str::from_utf8(&text[..end]).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(str::to_string)
}

/// Parses a state (anything after its `END` line, e.g. the rest of a disk, is ignored).
fn parse_state(text: &[u8]) -> Result<(u64, Vec<BlockState>), String> {
    let end = text
        .windows(5)
        .position(|w| w == b"\nEND\n")
        .ok_or("no END line: the state was not written completely")?;
    let text = std::str::from_utf8(&text[..end]).map_err(|e| format!("state: {e}"))?;
    let mut lines = text.lines();
    let head = lines.next().unwrap_or_default();
    let mut seed = None;
    let mut blocks = None;
    for w in head.split_whitespace() {
        if let Some(v) = w.strip_prefix("seed=") {
            seed = v.parse::<u64>().ok();
        } else if let Some(v) = w.strip_prefix("blocks=") {
            blocks = v.parse::<usize>().ok();
        }
    }
    let (Some(seed), Some(blocks), true) = (seed, blocks, head.starts_with("BLKSTRESS-STATE 1 "))
    else {
        return Err(format!("not a blkstress state: {head:?}"));
    };
    let mut states = vec![BlockState::default(); blocks];
    for line in lines.filter(|l| !l.starts_with("RESULT ")) {
        let nums: Result<Vec<u64>, _> = line.split_whitespace().map(str::parse::<u64>).collect();
        match nums.ok().as_deref() {
            Some([b, committed, failed @ ..]) if (*b as usize) < blocks => {
                states[*b as usize] = BlockState {
                    committed: *committed,
                    failed: failed.to_vec(),
                };
            }
            _ => return Err(format!("bad state line {line:?}")),
        }
    }
    Ok((seed, states))
}

// ---------------------------------------------------------------------------------------------
// Verification of a whole device or image

/// The verify pass's findings; its JSON is the `verify` member of the result line and the
/// body of `BLKSTRESS-IMAGE`.
#[derive(Debug, Default, Serialize)]
struct VerifyReport {
    checked: u64,
    ok: u64,
    old_after_error: u64,
    new_after_error: u64,
    read_errors: u64,
    first_read_error: Option<String>,
    mismatches: u64,
    #[serde(rename = "mismatch_kinds")]
    by_kind: BTreeMap<&'static str, u64>,
    #[serde(rename = "first_mismatches")]
    first: Vec<String>,
}

impl VerifyReport {
    fn add(&mut self, block: u64, found: Found, st: &BlockState, loud: bool) {
        self.checked += 1;
        match judge(found, st) {
            Verdict::Ok => self.ok += 1,
            Verdict::OldAfterError => self.old_after_error += 1,
            Verdict::NewAfterError => self.new_after_error += 1,
            Verdict::Bad(f) => {
                self.mismatches += 1;
                *self.by_kind.entry(kind(f, st)).or_default() += 1;
                if self.first.len() < REPORT_FIRST {
                    let d = describe(block, f, st);
                    if loud {
                        println!("BLKSTRESS-MISMATCH verify {d}");
                    }
                    self.first.push(d);
                }
            }
        }
    }
}

/// Reads every block of `states` from `f` and judges it. `progress` counts blocks done (for a
/// watchdog).
fn verify_blocks(
    f: &File,
    seed: u64,
    states: &[BlockState],
    loud: bool,
    progress: &AtomicU64,
) -> VerifyReport {
    let mut storage = vec![0u8; 2 * BLOCK];
    let buf = aligned(&mut storage);
    let mut r = VerifyReport::default();
    for (b, st) in states.iter().enumerate() {
        let b = b as u64;
        match f.read_at(buf, b * BLOCK as u64) {
            Ok(BLOCK) => r.add(b, classify(buf, b, seed), st, loud),
            res => {
                r.read_errors += 1;
                if r.first_read_error.is_none() {
                    let why = match res {
                        Ok(n) => format!("short read of {n} bytes"),
                        Err(e) => e.to_string(),
                    };
                    r.first_read_error = Some(format!("block {b}: {why}"));
                }
            }
        }
        progress.store(b + 1, Ordering::Relaxed);
    }
    r
}

// ---------------------------------------------------------------------------------------------
// The stress run

struct RunArgs {
    device: String,
    blocks: u64,
    threads: usize,
    seconds: u64,
    seed: u64,
    state: Option<String>,
    direct: bool,
}

fn parse_run(args: &[String]) -> Result<RunArgs, String> {
    let mut a = RunArgs {
        device: String::new(),
        blocks: 2048,
        threads: 16,
        seconds: 20,
        seed: 0,
        state: None,
        direct: true,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        let num = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name} {v}: not a number\n{USAGE}"))
        };
        match arg.as_str() {
            "--blocks" => a.blocks = num("--blocks", value("--blocks")?)?,
            "--threads" => a.threads = num("--threads", value("--threads")?)? as usize,
            "--seconds" => a.seconds = num("--seconds", value("--seconds")?)?,
            "--seed" => a.seed = num("--seed", value("--seed")?)?,
            "--state" => a.state = Some(value("--state")?),
            "--buffered" => a.direct = false,
            s if !s.starts_with("--") && a.device.is_empty() => a.device = s.to_string(),
            s => return Err(format!("unknown argument {s}\n{USAGE}")),
        }
    }
    if a.device.is_empty() {
        return Err(USAGE.into());
    }
    if a.threads == 0 || a.blocks < a.threads as u64 {
        return Err(format!(
            "--threads {} and --blocks {}: need 1 <= threads <= blocks",
            a.threads, a.blocks
        ));
    }
    if a.seed == 0 {
        a.seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
    }
    Ok(a)
}

/// A 4 KiB window of `buf` aligned to 4 KiB (O_DIRECT needs an aligned buffer).
fn aligned(buf: &mut [u8]) -> &mut [u8] {
    let off = buf.as_ptr().align_offset(BLOCK);
    &mut buf[off..off + BLOCK]
}

fn open(path: &str, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

const WRITE: usize = 0;
const READ: usize = 1;
const FLUSH: usize = 2;
const KINDS: [&str; 3] = ["write", "read", "flush"];

/// Counters the threads share (for progress lines and the result).
#[derive(Default)]
struct Shared {
    done: [AtomicU64; 3],
    errors: [AtomicU64; 3],
    run_mismatches: AtomicU64,
    reported: AtomicUsize,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
    first_error: std::sync::Mutex<Option<String>>,
    first_mismatches: std::sync::Mutex<Vec<String>>,
}

/// What one thread is doing: since when (ms from the start, +1; 0 idle), which kind and block.
#[derive(Default)]
struct Busy {
    since_ms: AtomicU64,
    what: AtomicU64,
}

struct Worker {
    id: usize,
    threads: usize,
    seed: u64,
    file: File,
    start: Instant,
}

impl Worker {
    /// Runs until `stop`, keeping the state of this worker's blocks (index b / threads) in
    /// `states`: a write in flight is listed as failed until it returns, so a snapshot taken
    /// while a request hangs allows both outcomes of that write.
    fn run(
        &self,
        gens: &AtomicU64,
        stop: &AtomicBool,
        sh: &Shared,
        busy: &Busy,
        states: &std::sync::Mutex<Vec<BlockState>>,
    ) {
        let own = lock(states).len() as u64;
        let mut written: Vec<u64> = Vec::new(); // local indices with some write attempted
        let mut rng =
            XorShift::new(self.seed ^ (self.id as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1));
        let mut storage = vec![0u8; 2 * BLOCK];
        let buf = aligned(&mut storage);
        while !stop.load(Ordering::Relaxed) {
            let dice = rng.below(100);
            let op = if dice < 5 {
                FLUSH
            } else if dice < 45 && !written.is_empty() {
                READ
            } else {
                WRITE
            };
            let local = match op {
                READ => written[rng.below(written.len() as u64) as usize],
                _ => rng.below(own),
            };
            let block = self.id as u64 + local * self.threads as u64;
            let gen = if op == WRITE {
                let g = gens.fetch_add(1, Ordering::Relaxed);
                stamp(buf, block, g, self.seed);
                let mut st = lock(states);
                let st = &mut st[local as usize];
                if st.committed == 0 && st.failed.is_empty() {
                    written.push(local);
                }
                st.failed.push(g);
                g
            } else {
                0
            };
            busy.what
                .store(((op as u64) << 56) | block, Ordering::Relaxed);
            busy.since_ms.store(
                self.start.elapsed().as_millis() as u64 + 1,
                Ordering::Relaxed,
            );
            let n = sh.inflight.fetch_add(1, Ordering::Relaxed) + 1;
            sh.max_inflight.fetch_max(n, Ordering::Relaxed);
            let off = block * BLOCK as u64;
            let res = match op {
                WRITE => self.file.write_at(buf, off),
                READ => self.file.read_at(buf, off),
                _ => self.file.sync_data().map(|()| BLOCK),
            };
            sh.inflight.fetch_sub(1, Ordering::Relaxed);
            busy.since_ms.store(0, Ordering::Relaxed);
            let ok = match res {
                Ok(BLOCK) => true,
                Ok(n) => {
                    self.note_error(sh, op, block, &format!("short {} of {n} bytes", KINDS[op]));
                    false
                }
                Err(e) => {
                    self.note_error(sh, op, block, &e.to_string());
                    false
                }
            };
            match (op, ok) {
                (WRITE, true) => {
                    let mut st = lock(states);
                    let st = &mut st[local as usize];
                    st.committed = gen;
                    st.failed.clear();
                }
                (READ, true) => {
                    let found = classify(buf, block, self.seed);
                    let st = lock(states)[local as usize].clone();
                    if let Verdict::Bad(f) = judge(found, &st) {
                        sh.run_mismatches.fetch_add(1, Ordering::Relaxed);
                        if sh.reported.fetch_add(1, Ordering::Relaxed) < REPORT_FIRST {
                            let d = describe(block, f, &st);
                            println!("BLKSTRESS-MISMATCH read {d}");
                            lock(&sh.first_mismatches).push(d);
                        }
                    }
                }
                // A failed write stays listed as failed: the block may hold either.
                _ => {}
            }
            if ok {
                sh.done[op].fetch_add(1, Ordering::Relaxed);
            } else {
                sh.errors[op].fetch_add(1, Ordering::Relaxed);
                // A device that fails everything (reset, gone) must not be spun on.
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn note_error(&self, sh: &Shared, op: usize, block: u64, why: &str) {
        let mut first = lock(&sh.first_error);
        if first.is_none() {
            let at = self.start.elapsed().as_secs_f64();
            let msg = format!("{} of block {block} at {at:.1} s: {why}", KINDS[op]);
            println!("BLKSTRESS-ERROR {msg}");
            *first = Some(msg);
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Requests by kind (the order of [`KINDS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
struct OpCounts {
    write: u64,
    read: u64,
    flush: u64,
}

impl fmt::Display for OpCounts {
    /// `{write:N,read:N,flush:N}` for the progress line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{write:{},read:{},flush:{}}}",
            self.write, self.read, self.flush
        )
    }
}

fn counts(a: &[AtomicU64; 3]) -> OpCounts {
    let [write, read, flush] = a.each_ref().map(|n| n.load(Ordering::Relaxed));
    OpCounts { write, read, flush }
}

/// The result line of a run whose requests hung: `BLKSTRESS {...}`.
#[derive(Debug, Serialize)]
struct HungResult {
    seed: u64,
    hung: usize,
    first_hung: String,
    max_inflight: usize,
    done: OpCounts,
    errors: OpCounts,
    first_error: Option<String>,
    run_mismatches: u64,
}

/// The result line of a run whose verify read hung.
#[derive(Debug, Serialize)]
struct VerifyHung {
    hung: u32,
    first_hung: String,
}

/// The result line of a finished run.
#[derive(Debug, Serialize)]
struct RunResult<'a> {
    seed: u64,
    #[serde(serialize_with = "tenths")]
    seconds: f64,
    threads: usize,
    blocks: u64,
    written_blocks: usize,
    max_inflight: usize,
    done: OpCounts,
    errors: OpCounts,
    first_error: Option<String>,
    run_mismatches: u64,
    first_run_mismatches: Vec<String>,
    verify: &'a VerifyReport,
}

fn tenths<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((v * 10.0).round() / 10.0)
}

/// `PREFIX {json}`.
fn json_line(prefix: &str, v: &impl Serialize) -> Result<String, String> {
    serde_json::to_string(v)
        .map(|j| format!("{prefix} {j}"))
        .map_err(|e| format!("{prefix} line: {e}"))
}

/// Stuck requests: (thread, kind, block, seconds) of those running for `limit` or more.
fn stuck(busy: &[Busy], start: Instant, limit: Duration) -> Vec<String> {
    let now = start.elapsed().as_millis() as u64 + 1;
    busy.iter()
        .enumerate()
        .filter_map(|(t, b)| {
            let since = b.since_ms.load(Ordering::Relaxed);
            let what = b.what.load(Ordering::Relaxed);
            (since != 0 && now.saturating_sub(since) >= limit.as_millis() as u64).then(|| {
                format!(
                    "thread={t} {} block={} for {:.1} s",
                    KINDS[(what >> 56) as usize % 3],
                    what & ((1 << 56) - 1),
                    (now - since) as f64 / 1000.0
                )
            })
        })
        .collect()
}

/// The whole run: returns the result line and the exit status.
fn run(a: &RunArgs) -> Result<(String, u8), String> {
    let size = File::open(&a.device)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|e| format!("size of {}: {e}", a.device))?;
    if size < a.blocks * BLOCK as u64 {
        return Err(format!(
            "{} has {size} bytes, fewer than --blocks {} x 4 KiB",
            a.device, a.blocks
        ));
    }
    let start = Instant::now();
    let sh = Arc::new(Shared::default());
    let stop = Arc::new(AtomicBool::new(false));
    let gens = Arc::new(AtomicU64::new(1));
    let busy: Arc<Vec<Busy>> = Arc::new((0..a.threads).map(|_| Busy::default()).collect());
    let own: Arc<Vec<std::sync::Mutex<Vec<BlockState>>>> = Arc::new(
        (0..a.threads)
            .map(|id| {
                let n = (a.blocks - id as u64).div_ceil(a.threads as u64) as usize;
                std::sync::Mutex::new(vec![BlockState::default(); n])
            })
            .collect(),
    );
    // The state of every block, from the workers' current states.
    let snapshot = |own: &[std::sync::Mutex<Vec<BlockState>>]| {
        let mut states = vec![BlockState::default(); a.blocks as usize];
        for (id, w) in own.iter().enumerate() {
            for (local, st) in lock(w).iter().enumerate() {
                states[id + local * a.threads] = st.clone();
            }
        }
        states
    };
    let mut handles = Vec::new();
    for id in 0..a.threads {
        let file = open(&a.device, a.direct).map_err(|e| {
            format!(
                "open {}{}: {e}",
                a.device,
                if a.direct { " with O_DIRECT" } else { "" }
            )
        })?;
        let w = Worker {
            id,
            threads: a.threads,
            seed: a.seed,
            file,
            start,
        };
        let (gens, stop, sh, busy, own) = (
            gens.clone(),
            stop.clone(),
            sh.clone(),
            busy.clone(),
            own.clone(),
        );
        handles.push(
            thread::Builder::new()
                .name(format!("w{id}"))
                .spawn(move || w.run(&gens, &stop, &sh, &busy[id], &own[id]))
                .map_err(|e| format!("cannot start a thread: {e}"))?,
        );
    }
    println!(
        "BLKSTRESS-START device={} blocks={} threads={} seconds={} seed={} direct={}",
        a.device, a.blocks, a.threads, a.seconds, a.seed, a.direct
    );
    let progress = |t: f64| {
        println!(
            "BLKSTRESS-PROGRESS t={t:.0} done={} errors={} inflight={}",
            counts(&sh.done),
            counts(&sh.errors),
            sh.inflight.load(Ordering::Relaxed)
        );
    };
    let run_for = Duration::from_secs(a.seconds);
    let mut next = Duration::from_secs(2);
    let mut stuck_told = false;
    while start.elapsed() < run_for {
        thread::sleep(Duration::from_millis(100));
        if start.elapsed() >= next {
            progress(start.elapsed().as_secs_f64());
            next += Duration::from_secs(2);
            for s in stuck(&busy, start, STUCK_AFTER) {
                if !stuck_told {
                    println!("BLKSTRESS-STUCK {s}");
                }
            }
            stuck_told |= !stuck(&busy, start, STUCK_AFTER).is_empty();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let drain_from = Instant::now();
    while handles.iter().any(|h| !h.is_finished()) && drain_from.elapsed() < DRAIN_LIMIT {
        thread::sleep(Duration::from_millis(50));
    }
    let hung = stuck(&busy, start, Duration::ZERO);
    if handles.iter().any(|h| !h.is_finished()) {
        for s in &hung {
            println!("BLKSTRESS-STUCK {s} (after the run ended)");
        }
        // The state as it stands (a hung write may or may not have landed), for L1's check
        // of the image; the device itself is not read again (it would hang).
        let line = json_line(
            "BLKSTRESS",
            &HungResult {
                seed: a.seed,
                hung: hung.len(),
                first_hung: hung.first().cloned().unwrap_or_default(),
                max_inflight: sh.max_inflight.load(Ordering::Relaxed),
                done: counts(&sh.done),
                errors: counts(&sh.errors),
                first_error: lock(&sh.first_error).clone(),
                run_mismatches: sh.run_mismatches.load(Ordering::Relaxed),
            },
        )?;
        if let Some(path) = &a.state {
            write_state(
                path,
                a.seed,
                &snapshot(&own),
                line.strip_prefix("BLKSTRESS "),
            )?;
        }
        return Ok((line, 3));
    }
    for (id, h) in handles.into_iter().enumerate() {
        h.join().map_err(|_| format!("thread {id} panicked"))?;
    }
    let states = snapshot(&own);
    let secs = start.elapsed().as_secs_f64();
    progress(secs);
    if let Some(path) = &a.state {
        write_state(path, a.seed, &states, None)?;
    }

    // The verify pass, with a watchdog: a read that never returns is reported, not waited on.
    let file = open(&a.device, a.direct).map_err(|e| format!("open {}: {e}", a.device))?;
    let done = Arc::new(AtomicU64::new(0));
    let watch_done = done.clone();
    let finished = Arc::new(AtomicBool::new(false));
    let watch_finished = finished.clone();
    thread::spawn(move || {
        let mut last = (0, Instant::now());
        while !watch_finished.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(200));
            let n = watch_done.load(Ordering::Relaxed);
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() >= STUCK_AFTER {
                println!(
                    "BLKSTRESS-STUCK verify read of block={n} for {:.1} s",
                    last.1.elapsed().as_secs_f64()
                );
                let hung = VerifyHung {
                    hung: 1,
                    first_hung: format!("verify read of block {n}"),
                };
                match json_line("BLKSTRESS", &hung) {
                    Ok(line) => println!("{line}"),
                    Err(e) => println!("BLKSTRESS-ERROR {e}"),
                }
                std::process::exit(3);
            }
        }
    });
    let v = verify_blocks(&file, a.seed, &states, true, &done);
    finished.store(true, Ordering::Relaxed);
    let written = states
        .iter()
        .filter(|s| s.committed != 0 || !s.failed.is_empty())
        .count();
    let run_mismatches = sh.run_mismatches.load(Ordering::Relaxed);
    let line = json_line(
        "BLKSTRESS",
        &RunResult {
            seed: a.seed,
            seconds: secs,
            threads: a.threads,
            blocks: a.blocks,
            written_blocks: written,
            max_inflight: sh.max_inflight.load(Ordering::Relaxed),
            done: counts(&sh.done),
            errors: counts(&sh.errors),
            first_error: lock(&sh.first_error).clone(),
            run_mismatches,
            first_run_mismatches: lock(&sh.first_mismatches).clone(),
            verify: &v,
        },
    )?;
    let status = if run_mismatches > 0 || v.mismatches > 0 {
        1
    } else {
        0
    };
    if let Some(path) = &a.state {
        write_state(path, a.seed, &states, line.strip_prefix("BLKSTRESS "))?;
    }
    Ok((line, status))
}

fn write_state(
    path: &str,
    seed: u64,
    states: &[BlockState],
    result: Option<&str>,
) -> Result<(), String> {
    let text = format_state(seed, states, result);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("open state {path}: {e}"))?;
    // Whole sectors (a block device takes any length through the page cache, but be plain).
    let mut bytes = text.into_bytes();
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("write state {path}: {e}"))?;
    println!("BLKSTRESS-STATE written to {path} ({} bytes)", bytes.len());
    Ok(())
}

/// `verify-image IMAGE STATE`: the result line and whether it passed.
fn verify_image(image: &str, state: &str) -> Result<(String, bool), String> {
    let mut text = Vec::new();
    File::open(state)
        .and_then(|mut f| f.read_to_end(&mut text))
        .map_err(|e| format!("read state {state}: {e}"))?;
    let (seed, states) = parse_state(&text).map_err(|e| format!("{state}: {e}"))?;
    let f = File::open(image).map_err(|e| format!("open {image}: {e}"))?;
    let v = verify_blocks(&f, seed, &states, true, &AtomicU64::new(0));
    let ok = v.mismatches == 0 && v.read_errors == 0;
    Ok((json_line("BLKSTRESS-IMAGE", &v)?, ok))
}

/// `mute-listener PATH`: accepts every connection and never answers.
fn mute_listener(path: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let l =
        std::os::unix::net::UnixListener::bind(path).map_err(|e| format!("bind {path}: {e}"))?;
    println!("BLKSTRESS-MUTE listening on {path}");
    let mut held = Vec::new();
    for (n, c) in l.incoming().enumerate() {
        match c {
            Ok(c) => {
                println!(
                    "BLKSTRESS-MUTE connection {} accepted, not answering",
                    n + 1
                );
                held.push(c);
            }
            Err(e) => return Err(format!("accept on {path}: {e}")),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => parse_run(&args[1..]).and_then(|a| run(&a)),
        Some("verify-image") => match &args[1..] {
            [image, state] => verify_image(image, state).map(|(l, ok)| (l, u8::from(!ok))),
            _ => Err(USAGE.into()),
        },
        Some("result") => match &args[1..] {
            [state] => std::fs::read(state)
                .map_err(|e| format!("read state {state}: {e}"))
                .and_then(|t| state_result(&t).ok_or(format!("{state}: no RESULT line")))
                .map(|r| (format!("BLKSTRESS {r}"), 0)),
            _ => Err(USAGE.into()),
        },
        Some("mute-listener") => match &args[1..] {
            [path] => mute_listener(path).map(|()| (String::new(), 0)),
            _ => Err(USAGE.into()),
        },
        _ => Err(USAGE.into()),
    };
    match result {
        Ok((line, status)) => {
            println!("{line}");
            let _ = std::io::stdout().flush();
            ExitCode::from(status)
        }
        Err(e) => {
            println!("BLKSTRESS-ERROR {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The result line is JSON whatever the error texts hold, in the compact layout the lab
    /// script's `json_num` and `grep '"errors":{"write":0,"read":0,"flush":0}'` read.
    #[test]
    fn result_lines_are_json() {
        let v = VerifyReport {
            checked: 4,
            first_read_error: Some("read of block 1: \"Input/output\" \\ error\n".into()),
            by_kind: [("stale", 2)].into_iter().collect(),
            first: vec!["block=3 stale (gen 1) want gen 2".into()],
            ..VerifyReport::default()
        };
        let zero = OpCounts {
            write: 0,
            read: 0,
            flush: 0,
        };
        let r = RunResult {
            seed: 7,
            seconds: 20.04,
            threads: 16,
            blocks: 2048,
            written_blocks: 100,
            max_inflight: 16,
            done: OpCounts {
                write: 5,
                read: 3,
                flush: 1,
            },
            errors: zero,
            first_error: Some("write of block 9 at 1.0 s: \"quoted\"".into()),
            run_mismatches: 0,
            first_run_mismatches: vec![],
            verify: &v,
        };
        let line = json_line("BLKSTRESS", &r).unwrap();
        let body = line.strip_prefix("BLKSTRESS ").unwrap();
        let j: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(j["first_error"], "write of block 9 at 1.0 s: \"quoted\"");
        assert_eq!(
            j["verify"]["first_read_error"],
            *v.first_read_error.as_ref().unwrap()
        );
        assert_eq!(j["verify"]["mismatch_kinds"]["stale"], 2);
        assert!(
            body.starts_with("{\"seed\":7,\"seconds\":20.0,\"threads\":16,"),
            "{body}"
        );
        assert!(
            body.contains("\"errors\":{\"write\":0,\"read\":0,\"flush\":0}"),
            "{body}"
        );
        assert!(body.contains("\"run_mismatches\":0,"), "{body}");
        let hung = json_line(
            "BLKSTRESS",
            &VerifyHung {
                hung: 1,
                first_hung: "verify read of block 5".into(),
            },
        )
        .unwrap();
        assert_eq!(
            hung,
            "BLKSTRESS {\"hung\":1,\"first_hung\":\"verify read of block 5\"}"
        );
        assert_eq!(r.done.to_string(), "{write:5,read:3,flush:1}");
    }

    fn temp_image(name: &str, blocks: u64) -> String {
        let dir = std::env::temp_dir().join(format!("blkstress-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        let f = File::create(&p).unwrap();
        f.set_len(blocks * BLOCK as u64).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn args(device: &str, blocks: u64, threads: usize, state: Option<String>) -> RunArgs {
        // O_DIRECT where the file system has it (not tmpfs).
        let direct = open(device, true).is_ok();
        RunArgs {
            device: device.to_string(),
            blocks,
            threads,
            seconds: 1,
            seed: 77,
            state,
            direct,
        }
    }

    fn field(line: &str, key: &str) -> u64 {
        let at = line
            .find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("{key} in {line}"));
        line[at + key.len() + 3..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    }

    #[test]
    fn stamps_tell_every_kind_of_wrong_block() {
        let mut a = vec![0u8; BLOCK];
        assert_eq!(classify(&a, 3, 9), Found::Zero);
        stamp(&mut a, 3, 41, 9);
        assert_eq!(classify(&a, 3, 9), Found::Gen(41));
        assert_eq!(classify(&a, 4, 9), Found::Misplaced { block: 3, gen: 41 });
        assert_eq!(classify(&a, 3, 8), Found::OtherRun { seed: 9 });
        let mut torn = a.clone();
        torn[2048..].copy_from_slice(&vec![0u8; 2048]);
        assert_eq!(classify(&torn, 3, 9), Found::Torn);
        let mut b = vec![0u8; BLOCK];
        stamp(&mut b, 3, 42, 9);
        assert_ne!(a, b, "generations differ in more than the header");
        assert_ne!(a[100..200], b[100..200]);
        a[..8].copy_from_slice(b"garbage!");
        assert_eq!(classify(&a, 3, 9), Found::Garbage);

        let st = BlockState {
            committed: 42,
            failed: vec![],
        };
        assert_eq!(judge(Found::Gen(42), &st), Verdict::Ok);
        assert_eq!(judge(Found::Gen(41), &st), Verdict::Bad(Found::Gen(41)));
        assert_eq!(kind(Found::Gen(41), &st), "stale");
        assert_eq!(judge(Found::Zero, &st), Verdict::Bad(Found::Zero));
        let st = BlockState {
            committed: 42,
            failed: vec![50, 51],
        };
        assert_eq!(judge(Found::Gen(42), &st), Verdict::OldAfterError);
        assert_eq!(judge(Found::Gen(51), &st), Verdict::NewAfterError);
        assert!(matches!(judge(Found::Gen(49), &st), Verdict::Bad(_)));
        let never = BlockState::default();
        assert_eq!(judge(Found::Zero, &never), Verdict::Ok);
        assert!(matches!(judge(Found::Gen(1), &never), Verdict::Bad(_)));
        let only_failed = BlockState {
            committed: 0,
            failed: vec![7],
        };
        assert_eq!(judge(Found::Zero, &only_failed), Verdict::OldAfterError);
        assert_eq!(judge(Found::Gen(7), &only_failed), Verdict::NewAfterError);
        assert!(describe(
            5,
            Found::Gen(41),
            &BlockState {
                committed: 42,
                failed: vec![]
            }
        )
        .contains("block=5 stale (gen 41) want gen 42"));
    }

    #[test]
    fn state_round_trips_and_stops_at_end() {
        let states = vec![
            BlockState::default(),
            BlockState {
                committed: 12,
                failed: vec![],
            },
            BlockState {
                committed: 0,
                failed: vec![3, 4],
            },
            BlockState {
                committed: 9,
                failed: vec![10],
            },
        ];
        let mut text = format_state(5, &states, Some("{\"x\":1}")).into_bytes();
        text.extend_from_slice(b"\0\0\0 anything after END\n");
        assert_eq!(parse_state(&text).unwrap(), (5, states.clone()));
        assert_eq!(state_result(&text).as_deref(), Some("{\"x\":1}"));
        assert_eq!(
            state_result(format_state(5, &states, None).as_bytes()),
            None
        );
        let cut = format_state(5, &states, None);
        assert!(parse_state(&cut.as_bytes()[..cut.len() - 4])
            .unwrap_err()
            .contains("no END"));
        assert!(parse_state(b"x\nEND\n")
            .unwrap_err()
            .contains("not a blkstress state"));
        assert!(
            parse_state(b"BLKSTRESS-STATE 1 seed=1 blocks=2\n7 1\nEND\n")
                .unwrap_err()
                .contains("bad state line")
        );
    }

    #[test]
    fn a_run_on_a_file_verifies_and_the_image_check_finds_damage() {
        let img = temp_image("run", 64);
        let state = format!("{img}.state");
        let a = args(&img, 64, 8, Some(state.clone()));
        let (line, status) = run(&a).unwrap();
        assert_eq!(status, 0, "{line}");
        assert!(
            field(&line, "write") > 0 && field(&line, "read") > 0,
            "{line}"
        );
        assert_eq!(field(&line, "mismatches"), 0, "{line}");
        assert!(field(&line, "max_inflight") >= 1, "{line}");
        let (line, ok) = verify_image(&img, &state).unwrap();
        assert!(ok, "{line}");
        assert_eq!(field(&line, "checked"), 64);
        let kept = state_result(&std::fs::read(&state).unwrap()).unwrap();
        assert_eq!(field(&kept, "mismatches"), 0, "{kept}");
        assert!(field(&kept, "write") > 0, "{kept}");

        let (seed, states) = parse_state(&std::fs::read(&state).unwrap()).unwrap();
        let written: Vec<usize> = (0..64).filter(|b| states[*b].committed > 1).collect();
        assert!(written.len() >= 3, "{states:?}");
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        let mut buf = vec![0u8; BLOCK];
        // A stale block (an older generation: a lost write).
        let (b0, b1, b2) = (written[0] as u64, written[1] as u64, written[2] as u64);
        stamp(&mut buf, b0, states[b0 as usize].committed - 1, seed);
        f.write_all_at(&buf, b0 * BLOCK as u64).unwrap();
        // A misplaced block (another block's stamp).
        stamp(&mut buf, b2, states[b2 as usize].committed, seed);
        f.write_all_at(&buf, b1 * BLOCK as u64).unwrap();
        // A torn one.
        f.write_all_at(&[0xa5; 512], b2 * BLOCK as u64 + 1024)
            .unwrap();
        let (line, ok) = verify_image(&img, &state).unwrap();
        assert!(!ok, "{line}");
        assert_eq!(field(&line, "mismatches"), 3, "{line}");
        assert!(
            line.contains("\"stale\":1")
                && line.contains("\"misplaced\":1")
                && line.contains("\"torn\":1"),
            "{line}"
        );
        assert!(line.contains(&format!("block={b0} stale")), "{line}");

        // The run's own verify pass sees damage too: a state whose committed generation is
        // not on the disk.
        let mut st = states.clone();
        st[b0 as usize].committed += 1000;
        let file = File::open(&img).unwrap();
        let v = verify_blocks(&file, seed, &st, false, &AtomicU64::new(0));
        assert_eq!(v.mismatches, 3, "{v:?}");
        let _ = std::fs::remove_dir_all(std::path::Path::new(&img).parent().unwrap());
    }

    #[test]
    fn failed_writes_accept_old_or_new() {
        let img = temp_image("failed", 4);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut buf = vec![0u8; BLOCK];
        stamp(&mut buf, 0, 5, 1);
        f.write_all_at(&buf, 0).unwrap();
        stamp(&mut buf, 1, 8, 1);
        f.write_all_at(&buf, BLOCK as u64).unwrap();
        let states = vec![
            BlockState {
                committed: 5,
                failed: vec![6],
            },
            BlockState {
                committed: 7,
                failed: vec![8],
            },
            BlockState::default(),
            BlockState::default(),
        ];
        let v = verify_blocks(&f, 1, &states, false, &AtomicU64::new(0));
        assert_eq!(
            (v.ok, v.old_after_error, v.new_after_error, v.mismatches),
            (2, 1, 1, 0)
        );
        let _ = std::fs::remove_dir_all(std::path::Path::new(&img).parent().unwrap());
    }

    #[test]
    fn the_mute_listener_accepts_and_never_answers() {
        use std::io::Read as _;
        let dir = std::env::temp_dir().join(format!("blkstress-{}-mute", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock").to_string_lossy().into_owned();
        let p = path.clone();
        thread::spawn(move || mute_listener(&p));
        let give_up = Instant::now() + Duration::from_secs(5);
        let mut c = loop {
            match std::os::unix::net::UnixStream::connect(&path) {
                Ok(c) => break c,
                Err(e) if Instant::now() > give_up => panic!("connect {path}: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        // A vhost-user GET_FEATURES header: no answer comes, and the connection stays open.
        c.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        let e = c.read(&mut b).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn arguments() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let a = parse_run(&s(&[
            "/dev/vdb",
            "--threads",
            "4",
            "--blocks",
            "8",
            "--seconds",
            "3",
            "--seed",
            "5",
            "--state",
            "/dev/vdc",
        ]))
        .unwrap();
        assert_eq!(
            (a.device.as_str(), a.threads, a.blocks, a.seconds, a.seed),
            ("/dev/vdb", 4, 8, 3, 5)
        );
        assert_eq!(a.state.as_deref(), Some("/dev/vdc"));
        assert!(a.direct);
        assert!(parse_run(&s(&["/dev/x", "--threads", "9", "--blocks", "8"])).is_err());
        assert!(parse_run(&s(&["/dev/x", "--bogus"])).is_err());
        assert!(parse_run(&s(&[])).is_err());
        assert_ne!(parse_run(&s(&["/dev/x"])).unwrap().seed, 0);
    }
}
