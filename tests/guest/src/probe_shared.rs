//! Definitions the probe guest and the host (`tests::probe`) must agree on, in one file that
//! both compile (`core` only): the disk stamp format, the random block sequence and the
//! percentile rule.
//!
//! # Stamp format
//! Every 512-byte sector of a stamped image holds 64 little-endian u64 words:
//! - word 0: [`STAMP_MAGIC`] (`"PRBSTMP1"`),
//! - word 1: the image seed,
//! - word 2: the sector number (LBA in 512-byte sectors),
//! - words 3..64: `fill + i * GOLDEN` (wrapping), where `i` is the word index and
//!   `fill = mix64(seed ^ sector * GOLDEN2)`.
//!
//! So a sector read from the wrong place, from an image of another seed, or torn, does not
//! verify. A probe write writes exactly the stamp of its block: the image stays verifiable.
//!
//! # Percentiles
//! Nearest rank: for `n` samples sorted ascending and `p` in per-mille (0 < p <= 1000), the
//! percentile is the sample of rank `ceil(p * n / 1000)` (1-based), i.e. the smallest sample
//! such that at least `p`/1000 of all samples are less than or equal to it. `p = 0` gives the
//! minimum. No interpolation.

#![allow(dead_code)]

/// Word 0 of every stamped sector: `"PRBSTMP1"` read as a little-endian u64.
pub const STAMP_MAGIC: u64 = u64::from_le_bytes(*b"PRBSTMP1");
pub const SECTOR_SIZE: usize = 512;
pub const WORDS_PER_SECTOR: usize = SECTOR_SIZE / 8;
/// Size of one probe I/O.
pub const BLOCK_SIZE: usize = 4096;
pub const SECTORS_PER_BLOCK: u64 = (BLOCK_SIZE / SECTOR_SIZE) as u64;

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
const GOLDEN2: u64 = 0xc2b2_ae3d_27d4_eb4f;

/// The splitmix64 finalizer.
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `i` (0..64) of the stamp of `sector` in an image of `seed`.
#[inline(always)]
pub fn stamp_word(seed: u64, sector: u64, fill: u64, i: usize) -> u64 {
    match i {
        0 => STAMP_MAGIC,
        1 => seed,
        2 => sector,
        _ => fill.wrapping_add((i as u64).wrapping_mul(GOLDEN)),
    }
}

/// The fill base of `sector` (see the module doc).
#[inline(always)]
pub fn stamp_fill(seed: u64, sector: u64) -> u64 {
    mix64(seed ^ sector.wrapping_mul(GOLDEN2))
}

/// Writes the stamp of `sector` into `words` (one sector: 64 words).
pub fn stamp_sector(words: &mut [u64; WORDS_PER_SECTOR], seed: u64, sector: u64) {
    let fill = stamp_fill(seed, sector);
    for (i, w) in words.iter_mut().enumerate() {
        *w = stamp_word(seed, sector, fill, i).to_le();
    }
}

/// Whether `words` is the stamp of `sector`.
pub fn sector_matches(words: &[u64; WORDS_PER_SECTOR], seed: u64, sector: u64) -> bool {
    let fill = stamp_fill(seed, sector);
    let mut diff = 0u64;
    for (i, &w) in words.iter().enumerate() {
        diff |= u64::from_le(w) ^ stamp_word(seed, sector, fill, i);
    }
    diff == 0
}

/// xorshift64* : the random block sequence of a run. A zero seed is replaced by a constant
/// (xorshift has a fixed point at 0).
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 { GOLDEN } else { seed })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n > 0`; the modulo bias is irrelevant for `n` far below 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The percentile ranks every probe result reports, in per-mille: p50, p90, p99, p99.9.
pub const PERCENTILES_PER_MILLE: [u32; 4] = [500, 900, 990, 999];

/// Nearest-rank percentile of `sorted` (ascending) for `per_mille` in 0..=1000 (see the module
/// doc). `None` for no samples or `per_mille > 1000`.
pub fn percentile(sorted: &[u64], per_mille: u32) -> Option<u64> {
    if sorted.is_empty() || per_mille > 1000 {
        return None;
    }
    let n = sorted.len() as u64;
    let rank = (u64::from(per_mille) * n).div_ceil(1000).max(1);
    sorted.get((rank - 1) as usize).copied()
}
